"""What a model is built with, apart from its `ModelConfig` (no JAX): `ModelOptions` (dtypes, attention
kernel, rematerialisation, layer scan, LoRA) and `LoraConfig` with NeMo RL's module matching.

    options = ModelOptions(dtype="bfloat16", param_dtype="float32", remat="full", lora=LoraConfig(dim=8, alpha=16))
    model = CausalLM(config, options, rngs=nnx.Rngs(0))       # or CausalLM(config, dtype=jnp.float32, ...)
    model = from_pretrained(path, options, mesh=mesh)           # or from_pretrained(path, dtype=jnp.bfloat16)

The run plan (`jax_sft.config.plan`) makes one `ModelOptions` from the config; model constructors,
`from_pretrained`, export and generation take it whole. The keyword form (`dtype=...`) builds one.

Which projections get LoRA adapters (`LoraConfig.adapted`), as NeMo RL matches module names:

- NeMo RL's DTensor `policy.dtensor_cfg.lora_cfg` (`naming="hf"`), names as in the HF model
  (`q_proj`, ..., full names `model.layers.3.self_attn.q_proj`, `lm_head`): `match_all_linear`
  adapts every linear layer, lm_head included (Automodel's rule); else a module matches a
  `target_modules` entry equal to its name or a wildcard pattern of its full name
  (`*.layers.0.*.q_proj`; `*` matches any characters); `exclude_modules` removes modules the same
  way. Neither given: `*_proj` (every projection, not lm_head), as Automodel defaults. Hybrid
  layers (Nemotron-H, `HYBRID_PROJECTIONS`) are named as transformers names them:
  `model.layers.3.mixer.in_proj`, `model.layers.5.mixer.shared_experts.up_proj`.
- Megatron's `policy.megatron_cfg.peft` (`naming="megatron"`): `linear_qkv` (q, k, v), `linear_proj`
  (o), `linear_fc1` (gate, up), `linear_fc2` (down), `output_layer` (lm_head); full names
  `decoder.layers.3.self_attention.linear_qkv`, `decoder.layers.3.mlp.linear_fc1`. No targets: the
  four layer projections.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from functools import lru_cache
from typing import Any

import numpy as np

from jax_sft import choices
from jax_sft.errors import SettingError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LM_HEAD = "lm_head"
# Megatron's module name of each projection, and its parent module under decoder.layers.<i>.
_MEGATRON = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj"), ("linear_qkv", "self_attention")),
    "o_proj": ("linear_proj", "self_attention"),
    "gate_proj": ("linear_fc1", "mlp"),
    "up_proj": ("linear_fc1", "mlp"),
    "down_proj": ("linear_fc2", "mlp"),
}
_MEGATRON_DEFAULT = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


Site = tuple[int | None, str]  # (layer index, projection name); (None, "lm_head")

# Parameters that transformers holds as float32 buffers (Nemotron-H's router correction bias): read
# and exported like weights, never trained. No gradient reaches them; the compute copy of the
# weights keeps them in float32 (step.py) and weight decay skips them (optim.py).
BUFFERS = ("e_score_correction_bias",)


def dtype_name(dtype: Any) -> str:
    """ "bfloat16" for "bfloat16", jnp.bfloat16 or np.dtype(...): the name options store."""
    if isinstance(dtype, str):
        return dtype
    return np.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """FP8 matmuls in the projection layers (`jax_sft.models.fp8`): `format` "hybrid" (e4m3 forward,
    e5m2 gradients) or "e4m3" (both); `recipe` "delayed" (scales from an amax history of
    `history` steps) or "tensorwise" (current scaling: each tensor's own amax)."""

    format: str = "hybrid"
    recipe: str = "delayed"
    history: int = 16

    def __post_init__(self):
        if self.format not in choices.FP8 or self.format == "none":
            raise ValueError(f"fp8 format={self.format!r}; choose one of {choices.FP8[1:]}")
        if self.recipe not in choices.FP8_RECIPES:
            raise ValueError(f"fp8 recipe={self.recipe!r}; choose one of {choices.FP8_RECIPES}")
        if not (isinstance(self.history, int) and self.history >= 1):
            raise ValueError(f"fp8 history={self.history!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a `CausalLM` is built and run, apart from its architecture (hashable).

    dtype: the compute dtype ("bfloat16" or "float32"); param_dtype: how parameters are stored;
    attention: the kernel (`choices.ATTENTION`, see models/attention.py); remat: activation
    checkpointing per layer (`choices.REMAT`); scan_layers: the layers stacked and run by one
    `lax.scan`; max_segments: packed rows with cuDNN, the most segments per row; lora: adapters
    (None: none); fp8: FP8 matmuls in the projections (None: none); context_attention: attention
    across the mesh's context axis when it is > 1 (`choices.CONTEXT_ATTENTION`, see
    models/context.py). dtypes may be given as jnp / numpy dtypes; they are stored by name.
    """

    dtype: Any = "bfloat16"
    param_dtype: Any = "float32"
    attention: str = "auto"
    remat: str = "none"
    scan_layers: bool = False
    max_segments: int = 64
    lora: LoraConfig | None = None
    fp8: Fp8Config | None = None
    context_attention: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", dtype_name(self.param_dtype))
        if self.remat not in choices.REMAT:
            raise ValueError(f"remat={self.remat!r}; choose one of {choices.REMAT}")
        if self.attention not in choices.ATTENTION:
            raise ValueError(f"attention={self.attention!r}; choose one of {choices.ATTENTION}")
        if self.context_attention not in choices.CONTEXT_ATTENTION:
            raise ValueError(f"context_attention={self.context_attention!r}; choose one of {choices.CONTEXT_ATTENTION}")
        if not (isinstance(self.max_segments, int) and self.max_segments >= 1):
            raise ValueError(f"max_segments={self.max_segments!r} must be a positive integer")

    @classmethod
    def of(cls, options: ModelOptions | None = None, **changes: Any) -> ModelOptions:
        """`options` (default: the defaults) with the keyword `changes` (the keyword form of the
        model constructors: dtype=..., remat=...; None values are left out)."""
        base = options if options is not None else cls()
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(base, **changes) if changes else base


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters: what to adapt (see the module docstring) and how; built by jax_sft.config.lora from NeMo RL's
    `lora_cfg` / `megatron_cfg.peft`."""

    dim: int
    alpha: float
    dropout: float = 0.0
    dropout_position: str = "post"
    a_init: str = "xavier"
    target_modules: tuple[str, ...] = ()
    exclude_modules: tuple[str, ...] = ()
    match_all_linear: bool = False
    naming: str = "hf"
    seed: int = 0  # adapters' initial values: the same for every mesh and layer layout

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    def problems(self) -> list[str]:
        """What is wrong with the settings, one line each (keys as NeMo RL's lora_cfg names them)."""
        out = []
        if not (isinstance(self.dim, int) and self.dim >= 1):
            out.append(f"dim={self.dim!r}: expected a positive integer (the LoRA rank)")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            out.append(f"alpha={self.alpha!r}: expected a positive number (scale = alpha / dim)")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            out.append(f"dropout={self.dropout!r}: expected a probability in [0, 1)")
        if self.dropout_position not in choices.LORA_DROPOUT_POSITIONS:
            out.append(
                f"dropout_position={self.dropout_position!r}: expected one of {list(choices.LORA_DROPOUT_POSITIONS)}"
            )
        if self.a_init not in choices.LORA_A_INITS:
            out.append(f"lora_A_init={self.a_init!r}: expected one of {list(choices.LORA_A_INITS)}")
        if self.naming not in choices.LORA_NAMINGS:
            out.append(f"naming={self.naming!r}: expected one of {list(choices.LORA_NAMINGS)}")
        if self.match_all_linear and (self.target_modules or self.exclude_modules):
            out.append(
                "match_all_linear=true adapts every linear layer, so target_modules and "
                "exclude_modules must be empty; set match_all_linear=false to use them"
            )
        return out

    def adapted(self, num_layers: int, dense_mlp: tuple[bool, ...], has_lm_head: bool = True) -> frozenset[Site]:
        """The (layer, projection) sites of a decoder (attention + MLP layers) that get adapters.
        `dense_mlp[i]`: layer i has a dense MLP (MoE layers have none to adapt)."""
        return self.adapted_in(decoder_projections(dense_mlp[:num_layers]), has_lm_head)

    def adapted_in(self, layers: tuple[tuple[tuple[str, str], ...], ...], has_lm_head: bool = True) -> frozenset[Site]:
        """The sites that get adapters among `layers`: per layer its (projection, HF parent module)
        pairs (`layer_projections`)."""
        sites = [(i, proj, parent) for i, projs in enumerate(layers) for proj, parent in projs]
        if has_lm_head:
            sites.append((None, LM_HEAD, None))
        return frozenset((layer, proj) for layer, proj, parent in sites if self._matches(layer, proj, parent))

    def sites(self, config: Any) -> frozenset[Site]:
        """The adapted sites of the model of `config` (a ModelConfig), lm_head included."""
        if self.naming == "megatron" and config.layer_kinds:
            raise SettingError(
                f"LoRA with Megatron module names (policy.megatron_cfg.peft) on a {config.architecture}: its "
                "Mamba / hybrid layers have no Megatron names here; use policy.dtensor_cfg.lora_cfg (HF names)"
            )
        return self.adapted_in(layer_projections(config))

    def by_layer(self, config: Any, scan_layers: bool) -> dict[int | None, frozenset[str]]:
        """{layer index: its adapted projections, None: {"lm_head"} or {}} on the model of
        `config` (a ModelConfig); SettingError when nothing matches, when scan_layers needs the
        same adapters on every layer, or for dropout with an adapter on lm_head."""
        sites = self.sites(config)
        if not sites:
            raise SettingError(
                f"LoRA target_modules={list(self.target_modules)}, exclude_modules="
                f"{list(self.exclude_modules)} match no linear layer of this {config.architecture}"
            )
        unmatched = self.unmatched_targets(config)
        if unmatched:
            example = sorted(
                {self.module_name(0, p)[0] for p in ATTENTION + MLP} | {self.module_name(None, LM_HEAD)[0]}
            )
            raise SettingError(
                f"LoRA target_modules entr{'y' if len(unmatched) == 1 else 'ies'} {unmatched} "
                f"match{'es' if len(unmatched) == 1 else ''} no linear "
                f"layer of this {config.architecture} (the other entries do); an entry is a module name "
                f"({', '.join(example)}) or a wildcard pattern of a full name ({self.module_name(0, 'q_proj')[1]}). "
                "Correct or remove it"
            )
        by_layer = {i: frozenset(p for j, p in sites if j == i) for i in [None, *range(config.num_layers)]}
        if scan_layers and len({by_layer[i] for i in range(config.num_layers)}) > 1:
            raise SettingError(
                "LoRA adapters differ between layers (target_modules / exclude_modules name "
                "layers), but scan_layers=true needs the same on every layer; set "
                "policy.jax_cfg.scan_layers=false"
            )
        if self.dropout > 0 and by_layer[None]:
            raise SettingError(
                f"LoRA dropout={self.dropout} with an adapter on lm_head (match_all_linear "
                "adapts it) is not supported; exclude lm_head (target_modules: ['*_proj']) or "
                "set dropout to 0"
            )
        return by_layer

    def unmatched_targets(self, config: Any, has_lm_head: bool = True) -> list[str]:
        """The `target_modules` entries that match no module of the model of `config` (a
        ModelConfig; whether or not exclude_modules then removes what they match, and although the
        experts of a decoder's MoE layers, whose projections carry the MLP's names, get no
        adapters). Automodel ignores such an entry and Megatron-Bridge warns; here it is an error
        (a typo would silently train fewer adapters)."""
        layers = layer_projections(config) if config.layer_kinds else decoder_projections((True,) * config.num_layers)
        names = [self.module_name(i, p, parent) for i, projs in enumerate(layers) for p, parent in projs]
        names += [self.module_name(None, LM_HEAD)] if has_lm_head else []
        return [
            t
            for t in self.target_modules
            if not any(name is not None and (name == t or wildcard_match(t, full)) for name, full in names)
        ]

    def _matches(self, layer: int | None, proj: str, parent: str | None = None) -> bool:
        name, full = self.module_name(layer, proj, parent)
        if name is None:
            return False
        if self.match_all_linear:
            return True
        hit = lambda patterns: any(name == p or wildcard_match(p, full) for p in patterns)  # noqa: E731
        if self.target_modules:
            selected = hit(self.target_modules)
        elif self.naming == "megatron":
            selected = name in _MEGATRON_DEFAULT
        else:
            selected = self.exclude_modules != () or wildcard_match("*_proj", full)
        return selected and not hit(self.exclude_modules)

    def module_name(self, layer: int | None, proj: str, parent: str | None = None) -> tuple[str | None, str]:
        """(module name, full module name) of a site in this config's naming (HF or Megatron);
        `parent`: its HF parent module (None: a decoder's, `hf_module_name`)."""
        if self.naming == "megatron":
            if proj == LM_HEAD:
                return "output_layer", "output_layer"
            name, megatron_parent = _MEGATRON[proj]
            return name, f"decoder.layers.{layer}.{megatron_parent}.{name}"
        return proj, hf_module_name(layer, proj, parent)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**d, "target_modules": list(self.target_modules), "exclude_modules": list(self.exclude_modules)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        return cls(
            **{**d, "target_modules": tuple(d["target_modules"]), "exclude_modules": tuple(d["exclude_modules"])}
        )


# A LoRA checkpoint's reference to its frozen base (extra file LORA_FILE, see `base_reference`).
LORA_FILE = "lora.json"


def base_reference(
    lora: LoraConfig, model_name: str, hf_config: dict[str, Any], hf_config_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a LoRA checkpoint records about its base (extra file LORA_FILE): the adapters'
    config, the base's name or path (policy.model_name), the hf_config_overrides it was built with
    and the SHA-256 of its config as loaded (`CausalLM.config.to_hf_dict()`), so that resuming or
    exporting onto another base is refused (`base_problem`)."""
    return {
        "lora": lora.to_dict(),
        "base": {
            "model_name": str(model_name),
            "hf_config_overrides": hf_config_overrides or {},
            "config_sha256": config_hash(hf_config),
        },
    }


def base_problem(reference: dict[str, Any], model_name: str, hf_config: dict[str, Any]) -> str | None:
    """None when `hf_config` (of the base at `model_name`) is the one `reference` was trained on;
    else one sentence saying what differs."""
    if config_hash(hf_config) == reference["base"]["config_sha256"]:
        return None
    return (
        f"the base model {model_name} is not the one these LoRA adapters were trained on "
        f"({reference['base']['model_name']}): its config.json differs (SHA-256 of the loaded config "
        f"{config_hash(hf_config)[:12]}... != {reference['base']['config_sha256'][:12]}...)"
    )


def config_hash(hf_config: dict[str, Any]) -> str:
    """The SHA-256 of a config dict (keys sorted)."""
    return hashlib.sha256(json.dumps(hf_config, sort_keys=True).encode()).hexdigest()


def hf_module_name(layer: int | None, proj: str, parent: str | None = None) -> str:
    """The projection's module name in a transformers causal LM (PEFT's key names build on it);
    `parent` its module under the layer (None: a decoder's self_attn / mlp)."""
    if proj == LM_HEAD:
        return LM_HEAD
    parent = parent or ("self_attn" if proj in ATTENTION else "mlp")
    return f"model.layers.{layer}.{parent}.{proj}"


# The projections LoRA may adapt in each layer kind of a hybrid model (ModelConfig.layer_kinds), with
# their module under transformers' model.layers.<i> (Nemotron-H: every block's is "mixer"). The
# MoE router and routed experts are not linear layers there and get none.
HYBRID_PROJECTIONS = {
    "mamba": (("in_proj", "mixer"), ("out_proj", "mixer")),
    "attention": tuple((p, "mixer") for p in ATTENTION),
    "mlp": (("up_proj", "mixer"), ("down_proj", "mixer")),
    "moe": (("up_proj", "mixer.shared_experts"), ("down_proj", "mixer.shared_experts")),
}


def decoder_projections(dense_mlp: tuple[bool, ...]) -> tuple[tuple[tuple[str, str], ...], ...]:
    """Per decoder layer: (projection, HF parent) of q/k/v/o and, when its MLP is dense, gate/up/down."""
    attention = tuple((p, "self_attn") for p in ATTENTION)
    return tuple(attention + (tuple((p, "mlp") for p in MLP) if dense else ()) for dense in dense_mlp)


def layer_projections(config: Any) -> tuple[tuple[tuple[str, str], ...], ...]:
    """Per layer of the model of `config` (a ModelConfig): the (projection, HF parent module) pairs
    LoRA may adapt."""
    if config.layer_kinds:
        return tuple(HYBRID_PROJECTIONS[kind] for kind in config.layer_kinds)
    return decoder_projections(
        tuple(not (config.num_experts > 0 and config.moe_layers[i]) for i in range(config.num_layers))
    )


@lru_cache(maxsize=256)
def _wildcard_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$")


def wildcard_match(pattern: str, full_name: str) -> bool:
    """Whether `pattern` ("*" = any characters, everything else literal) matches the whole name."""
    return _wildcard_regex(pattern).match(full_name) is not None
