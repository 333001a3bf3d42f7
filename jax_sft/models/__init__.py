"""Causal LM decoders of every registered family in Flax NNX, HF checkpoint I/O, sharding.

    from jax_sft.models import ModelOptions, from_pretrained, save_pretrained, sharding
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    model = from_pretrained("Qwen/Qwen3-0.6B", ModelOptions(dtype="bfloat16"), mesh=mesh)
    hidden = model.hidden_states(input_ids, positions, segment_ids)  # [b, t, hidden]
    logits_chunk = model.unembed(hidden[:, i:j])                      # [b, j-i, vocab] fp32

The families (`registry.FAMILIES`, `supported_architectures()`) register themselves from
`jax_sft/models/families/` when this package is imported.
"""

from jax_sft.models import attention, families, registry, sharding  # noqa: F401  (families: registration)
from jax_sft.models.config import ModelConfig, RopeConfig
from jax_sft.models.decoder import CausalLM
from jax_sft.models.errors import CheckpointError, ModelConfigError
from jax_sft.models.hf_read import from_pretrained, read_config
from jax_sft.models.hf_write import save_pretrained
from jax_sft.models.options import LoraConfig, ModelOptions

SUPPORTED_ARCHITECTURES = registry.supported_architectures()

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "CheckpointError",
    "LoraConfig",
    "ModelConfig",
    "ModelConfigError",
    "ModelOptions",
    "RopeConfig",
    "attention",
    "from_pretrained",
    "read_config",
    "registry",
    "save_pretrained",
    "sharding",
]
