"""The model families jax_sft builds, one registry entry each (`jax_sft.models.registry.Family`).
Importing this package registers them all; `jax_sft.models` imports it."""

from jax_sft.models.families import dense, gemma, gpt_oss, moe, nemotron_h  # noqa: F401  (each module registers its families)
