"""The models' input errors: a model's config.json or checkpoint that jax_sft cannot build from."""

from __future__ import annotations

from jax_sft.errors import InputError


class ModelConfigError(InputError, ValueError):
    """A model's config.json (or policy.hf_config_overrides) that jax_sft cannot build from."""


class CheckpointError(InputError, ValueError):
    """A checkpoint that cannot be read as the config says; the message names file and tensor."""
