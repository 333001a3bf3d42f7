"""The trainer end to end on a tiny Llama and the quickstart's synthetic chat data (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jax_sft import config as config_lib
from jax_sft import train
from tiny_run import make_tiny_run_assets

ROOT = Path(__file__).resolve().parents[1]
METRIC_NAMES = (
    "train/loss", "train/mfu", "train/grad_norm", "train/lr", "train/num_unmasked_tokens",
    "train/global_valid_toks", "timing/train/total_step_time", "timing/train/data_processing",
    "timing/train/valid_tokens_per_sec_per_gpu",
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny Llama (tied embeddings) with a BPE tokenizer, and 512/64 arithmetic conversations."""
    return make_tiny_run_assets(tmp_path_factory.mktemp("assets"))


def overrides(assets: Path, run: Path, **extra) -> list[str]:
    base = {
        "policy.model_name": assets / "model",
        "data.train_data_path": assets / "data" / "train.jsonl",
        "data.val_data_path": assets / "data" / "val.jsonl",
        "checkpointing.checkpoint_dir": run / "ckpt",
        "logger.log_dir": run / "logs",
        "logger.tensorboard_enabled": False,
        "sft.max_num_steps": 8,
        "sft.val_period": 4,
        "sft.val_batches": 1,
        "sft.val_global_batch_size": 32,
        "sft.val_micro_batch_size": 32,
        "policy.train_global_batch_size": 16,
        "policy.train_micro_batch_size": 8,
        "policy.max_total_sequence_length": 96,
        "policy.jax_cfg.loss_chunk_size": 32,
        "checkpointing.save_period": 4,
        "checkpointing.hf_export_dir": None,
        "policy.scheduler": None,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def load(assets: Path, run: Path, **extra):
    return config_lib.load_config(str(ROOT / "configs" / "quickstart.py"), overrides(assets, run, **extra))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def test_end_to_end_val_loss_falls_and_metrics_are_written(assets, tmp_path, monkeypatch):
    # A made-up peak for the CPU, so that the MFU path runs here as it does on a GPU.
    monkeypatch.setattr("jax_sft.metrics.peak_flops_per_device", lambda device, precision: 1e12)
    result = train.run(load(assets, tmp_path, sft__max_num_steps=12, sft__val_period=6,
                            logger__tensorboard_enabled=True))
    vals = [result.val_losses[s] for s in sorted(result.val_losses)]
    assert sorted(result.val_losses) == [0, 6, 12]
    assert vals[-1] < 0.7 * vals[0], vals
    rows = read_metrics(result.run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for name in METRIC_NAMES:
        assert all(np.isfinite(r[name]) for r in train_rows), name
    assert [r["step"] for r in rows if "validation/val_loss" in r] == [0, 6, 12]
    assert list(result.run_dir.glob("**/events.out.tfevents.*"))
    assert (result.run_dir / "config.yaml").is_file()
    # Compiled once: one executable per jitted function, however many steps ran.
    assert result.compilations == {"init_accumulator": 1, "micro_step": 1, "apply": 1, "eval_step": 1}


def test_step0_val_loss_equals_hf_torch_masked_nll(assets, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from jax_sft import data as data_lib

    cfg = load(assets, tmp_path, sft__max_num_steps=0, checkpointing__enabled=False)
    result = train.run(cfg)
    hf = AutoModelForCausalLM.from_pretrained(assets / "model", torch_dtype=torch.float32).eval()
    tokenizer = data_lib.load_tokenizer(cfg)
    nll, count = 0.0, 0.0
    for mb in data_lib.SFTData(cfg, tokenizer, dp_size=1).val_batches():
        ids = torch.tensor(mb["input_ids"], dtype=torch.long)
        with torch.no_grad():
            logits = hf(ids, position_ids=torch.tensor(mb["positions"], dtype=torch.long)).logits
        logp = torch.log_softmax(logits.double(), -1)
        tok = logp.gather(-1, torch.tensor(mb["targets"], dtype=torch.long)[..., None])[..., 0]
        mask = torch.tensor(mb["loss_mask"], dtype=torch.float64)
        nll += float(-(tok * mask).sum())
        count += float(mask.sum())
    assert count > 0
    np.testing.assert_allclose(result.val_losses[0], nll / count, rtol=2e-6)


def test_sharded_8_devices_matches_single_device(assets, tmp_path):
    single = train.run(load(assets, tmp_path / "one", sft__max_num_steps=5, checkpointing__enabled=False))
    sharded = train.run(load(
        assets, tmp_path / "eight", sft__max_num_steps=5, checkpointing__enabled=False,
        cluster__gpus_per_node=8, policy__jax_cfg__mesh__fsdp=4, policy__jax_cfg__mesh__tensor=2,
        policy__train_micro_batch_size=2, sft__val_micro_batch_size=8,
    ))
    one = [single.train_losses[s] for s in range(1, 6)]
    eight = [sharded.train_losses[s] for s in range(1, 6)]
    print("\nstep  1 device      8 devices (fsdp 4 x tensor 2)")
    for s, (a, b) in enumerate(zip(one, eight), 1):
        print(f"{s:>4}  {a:.7f}   {b:.7f}")
    np.testing.assert_allclose(eight, one, rtol=1e-5)


def test_resume_after_kill_9_reproduces_uninterrupted_losses(assets, tmp_path):
    args = overrides(assets, tmp_path / "killed", sft__max_num_steps=10, sft__val_period=5,
                     checkpointing__save_period=2)
    cmd = [sys.executable, "-m", "jax_sft.train", "--config", str(ROOT / "configs" / "quickstart.py"), *args]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "ckpt"
    deadline = time.time() + 180
    while not (ckpt / "step_4").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.split("_")[1]) for p in ckpt.glob("step_*") if p.name[5:].isdigit())
    assert 4 <= killed_at < 10
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt / f'step_{killed_at}'}" in resumed.stdout + resumed.stderr

    straight = train.run(load(assets, tmp_path / "straight", sft__max_num_steps=10, sft__val_period=5,
                              checkpointing__save_period=2))
    logs = sorted((tmp_path / "killed" / "logs").glob("exp_*"))
    second = {r["step"]: r["train/loss"] for r in read_metrics(logs[-1]) if "train/loss" in r}
    assert sorted(second) == list(range(killed_at + 1, 11))
    print(f"\nkilled after step_{killed_at}; step  uninterrupted  resumed")
    for s in sorted(second):
        print(f"{s:>4}  {straight.train_losses[s]:.7f}   {second[s]:.7f}")
    np.testing.assert_allclose([second[s] for s in sorted(second)],
                               [straight.train_losses[s] for s in sorted(second)], rtol=1e-6)


def test_top_k_retention_keeps_latest_and_best(assets, tmp_path):
    result = train.run(load(assets, tmp_path, sft__max_num_steps=6, sft__val_period=1,
                            checkpointing__save_period=1, checkpointing__keep_top_k=2,
                            checkpointing__higher_is_better=True))
    # higher_is_better=True on a falling val_loss: the best are the earliest saves.
    vals = {s: v for s, v in result.val_losses.items() if s > 0}
    best = sorted(vals, key=lambda s: vals[s], reverse=True)[:2]
    kept = sorted(int(p.name[5:]) for p in result.checkpoint_dir.glob("step_*"))
    assert kept == sorted(set(best) | {6}) and len(kept) == 3, (kept, vals)


def test_export_loads_in_transformers_with_the_same_val_loss(assets, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from jax_sft import data as data_lib
    from jax_sft.export import main as export_main

    cfg = load(assets, tmp_path, sft__max_num_steps=4, sft__val_at_end=True,
               checkpointing__hf_export_dir=tmp_path / "hf_end")
    result = train.run(cfg)
    export_main(["--checkpoint", str(tmp_path / "ckpt" / "step_4"), "--out", str(tmp_path / "hf_cli")])
    tokenizer = data_lib.load_tokenizer(cfg)
    batches = list(data_lib.SFTData(cfg, tokenizer, dp_size=1).val_batches())
    for folder in ("hf_end", "hf_cli"):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / folder, torch_dtype=torch.float32).eval()
        nll, count = 0.0, 0.0
        for mb in batches:
            with torch.no_grad():
                logits = hf(torch.tensor(mb["input_ids"], dtype=torch.long),
                            position_ids=torch.tensor(mb["positions"], dtype=torch.long)).logits
            logp = torch.log_softmax(logits.double(), -1)
            tok = logp.gather(-1, torch.tensor(mb["targets"], dtype=torch.long)[..., None])[..., 0]
            mask = torch.tensor(mb["loss_mask"], dtype=torch.float64)
            nll += float(-(tok * mask).sum())
            count += float(mask.sum())
        np.testing.assert_allclose(nll / count, result.val_losses[4], rtol=2e-6, err_msg=folder)
        assert (tmp_path / folder / "tokenizer_config.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(cluster__gpus_per_node=8, policy__train_global_batch_size=12, policy__train_micro_batch_size=1,
              sft__val_global_batch_size=8, sft__val_micro_batch_size=1),
         "policy.train_global_batch_size=12 is not divisible by micro batch 1 x data-parallel size 8"),
        (dict(policy__max_total_sequence_length=512), "exceeds the model's max_position_embeddings=256"),
        (dict(cluster__gpus_per_node=8, policy__jax_cfg__mesh__tensor=3), "does not divide the 8 devices"),
    ],
)
def test_bad_input_fails_before_compiling(assets, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        train.run(load(assets, tmp_path, **extra))
    assert not (tmp_path / "logs").exists()  # failed before the run started


def test_unwritable_checkpoint_dir_fails_before_compiling(assets, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(config_lib.ConfigError, match="checkpointing.checkpoint_dir=.*is not writable"):
        train.run(load(assets, tmp_path, checkpointing__checkpoint_dir=tmp_path / "a_file" / "ckpt"))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(assets, tmp_path):
    cfg = load(assets, tmp_path, sft__max_num_steps=8, checkpointing__save_period=1,
               policy__optimizer__kwargs__lr=1e30, policy__max_grad_norm=None)
    with pytest.raises(train.TrainingDiverged, match=r"at step (\d+)") as err:
        train.run(cfg)
    bad = int(err.value.args[0].split("at step ")[1].split(";")[0])
    steps = sorted(int(p.name[5:]) for p in (tmp_path / "ckpt").glob("step_*"))
    assert steps and max(steps) == bad - 1  # every good step saved, the diverged one not
    from jax_sft.export import export_checkpoint
    from transformers import AutoConfig

    out = export_checkpoint(tmp_path / "ckpt" / f"step_{bad - 1}", tmp_path / "hf")
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 2


def test_checkpoint_must_save_by_saves_and_stops(assets, tmp_path):
    result = train.run(load(assets, tmp_path, sft__max_num_steps=50, checkpointing__save_period=100,
                            checkpointing__checkpoint_must_save_by="00:00:00:01"))
    assert result.stopped_early and "checkpoint_must_save_by" in result.stopped_early
    assert result.final_step < 50
    assert sorted(int(p.name[5:]) for p in (tmp_path / "ckpt").glob("step_*")) == [result.final_step]


def test_lazy_tokenisation_trains_like_upfront_and_resumes(assets, tmp_path):
    """data.tokenize=lazy (encoding in a Grain worker, step by step) gives the losses of the up-front
    cache, also when the run stops after step 3 and a new run resumes from its checkpoint."""
    kw = dict(sft__max_num_steps=6, sft__val_period=3, checkpointing__save_period=3)
    upfront = train.run(load(assets, tmp_path / "upfront", **kw))
    lazy = dict(data__tokenize="lazy", data__num_workers=1)
    first = train.run(load(assets, tmp_path / "lazy", **{**kw, **lazy, "sft__max_num_steps": 3}))
    second = train.run(load(assets, tmp_path / "lazy", **kw, **lazy))
    assert sorted(first.train_losses) == [1, 2, 3] and sorted(second.train_losses) == [4, 5, 6]
    got = {**first.train_losses, **second.train_losses}
    print("\nstep  upfront    lazy (resumed after step 3)")
    for s in sorted(got):
        print(f"{s:>4}  {upfront.train_losses[s]:.7f}  {got[s]:.7f}")
    np.testing.assert_allclose([got[s] for s in sorted(got)], [upfront.train_losses[s] for s in sorted(got)],
                               rtol=1e-6)
    np.testing.assert_allclose(second.val_losses[6], upfront.val_losses[6], rtol=1e-6)
