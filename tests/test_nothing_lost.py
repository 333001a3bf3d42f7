"""Nothing of the user's lost, and every user error one line: exports that cannot touch a
checkpoint or the base model, a damaged checkpoint that is set aside, a checkpoint of another
model, a mesh that cannot split a parameter, tokenizer code, a sandboxed template, Ctrl-C. One
tiny run (steps 1-6, checkpoints at 2, 4, 6) serves the tests that need a checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_train import ROOT, load, overrides
from tiny_run import make_tiny_run_assets

from jax_sft import distributed, train
from jax_sft.checkpoint import CheckpointMismatch, IncompleteCheckpointWarning
from jax_sft.config import ConfigError, IgnoredKeysWarning

RUN = dict(sft__max_num_steps=6, sft__val_period=0, checkpointing__save_period=2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return make_tiny_run_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """(the run folder: ckpt/step_{2,4,6}, logs/; the run's train losses by step)."""
    run = tmp_path_factory.mktemp("run")
    return run, train.run(load(assets, run, **RUN)).train_losses


def tree_hashes(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under `roots`, by path (what must be byte for byte unchanged)."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_error_line(fn, capsys) -> str:
    """`fn()` must exit 2 printing exactly one line, `error: ...`, on stderr; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        fn()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ----------------------------------------------------------------------------- export targets


def test_export_never_writes_into_at_or_around_a_checkpoint_or_the_base_model(assets, trained, capsys):
    from jax_sft.export import main as export_main

    run, _ = trained
    ckpt = run / "ckpt"
    before = tree_hashes(run, assets)
    targets = {
        "inside a checkpoint (params)": ckpt / "step_6" / "params",
        "inside a checkpoint (extra)": ckpt / "step_6" / "extra",
        "inside another checkpoint": ckpt / "step_2" / "extra" / "tokenizer",
        "the checkpoint being read": ckpt / "step_6",
        "checkpoint_dir": ckpt,
        "a folder holding checkpoint_dir": run,
        "the base model (an earlier export: it has the marker)": assets / "model",
        "a folder holding the base model": assets,
    }
    for what, out in targets.items():
        for flags in ([], ["--overwrite"]):
            args = ["--checkpoint", str(ckpt / "step_6"), "--out", str(out), *flags]
            line = one_error_line(lambda args=args: export_main(args), capsys)
            print(f"\n{what} {flags}: {line}")
            assert "export never replaces or writes into a training checkpoint" in line, line
            assert tree_hashes(run, assets) == before, (what, flags)
    # A training run's end-of-run export is refused onto its own base model before it starts.
    with pytest.raises(ConfigError, match="checkpointing.hf_export_dir: export to .* would replace"):
        train.run(load(assets, run / "other", checkpointing__hf_export_dir=assets / "model"))
    assert tree_hashes(run, assets) == before and not (run / "other" / "logs").exists()


# ----------------------------------------------------------------------------- a damaged checkpoint


def test_a_damaged_checkpoint_is_named_set_aside_and_the_run_resumes_from_the_one_before(
    assets, trained, tmp_path, capsys
):
    from jax_sft.export import main as export_main
    from jax_sft.generate import main as generate_main

    run, losses = trained
    shutil.copytree(run / "ckpt", tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    data = max((ckpt / "step_6" / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data.unlink()  # the largest array file of the newest checkpoint
    missing = f"params/ocdbt.process_0/d/{data.name} is missing"
    for fn in (
        lambda: export_main(["--checkpoint", str(ckpt / "step_6"), "--out", str(tmp_path / "hf")]),
        lambda: generate_main(["--model", str(ckpt / "step_6"), "--prompt", "1+1"]),
    ):
        assert missing in one_error_line(fn, capsys)
    # A tokenizer file gone: named too (a copy of step_4, which the rerun below resumes from).
    shutil.copytree(ckpt / "step_4", tmp_path / "other" / "step_4")
    (tmp_path / "other" / "step_4" / "extra" / "tokenizer" / "tokenizer.json").unlink()
    line = one_error_line(
        lambda: generate_main(["--model", str(tmp_path / "other" / "step_4"), "--prompt", "x"]), capsys
    )
    assert "extra/tokenizer/tokenizer.json is missing" in line, line
    assert not (tmp_path / "hf").exists()

    with pytest.warns(IncompleteCheckpointWarning, match=rf"skipping .*step_6: incomplete checkpoint \({missing}"):
        resumed = train.run(load(assets, tmp_path, **RUN))
    out = capsys.readouterr()
    assert f"resumed from {ckpt / 'step_4'}" in out.out + out.err
    assert (ckpt / "incomplete_step_6").is_dir() and (ckpt / "step_6").is_dir()  # set aside, then saved anew
    print(
        "\nstep  uninterrupted  resumed from step_4\n"
        + "\n".join(f"{s:>4}  {losses[s]:.7f}  {resumed.train_losses[s]:.7f}" for s in (5, 6))
    )
    assert sorted(resumed.train_losses) == [5, 6]
    np.testing.assert_allclose([resumed.train_losses[s] for s in (5, 6)], [losses[5], losses[6]], rtol=1e-6)


# ----------------------------------------------------------------------------- before any work


def test_resuming_with_a_model_of_another_size_names_the_fields_also_in_the_dry_run(assets, trained, tmp_path, capsys):
    run, _ = trained
    wider = tmp_path / "wider"
    wider.mkdir()
    config = json.loads((assets / "model" / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    before = tree_hashes(run / "ckpt")
    with pytest.raises(
        CheckpointMismatch, match=r"step_6 was trained with another model.*intermediate_size: 128 vs 256"
    ):
        train.run(load(assets, run, policy__model_name=wider, **RUN))
    args = [
        "--config",
        str(ROOT / "configs" / "quickstart.py"),
        *overrides(assets, run, policy__model_name=wider, **RUN),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        line = one_error_line(lambda: train.main([*args, "--dry_run"]), capsys)
    print("\n" + line)
    assert "intermediate_size: 128 vs 256 (checkpoint vs this run)" in line
    assert tree_hashes(run / "ckpt") == before


def test_a_parameter_the_mesh_cannot_split_fails_before_any_data_work(assets, tmp_path, capsys, monkeypatch):
    def no_data_work(*args, **kwargs):
        raise AssertionError("data work started")

    monkeypatch.setattr("jax_sft.trainer.setup.SFTData", no_data_work)
    monkeypatch.setattr("jax_sft.trainer.setup.load_tokenizer", no_data_work)
    mesh = dict(
        cluster__gpus_per_node=8,
        policy__jax_cfg__mesh__tensor=4,
        policy__jax_cfg__mesh__fsdp=2,
        sft__val_micro_batch_size=16,
    )
    # The vocabulary (290 rows) is padded to the tensor axis; 2 kv heads cannot be split 4 ways.
    kv_heads = (
        r"parameter layers\.\*\.self_attn\.k_proj\.kernel \(64, 2, 16\): dimension 1 \('kv_heads', size 2\) cannot "
        r"be split over mesh axis tensor=4 \(nor can 3 more parameters\); choose policy.jax_cfg.mesh.tensor dividing 2"
    )
    with pytest.raises(ConfigError, match=kv_heads):
        train.run(load(assets, tmp_path, **mesh))
    args = ["--config", str(ROOT / "configs" / "quickstart.py"), *overrides(assets, tmp_path, **mesh)]
    code = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        try:
            train.main([*args, "--dry_run"])
        except SystemExit as e:
            code = e.code
    err = capsys.readouterr().err
    print("\n" + err)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    # One problem (one line per kind of dimension): the k and v kernels of both layers in one line.
    assert err.strip().splitlines() == [f"error: dry run: {err.split('dry run: ')[1].strip()}"]
    assert re.search(kv_heads, err), err
    assert not (tmp_path / "logs").exists()


# ----------------------------------------------------------------------------- tokenizers and generate


def test_tokenizer_code_a_sandboxed_template_and_batch_size_0_are_one_line(assets, trained, tmp_path, capsys):
    from jax_sft.data import load_tokenizer
    from jax_sft.errors import DataError
    from jax_sft.generate import main as generate_main

    run, _ = trained
    custom = tmp_path / "custom"
    shutil.copytree(assets / "model", custom)
    tok = json.loads((custom / "tokenizer_config.json").read_text())
    tok.update(auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]}, tokenizer_class="XTokenizer")
    (custom / "tokenizer_config.json").write_text(json.dumps(tok))
    with pytest.raises(DataError, match="jax_sft never runs such code"):
        load_tokenizer(load(assets, tmp_path, policy__tokenizer__name=custom))
    step = str(run / "ckpt" / "step_4")
    for args, expected in (
        (["--model", str(custom), "--prompt", "x"], "names a tokenizer class defined by Python code"),
        (
            ["--model", step, "--prompt", "x", "--config.policy.tokenizer.chat_template={{ ''.__class__.__mro__ }}"],
            "policy.tokenizer.chat_template: the chat template does something the sandbox forbids",
        ),
        (["--model", step, "--prompt", "x", "--batch_size", "0"], "--batch_size=0: expected an integer >= 1"),
    ):
        line = one_error_line(lambda args=args: generate_main(args), capsys)
        print("\n" + line)
        assert expected in line, line


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_saves_and_exits_130_and_a_second_one_stops_at_once(assets, tmp_path, monkeypatch, capsys):
    import threading
    import time

    def interrupt_after_step_2():
        while not (tmp_path / "ckpt" / "step_2").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_after_step_2, daemon=True).start()
    previous = signal.getsignal(signal.SIGINT)
    result = train.run(load(assets, tmp_path, sft__max_num_steps=100, sft__val_period=0, checkpointing__save_period=2))
    assert signal.getsignal(signal.SIGINT) is previous  # pytest's handler is back
    assert result.exit_code == distributed.INTERRUPTED_EXIT_CODE == 130 and result.stopped_early == "SIGINT received"
    assert 2 <= result.final_step < 100 and (tmp_path / "ckpt" / f"step_{result.final_step}").is_dir()
    # A second Ctrl-C raises KeyboardInterrupt at once; the command line says so in one line, exit 130.
    with distributed.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs before this ends
    monkeypatch.setattr(train, "run", lambda cfg, stop_signals, **_: (_ for _ in ()).throw(KeyboardInterrupt))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(ROOT / "configs" / "quickstart.py"), *overrides(assets, tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 130 and "SIGINT received twice; stopped at once" in err and "Traceback" not in err
