"""Test session setup: 8 virtual CPU devices, so that sharding tests run on this machine.

XLA_FLAGS must be set before jax is first imported; unsharded code still runs on device 0.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURE_TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tokenizers"


@pytest.fixture
def fixture_tokenizer_path():
    """Path of a real tokenizer fixture by name ("qwen3", "llama3_1"); skips when absent."""

    def get(name: str) -> Path:
        path = FIXTURE_TOKENIZERS / name
        if not (path / "tokenizer.json").exists():
            pytest.skip(f"tokenizer fixture {path} is absent")
        return path

    return get
