"""Parameter and FLOP counts of a model from its `ModelConfig` alone (no arrays): what the dry run
reports, what memory estimates build on, and the MFU's numerator. The family registry uses these
for every family whose layers they describe (`jax_sft.models.registry.Family.param_count`,
`.training_flops`). No runtime import of the models package: a leaf module.

The counts follow the decoder of `jax_sft.models.decoder` parameter for parameter (tests compare
them with an abstract `CausalLM`): embeddings [vocab, hidden]; per layer the RMSNorm weights,
q/k/v/o kernels (and biases), q/k norms (over head_dim, or over the whole projection), attention
sinks [heads], a dense MLP (gate, up, down) or a mixture of experts (router [hidden, experts],
experts' gate/up/down, and with `moe_bias` the router's and experts' biases); the final norm; an
untied lm_head [hidden, vocab] (vocabulary padding, which depends on the mesh, is not counted). A
LoRA adapter on a projection whose kernel maps input dims I to output dims O has
dim * (prod(I) + prod(O)) parameters (A [*I, dim], B [dim, *O]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jax_sft.models.config import ModelConfig
    from jax_sft.models.options import LoraConfig

__all__ = [
    "base_param_count",
    "layer_projection_shapes",
    "lora_param_count",
    "lora_sites",
    "projection_shapes",
    "state_bytes_per_device",
    "activation_bytes_per_device",
    "training_flops",
    "dense_mlp_layers",
]

# RMSNorm weights [hidden] per layer by norm placement (models/decoder.py DecoderLayer).
NORMS_PER_LAYER = {"pre": 2, "sandwich": 4, "post": 2}


def projection_shapes(m: ModelConfig) -> dict[str, tuple[int, int]]:
    """(input size, output size) of each projection's kernel: q/k/v/o, the dense MLP's gate/up/down,
    lm_head."""
    e, q, kv = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    mlp = m.intermediate_size
    return {
        "q_proj": (e, q),
        "k_proj": (e, kv),
        "v_proj": (e, kv),
        "o_proj": (q, e),
        "gate_proj": (e, mlp),
        "up_proj": (e, mlp),
        "down_proj": (mlp, e),
        "lm_head": (e, m.vocab_size),
    }


def layer_projection_shapes(m: ModelConfig, layer: int | None) -> dict[str, tuple[int, int]]:
    """(input size, output size) of the projections of `layer` that LoRA may adapt: q/k/v/o and a
    dense MLP's gate/up/down; layer None: lm_head."""
    shapes = projection_shapes(m)
    if layer is None:
        return {"lm_head": shapes["lm_head"]}
    names = ("q_proj", "k_proj", "v_proj", "o_proj") + (
        ("gate_proj", "up_proj", "down_proj") if dense_mlp_layers(m)[layer] else ()
    )
    return {p: shapes[p] for p in names}


def dense_mlp_layers(m: ModelConfig) -> tuple[bool, ...]:
    """Per layer: whether its MLP is dense (not mixture-of-experts)."""
    return tuple(not (m.num_experts > 0 and m.moe_layers[i]) for i in range(m.num_layers))


def _qk_norm_params(m: ModelConfig) -> int:
    if m.qk_norm == "head":
        return 2 * m.head_dim
    if m.qk_norm == "projection":
        return (m.num_heads + m.num_kv_heads) * m.head_dim
    return 0


def base_param_count(m: ModelConfig) -> int:
    """Parameters of the model without adapters."""
    e, d = m.hidden_size, m.head_dim
    shapes = projection_shapes(m)
    attention = sum(i * o for i, o in (shapes[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj")))
    attention += (m.num_heads + 2 * m.num_kv_heads) * d * m.qkv_bias + e * m.o_bias + _qk_norm_params(m)
    attention += m.num_heads * m.attention_sinks
    dense = 3 * e * m.intermediate_size + (2 * m.intermediate_size + e) * m.mlp_bias
    sparse = e * m.num_experts + 3 * m.num_experts * e * m.moe_intermediate_size
    sparse += m.num_experts * (1 + 2 * m.moe_intermediate_size + e) * m.moe_bias  # router and expert biases
    norms = NORMS_PER_LAYER[m.norm_placement] * e
    layers = sum(attention + norms + (dense if is_dense else sparse) for is_dense in dense_mlp_layers(m))
    lm_head = 0 if m.tie_word_embeddings else e * m.vocab_size
    return m.vocab_size * e + layers + e + lm_head


def lora_sites(m: ModelConfig, lora: LoraConfig) -> frozenset[tuple[int | None, str]]:
    """The (layer, projection) sites of `m` that get adapters ((None, "lm_head") for the head)."""
    return lora.sites(m)


def lora_param_count(m: ModelConfig, lora: LoraConfig) -> tuple[int, int]:
    """(trainable adapter parameters, total parameters: the base's plus the adapters') of the model
    `m` with `lora`'s adapters."""
    trainable = sum(lora.dim * sum(m.projection_shapes(layer)[proj]) for layer, proj in lora_sites(m, lora))
    return trainable, m.param_count() + trainable


def state_bytes_per_device(
    m: ModelConfig, lora: LoraConfig | None, *, param_dtype: str, precision: str, devices: int
) -> dict[str, float]:
    """Bytes per device of the training state (activations not included) when FSDP shards it over
    `devices`: weights (the base in `param_dtype`; LoRA adapters fp32), gradients (the fp32
    accumulator of the trainable parameters), AdamW's two moments (in the trainable parameters'
    dtype) and the per-step compute-dtype copy of the weights that are not in it already."""
    size = {"float32": 4, "bfloat16": 2}
    base = m.param_count()
    trainable = lora_param_count(m, lora)[0] if lora is not None else base
    master = 4 if lora is not None else size[param_dtype]  # the trainable parameters' dtype
    weights = base * size[param_dtype] + (trainable * 4 if lora is not None else 0)
    copy = sum(
        n * size[precision]
        for n, dtype in ((base, param_dtype), (trainable if lora else 0, "float32"))
        if size[dtype] != size[precision]
    )
    parts = {"weights": weights, "gradients": 4 * trainable, "optimizer": 2 * master * trainable, "compute copy": copy}
    return {k: v / devices for k, v in parts.items()}


# Remat policies that keep only each layer's input for the backward pass (the others keep, at
# most, what no remat keeps: counted as "none").
_LAYER_INPUT_ONLY = ("full", "nothing_saveable")


def activation_bytes_per_device(
    m: ModelConfig,
    *,
    rows: int,
    seq: int,
    context: int,
    precision: str,
    remat: str,
    loss_chunk: int,
    flash: bool,
    key_block: int,
) -> dict[str, float]:
    """An estimate of one micro-batch's activations per device: `rows` rows of `seq` tokens, each
    split over `context` devices (models/context.py). Parts:

    layers     what the backward pass keeps, per token and layer in the compute dtype: the norms'
               and residuals' [hidden] x 4, q and the attention output, k and v, the MLP's gate,
               up and product (dense: intermediate_size; MoE: top-k x moe_intermediate_size),
               plus the fp32 softmax statistics; with `remat` "full" only the layers' inputs and
               one layer's working set
    attention  the scores a layer holds at once: context > 1, three fp32 [heads, chunk,
               key_block] blocks per row (models/context.py); context 1, none with a flash kernel
               (`flash`: cuDNN) and with "xla" the [heads, seq, seq] probabilities of every layer
               kept for the backward pass (compute dtype) plus three fp32 copies in flight
    loss       three fp32 [loss chunk, vocab] arrays per row (logits, probabilities, gradient)
    """
    size = {"float32": 4, "bfloat16": 2}[precision]
    e, heads = m.hidden_size, m.num_heads
    q, kv = heads * m.head_dim, m.num_kv_heads * m.head_dim
    moe = sum(m.moe_layers) if m.num_experts else 0
    mlp = ((m.num_layers - moe) * m.intermediate_size + moe * m.experts_per_token * m.moe_intermediate_size) / max(
        m.num_layers, 1
    )
    tokens = rows * seq / context
    per_token = size * (4 * e + 2 * q + 2 * kv + 3 * mlp) + 4 * 2 * heads
    if remat in _LAYER_INPUT_ONLY:
        layers = tokens * (m.num_layers * size * e + per_token)
    else:
        layers = tokens * m.num_layers * per_token
    if context > 1:
        attention = 3.0 * rows * heads * (seq / (2 * context)) * key_block * 4
    elif flash:
        attention = 0.0
    else:
        kept = 1 if remat in _LAYER_INPUT_ONLY else m.num_layers
        attention = rows * heads * float(seq) ** 2 * (kept * size + 3 * 4)
    loss = 3.0 * rows * min(loss_chunk, seq / context) * m.vocab_size * 4
    return {"layers": layers, "attention": attention, "loss": loss}


def training_flops(m: ModelConfig, sequence_lengths: np.ndarray) -> float:
    """Analytic FLOPs of forward + backward (3x forward) for sequences of the given lengths.

    Matmul FLOPs are 2 per multiply-add per token over every projection and the LM head; causal
    attention counts QK^T and AV over the n(n+1)/2 query-key pairs of a sequence (half of full
    attention), or fewer in a layer whose sliding window W caps the keys per query.
    Mixture-of-experts layers count their active parameters: the router and the top-k experts a
    token goes through.
    """
    d, hd = m.hidden_size, m.head_dim
    q, kv = m.num_heads * hd, m.num_kv_heads * hd
    attn = d * q + 2 * d * kv + q * d
    moe_layers = sum(m.moe_layers) if m.num_experts else 0
    dense_mlp = 3 * d * m.intermediate_size
    moe_mlp = d * m.num_experts + m.experts_per_token * 3 * d * m.moe_intermediate_size
    matmul_params = (
        m.num_layers * attn + (m.num_layers - moe_layers) * dense_mlp + moe_layers * moe_mlp + d * m.vocab_size
    )
    n = np.asarray(sequence_lengths, np.float64)
    pairs = 0.0
    for window in m.sliding_windows:
        w = n if window is None else np.minimum(n, window)
        pairs += (n * w - w * (w - 1) / 2).sum()  # = n(n+1)/2 when w = n
    forward = 2 * matmul_params * n.sum() + 2 * 2 * q * pairs
    return 3.0 * forward
