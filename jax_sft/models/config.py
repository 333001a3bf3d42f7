"""`ModelConfig`: the decoder's hyper-parameters, read from (and written back to) HF `config.json`.

Supported families (`config.json` "architectures"): LlamaForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, MistralForCausalLM. Each reading mirrors the transformers 5 config class of the
family (defaults, `head_dim`, biases, which layers use a sliding window), so a checkpoint means the
same thing here as in `transformers`.

RoPE: transformers 5 writes `rope_parameters` {"rope_type", "rope_theta", ...}; older files write
`rope_theta` beside `rope_scaling` {"type" or "rope_type", ...}. Both are read; rope types
"default", "linear", "llama3" and "yarn" are supported, anything else raises.

`apply_overrides` merges NeMo RL's `policy.hf_config_overrides` into a config dict as
`AutoConfig.from_pretrained(path, **overrides)` does (top-level keys replace the file's); a
`rope_scaling` override replaces the file's RoPE dict, under the key the file uses.

Architectures that the configs name but this decoder cannot build (vision-language, Mamba hybrids,
mixture-of-experts) fail in `ModelConfig.from_hf_dict` with one line naming them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# What the architectures that jax_sft cannot build are, by model_type (and architecture name).
_UNSUPPORTED_KINDS = (
    ("a vision-language model", ("ForConditionalGeneration", "_vl", "vl_", "llava", "vision",
                                 "idefics", "smolvlm", "mllama", "paligemma")),
    ("a Mamba hybrid", ("nemotron_h", "nemotronh", "mamba", "jamba", "zamba", "falcon_h1")),
    ("a mixture-of-experts model (MoE support is not built yet)",
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
            raise ValueError(_unsupported(archs, d.get("model_type"), source))

        def req(key: str) -> Any:
            if d.get(key) is None:
                raise ValueError(f"{source}: required key {key!r} is missing ({arch})")
            return d[key]

        hidden, heads = int(req("hidden_size")), int(req("num_attention_heads"))
        num_layers = int(req("num_hidden_layers"))
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        if float(d.get("attention_dropout") or 0.0) != 0.0:
            raise ValueError(
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
        elif arch == "Qwen3ForCausalLM":
            qkv_bias, o_bias, mlp_bias = attention_bias, attention_bias, False
        else:  # Mistral: no biases anywhere
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
            rope=_read_rope(d, source),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_windows=_read_sliding_windows(d, arch, num_layers, source),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            torch_dtype=d.get("dtype") or d.get("torch_dtype"),
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
        raise ValueError(f"{source}: {key}={params!r}: per-layer-type RoPE parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: {key} rope_type={rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if float(params.get("partial_rotary_factor", d.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return RopeConfig(theta=theta)

    def field(name: str) -> Any:
        if params.get(name) is None:
            raise ValueError(f"{source}: {key} of rope_type {rope_type!r} needs {name!r}")
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
        raise ValueError(f"{source}: {rope_type} RoPE needs original_max_position_embeddings")
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
    if arch == "MistralForCausalLM":
        window = d.get("sliding_window")
        return (int(window) if window is not None else None,) * num_layers
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    layer_types = d.get("layer_types")
    if layer_types is None:
        max_window_layers = int(d.get("max_window_layers", 28))
        layer_types = [
            "sliding_attention" if window is not None and i >= max_window_layers else "full_attention"
            for i in range(num_layers)
        ]
    if len(layer_types) != num_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise ValueError(
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
