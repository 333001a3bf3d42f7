"""bench/train_step.py --cpu-tiny end to end (so the GPU benchmark does not rot between GPU runs)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_cpu_tiny_prints_table(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_step.py"), "--cpu-tiny", "--out", str(tmp_path), "--scan"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "framework" in out and "tokens/s" in out and "MFU%" in out
    results = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    got = {(r["framework"], r["case"], r["variant"]) for r in results}
    assert got == {
        ("jax_sft", "padded-1024", "unrolled"),
        ("jax_sft", "padded-4096", "unrolled"),
        ("jax_sft", "packed-4096", "unrolled"),
        ("jax_sft", "padded-1024-warm", "unrolled"),
        ("jax_sft", "padded-4096", "scan"),
        ("jax_sft", "padded-4096-lora", "unrolled"),
        ("torch eager", "padded-1024", ""),
        ("torch eager", "padded-4096", ""),
    }, got
    for r in results:
        assert math.isfinite(r["loss"]) and r["step_s"] > 0 and r["tokens_per_s"] > 0, r
        assert f"{r['framework']}" in out and r["case"] in out
    # Random init: the loss starts near log(vocab) in both frameworks.
    assert all(abs(r["loss"] - math.log(512)) < 0.5 for r in results), [r["loss"] for r in results]
    packed = next(r for r in results if r["case"] == "packed-4096")
    assert 0.5 < packed["fill"] <= 1.0
    assert "padded-1024  vs torch eager" in out and "targets" in out
    assert (tmp_path / "bench_table.txt").read_text().strip() in out


SFT_YAML = ROOT.parent / "shared" / "reference" / "nemo-rl-configs" / "examples" / "configs" / "sft.yaml"


@pytest.mark.skipif(not SFT_YAML.is_file(), reason="NeMo RL's sft.yaml (../shared/reference) is absent")
def test_gpu_check_runs_through_in_its_dry_mode(tmp_path):
    """bench/gpu_check.sh --dry on the CPU: every part (versions, the bench's plan and imports, the
    trainer's two runs of NeMo RL's sft.yaml as --dry_run, the quickstart) starts and exits 0."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "XLA_FLAGS": ""}
    env["PYTHON"] = sys.executable  # the interpreter running the tests, venv activated or not
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = (tmp_path / "out" / "parts.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in parts] == [
        f"=== part {p}" for p in ("versions", "bench", "trainer", "quickstart")
    ], parts
    assert all(": exit 0 after" in line for line in parts), parts
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "device: cpu" in log and "[bench] dry: would run jax:padded-4096" in log
    assert log.count("dry run: the config is valid") == 2  # both trainer runs of sft.yaml
    assert "rows of 1024 tokens (packed)" in log and "32 micro-batch(es) of 1, rows of 1024 tokens" in log
