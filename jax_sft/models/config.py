"""`ModelConfig`: the decoder's hyper-parameters, read from (and written back to) HF `config.json`.

Supported families (`config.json` "architectures"): LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, MistralForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM (and the text part of
Gemma3ForConditionalGeneration), Qwen3MoeForCausalLM, MixtralForCausalLM. Each reading mirrors the
transformers 5 config class of the family (defaults, `head_dim`, biases, which layers use a sliding
window, which layers are mixture-of-experts), so a checkpoint means the same thing here as in
`transformers`. The Gemma and MoE specifics are read by `_gemma_fields` and `_moe_fields`: flags
(`norm_offset`, `activation`, `sandwich_norm`, `embed_scale`, soft-capping, `local_rope`,
`moe_layers`, ...) that the one decoder in decoder.py follows.

RoPE: transformers 5 writes `rope_parameters` {"rope_type", "rope_theta", ...}; older files write
`rope_theta` beside `rope_scaling` {"type" or "rope_type", ...}. Both are read; rope types
"default", "linear", "llama3" and "yarn" are supported, anything else raises.

`apply_overrides` merges NeMo RL's `policy.hf_config_overrides` into a config dict as
`AutoConfig.from_pretrained(path, **overrides)` does (top-level keys replace the file's); a
`rope_scaling` override replaces the file's RoPE dict, under the key the file uses.

Architectures that the configs name but this decoder cannot build (vision-language other than
Gemma 3's text model, Mamba hybrids, other mixture-of-experts) fail in `ModelConfig.from_hf_dict`
with one line naming them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from jax_sft.errors import InputError


class ModelConfigError(InputError, ValueError):
    """A model's config.json (or policy.hf_config_overrides) that jax_sft cannot build from."""


SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",  # its text model; exported as Gemma3ForCausalLM
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# What the architectures that jax_sft cannot build are, by model_type (and architecture name).
_UNSUPPORTED_KINDS = (
    ("a vision-language model", ("ForConditionalGeneration", "_vl", "vl_", "llava", "vision",
                                 "idefics", "smolvlm", "mllama", "paligemma")),
    ("a Mamba hybrid", ("nemotron_h", "nemotronh", "mamba", "jamba", "zamba", "falcon_h1")),
    ("a mixture-of-experts model other than Qwen3-MoE and Mixtral",
     ("moe", "gpt_oss", "gptoss", "mixtral", "deepseek", "dbrx", "olmoe", "granitemoe")),
)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: `theta` base; `rope_type` "default" | "linear" | "llama3" | "yarn" with
    its fields (as transformers' modeling_rope_utils reads them)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 and yarn
    beta_fast: float = 32.0  # yarn only
    beta_slow: float = 1.0  # yarn only
    truncate: bool = True  # yarn only
    attention_factor: float = 1.0  # yarn: scales cos and sin (transformers' attention_scaling)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable (it is static model metadata under jit) description of one decoder.

    `sliding_windows[i]` is layer i's window W in HF's meaning (query i sees keys j with
    i - W < j <= i) or None for full causal attention. `hf_config_json` (and
    `generation_config_json`) are the original files' text, kept so that `save_pretrained`
    writes back every key it was given.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on q_proj, k_proj, v_proj
    o_bias: bool  # bias on o_proj
    mlp_bias: bool  # biases on gate_proj, up_proj, down_proj
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_windows: tuple[int | None, ...]
    max_position_embeddings: int
    torch_dtype: str | None  # the checkpoint's dtype as config.json names it ("bfloat16"), if any
    # Gemma 2 / 3 (defaults: the Llama-like families).
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): Gemma's (1 + w)
    activation: str = "silu"  # MLP gate activation: "silu" or "gelu_tanh"
    sandwich_norm: bool = False  # extra norms after attention and around the MLP (Gemma)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    query_scale: float | None = None  # attention softmax scale; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> c * tanh(scores / c) before the mask
    final_softcap: float | None = None  # logits -> c * tanh(logits / c)
    local_rope: RopeConfig | None = None  # RoPE of the sliding-window layers when it differs (Gemma 3)
    text_of_multimodal: bool = False  # read from a Gemma3ForConditionalGeneration checkpoint
    # Mixture of experts (num_experts 0: dense).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE block (True) or dense MLP
    router_aux_loss_coef: float = 0.0  # 0 unless config.json's output_router_logits is true
    hf_config_json: str = dataclasses.field(default="{}", repr=False)
    generation_config_json: str | None = dataclasses.field(default=None, repr=False)

    @property
    def family(self) -> str:
        return self.architecture.removesuffix("ForCausalLM").lower()

    @property
    def context_length(self) -> int:
        """The longest sequence the model is configured for: max_position_embeddings, or for YaRN
        the extended length factor x original_max_position_embeddings when that is longer."""
        if self.rope.rope_type == "yarn":
            extended = int(self.rope.factor * self.rope.original_max_position_embeddings)
            return max(self.max_position_embeddings, extended)
        return self.max_position_embeddings

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Reads an HF config dict; `source` names the file in error messages."""
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelConfigError(_unsupported(archs, d.get("model_type"), source))
        if arch == "Gemma3ForConditionalGeneration":
            return _text_of_multimodal(cls, d, source)
        d = {**_FAMILY_DEFAULTS.get(arch, {}), **d}  # keys config.json leaves to the HF class

        def req(key: str) -> Any:
            if d.get(key) is None:
                raise ModelConfigError(f"{source}: required key {key!r} is missing ({arch})")
            return d[key]

        hidden, heads = int(req("hidden_size")), int(req("num_attention_heads"))
        num_layers = int(req("num_hidden_layers"))
        gemma = arch in _GEMMA
        act_key = "hidden_activation" if gemma else "hidden_act"
        act = d.get(act_key, "silu")
        if act not in _ACTIVATIONS:
            raise ModelConfigError(f"{source}: {act_key}={act!r} is not supported (one of {sorted(_ACTIVATIONS)})")
        if float(d.get("attention_dropout") or 0.0) != 0.0:
            raise ModelConfigError(
                f"{source}: attention_dropout={d['attention_dropout']} is not supported; set it to 0.0"
            )
        # head_dim: Qwen3Config defaults to 128 when absent; the others derive it.
        default_head_dim = 128 if arch == "Qwen3ForCausalLM" else hidden // heads
        head_dim = int(d.get("head_dim") or default_head_dim)

        attention_bias = bool(d.get("attention_bias", False))
        if arch == "LlamaForCausalLM":
            qkv_bias, o_bias, mlp_bias = attention_bias, attention_bias, bool(d.get("mlp_bias", False))
        elif arch == "Qwen2ForCausalLM":  # hard-coded in Qwen2Attention: q/k/v biases, none on o_proj
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", *_GEMMA):
            qkv_bias, o_bias, mlp_bias = attention_bias, attention_bias, False
        else:  # Mistral, Mixtral: no biases anywhere
            qkv_bias, o_bias, mlp_bias = False, False, False

        return cls(
            architecture=arch,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_read_rope(d, source) if arch != "Gemma3ForCausalLM" else _gemma3_ropes(d, source)[0],
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
            sliding_windows=_read_sliding_windows(d, arch, num_layers, source),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            torch_dtype=d.get("dtype") or d.get("torch_dtype"),
            activation=_ACTIVATIONS[act],
            **(_gemma_fields(d, arch, source) if gemma else {}),
            **_moe_fields(d, arch, num_layers, source),
            hf_config_json=json.dumps(d, sort_keys=True),
        )

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The original config.json with `architectures`, `tie_word_embeddings` and `dtype` set."""
        d = json.loads(self.hf_config_json)
        d["architectures"] = [self.architecture]
        d["tie_word_embeddings"] = self.tie_word_embeddings
        if dtype is not None:
            d["dtype"] = dtype  # transformers 5's key; older versions read torch_dtype
            if "torch_dtype" in d:
                d["torch_dtype"] = dtype
        return d


_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_MOE = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# The transformers 5 config classes' defaults for keys a config.json may leave out (hub Gemma 3
# text_configs list only what differs from Gemma3TextConfig).
_GEMMA_DEFAULTS = dict(
    head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
    query_pre_attn_scalar=256, sliding_window=4096, num_attention_heads=8, num_key_value_heads=4,
    hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
)
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "Gemma2ForCausalLM": dict(_GEMMA_DEFAULTS, vocab_size=256000, max_position_embeddings=8192,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "Gemma3ForCausalLM": dict(_GEMMA_DEFAULTS, vocab_size=262208, max_position_embeddings=131072,
                              sliding_window_pattern=6),
    "Qwen3MoeForCausalLM": dict(num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                                router_aux_loss_coef=0.001),
    "MixtralForCausalLM": dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001),
}


def _text_of_multimodal(cls, d: dict[str, Any], source: str) -> ModelConfig:
    """Gemma3ForConditionalGeneration: its `text_config` read as a Gemma3ForCausalLM (what the
    export writes; the vision tower is not part of the model)."""
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ModelConfigError(f"{source}: Gemma3ForConditionalGeneration needs a text_config dict")
    text = {**text, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
    text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", True))
    if text.get("dtype") is None and text.get("torch_dtype") is None:
        text["dtype"] = d.get("dtype") or d.get("torch_dtype")
    config = cls.from_hf_dict(text, source=f"{source} (text_config)")
    return dataclasses.replace(config, text_of_multimodal=True)


def _gemma_fields(d: dict[str, Any], arch: str, source: str) -> dict[str, Any]:
    """Gemma 2 / 3: (1 + w) norms, pre/post norms, scaled embeddings, query_pre_attn_scalar,
    soft-capping (Gemma 3's attention ignores attn_logit_softcapping, as transformers does) and
    Gemma 3's separate RoPE of the sliding-window layers."""
    if d.get("use_bidirectional_attention"):
        raise ModelConfigError(f"{source}: use_bidirectional_attention=true is not supported (causal LM only)")
    fields = dict(
        norm_offset=1.0, sandwich_norm=True, embed_scale=True,
        query_scale=float(d["query_pre_attn_scalar"]) ** -0.5,
        final_softcap=_optional_float(d.get("final_logit_softcapping")),
    )
    if arch == "Gemma2ForCausalLM":
        fields["attn_softcap"] = _optional_float(d.get("attn_logit_softcapping"))
    else:
        fields["local_rope"] = _gemma3_ropes(d, source)[1]
    return fields


def _optional_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _gemma3_ropes(d: dict[str, Any], source: str) -> tuple[RopeConfig, RopeConfig]:
    """(full-attention RoPE, sliding-window RoPE). transformers 5 writes rope_parameters per layer
    type; older files write rope_theta (+ rope_scaling, global layers only) and rope_local_base_freq."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} <= set(params):
        return tuple(_read_rope({**d, "rope_parameters": params[t] or {"rope_type": "default"}},
                                f"{source} rope_parameters.{t}")
                     for t in ("full_attention", "sliding_attention"))
    full = _read_rope({**d, "rope_theta": d.get("rope_theta", 1_000_000.0)}, source)
    return full, RopeConfig(theta=float(d.get("rope_local_base_freq", 10_000.0)))


def _moe_fields(d: dict[str, Any], arch: str, num_layers: int, source: str) -> dict[str, Any]:
    """Qwen3-MoE and Mixtral: experts, top-k, which layers are sparse, the router's aux loss.

    As in transformers, the load-balancing loss joins the training loss only when config.json's
    `output_router_logits` is true (Qwen3-30B-A3B ships false); it is logged either way."""
    if arch not in _MOE:
        return {}
    experts = d.get("num_local_experts", d.get("num_experts", 128))
    top_k = int(d["num_experts_per_tok"])
    if not (isinstance(experts, int) and 1 <= top_k <= experts):
        raise ModelConfigError(f"{source}: num_experts_per_tok={top_k} must be within 1..num experts={experts}")
    if arch == "MixtralForCausalLM":
        if float(d.get("router_jitter_noise") or 0.0) != 0.0:
            raise ModelConfigError(f"{source}: router_jitter_noise={d['router_jitter_noise']} is not supported; set 0.0")
        size, norm_topk, sparse = int(d["intermediate_size"]), True, (True,) * num_layers
    else:
        size, norm_topk = int(d["moe_intermediate_size"]), bool(d.get("norm_topk_prob", False))
        step, dense = int(d["decoder_sparse_step"]), set(d.get("mlp_only_layers") or [])
        sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    coef = float(d["router_aux_loss_coef"]) if d.get("output_router_logits") else 0.0
    return dict(num_experts=experts, experts_per_token=top_k, moe_intermediate_size=size,
                norm_topk_prob=norm_topk, moe_layers=sparse, router_aux_loss_coef=coef)


def _unsupported(archs: list, model_type: Any, source: str) -> str:
    """One line: the architecture and model_type jax_sft cannot build, what it is, what can be."""
    names = " ".join([*(str(a) for a in archs), str(model_type or "")]).lower()
    kind = next((k for k, marks in _UNSUPPORTED_KINDS if any(m.lower() in names for m in marks)),
                None)
    what = f" ({kind})" if kind else ""
    return (f"{source}: architectures={archs!r} (model_type={model_type!r}){what} is not "
            f"supported by jax_sft; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")


def apply_overrides(d: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`d` with NeMo RL's `policy.hf_config_overrides` merged in (a new dict): each top-level key
    replaces the file's, as `AutoConfig.from_pretrained(path, **overrides)` does. A `rope_scaling`
    dict replaces the file's RoPE parameters (`rope_parameters` in transformers 5 files, where
    transformers moves it), keeping the file's `rope_theta` when it names none."""
    out = dict(d)
    for key, value in (overrides or {}).items():
        out[key] = value
    rope = (overrides or {}).get("rope_scaling")
    if isinstance(rope, dict) and "rope_parameters" in d and "rope_parameters" not in (overrides or {}):
        old = d["rope_parameters"] if isinstance(d["rope_parameters"], dict) else {}
        theta = old.get("rope_theta", d.get("rope_theta"))
        out["rope_parameters"] = {**({"rope_theta": theta} if theta is not None else {}), **rope}
        del out["rope_scaling"]
    return out


def _read_rope(d: dict[str, Any], source: str) -> RopeConfig:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise ModelConfigError(f"{source}: {key}={params!r}: per-layer-type RoPE parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"{source}: {key} rope_type={rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if float(params.get("partial_rotary_factor", d.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ModelConfigError(f"{source}: partial_rotary_factor != 1 is not supported")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return RopeConfig(theta=theta)

    def field(name: str) -> Any:
        if params.get(name) is None:
            raise ModelConfigError(f"{source}: {key} of rope_type {rope_type!r} needs {name!r}")
        return params[name]

    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(field("factor")))
    # As transformers: a top-level original_max_position_embeddings wins, then the rope dict's,
    # then max_position_embeddings.
    original = (
        d.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or d.get("max_position_embeddings")
    )
    if original is None:
        raise ModelConfigError(f"{source}: {rope_type} RoPE needs original_max_position_embeddings")
    if rope_type == "yarn":
        return _read_yarn(d, params, theta, int(original))
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(field("factor")),
        low_freq_factor=float(field("low_freq_factor")),
        high_freq_factor=float(field("high_freq_factor")),
        original_max_position_embeddings=int(original),
    )


def _read_sliding_windows(
    d: dict[str, Any], arch: str, num_layers: int, source: str
) -> tuple[int | None, ...]:
    """Per-layer window, as transformers 5 decides it for each family.

    Llama: never. Mistral: every layer when `sliding_window` is set. Qwen2/Qwen3: only when
    `use_sliding_window` is true, and then on the layers that `layer_types` marks
    "sliding_attention" (config.json's list, else layers i >= `max_window_layers`).
    """
    if arch == "LlamaForCausalLM":
        return (None,) * num_layers
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        window = d.get("sliding_window")
        return (int(window) if window is not None else None,) * num_layers
    if arch == "Qwen3MoeForCausalLM":  # every layer when use_sliding_window
        window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
        return (int(window) if window is not None else None,) * num_layers
    if arch in _GEMMA:
        window = d.get("sliding_window")
        # Gemma 2: even layers slide; Gemma 3: all but every sliding_window_pattern-th layer.
        period = 2 if arch == "Gemma2ForCausalLM" else int(d.get("sliding_window_pattern", 6))
        default_types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]
    else:
        window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
        max_window_layers = int(d.get("max_window_layers", 28))
        default_types = [
            "sliding_attention" if window is not None and i >= max_window_layers else "full_attention"
            for i in range(num_layers)
        ]
    layer_types = d.get("layer_types") or default_types
    if len(layer_types) != num_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise ModelConfigError(
            f"{source}: layer_types={layer_types!r} must list 'full_attention' or 'sliding_attention' "
            f"for each of the {num_layers} layers"
        )
    return tuple(
        int(window) if t == "sliding_attention" and window is not None else None for t in layer_types
    )


def _read_yarn(d: dict[str, Any], params: dict[str, Any], theta: float, original: int) -> RopeConfig:
    """YaRN's fields as transformers' `_compute_yarn_parameters` reads them: factor (null: the
    ratio max_position_embeddings / original), attention_factor (null: from factor, mscale and
    mscale_all_dim), beta_fast / beta_slow (falsy: 32 / 1), truncate (absent: true)."""
    factor = params.get("factor")
    if factor is None:
        factor = d.get("max_position_embeddings", 2048) / original
    factor = float(factor)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    return RopeConfig(
        theta=theta,
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
    )
