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
