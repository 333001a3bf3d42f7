"""`python -m jax_sft.train --dry_run` on every SFT config of today's NeMo RL, and input errors as
one-line messages with exit code 2 (no traceback)."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tiny_run import write_model_config

from jax_sft.config import IgnoredKeysWarning
from jax_sft.train import main

ROOT = Path(__file__).resolve().parents[1]
NEMO_CONFIGS = ROOT.parent / "shared" / "reference" / "nemo-rl-configs" / "examples" / "configs"
CONFIGS = sorted(NEMO_CONFIGS.glob("*.yaml")) + sorted(NEMO_CONFIGS.glob("recipes/llm/*.yaml"))
# What a config may not do here, as the one error line must say it.
VISION = {"sft_vlm_3B.yaml": "vision-language", "sft_avlm.yaml": "vision-language"}
# The LoRA recipes' plan line (their models are hub ids, so no parameter counts).
LORA = {
    "sft-llama3.1-8b-1n8g-fsdp2tp1-lora.yaml": (
        "LoRA (policy.dtensor_cfg.lora_cfg, hf module names): rank 128, alpha 128, scale 1, "
        "every linear layer (match_all_linear)"
    ),
    "sft-llama3.1-8b-1n8g-megatron-lora.yaml": (
        "LoRA (policy.megatron_cfg.peft, megatron module names): rank 128, alpha 128, scale 1, "
        "targets linear_qkv, linear_proj, linear_fc1, linear_fc2 (no target_modules);"
    ),
    **dict.fromkeys(
        ("sft-nanov3-30BA3B-2n4g-fsdp2-lora.yaml", "sft-nanov3-30BA3B-2n8g-fsdp2-lora.yaml"),
        "LoRA (policy.dtensor_cfg.lora_cfg, hf module names): rank 256, alpha 512, scale 2, "
        "every linear layer, lm_head included (exclude_modules without target_modules) minus "
        "['*out_proj*'];",
    ),
}


def dry_run(args, capsys) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        try:
            main([*args, "--dry_run"])
            code = 0
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def nemo_rl_checkout(tmp_path, monkeypatch):
    """A working directory shaped like a NeMo RL checkout: the recipes' relative prompt file."""
    (tmp_path / "examples" / "prompts").mkdir(parents=True)
    (tmp_path / "examples" / "prompts" / "math.txt").write_text("Solve step by step.\n\n{}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")  # NeMo RL's configs enable W&B; no login here
    return tmp_path


@pytest.mark.skipif(not CONFIGS, reason="../shared/reference/nemo-rl-configs is absent")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dry_run_of_every_nemo_rl_sft_config(path, nemo_rl_checkout, capsys):
    code, out, err = dry_run(["--config", str(path)], capsys)
    if path.name in VISION:
        assert code == 2 and out == "", (out, err)
        (line,) = err.strip().splitlines()  # one line, no traceback
        assert line.startswith("error: ") and VISION[path.name] in line, line
        return
    assert code == 0, err
    assert "dry run: the config is valid" in out
    plan = out[out.index("\nplan:\n") :]
    for part in ("mesh: data=", "batches: ", "model: ", "data: ", "optimizer: ", "learning rate: "):
        assert f"\n  {part}" in plan, plan
    assert ("\n  LoRA " in plan) == (path.name in LORA), plan
    if path.name in LORA:
        assert f"\n  {LORA[path.name]}" in plan, plan


@pytest.mark.skipif(not CONFIGS, reason="../shared/reference/nemo-rl-configs is absent")
def test_dry_run_names_a_missing_prompt_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no examples/prompts/math.txt here
    code, out, err = dry_run(["--config", str(NEMO_CONFIGS / "sft_openmathinstruct2.yaml")], capsys)
    assert code == 2 and "examples/prompts/math.txt" in err and "Traceback" not in err


@pytest.mark.skipif(not CONFIGS, reason="../shared/reference/nemo-rl-configs is absent")
def test_relative_prompt_files_are_found_in_the_checkout_of_the_config(tmp_path, monkeypatch, capsys, caplog):
    """A recipe run from outside its NeMo RL checkout: examples/prompts/math.txt is taken from the
    checkout that holds the config (logged); missing there too, the error names both places."""
    checkout = tmp_path / "RL"
    shutil.copytree(NEMO_CONFIGS, checkout / "examples" / "configs")
    (checkout / "examples" / "prompts").mkdir()
    (checkout / "examples" / "prompts" / "math.txt").write_text("Solve: {}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = ["--config", str(checkout / "examples" / "configs" / "sft_openmathinstruct2.yaml")]
    with caplog.at_level("WARNING"):
        code, out, err = dry_run(config, capsys)
    used = checkout / "examples" / "prompts" / "math.txt"
    assert code == 0, err
    assert f"prompt_file {used}" in out
    assert any(f"not in the working folder; using {used}" in r.getMessage() for r in caplog.records)
    used.unlink()
    code, out, err = dry_run(config, capsys)
    assert code == 2 and "Traceback" not in err
    assert str(elsewhere / "examples" / "prompts" / "math.txt") in err and str(used) in err, err


def test_dry_run_prints_the_proportions_of_a_weighted_mixture(tmp_path, capsys):
    train = tmp_path / "a.jsonl"
    train.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    sections = [
        {"dataset_name": "openai_format", "data_path": str(train), "weight": 3},
        {"dataset_name": "openai_format", "data_path": str(train), "weight": 1},
    ]
    args = ["--config", str(ROOT / "configs" / "sft.py"), f"data.train={json.dumps(sections)}", "data.validation=null"]
    code, out, err = dry_run([*args, "sft.val_period=0", "data.mixture_by=tokens"], capsys)
    assert code == 0, err
    assert "  data: mixture by tokens: train[0] 75.00%, train[1] 25.00% of the tokens" in out
    sections[1].pop("weight")
    code, out, err = dry_run([*args[:2], f"data.train={json.dumps(sections)}", "data.validation=null"], capsys)
    assert (
        code == 2 and "data.train[1]: no weight; when one data.train entry has a weight, every entry needs one" in err
    )


def test_dry_run_checks_the_mesh_and_reads_a_local_model(tmp_path, capsys):
    sft = str(ROOT / "configs" / "sft.py")
    code, out, err = dry_run(["--config", sft, "cluster.gpus_per_node=8", "policy.jax_cfg.mesh.tensor=3"], capsys)
    assert code == 2
    assert "policy.jax_cfg.mesh data=1 x tensor=3 = 3 does not divide the 8 devices" in err
    model = write_model_config(tmp_path / "model")
    args = [
        "--config",
        sft,
        f"policy.model_name={model}",
        "cluster.gpus_per_node=8",
        "policy.jax_cfg.mesh.tensor=2",
        f"checkpointing.checkpoint_dir={tmp_path}/ckpt",
        f"logger.log_dir={tmp_path}/logs",
    ]
    code, out, err = dry_run([*args, "policy.max_total_sequence_length=512"], capsys)
    assert code == 2 and "exceeds the model's max_position_embeddings=256" in err
    code, out, err = dry_run([*args, "policy.max_total_sequence_length=256"], capsys)
    assert code == 0, err
    assert "  mesh: data=1 x fsdp=4 x expert=1 x tensor=2 over 8 devices" in out
    assert f"  model: LlamaForCausalLM (llama family) from {model}: 2 layers, hidden 64, 4 heads (2 kv)" in out


def test_input_errors_print_one_message_and_exit_2_without_traceback(tmp_path):
    """A real process: bad config key, missing config file, bad flag."""
    cases = [
        (
            ["--config", "configs/sft.py", "policy.train_micro_batch_szie=2"],
            "did you mean policy.train_micro_batch_size?",
        ),
        (["--config", str(tmp_path / "absent.yaml")], "no such file"),
        (["--config", "configs/sft.py", "--num_processes=zero"], "--num_processes=zero"),
    ]
    for args, expected in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "jax_sft.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_bad_data_and_bad_weights_print_one_message_and_exit_2(tmp_path):
    """The input errors of a real start-up: a malformed data line (file and 1-based line), a
    model folder whose weights are not safetensors (the file), a missing model folder."""
    from tiny_run import make_tiny_run_assets

    assets = make_tiny_run_assets(tmp_path / "assets")
    bad_data = tmp_path / "bad.jsonl"
    lines = (assets / "data" / "train.jsonl").read_text().splitlines()
    bad_data.write_text("\n".join([*lines[:2], '{"messages": [', *lines[2:40]]) + "\n")
    bad_model = tmp_path / "bad_model"
    shutil.copytree(assets / "model", bad_model)
    for weights in bad_model.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    run = [
        "--config",
        "configs/sft.py",
        "data.dataset_name=openai_format",
        "policy.tokenizer.chat_template=default",
        f"logger.log_dir={tmp_path}/logs",
        f"checkpointing.checkpoint_dir={tmp_path}/ckpt",
        "policy.max_total_sequence_length=96",
        "policy.train_global_batch_size=4",
        "sft.val_global_batch_size=4",
        "sft.max_num_steps=1",
        f"data.val_data_path={assets / 'data' / 'val.jsonl'}",
    ]
    train = f"data.train_data_path={assets / 'data' / 'train.jsonl'}"
    cases = [
        ([f"policy.model_name={assets / 'model'}", f"data.train_data_path={bad_data}"], f"{bad_data}:3"),
        ([f"policy.model_name={bad_model}", train], "model.safetensors"),
        ([f"policy.model_name={tmp_path / 'absent'}", train], str(tmp_path / "absent")),
    ]
    for extra, expected in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "jax_sft.train", *run, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
