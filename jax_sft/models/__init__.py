"""Causal LM decoders (Llama, Qwen2, Qwen3, Mistral, Gemma 2/3, Qwen3-MoE, Mixtral) in Flax NNX,
HF checkpoint I/O, sharding.

    from jax_sft.models import from_pretrained, save_pretrained, sharding
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
    model = from_pretrained("Qwen/Qwen3-0.6B", dtype=jnp.bfloat16, mesh=mesh)
    hidden = model.hidden_states(input_ids, positions, segment_ids)  # [b, t, hidden]
    logits_chunk = model.unembed(hidden[:, i:j])                      # [b, j-i, vocab] fp32
"""

from jax_sft.models import attention, sharding  # modules: attention.attention(...), sharding.*
from jax_sft.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeConfig
from jax_sft.models.decoder import REMAT_POLICIES, CausalLM
from jax_sft.models.hf_io import CheckpointError, from_pretrained, read_config, save_pretrained

__all__ = [
    "REMAT_POLICIES",
    "SUPPORTED_ARCHITECTURES",
    "CausalLM",
    "CheckpointError",
    "ModelConfig",
    "RopeConfig",
    "attention",
    "from_pretrained",
    "read_config",
    "save_pretrained",
    "sharding",
]
