"""What a new user meets first: --help everywhere, a rerun of a finished run, samples at validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import make_tiny_run_assets

from jax_sft import config as config_lib
from jax_sft import train

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("train", "generate", "export", "inspect_data", "quickstart", "launch_local", "docs")

HELP_PROBE = """
import contextlib, io, runpy, sys
for name in sys.argv[1:]:
    for flag in ("--help", "-h"):
        sys.argv = ["x", flag]
        out = io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out):
            try:
                runpy.run_module("jax_sft." + name, run_name="__main__")
            except SystemExit as e:
                code = e.code or 0
        text = out.getvalue()
        example, usage = "python -m jax_sft." + name in text, text.startswith("usage: python -m jax_sft." + name + " ")
        print(f"{name} {flag} exit={code} example={example} usage={usage} chars={len(text)}")
"""


def test_every_command_prints_usage_with_an_example_and_exits_0():
    """Each starts with `usage: python -m jax_sft.<name> ...` (never `usage: export.py`)."""
    out = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, *COMMANDS], capture_output=True, text=True, timeout=300, cwd=ROOT, check=True
    ).stdout.splitlines()
    assert len(out) == 2 * len(COMMANDS), out
    for line in out:
        name, flag, code, example, usage, chars = line.split()
        assert code == "exit=0" and example == "example=True" and usage == "usage=True", line
        assert int(chars.split("=")[1]) > 300, line  # the usage text, not a one-line error


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_tiny_run_assets(tmp_path_factory.mktemp("assets"))


def config(assets: Path, run: Path, **extra):
    base = {
        "policy.model_name": assets / "model",
        "data.train_data_path": assets / "data" / "train.jsonl",
        "data.val_data_path": assets / "data" / "val.jsonl",
        "checkpointing.checkpoint_dir": run / "ckpt",
        "logger.log_dir": run / "logs",
        "logger.tensorboard_enabled": False,
        "sft.max_num_steps": 2,
        "sft.val_period": 2,
        "sft.val_at_start": False,
        "sft.val_batches": 1,
        "sft.val_global_batch_size": 16,
        "sft.val_micro_batch_size": 16,
        "policy.train_global_batch_size": 8,
        "policy.train_micro_batch_size": 8,
        "policy.max_total_sequence_length": 64,
        "policy.jax_cfg.loss_chunk_size": 64,
        "checkpointing.hf_export_dir": None,
        "policy.scheduler": None,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    overrides = [f"{k}={'null' if v is None else v}" for k, v in base.items()]
    return config_lib.load_config(str(ROOT / "configs" / "quickstart.py"), overrides)


def test_rerun_of_a_finished_run_trains_nothing_and_makes_no_run_folder(assets, tmp_path, capsys):
    first = train.run(config(assets, tmp_path))
    assert first.final_step == 2
    runs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    again = train.run(config(assets, tmp_path))
    assert "already at step 2 of 2; nothing to train" in capsys.readouterr().out
    assert again.final_step == 2 and again.run_dir is None and not again.train_losses
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == runs == ["exp_001"]


def test_validation_prints_and_logs_samples(assets, tmp_path, capsys):
    result = train.run(
        config(
            assets,
            tmp_path,
            logger__num_val_samples_to_print=2,
            logger__tensorboard_enabled=True,
            checkpointing__enabled=False,
        )
    )
    out = capsys.readouterr().out
    assert "step 2: validation samples" in out
    assert out.count("=== sample ") == 2 and out.count("reference:  ") == 2
    raw = b"".join(p.read_bytes() for p in (result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert b"validation/samples" in raw and b"=== sample 2 ===" in raw  # the text summary, as written
