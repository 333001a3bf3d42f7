"""What several families share: Llama's weight table and the readers of sliding windows, biases and
dropout settings, as transformers 5's config classes define them."""

from __future__ import annotations

from typing import Any

from jax_sft.models.errors import ModelConfigError
from jax_sft.models.weights import HEADS, IN_HEADS, LINEAR, OUT_HEADS, SAME, HfTensor

# jax parameter path ("{i}" = layer) -> HF tensor. Entries whose parameter the config does not
# create (biases, lm_head when tied, norms of another placement) are simply not looked up.
LLAMA_WEIGHTS: dict[str, HfTensor] = {
    "embed_tokens.embedding": HfTensor("model.embed_tokens.weight", SAME),
    "layers.{i}.input_layernorm.weight": HfTensor("model.layers.{i}.input_layernorm.weight", SAME),
    "layers.{i}.post_attention_layernorm.weight": HfTensor("model.layers.{i}.post_attention_layernorm.weight", SAME),
    **{
        f"layers.{{i}}.self_attn.{p}_proj.kernel": HfTensor(f"model.layers.{{i}}.self_attn.{p}_proj.weight", IN_HEADS)
        for p in "qkv"
    },
    **{
        f"layers.{{i}}.self_attn.{p}_proj.bias": HfTensor(f"model.layers.{{i}}.self_attn.{p}_proj.bias", HEADS)
        for p in "qkv"
    },
    "layers.{i}.self_attn.o_proj.kernel": HfTensor("model.layers.{i}.self_attn.o_proj.weight", OUT_HEADS),
    "layers.{i}.self_attn.o_proj.bias": HfTensor("model.layers.{i}.self_attn.o_proj.bias", SAME),
    **{
        f"layers.{{i}}.mlp.{p}_proj.{kind}": HfTensor(f"model.layers.{{i}}.mlp.{p}_proj.{hf}", layout)
        for p in ("gate", "up", "down")
        for kind, hf, layout in (("kernel", "weight", LINEAR), ("bias", "bias", SAME))
    },
    "norm.weight": HfTensor("model.norm.weight", SAME),
    "lm_head.kernel": HfTensor("lm_head.weight", LINEAR),
}
QK_NORM_WEIGHTS = {
    f"layers.{{i}}.self_attn.{p}_norm.weight": HfTensor(f"model.layers.{{i}}.self_attn.{p}_norm.weight", SAME)
    for p in "qk"
}
FEEDFORWARD_NORM_WEIGHTS = {
    f"layers.{{i}}.{n}.weight": HfTensor(f"model.layers.{{i}}.{n}.weight", SAME)
    for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")
}


def biases(qkv: bool, o: bool, mlp: bool) -> dict[str, bool]:
    """The bias fields of `ModelConfig`."""
    return dict(qkv_bias=bool(qkv), o_bias=bool(o), mlp_bias=bool(mlp))


def every_layer(d: dict[str, Any], window: Any) -> tuple[int | None, ...]:
    """The same window (None: full attention) on every layer."""
    return (int(window) if window is not None else None,) * int(d["num_hidden_layers"])


def windows_by_layer_types(
    d: dict[str, Any], window: Any, default_types: list[str], source: str
) -> tuple[int | None, ...]:
    """Per-layer windows from config.json's `layer_types` (else `default_types`): the window on
    "sliding_attention" layers, None on "full_attention" ones."""
    num_layers = int(d["num_hidden_layers"])
    layer_types = d.get("layer_types") or default_types
    if len(layer_types) != num_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise ModelConfigError(
            f"{source}: layer_types={layer_types!r} must list 'full_attention' or 'sliding_attention' "
            f"for each of the {num_layers} layers"
        )
    return tuple(int(window) if t == "sliding_attention" and window is not None else None for t in layer_types)


def qwen_windows(d: dict[str, Any], source: str) -> tuple[int | None, ...]:
    """Qwen2 / Qwen3: windows only when `use_sliding_window`, on the layers `layer_types` marks
    "sliding_attention" (config.json's list, else layers i >= `max_window_layers`)."""
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    max_window_layers = int(d.get("max_window_layers", 28))
    default_types = [
        "sliding_attention" if window is not None and i >= max_window_layers else "full_attention"
        for i in range(int(d["num_hidden_layers"]))
    ]
    return windows_by_layer_types(d, window, default_types, source)


def no_dropout(d: dict[str, Any], source: str, *keys: str) -> None:
    """Dropout settings must be 0: jax_sft trains without dropout (it would change the loss)."""
    for key in keys:
        if float(d.get(key) or 0.0) != 0.0:
            raise ModelConfigError(f"{source}: {key}={d[key]} is not supported; set it to 0.0")
