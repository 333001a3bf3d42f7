"""The trainer end to end on a tiny Llama and the quickstart's synthetic chat data (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_run import make_tiny_run_assets

from jax_sft import config as config_lib
from jax_sft import train
from jax_sft.config import make_plan

ROOT = Path(__file__).resolve().parents[1]
METRIC_NAMES = (
    "train/loss",
    "train/mfu",
    "train/grad_norm",
    "train/lr",
    "train/num_unmasked_tokens",
    "train/global_valid_toks",
    "timing/train/total_step_time",
    "timing/train/data_processing",
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
    result = train.run(
        load(assets, tmp_path, sft__max_num_steps=12, sft__val_period=6, logger__tensorboard_enabled=True)
    )
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
    from hf_models import hf_val_loss
    from transformers import AutoModelForCausalLM

    from jax_sft import data as data_lib

    cfg = load(assets, tmp_path, sft__max_num_steps=0, checkpointing__enabled=False)
    result = train.run(cfg)
    hf = AutoModelForCausalLM.from_pretrained(assets / "model", torch_dtype=torch.float32).eval()
    batches = data_lib.SFTData(make_plan(cfg, devices=1).data, data_lib.load_tokenizer(cfg)).val_batches()
    np.testing.assert_allclose(result.val_losses[0], hf_val_loss(hf, batches), rtol=2e-6)


def test_sharded_8_devices_matches_single_device(assets, tmp_path):
    single = train.run(load(assets, tmp_path / "one", sft__max_num_steps=5, checkpointing__enabled=False))
    sharded = train.run(
        load(
            assets,
            tmp_path / "eight",
            sft__max_num_steps=5,
            checkpointing__enabled=False,
            cluster__gpus_per_node=8,
            policy__jax_cfg__mesh__fsdp=4,
            policy__jax_cfg__mesh__tensor=2,
            policy__train_micro_batch_size=2,
            sft__val_micro_batch_size=8,
        )
    )
    one = [single.train_losses[s] for s in range(1, 6)]
    eight = [sharded.train_losses[s] for s in range(1, 6)]
    print("\nstep  1 device      8 devices (fsdp 4 x tensor 2)")
    for s, (a, b) in enumerate(zip(one, eight), 1):
        print(f"{s:>4}  {a:.7f}   {b:.7f}")
    np.testing.assert_allclose(eight, one, rtol=1e-5)


def killed_and_resumed(assets: Path, run: Path, **extra) -> tuple[int, dict[int, float]]:
    """A 10-step run (saves every 2 steps, validation every 5) in a subprocess, killed with
    SIGKILL once step_4 is saved, then rerun to resume: (the step it resumed from, the resumed
    run's train losses by step)."""
    args = overrides(assets, run, sft__max_num_steps=10, sft__val_period=5, checkpointing__save_period=2, **extra)
    cmd = [sys.executable, "-m", "jax_sft.train", "--config", str(ROOT / "configs" / "quickstart.py"), *args]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = run / "ckpt"
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
    logs = sorted((run / "logs").glob("exp_*"))
    second = {r["step"]: r["train/loss"] for r in read_metrics(logs[-1]) if "train/loss" in r}
    assert sorted(second) == list(range(killed_at + 1, 11))
    return killed_at, second


def test_resume_after_kill_9_reproduces_uninterrupted_losses(assets, tmp_path):
    killed_at, second = killed_and_resumed(assets, tmp_path / "killed")
    straight = train.run(
        load(assets, tmp_path / "straight", sft__max_num_steps=10, sft__val_period=5, checkpointing__save_period=2)
    )
    print(f"\nkilled after step_{killed_at}; step  uninterrupted  resumed")
    for s in sorted(second):
        print(f"{s:>4}  {straight.train_losses[s]:.7f}   {second[s]:.7f}")
    np.testing.assert_allclose(
        [second[s] for s in sorted(second)], [straight.train_losses[s] for s in sorted(second)], rtol=1e-6
    )


def test_top_k_retention_keeps_latest_and_best(assets, tmp_path):
    result = train.run(
        load(
            assets,
            tmp_path,
            sft__max_num_steps=6,
            sft__val_period=1,
            checkpointing__save_period=1,
            checkpointing__keep_top_k=2,
            checkpointing__higher_is_better=True,
        )
    )
    # higher_is_better=True on a falling val_loss: the best are the earliest saves.
    vals = {s: v for s, v in result.val_losses.items() if s > 0}
    best = sorted(vals, key=lambda s: vals[s], reverse=True)[:2]
    kept = sorted(int(p.name[5:]) for p in result.checkpoint_dir.glob("step_*"))
    assert kept == sorted(set(best) | {6}) and len(kept) == 3, (kept, vals)


def test_export_loads_in_transformers_with_the_same_val_loss(assets, tmp_path):
    torch = pytest.importorskip("torch")
    from hf_models import hf_val_loss
    from transformers import AutoModelForCausalLM

    from jax_sft import data as data_lib
    from jax_sft.export import main as export_main

    cfg = load(
        assets, tmp_path, sft__max_num_steps=4, sft__val_at_end=True, checkpointing__hf_export_dir=tmp_path / "hf_end"
    )
    result = train.run(cfg)
    export_main(["--checkpoint", str(tmp_path / "ckpt" / "step_4"), "--out", str(tmp_path / "hf_cli")])
    tokenizer = data_lib.load_tokenizer(cfg)
    batches = list(data_lib.SFTData(make_plan(cfg, devices=1).data, tokenizer).val_batches())
    for folder in ("hf_end", "hf_cli"):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / folder, torch_dtype=torch.float32).eval()
        np.testing.assert_allclose(hf_val_loss(hf, batches), result.val_losses[4], rtol=2e-6, err_msg=folder)
        assert (tmp_path / folder / "tokenizer_config.json").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            dict(
                cluster__gpus_per_node=8,
                policy__train_global_batch_size=12,
                policy__train_micro_batch_size=1,
                sft__val_global_batch_size=8,
                sft__val_micro_batch_size=1,
            ),
            "policy.train_global_batch_size=12 is not divisible by micro batch 1 x data-parallel size 8",
        ),
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


def test_non_finite_step_names_a_checkpoint_whose_weights_are_finite(assets, tmp_path):
    # lr 1e10 after a near-zero first step: step 2's update ruins the weights (finite, ~1e9),
    # and step 3's loss on them is NaN. step_2 holds those weights: the good one is step_1.
    warm = (
        "[{name: torch.optim.lr_scheduler.LinearLR, kwargs: {start_factor: 1.0e-12, end_factor: 1.0, total_iters: 2}}]"
    )
    cfg = load(
        assets,
        tmp_path,
        sft__max_num_steps=8,
        checkpointing__save_period=1,
        sft__val_period=0,
        policy__optimizer__kwargs__lr=1e10,
        policy__max_grad_norm=None,
        policy__scheduler=warm,
    )
    with pytest.raises(train.TrainingDiverged, match=r"diverged at step (\d+)") as err:
        train.run(cfg)
    message = str(err.value)
    print("\n" + message)
    bad = int(message.split("diverged at step ")[1].split(":")[0])
    named = message.split("gave a finite loss is ")[1].split(";")[0]
    assert bad == 3 and Path(named) == tmp_path / "ckpt" / "step_1"
    assert f"diverged_step_{bad - 1}" in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"diverged_step_{bad - 1}", "step_1"]
    # A rerun with a sane learning rate resumes from the named checkpoint and trains normally.
    result = train.run(
        load(
            assets,
            tmp_path,
            sft__max_num_steps=4,
            sft__val_period=0,
            checkpointing__save_period=1,
            policy__optimizer__kwargs__lr=1e-3,
            policy__max_grad_norm=None,
            policy__scheduler=warm,
        )
    )
    assert sorted(result.train_losses) == [2, 3, 4]
    assert all(np.isfinite(v) and v < 10 for v in result.train_losses.values()), result.train_losses


def test_checkpoint_must_save_by_saves_and_stops(assets, tmp_path):
    result = train.run(
        load(
            assets,
            tmp_path,
            sft__max_num_steps=50,
            checkpointing__save_period=100,
            checkpointing__checkpoint_must_save_by="00:00:00:01",
        )
    )
    assert result.stopped_early and "checkpoint_must_save_by" in result.stopped_early
    assert result.final_step < 50
    assert sorted(int(p.name[5:]) for p in (tmp_path / "ckpt").glob("step_*")) == [result.final_step]


def test_export_never_replaces_the_checkpoint_folder(assets, tmp_path, capsys):
    from jax_sft.export import main as export_main

    with pytest.raises(config_lib.ConfigError, match="checkpointing.hf_export_dir: export to .* never replaces"):
        train.run(load(assets, tmp_path, checkpointing__hf_export_dir=tmp_path / "ckpt"))
    assert not (tmp_path / "logs").exists()  # refused before the run started
    train.run(load(assets, tmp_path, sft__max_num_steps=2, sft__val_period=0, checkpointing__save_period=2))
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "ckpt").rglob("*"))
    for out in (tmp_path / "ckpt", tmp_path / "logs"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            export_main(
                ["--checkpoint", str(tmp_path / "ckpt" / "step_2"), "--out", str(out), "--overwrite"]
                if out.name == "ckpt"
                else ["--checkpoint", str(tmp_path / "ckpt" / "step_2"), "--out", str(out)]
            )
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: export to ") and err.count("\n") == 1, err
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "ckpt").rglob("*")) == before
    assert (tmp_path / "logs" / "exp_001").is_dir()


def test_incomplete_checkpoints_are_never_resumed_or_exported(assets, tmp_path, capsys):
    from jax_sft.checkpoint import IncompleteCheckpoint, IncompleteCheckpointWarning
    from jax_sft.export import export_checkpoint

    train.run(load(assets, tmp_path, sft__max_num_steps=4, sft__val_period=0, checkpointing__save_period=2))
    # A deletion killed halfway: step_4 keeps its top-level markers but lost most of params/.
    for path in sorted((tmp_path / "ckpt" / "step_4" / "params").rglob("*")):
        if path.is_file() and path.name != "commit_success.txt":
            path.unlink()
    with pytest.raises(IncompleteCheckpoint, match=r"step_4: incomplete checkpoint \(params/ lacks _METADATA"):
        export_checkpoint(tmp_path / "ckpt" / "step_4", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.warns(IncompleteCheckpointWarning, match=r"skipping .*step_4: incomplete checkpoint"):
        result = train.run(
            load(assets, tmp_path, sft__max_num_steps=6, sft__val_period=0, checkpointing__save_period=2)
        )
    assert sorted(result.train_losses) == [3, 4, 5, 6]  # resumed from step_2
    captured = capsys.readouterr()
    assert f"resumed from {tmp_path / 'ckpt' / 'step_2'}" in captured.out + captured.err


def test_a_second_run_on_a_locked_checkpoint_dir_refuses_at_once(assets, tmp_path):
    import socket

    from jax_sft.run_lock import LOCK_NAME, RunLocked

    (tmp_path / "ckpt").mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": None, "started": "earlier"}
    (tmp_path / "ckpt" / LOCK_NAME).write_text(json.dumps(holder))
    with pytest.raises(RunLocked, match=rf"in use by another run \(pid {os.getpid()} on"):
        train.run(load(assets, tmp_path, sft__max_num_steps=2))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [LOCK_NAME]  # nothing written
    (tmp_path / "ckpt" / LOCK_NAME).unlink()
    result = train.run(load(assets, tmp_path, sft__max_num_steps=2, sft__val_period=0))
    assert result.final_step == 2 and not (tmp_path / "ckpt" / LOCK_NAME).exists()  # released


def test_two_runs_started_together_one_refuses_and_the_other_finishes(assets, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "jax_sft.train",
        "--config",
        str(ROOT / "configs" / "quickstart.py"),
        *overrides(assets, tmp_path, sft__max_num_steps=6, sft__val_period=0, checkpointing__save_period=2),
    ]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    refused = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 2)
    print("\n" + refused.strip().splitlines()[-1])
    assert codes == [0, 2], outs
    assert refused.strip().splitlines()[-1].startswith("error: ") and "in use by another run (pid" in refused
    assert "Traceback" not in refused
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_2", "step_4", "step_6"]


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )


def test_disk_full_says_so_in_one_line_and_keeps_earlier_checkpoints(assets, tmp_path, monkeypatch):
    fs = tmp_path / "fs"
    if _mount_tmpfs(fs, "1500k"):  # room for one checkpoint (~1.2 MB with AdamW's moments), not two
        try:
            cmd = [
                sys.executable,
                "-m",
                "jax_sft.train",
                "--config",
                str(ROOT / "configs" / "quickstart.py"),
                *overrides(
                    assets,
                    tmp_path,
                    sft__max_num_steps=8,
                    checkpointing__save_period=2,
                    checkpointing__checkpoint_dir=fs / "ckpt",
                ),
            ]
            env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            kept = sorted(p.name for p in (fs / "ckpt").iterdir())
        finally:
            subprocess.run(["umount", str(fs)], check=True)
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        print("\n" + "\n".join(errors))
        assert proc.returncode == 1
        assert len(errors) == 1 and errors[0].startswith("error: no space left on the device of "), proc.stderr[-6000:]
        assert "while saving step_4" in errors[0] and "kept step_2" in errors[0]
        assert kept == ["step_2"], kept  # the partial step_4 removed, the lock released
        return
    # No tmpfs here: the same path with the write error injected where Orbax writes our files.
    from jax_sft import checkpoint

    real_save = checkpoint.FilesHandler.save

    def full_after_step_2(self, directory, args):
        if "step_2" not in str(directory) and args.files:
            raise OSError(28, "No space left on device", str(directory))
        return real_save(self, directory, args)

    monkeypatch.setattr(checkpoint.FilesHandler, "save", full_after_step_2)
    with pytest.raises(checkpoint.CheckpointDiskFull, match=r"while saving step_4.*kept step_2") as err:
        train.run(load(assets, tmp_path, sft__max_num_steps=8, checkpointing__save_period=2))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_2"]


def test_sigterm_during_start_up_exits_75(assets, tmp_path):
    """The handler is in place before the heavy imports: SIGTERM at that moment exits 75, not 143."""
    cmd = [
        sys.executable,
        "-m",
        "jax_sft.train",
        "--config",
        str(ROOT / "configs" / "quickstart.py"),
        *overrides(assets, tmp_path),
    ]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    caught, maps = False, ""
    while not caught and proc.poll() is None and time.time() < deadline:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = bool(int(status.split("SigCgt:")[1].split()[0], 16) & (1 << (signal.SIGTERM - 1)))
        if caught:
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        else:
            time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert caught and "jaxlib" not in maps  # caught before jax was even loaded
    assert proc.returncode == 75, err[-2000:]
    assert "SIGTERM received" in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()  # it stopped before the run began


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
    np.testing.assert_allclose([got[s] for s in sorted(got)], [upfront.train_losses[s] for s in sorted(got)], rtol=1e-6)
    np.testing.assert_allclose(second.val_losses[6], upfront.val_losses[6], rtol=1e-6)


def test_segment_lengths_lists_each_rows_sequences_in_order():
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 2, 2, 2, 3, 3], [0, 0, 0, 0, 0, 0], [4, 4, 4, 4, 4, 4]], np.int32)
    lengths = train.segment_lengths({"segment_ids": seg})
    assert lengths.tolist() == [3, 2, 1, 3, 2, 6] and lengths.dtype == np.int64
    assert train.segment_lengths({"segment_ids": np.zeros((2, 3), np.int32)}).tolist() == []
