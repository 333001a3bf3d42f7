"""LoRA training end to end on the CPU: only adapters learn, kill -9 and resume, small checkpoints,
every layout (mesh, scan_layers, remat, packing), and refusals to resume onto another base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_train import killed_and_resumed, load
from tiny_run import make_tiny_run_assets

from jax_sft import train
from jax_sft.checkpoint import CheckpointMismatch
from jax_sft.config import make_plan

# Adapters on every projection (not lm_head, so that dropout is allowed), dropout 0.1 before them.
LORA = dict(
    policy__dtensor_cfg__lora_cfg__enabled=True,
    policy__dtensor_cfg__lora_cfg__dim=8,
    policy__dtensor_cfg__lora_cfg__alpha=16,
    policy__dtensor_cfg__lora_cfg__match_all_linear=False,
    policy__dtensor_cfg__lora_cfg__target_modules="['*_proj']",
    policy__dtensor_cfg__lora_cfg__dropout=0.1,
    policy__dtensor_cfg__lora_cfg__dropout_position="pre",
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_tiny_run_assets(tmp_path_factory.mktemp("assets"))


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_lora_run_learns_resumes_after_kill_9_and_saves_small_checkpoints(assets, tmp_path):
    killed_at, second = killed_and_resumed(assets, tmp_path / "killed", **LORA)
    straight = train.run(
        load(
            assets,
            tmp_path / "straight",
            sft__max_num_steps=10,
            sft__val_period=5,
            checkpointing__save_period=2,
            **LORA,
        )
    )
    vals = [straight.val_losses[s] for s in sorted(straight.val_losses)]
    assert vals[-1] < 0.9 * vals[0], vals  # the adapters learn
    print(f"\nLoRA, killed after step_{killed_at}; step  uninterrupted  resumed")
    for s in sorted(second):
        print(f"{s:>4}  {straight.train_losses[s]:.7f}   {second[s]:.7f}")
    # Same dropout masks after resuming (keyed by step and micro-batch).
    np.testing.assert_allclose(
        [second[s] for s in sorted(second)], [straight.train_losses[s] for s in sorted(second)], rtol=1e-6
    )
    step_dir = straight.checkpoint_dir / "step_10"
    reference = json.loads((step_dir / "extra" / "lora.json").read_text())
    assert reference["base"]["model_name"] == str(assets / "model") and reference["lora"]["dim"] == 8

    # A full fine-tune's checkpoint holds every parameter and its two AdamW moments in fp32.
    from jax_sft.models import read_config
    from jax_sft.models.counts import base_param_count

    full_arrays = 3 * 4 * base_param_count(read_config(assets / "model"))
    lora_arrays = tree_bytes(step_dir / "params") + tree_bytes(step_dir / "opt_state")
    print(
        f"checkpoint: LoRA {tree_bytes(step_dir):,} bytes (arrays {lora_arrays:,}); a full fine-tune's "
        f"arrays {full_arrays:,} bytes"
    )
    assert lora_arrays < 0.5 * full_arrays


def test_lora_losses_agree_across_meshes_scan_remat_and_packing(assets, tmp_path):
    common = dict(
        sft__max_num_steps=3,
        sft__val_period=0,
        checkpointing__enabled=False,
        policy__sequence_packing__enabled=True,
        policy__dtensor_cfg__lora_cfg__enabled=True,
        policy__dtensor_cfg__lora_cfg__dim=4,
        policy__dtensor_cfg__lora_cfg__alpha=8,
        policy__dtensor_cfg__lora_cfg__lora_A_init="uniform",
    )
    one = train.run(load(assets, tmp_path / "one", **common))
    eight = train.run(
        load(
            assets,
            tmp_path / "eight",
            cluster__gpus_per_node=8,
            policy__jax_cfg__mesh__fsdp=4,
            policy__jax_cfg__mesh__tensor=2,
            policy__jax_cfg__scan_layers=True,
            policy__jax_cfg__remat="full",
            policy__train_micro_batch_size=2,
            sft__val_micro_batch_size=8,
            **common,
        )
    )
    a = [one.train_losses[s] for s in (1, 2, 3)]
    b = [eight.train_losses[s] for s in (1, 2, 3)]
    print(f"\nLoRA packed losses, 1 device unrolled: {a}\n8 devices (fsdp 4 x tensor 2), scan, remat: {b}")
    assert a[2] < a[0]
    np.testing.assert_allclose(b, a, rtol=1e-5)


def test_resuming_lora_onto_another_base_or_a_full_run_is_refused(assets, tmp_path, capsys):
    run = tmp_path / "run"
    train.run(load(assets, run, sft__max_num_steps=1, sft__val_period=0, **LORA))
    other = tmp_path / "other_model"
    shutil.copytree(assets / "model", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    # Named before any data work (the fields that differ), as for a full fine-tune.
    with pytest.raises(
        CheckpointMismatch, match=r"step_1 was trained with another model.*rms_norm_eps: 1e-05 vs 1e-06"
    ):
        train.run(load(assets, run, sft__max_num_steps=2, sft__val_period=0, policy__model_name=other, **LORA))
    with pytest.raises(CheckpointMismatch, match="holds LoRA adapters but this run trains a full fine-tune"):
        train.run(load(assets, run, sft__max_num_steps=2, sft__val_period=0))
    with pytest.raises(CheckpointMismatch, match="LoRA settings"):
        train.run(
            load(
                assets,
                run,
                sft__max_num_steps=2,
                sft__val_period=0,
                **{**LORA, "policy__dtensor_cfg__lora_cfg__dim": 4},
            )
        )
    # Nor can an export replace the base these adapters need (recorded, or named by --base),
    # although an earlier export's marker is in it, not even with --overwrite.
    from test_nothing_lost import one_error_line, tree_hashes

    from jax_sft.export import main as export_main

    before = tree_hashes(assets / "model", other, run / "ckpt")
    step = str(run / "ckpt" / "step_1")
    for args in (
        ["--out", str(assets / "model")],
        ["--peft_out", str(assets / "model"), "--overwrite"],
        ["--base", str(other), "--out", str(other), "--overwrite"],
    ):
        line = one_error_line(lambda args=args: export_main(["--checkpoint", step, *args]), capsys)
        assert "would replace" in line and "the base model" in line, line
    assert tree_hashes(assets / "model", other, run / "ckpt") == before


def test_lora_run_exports_merged_and_peft_with_the_runs_val_loss(assets, tmp_path):
    """A real LoRA run (adapters on every linear layer, lm_head of the tied model included), its
    end-of-run export and both exports of its checkpoint give the run's validation loss in
    transformers (the PEFT folder through peft.PeftModel)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from hf_models import hf_val_loss as val_loss
    from transformers import AutoModelForCausalLM

    from jax_sft import data as data_lib
    from jax_sft.export import main as export_main

    cfg = load(
        assets,
        tmp_path,
        sft__max_num_steps=4,
        sft__val_at_end=True,
        checkpointing__hf_export_dir=tmp_path / "hf_end",
        policy__optimizer__kwargs__lr=1e-2,
        policy__dtensor_cfg__lora_cfg__enabled=True,
        policy__dtensor_cfg__lora_cfg__dim=4,
        policy__dtensor_cfg__lora_cfg__alpha=8,
    )
    result = train.run(cfg)
    step_dir = tmp_path / "ckpt" / "step_4"
    export_main(
        ["--checkpoint", str(step_dir), "--out", str(tmp_path / "hf_cli"), "--peft_out", str(tmp_path / "adapter")]
    )
    batches = list(data_lib.SFTData(make_plan(cfg, devices=1).data, data_lib.load_tokenizer(cfg)).val_batches())

    load_hf = lambda path: AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()  # noqa: E731
    losses = {folder: val_loss(load_hf(tmp_path / folder), batches) for folder in ("hf_end", "hf_cli")}
    losses["peft"] = val_loss(
        peft.PeftModel.from_pretrained(load_hf(assets / "model"), tmp_path / "adapter").eval(), batches
    )
    base = val_loss(load_hf(assets / "model"), batches)
    print(
        f"\nLoRA run val_loss {result.val_losses[4]:.7f} (base {base:.7f}); in transformers: "
        + ", ".join(f"{k} {v:.7f}" for k, v in losses.items())
    )
    assert abs(result.val_losses[4] - base) > 1e-3 * base  # the adapters changed the model
    for name, loss in losses.items():
        # fp32 forward passes in two frameworks: a few ulps per op over a 2-layer model.
        np.testing.assert_allclose(loss, result.val_losses[4], rtol=1e-5, err_msg=name)
