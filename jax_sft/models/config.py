"""`ModelConfig`: the decoder's hyper-parameters, read from (and written back to) HF `config.json`.

`ModelConfig.from_hf_dict(d)` reads the keys every family shares (sizes, heads, RoPE, tying,
dtype, activation) and asks the architecture's registry entry (`jax_sft.models.registry`,
`jax_sft/models/families/`) for the rest: biases, windows, norm placement, q/k norms, mixture of
experts, soft-capping. An architecture no family reads fails with one line naming it, what it is
and the supported ones.

`apply_overrides` merges NeMo RL's `policy.hf_config_overrides` into a config dict as
`AutoConfig.from_pretrained(path, **overrides)` does (top-level keys replace the file's); a
`rope_scaling` override replaces the file's RoPE dict, under the key the file uses.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jax_sft.models import registry
from jax_sft.models.errors import ModelConfigError
from jax_sft.models.rope import RopeConfig

__all__ = [
    "ModelConfig",
    "ModelConfigError",
    "MambaConfig",
    "RopeConfig",
    "apply_overrides",
    "NORM_PLACEMENTS",
    "QK_NORMS",
    "LAYER_KINDS",
    "LAYER_PATTERN",
]

NORM_PLACEMENTS = ("pre", "sandwich", "post")  # see models/decoder.py DecoderLayer
QK_NORMS = (None, "head", "projection")
EXPERT_GLUS = ("gated", "clamped_swiglu")  # see models/moe.py
# A hybrid model's blocks (models/hybrid.py): each layer is one of them, with its own pre-norm and
# residual; LAYER_PATTERN: each one's character in Nemotron-H's hybrid_override_pattern.
LAYER_KINDS = ("mamba", "attention", "mlp", "moe")
LAYER_PATTERN = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "relu2": "relu2"}
# Fields that may differ between a checkpoint's model and the run that continues from it: the
# checkpoint's storage dtype, the files' text, the context length and its RoPE (extending the context
# of a model under training), the router loss coefficient (a training setting).
CHANGEABLE_FIELDS = frozenset(
    {
        "torch_dtype",
        "hf_config_json",
        "generation_config_json",
        "max_position_embeddings",
        "rope",
        "local_rope",
        "router_aux_loss_coef",
    }
)


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """A Mamba-2 mixer (models/mamba.py), as transformers' NemotronHConfig names its keys in
    comments: inner channels num_heads x head_dim, B and C of `groups` groups x `state_size`."""

    num_heads: int  # mamba_num_heads
    head_dim: int  # mamba_head_dim
    state_size: int  # ssm_state_size
    groups: int  # n_groups
    conv_kernel: int  # conv_kernel
    chunk_size: int  # chunk_size: tokens per chunk of the chunked scan
    conv_bias: bool  # use_conv_bias
    proj_bias: bool  # use_bias: biases on in_proj and out_proj
    dt_limit: tuple[float, float]  # time_step_limit: dt is clamped to it
    eps: float  # the gated norm's epsilon (layer_norm_epsilon)

    @property
    def inner(self) -> int:
        """Channels of x (and of z and the gated norm): num_heads x head_dim."""
        return self.num_heads * self.head_dim

    @property
    def in_proj_size(self) -> int:
        """Rows of transformers' in_proj: z, x, B, C and dt."""
        return 2 * self.inner + 2 * self.groups * self.state_size + self.num_heads

    @property
    def conv_channels(self) -> int:
        """Channels of the depthwise conv1d: x, B and C."""
        return self.inner + 2 * self.groups * self.state_size


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
    sliding_windows: tuple[int | None, ...]
    max_position_embeddings: int
    torch_dtype: str | None  # the checkpoint's dtype as config.json names it ("bfloat16"), if any
    qkv_bias: bool = False  # biases on q_proj, k_proj, v_proj
    o_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False  # biases on gate_proj, up_proj, down_proj
    # Layer kinds. Norms: "pre" (before attention and MLP: Llama), "sandwich" (before and after
    # both: Gemma), "post" (after both, none before: OLMo 2).
    norm_placement: str = "pre"
    qk_norm: str | None = None  # RMSNorm on q and k before RoPE: per "head" (Qwen3), whole "projection" (OLMo 2)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): Gemma's (1 + w)
    activation: str = "silu"  # MLP gate activation: "silu" or "gelu_tanh"
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
    moe_bias: bool = False  # biases on the router and on the experts' gate/up/down projections (gpt-oss)
    # The experts' activation: "gated" act(gate) * up; "clamped_swiglu" gpt-oss's
    # (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
    expert_glu: str = "gated"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_sinks: bool = False  # a learned logit per head in each softmax's denominator (gpt-oss)
    quantization: str | None = None  # config.json's quantization_config quant_method ("mxfp4": dequantized on load)
    # Hybrid models (Nemotron-H). layer_kinds: one of LAYER_KINDS per layer (() : every layer is
    # attention + MLP, DecoderLayer); mamba: the Mamba-2 mixers' settings; use_rope False: attention
    # without position embeddings. Sigmoid routing ("sigmoid", Nemotron-H / DeepSeek-V3): sigmoid
    # scores plus e_score_correction_bias choose the top-k among the best `topk_groups` of
    # `expert_groups` groups, weighted by the plain scores (renormalised when norm_topk_prob) times
    # `routed_scaling_factor`; the experts' MLPs are not gated (up, activation, down) and a shared
    # expert of `shared_expert_intermediate_size` runs on every token.
    layer_kinds: tuple[str, ...] = ()
    mamba: MambaConfig | None = None
    use_rope: bool = True
    moe_router: str = "softmax"
    expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    shared_expert_intermediate_size: int = 0
    hf_config_json: str = dataclasses.field(default="{}", repr=False)
    generation_config_json: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if self.norm_placement not in NORM_PLACEMENTS or self.qk_norm not in QK_NORMS:
            raise ValueError(
                f"norm_placement={self.norm_placement!r}, qk_norm={self.qk_norm!r}: expected one of "
                f"{NORM_PLACEMENTS}, {QK_NORMS}"
            )
        if self.expert_glu not in EXPERT_GLUS:
            raise ValueError(f"expert_glu={self.expert_glu!r}: expected one of {EXPERT_GLUS}")

    def differences(self, other: ModelConfig) -> list[str]:
        """ "<field>: <self's> vs <other's>" for each field of the model that differs, except those a
        run may change and still continue from the other's weights (`CHANGEABLE_FIELDS`)."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in CHANGEABLE_FIELDS and getattr(self, f.name) != getattr(other, f.name)
        ]
        if self.layer_kinds and (
            len(self.layer_kinds) != self.num_layers or not set(self.layer_kinds) <= set(LAYER_KINDS)
        ):
            raise ValueError(
                f"layer_kinds={self.layer_kinds}: expected one of {LAYER_KINDS} per layer ({self.num_layers})"
            )

    @property
    def family(self) -> str:
        """The registry name of this architecture's family ("llama", "qwen3moe", ...)."""
        return registry.family_of(self.architecture).name

    def param_count(self) -> int:
        """Parameters of the model (no adapters), as its family counts them."""
        return registry.family_of(self.architecture).param_count(self)

    def training_flops(self, sequence_lengths) -> float:
        """Forward + backward FLOPs for sequences of these lengths (the MFU's numerator)."""
        return registry.family_of(self.architecture).training_flops(self, sequence_lengths)

    def projection_shapes(self, layer: int | None) -> dict[str, tuple[int, int]]:
        """(input size, output size) of each linear projection of `layer` that LoRA may adapt
        (None: {"lm_head": ...}), as its family counts them."""
        return registry.family_of(self.architecture).projection_shapes(self, layer)

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
        arch = registry.find(archs)
        if arch is None:
            raise ModelConfigError(registry.unsupported(archs, d.get("model_type"), source))
        family = registry.family_of(arch)
        if family.text_config is not None:  # a multimodal checkpoint: its text model
            text = cls.from_hf_dict(family.text_config(d, source), source=f"{source} (text_config)")
            return dataclasses.replace(text, text_of_multimodal=True)
        d = {**family.defaults, **d}  # keys config.json leaves to the HF class
        read = d if family.prepare is None else family.prepare(d, source)  # what is read, not written back
        fields = {**_common_fields(read, arch, family, source), **family.fields(read, source)}
        return cls(architecture=arch, **fields, hf_config_json=json.dumps(d, sort_keys=True))

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The original config.json with `architectures`, `tie_word_embeddings` and `dtype` set, and
        without `quantization_config`: jax_sft's weights (and exports) are dequantized."""
        d = json.loads(self.hf_config_json)
        d.pop("quantization_config", None)
        d["architectures"] = [self.architecture]
        d["tie_word_embeddings"] = self.tie_word_embeddings
        if dtype is not None:
            d["dtype"] = dtype  # transformers 5's key; older versions read torch_dtype
            if "torch_dtype" in d:
                d["torch_dtype"] = dtype
        return d


def _common_fields(d: dict[str, Any], arch: str, family: registry.Family, source: str) -> dict[str, Any]:
    """The fields every family reads alike (family.head_dim, activation_key and rope say how)."""

    def req(key: str) -> Any:
        if d.get(key) is None:
            raise ModelConfigError(f"{source}: required key {key!r} is missing ({arch})")
        return d[key]

    hidden, heads = int(req("hidden_size")), int(req("num_attention_heads"))
    act = d.get(family.activation_key, "silu")
    if act not in _ACTIVATIONS:
        raise ModelConfigError(
            f"{source}: {family.activation_key}={act!r} is not supported (one of {sorted(_ACTIVATIONS)})"
        )
    if float(d.get("attention_dropout") or 0.0) != 0.0:
        raise ModelConfigError(f"{source}: attention_dropout={d['attention_dropout']} is not supported; set it to 0.0")
    return dict(
        vocab_size=int(req("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(req("intermediate_size")),
        num_layers=int(req("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or family.head_dim or hidden // heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=family.rope(d, source),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        torch_dtype=d.get("dtype") or d.get("torch_dtype"),
        activation=_ACTIVATIONS[act],
    )


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
