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
    return config_lib.load_config(str(ROOT / "configs" / "quickstart.py"), overrides(assets, run, **extra))


def overrides(assets: Path, run: Path, **extra) -> list[str]:
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
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def main(assets: Path, run: Path, *flags: str, **extra) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m jax_sft.train` in this process."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            train.main(["--config", str(ROOT / "configs" / "quickstart.py"), *overrides(assets, run, **extra), *flags])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


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


# ----------------------------------------------------------------------------- checks before the long work


def _no_wandb_login(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def test_wandb_without_a_login_or_the_package_fails_before_the_data(assets, tmp_path, monkeypatch):
    """NeMo RL's sft.yaml enables W&B: without a login the run stops in its first seconds with one
    line naming the ways out, in --dry_run too; the data is never read (its file does not exist)."""
    _no_wandb_login(monkeypatch, tmp_path)
    absent = dict(data__train_data_path=tmp_path / "absent.jsonl", logger__wandb_enabled="true")
    for flags, extra in (((), absent), (("--dry_run",), dict(logger__wandb_enabled="true"))):
        code, out, err = main(assets, tmp_path, *flags, **extra)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        for way in ("`wandb login`", "WANDB_API_KEY", "WANDB_MODE=offline", "logger.wandb_enabled=false"):
            assert way in lines[0], lines[0]
    assert not (tmp_path / "logs").exists()
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    code, out, err = main(assets, tmp_path, **absent)
    assert code == 2 and "wandb is not installed: pip install 'jax_sft[wandb]'" in err
    monkeypatch.delitem(sys.modules, "wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # a way out: the run gets as far as the data
    code, out, err = main(assets, tmp_path, **absent)
    assert code == 2 and "absent.jsonl': no such file" in err and "W&B" not in err


def test_validate_data_and_a_bad_byte_stop_the_trainer_before_the_model(assets, tmp_path):
    """--validate_data encodes every row first and lists each bad one; a byte that is not UTF-8
    names its file and line (not pyarrow's traceback)."""
    lines = (assets / "data" / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join(
            [
                *lines[:3],
                lines[3].replace('"user"', '"narrator"'),
                *lines[4:9],
                '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}',
            ]
        )
        + "\n"
    )
    code, out, err = main(
        assets, tmp_path, "--validate_data", data__train_data_path=bad, data__use_preserving_dataset="true"
    )
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err, err
    assert len(errors) == 3, err
    assert f"{bad}:4 (train): message 0: unknown role 'narrator'" in errors[0]
    assert f"{bad}:10 (train): message 0 (user): 'content' must be a string" in errors[1], errors
    assert "2 of 74 rows failed to encode" in errors[2] and len(errors) == 3, errors
    raw = [line.encode() for line in lines[:8]]
    raw[4] = raw[4].replace(b'"content": "', b'"content": "\xe9', 1)  # line 5, inside a message
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"\n".join(raw) + b"\n")
    code, out, err = main(assets, tmp_path, data__train_data_path=broken)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"{broken}:5: bytes that are not UTF-8 (b'\\xe9'" in errors[0], errors
    assert not (tmp_path / "logs").exists()


def test_validate_data_passes_and_the_end_line_names_the_tensorboard_folder(assets, tmp_path):
    board = tmp_path / "board"
    code, out, err = main(
        assets,
        tmp_path,
        "--validate_data",
        logger__tensorboard_enabled="true",
        logger__tensorboard__log_dir=board,
        sft__max_num_steps=1,
        checkpointing__enabled="false",
    )
    assert code == 0, err
    assert "validate_data: all 576 rows encode" in out
    assert f"(TensorBoard: {board})" in out and list(board.glob("events.out.tfevents.*"))
    assert not list((tmp_path / "logs").glob("exp_*/tensorboard"))
