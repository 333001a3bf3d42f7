"""Generation with a KV cache: greedy parity with transformers' generate, sampling, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import FAMILIES, make_hf_model

from jax_sft.generate import Generator, Sampling, bucket, sample_next
from jax_sft.models import from_pretrained, sharding

EOS = 2
PROMPT_LENGTHS = (3, 9, 17)  # different lengths in one batch; 17 > 16 gives a second bucket


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(model, prompt, max_new):
    """transformers' greedy generate on one unpadded prompt: the new ids, up to and with eos."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new, eos_token_id=EOS, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_transformers_generate(family, tmp_path):
    hf = make_hf_model(family, tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32, param_dtype=jnp.float32, attention="xla")
    max_new = 16  # with prompts of 3..17: past the 5-token windows of qwen2 / mistral / gpt-oss
    gen = Generator(model, None, batch_size=4, stop_ids=[EOS])
    got = gen.generate(prompts(), Sampling(max_new_tokens=max_new))
    want = [hf_greedy(hf, p, max_new) for p in prompts()]
    assert got == want


def test_sharded_and_scanned_greedy_equal_transformers(tmp_path):
    """fsdp x tensor sharding and stacked (scanned) layers with caches give the same tokens."""
    hf = make_hf_model("qwen3", tmp_path)  # q/k norms, biases, GQA heads split over "tensor"
    want = [hf_greedy(hf, p, 10) for p in prompts(1)]
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    for scan in (False, True):
        model = from_pretrained(
            tmp_path, dtype=jnp.float32, param_dtype=jnp.float32, attention="xla", mesh=mesh, scan_layers=scan
        )
        got = Generator(model, None, mesh=mesh, batch_size=3, stop_ids=[EOS]).generate(
            prompts(1), Sampling(max_new_tokens=10)
        )
        assert got == want, scan


def test_stops_at_stop_id_and_fills_nothing_after(tmp_path):
    make_hf_model("llama", tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32, param_dtype=jnp.float32)
    free = Generator(model, None, stop_ids=[]).generate(prompts(), Sampling(max_new_tokens=8))
    stop = free[1][3]  # the 4th token of the second prompt's free run becomes a stop id
    got = Generator(model, None, stop_ids=[stop]).generate(prompts(), Sampling(max_new_tokens=8))
    for f, g in zip(free, got):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert g == f[:cut]
    assert len(got[1]) <= 4


def test_bucket_lengths():
    assert [bucket(n) for n in (1, 16, 17, 32, 33, 100)] == [16, 16, 32, 32, 64, 128]


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    key = jax.random.key(0)
    assert set(np.asarray(sample_next(logits, key, Sampling(temperature=0.0))).tolist()) == {0}
    top_k = np.asarray(sample_next(logits, key, Sampling(temperature=1.0, top_k=2)))
    assert set(top_k.tolist()) == {0, 1}
    # top_p 0.7: the smallest set with mass >= 0.7 is {0, 1}; 0.85 adds token 2.
    assert set(np.asarray(sample_next(logits, key, Sampling(temperature=1.0, top_p=0.7))).tolist()) == {0, 1}
    full = np.asarray(sample_next(logits, key, Sampling(temperature=1.0)))
    freq = np.bincount(full, minlength=4) / len(full)
    # 4000 draws: binomial standard deviation of a frequency <= 0.008; 5 sigma.
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_sampling_options_checked():
    with pytest.raises(ValueError, match="--top_p"):
        Sampling(top_p=0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run of the tiny Llama: its step_2 checkpoint, its HF export and the validation jsonl."""
    from pathlib import Path

    from tiny_run import make_tiny_run_assets

    from jax_sft import config as config_lib
    from jax_sft import train

    root = tmp_path_factory.mktemp("run")
    assets = make_tiny_run_assets(root / "assets")
    overrides = {
        "policy.model_name": assets / "model",
        "data.train_data_path": assets / "data" / "train.jsonl",
        "data.val_data_path": assets / "data" / "val.jsonl",
        "checkpointing.checkpoint_dir": root / "ckpt",
        "logger.log_dir": root / "logs",
        "logger.tensorboard_enabled": False,
        "sft.max_num_steps": 2,
        "sft.val_period": 0,
        "sft.val_at_start": False,
        "sft.val_at_end": False,
        "policy.train_global_batch_size": 8,
        "policy.train_micro_batch_size": 8,
        "policy.max_total_sequence_length": 64,
        "policy.jax_cfg.loss_chunk_size": 64,
        "checkpointing.hf_export_dir": root / "export",
        "policy.scheduler": "null",
    }
    cfg = config_lib.load_config(
        str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"),
        [f"{k}={v}" for k, v in overrides.items()],
    )
    train.run(cfg)
    return root / "ckpt" / "step_2", root / "export", assets / "data" / "val.jsonl"


def test_cli_checkpoint_and_export_give_the_same_completions(trained, tmp_path, capsys):
    from jax_sft.generate import main

    step_dir, export, val = trained
    outs = []
    for i, model in enumerate((step_dir, export)):
        out = tmp_path / f"{i}.jsonl"
        main(
            [
                "--model",
                str(model),
                "--input",
                str(val),
                "--num",
                "3",
                "--output",
                str(out),
                "--max_new_tokens",
                "12",
                "--batch_size",
                "2",
                "--config.policy.precision=float32",
            ]
        )
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 3
    rows = [json.loads(line) for line in val.read_text().splitlines()[:3]]
    for row, got in zip(rows, outs[0]):
        assert got["prompt"] == row["messages"][:-1]
        assert got["reference"] == row["messages"][-1]["content"]
        assert isinstance(got["completion"], str) and "<|eot_id|>" not in got["completion"]


def test_cli_reads_stdin_and_reports_bad_input(trained, tmp_path):
    _, export, _ = trained
    cmd = [
        sys.executable,
        "-m",
        "jax_sft.generate",
        "--model",
        str(export),
        "--max_new_tokens",
        "4",
        "--temperature",
        "0.8",
        "--top_p",
        "0.9",
        "--top_k",
        "20",
    ]
    done = subprocess.run(
        cmd, input="What is 2 plus 3?\nCompute 4 * 5.\n", capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.count("=== sample ") == 2 and "prompt:     Compute 4 * 5." in done.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    done = subprocess.run([*cmd, "--input", str(bad)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and f"error: {bad}:1: expected" in done.stderr


def test_prompt_lengths_in_one_bucket_share_one_compilation(tmp_path):
    from jax_sft.generate import generate_ids

    make_hf_model("qwen3", tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32, param_dtype=jnp.float32)
    gen = Generator(model, None, batch_size=2, stop_ids=[EOS])
    before = generate_ids._cache_size()
    for lengths in ((3, 5), (16, 9), (1, 12)):  # all pad to 16: one shape
        gen.generate([list(range(3, 3 + n)) for n in lengths], Sampling(max_new_tokens=4))
    assert generate_ids._cache_size() == before + 1
    gen.generate([list(range(3, 20))], Sampling(max_new_tokens=4))  # 17 tokens: the 32 bucket
    assert generate_ids._cache_size() == before + 2
