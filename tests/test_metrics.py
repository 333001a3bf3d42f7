"""Metric sinks (jsonl, TensorBoard, W&B offline, MLflow sqlite) and the analytic FLOPs."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from jax_sft.config import default_config
from jax_sft.metrics import PEAK_TFLOPS, MetricsLogger, peak_flops_per_device
from jax_sft.models import ModelConfig
from jax_sft.models.counts import training_flops


def test_every_sink_receives_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = default_config().logger
    cfg.unlock()
    cfg.wandb_enabled = cfg.tensorboard_enabled = cfg.mlflow_enabled = True
    logger = MetricsLogger(cfg, tmp_path / "run", total_steps=2)
    logger.log_config({"policy": {"model_name": "tiny"}})
    for step, loss in ((1, 2.5), (2, 2.0)):
        logger.log({"train/loss": loss, "train/lr": 1e-3, "train/mfu": None}, step)
        logger.progress(step, {"train/loss": loss})
    logger.log_text("validation/samples", "=== sample 1 ===\nprompt:     1 + 1?", 2)
    logger.close()

    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows == [{"step": 1, "train/loss": 2.5, "train/lr": 1e-3}, {"step": 2, "train/loss": 2.0, "train/lr": 1e-3}]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sft-dev").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2.5, 2.0]
    assert run.data.params["policy.model_name"] == "tiny"
    text = client.download_artifacts(run.info.run_id, "validation_samples_step_2.txt", str(tmp_path))
    assert open(text).read().startswith("=== sample 1 ===")
    # The artifacts stay in the run folder (MLflow's default would be ./mlruns in the cwd).
    assert list((tmp_path / "run" / "mlflow_artifacts").rglob("validation_samples_step_2.txt"))


def test_training_flops_by_hand():
    hf = {
        "architectures": ["MistralForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 2,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": None,
    }
    cfg = ModelConfig.from_hf_dict(hf)
    per_layer = 8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16  # q, k+v, o, gate/up/down
    matmul = 3 * per_layer + 8 * 10
    lengths = np.array([5, 3])
    pairs = 5 * 6 / 2 + 3 * 4 / 2  # causal query-key pairs per layer
    assert training_flops(cfg, lengths) == pytest.approx(3 * (2 * matmul * 8 + 4 * 8 * 3 * pairs))
    windowed = ModelConfig.from_hf_dict({**hf, "sliding_window": 2})
    assert windowed.sliding_windows == (2, 2, 2)
    pairs_w = (1 + 2 + 2 + 2 + 2) + (1 + 2 + 2)  # each query sees at most 2 keys
    assert training_flops(windowed, lengths) == pytest.approx(3 * (2 * matmul * 8 + 4 * 8 * 3 * pairs_w))


def test_peak_table_knows_h100_and_not_cpu():
    h100 = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    assert peak_flops_per_device(h100, "bfloat16") == 989e12
    assert peak_flops_per_device(SimpleNamespace(device_kind="NVIDIA H100 PCIe"), "bfloat16") == 756e12
    assert peak_flops_per_device(SimpleNamespace(device_kind="cpu"), "bfloat16") is None
    assert all(set(peaks) == {"bfloat16", "float32"} for _, peaks in PEAK_TFLOPS)


def test_progress_off_a_terminal_is_whole_lines_at_most_every_30_s(tmp_path, monkeypatch, capsys):
    import io

    from jax_sft import metrics as metrics_lib

    clock = [1000.0]
    monkeypatch.setattr(metrics_lib.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    cfg = default_config().logger
    logger = MetricsLogger(cfg, tmp_path / "run", total_steps=10)
    for step in range(1, 11):
        clock[0] += 7.0  # a step every 7 s: lines at 35 s (step 5), 70 s (step 10, also the last)
        logger.progress(step, {"train/loss": 1.0 / step, "train/lr": 1e-3})
        if step == 3:
            logger.write("step 3: val_loss 0.5")
    logger.close()
    err = sys.stderr.getvalue()
    assert "\r" not in err
    assert err.splitlines() == ["step 5/10: loss 0.2, lr 0.001", "step 10/10: loss 0.1, lr 0.001"]
    assert capsys.readouterr().out == "step 3: val_loss 0.5\n"


def test_each_enabled_sink_is_checked_before_the_run(tmp_path, monkeypatch):
    """`check` and `folders` of the SINKS rows: a package that is missing, the W&B login, and the
    folders a sink writes besides the run folder (checked by the run plan, --dry_run too)."""
    from jax_sft.config import load_config, make_plan
    from jax_sft.config.plan import output_problems
    from jax_sft.sinks import sink_folders, sink_problems

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    cfg = load_config(
        None, ["logger.mlflow_enabled=true", "logger.wandb_enabled=true", f"logger.tensorboard.log_dir={blocked}/tb"]
    )
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert sink_problems(cfg.logger) == [
        "logger.mlflow_enabled=true but mlflow is not installed: pip install 'jax_sft[mlflow]' or set "
        "logger.mlflow_enabled=false"
    ]
    assert sink_folders(cfg.logger) == {"logger.tensorboard.log_dir": blocked / "tb"}
    problems = output_problems(make_plan(cfg, devices=1))
    assert f"logger.tensorboard.log_dir={blocked}/tb is not writable ({blocked} is not a writable folder)" in problems
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert any("no W&B login was found" in p for p in sink_problems(cfg.logger))
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert not any("W&B" in p for p in sink_problems(cfg.logger))  # `wandb login` writes this
