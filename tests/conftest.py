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


# The longest files first (measured on 2 cores), so that under pytest-xdist's `--dist loadfile`
# (.ci/run) the two workers end together instead of one running a long file alone at the end.
LONGEST_FIRST = (
    "test_slurm.py",
    "test_distributed.py",
    "test_train.py",
    "test_bench.py",
    "test_lora_train.py",
    "test_nemotron_h.py",
    "test_context.py",
    "test_families.py",
    "test_data_pipeline.py",
    "test_first_contact.py",
    "test_nothing_lost.py",
    "test_dry_run.py",
    "test_fp8.py",
    "test_nemo_recipes.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept
