"""Tiny random Hugging Face models (torch, test-only) for parity and I/O tests.

Each family's config exercises what distinguishes it: Llama with llama3 RoPE scaling (a small
original_max_position_embeddings, so that the scaling shows) and tied embeddings; Qwen2 with its
q/k/v biases and a sliding window on the layers from max_window_layers on; Qwen3 with q/k norms,
head_dim != hidden/heads and attention biases; Mistral with MQA and a window shorter than the
test sequences; Gemma 2 with soft-capping small enough to bite, query_pre_attn_scalar != head_dim
and alternating sliding/full layers; Gemma 3 with q/k norms and linear-scaled global RoPE beside a
plain local one; OLMo 2 with its norms after attention and MLP and q/k norms over the whole
projections, with biases; Phi-3 with its fused qkv_proj / gate_up_proj tensors and a window;
Qwen3-MoE with a dense layer (mlp_only_layers) and top-k without renormalisation; Mixtral
(renormalised top-2) with a window; gpt-oss with a sliding and a full layer, attention sinks,
biases everywhere, a clamped SwiGLU whose limit bites and YaRN with a small original length
(its hub checkpoints' MXFP4 experts: tests/test_gpt_oss.py); Nemotron-H with a layer of each kind
(Mamba-2, attention, MLP, MoE: "M*-E"), several scan chunks per sequence (chunk_size 8), B/C in
two groups, biases on in_proj / out_proj / conv / MLPs, grouped sigmoid routing with a random
correction bias. This is the one table of families: the parity, packing, bf16, round-trip,
sharding, generation and training tests run every row. Biases and norm weights are randomised (HF
initialises them to 0 and 1), so that a wrong mapping of any tensor shows in the logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=32768,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, tuple[type, type, dict]] = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            tie_word_embeddings=True,
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(rope_theta=1000000.0, use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(head_dim=32, attention_bias=True, rope_theta=1000000.0, tie_word_embeddings=False),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(num_key_value_heads=1, sliding_window=5, rope_theta=10000.0),
    ),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=5,
            final_logit_softcapping=2.0,
            attn_logit_softcapping=3.0,
            rope_theta=10000.0,
            pad_token_id=0,
        ),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=5,
            pad_token_id=0,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=dict(
                full_attention=dict(rope_type="linear", factor=4.0, rope_theta=1000000.0),
                sliding_attention=dict(rope_type="default", rope_theta=10000.0),
            ),
        ),
    ),
    "olmo2": (
        transformers.Olmo2Config,
        transformers.Olmo2ForCausalLM,
        dict(attention_bias=True, rope_theta=500000.0, tie_word_embeddings=False, pad_token_id=0),
    ),
    "phi3": (
        transformers.Phi3Config,
        transformers.Phi3ForCausalLM,
        dict(sliding_window=5, rope_theta=10000.0, pad_token_id=0),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            mlp_only_layers=[1],
            norm_topk_prob=False,
            output_router_logits=True,
            router_aux_loss_coef=0.01,
            rope_theta=1000000.0,
        ),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=48,
            sliding_window=5,
            output_router_logits=True,
            router_aux_loss_coef=0.02,
            rope_theta=1000000.0,
        ),
    ),
    "gpt_oss": (
        transformers.GptOssConfig,
        transformers.GptOssForCausalLM,
        dict(
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=32,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            swiglu_limit=0.5,
            output_router_logits=True,
            router_aux_loss_coef=0.02,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=8.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "nemotron_h": (
        transformers.NemotronHConfig,
        transformers.NemotronHForCausalLM,
        dict(
            hybrid_override_pattern="M*-E",
            head_dim=16,
            mamba_num_heads=8,
            mamba_head_dim=8,
            n_groups=2,
            ssm_state_size=8,
            chunk_size=8,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=2.5,
            use_bias=True,
            mlp_bias=True,
            layer_norm_epsilon=1e-5,
        ),
    ),
}
MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "nemotron_h")


def make_hf_model(family: str, out_dir: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Builds a tiny random float32 HF model of `family`, saves it to `out_dir`, returns it (eval)."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
        for name, b in model.named_buffers():  # Nemotron-H's router correction bias
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    model.config._attn_implementation = "eager"
    model.eval()
    model.save_pretrained(out_dir)
    return model


def make_gemma3_multimodal(out_dir: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random Gemma3ForConditionalGeneration (SigLIP tower included) saved to `out_dir`:
    its text model is the "gemma3" family's."""
    text = FAMILIES["gemma3"][0](**{**COMMON, **FAMILIES["gemma3"][2]})
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=255,
        boi_token_index=253,
        eoi_token_index=254,
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.08 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    model.eval()
    model.save_pretrained(out_dir)
    return model


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF's [experts, in, out] float -> (blocks [experts, out, in / 32, 16] uint8, scales
    [experts, out, in / 32] uint8), as the hub's gpt-oss checkpoints store expert weights: per
    group of 32 inputs a power of two 2^e with the group's largest magnitude / 2^e <= 6, each value
    rounded to the nearest FP4 (e2m1) value, two a byte (the even one in the low nibble)."""
    from jax_sft.models.mxfp4 import FP4_VALUES

    rows = np.swapaxes(w, 1, 2).astype(np.float32)  # [experts, out, in]
    groups = rows.reshape(*rows.shape[:-1], -1, 32)
    exponent = np.ceil(np.log2(np.maximum(np.abs(groups).max(-1), 1e-30) / 6.0)).astype(np.int32)
    scaled = groups / np.exp2(exponent)[..., None].astype(np.float32)
    index = np.abs(scaled[..., None] - FP4_VALUES).argmin(-1).astype(np.uint8)  # nearest, sign included
    blocks = index[..., 0::2] | (index[..., 1::2] << 4)
    return np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(exponent + 127, np.uint8)


def save_mxfp4(src: Path, out: Path) -> Path:
    """A copy of the gpt-oss folder `src` (one model.safetensors) with its experts' gate_up_proj
    and down_proj in MXFP4 (`*_blocks` / `*_scales`) and config.json's quantization_config, as the
    hub's openai/gpt-oss-* are; the other tensors as they are."""
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(state.pop(name).float().numpy())
        state[f"{name}_blocks"], state[f"{name}_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    modules = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": modules}
    (out / "config.json").write_text(json.dumps(config))
    return out


def hf_logits(model, input_ids, position_ids=None):
    """float32 logits [b, t, vocab] as numpy, from int numpy inputs."""
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(input_ids, dtype=torch.long),
            position_ids=None if position_ids is None else torch.as_tensor(position_ids, dtype=torch.long),
        )
    return out.logits.float().numpy()


@nnx.jit
def _jit_forward(model, input_ids, positions, segment_ids):
    return model(input_ids, positions, segment_ids)


def jax_logits(model, input_ids, positions=None, segment_ids=None) -> np.ndarray:
    """model(...) under nnx.jit (compiling once per model and shape beats eager op-by-op)."""
    as_array = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    return np.asarray(_jit_forward(model, as_array(input_ids), as_array(positions), as_array(segment_ids)))


def hf_val_loss(model, batches) -> float:
    """The masked mean NLL (float64 log-softmax) of a transformers (or peft) causal LM over jax_sft
    batches (dicts with input_ids, positions, targets, loss_mask): what jax_sft's val_loss is."""
    nll, count = 0.0, 0.0
    for mb in batches:
        with torch.no_grad():
            logits = model(
                torch.tensor(mb["input_ids"], dtype=torch.long),
                position_ids=torch.tensor(mb["positions"], dtype=torch.long),
            ).logits
        logp = torch.log_softmax(logits.double(), -1)
        tok = logp.gather(-1, torch.tensor(mb["targets"], dtype=torch.long)[..., None])[..., 0]
        mask = torch.tensor(mb["loss_mask"], dtype=torch.float64)
        nll += float(-(tok * mask).sum())
        count += float(mask.sum())
    assert count > 0
    return nll / count
