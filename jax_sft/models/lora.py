"""LoRA: low-rank adapters on the decoder's linear projections, as NeMo RL trains them.

A targeted projection y = x @ W (+ bias) becomes

    y = x @ W (+ bias) + scale * (x @ A) @ B,   scale = alpha / dim

A: [*in_dims, dim] (the base kernel's input dimensions), B: [dim, *out_dims]; B starts at zero, so
the model starts as the base. "xavier" draws A from N(0, 2 / (fan_in + dim)) (torch's
xavier_normal_ on the [dim, fan_in] weight), "uniform" from U(-1/sqrt(fan_in), 1/sqrt(fan_in))
(torch's kaiming_uniform_ with a=sqrt(5)), as NeMo RL's Automodel LoRA initialises. Dropout is
applied to x ("pre") or to the adapter's output ("post") while training.

Adapters are `LoRAParam`s (a subclass of `nnx.Param`): training splits the model with that filter,
so only adapters get gradients and optimizer state, and the base (`nnx.Param` otherwise) is frozen.
Adapters carry the logical axes of their base kernel's dimensions (plus "lora_rank", replicated),
so they shard with it.

Which projections get adapters (`LoraConfig.adapted`), as NeMo RL matches module names:

- NeMo RL's DTensor `policy.dtensor_cfg.lora_cfg` (`naming="hf"`), names as in the HF model
  (`q_proj`, ..., full names `model.layers.3.self_attn.q_proj`, `lm_head`): `match_all_linear`
  adapts every linear layer, lm_head included (Automodel's rule); else a module matches a
  `target_modules` entry equal to its name or a wildcard pattern of its full name
  (`*.layers.0.*.q_proj`; `*` matches any characters); `exclude_modules` removes modules the same
  way. Neither given: `*_proj` (every projection, not lm_head), as Automodel defaults.
- Megatron's `policy.megatron_cfg.peft` (`naming="megatron"`): `linear_qkv` (q, k, v), `linear_proj`
  (o), `linear_fc1` (gate, up), `linear_fc2` (down), `output_layer` (lm_head); full names
  `decoder.layers.3.self_attention.linear_qkv`, `decoder.layers.3.mlp.linear_fc1`. No targets: the
  four layer projections. Megatron's fused linear_qkv / linear_fc1 adapters share one A across the
  fused projections; here each projection has its own A (same rank).

Mixture-of-experts experts and routers get no adapters (they stay frozen).
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LM_HEAD = "lm_head"
DROPOUT_POSITIONS = ("pre", "post")
A_INITS = ("xavier", "uniform")
NAMINGS = ("hf", "megatron")
# Megatron's module name of each projection, and its parent module under decoder.layers.<i>.
_MEGATRON = {
    **{p: ("linear_qkv", "self_attention") for p in ("q_proj", "k_proj", "v_proj")},
    "o_proj": ("linear_proj", "self_attention"),
    "gate_proj": ("linear_fc1", "mlp"),
    "up_proj": ("linear_fc1", "mlp"),
    "down_proj": ("linear_fc2", "mlp"),
}
_MEGATRON_DEFAULT = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix: the only trainable parameters of a LoRA run."""


Site = tuple[int | None, str]  # (layer index, projection name); (None, "lm_head")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how (see the module docstring); built by jax_sft.config from NeMo RL's
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
        if self.dropout_position not in DROPOUT_POSITIONS:
            out.append(f"dropout_position={self.dropout_position!r}: expected one of {list(DROPOUT_POSITIONS)}")
        if self.a_init not in A_INITS:
            out.append(f"lora_A_init={self.a_init!r}: expected one of {list(A_INITS)}")
        if self.naming not in NAMINGS:
            out.append(f"naming={self.naming!r}: expected one of {list(NAMINGS)}")
        if self.match_all_linear and (self.target_modules or self.exclude_modules):
            out.append("match_all_linear=true adapts every linear layer, so target_modules and "
                       "exclude_modules must be empty; set match_all_linear=false to use them")
        return out

    def adapted(self, num_layers: int, dense_mlp: tuple[bool, ...], has_lm_head: bool = True) -> frozenset[Site]:
        """The (layer, projection) sites that get adapters. `dense_mlp[i]`: layer i has a dense
        MLP (MoE layers have none to adapt)."""
        sites = [(i, p) for i in range(num_layers) for p in ATTENTION + (MLP if dense_mlp[i] else ())]
        if has_lm_head:
            sites.append((None, LM_HEAD))
        return frozenset(s for s in sites if self._matches(*s))

    def _matches(self, layer: int | None, proj: str) -> bool:
        name, full = self.module_name(layer, proj)
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

    def module_name(self, layer: int | None, proj: str) -> tuple[str | None, str]:
        """(module name, full module name) of a site in this config's naming (HF or Megatron)."""
        if self.naming == "megatron":
            if proj == LM_HEAD:
                return "output_layer", "output_layer"
            name, parent = _MEGATRON[proj]
            return name, f"decoder.layers.{layer}.{parent}.{name}"
        return proj, hf_module_name(layer, proj)


    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {**d, "target_modules": list(self.target_modules), "exclude_modules": list(self.exclude_modules)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraConfig:
        return cls(**{**d, "target_modules": tuple(d["target_modules"]), "exclude_modules": tuple(d["exclude_modules"])})


# A LoRA checkpoint's reference to its frozen base (extra file LORA_FILE, see `base_reference`).
LORA_FILE = "lora.json"


def base_reference(lora: LoraConfig, model_name: str, hf_config: dict[str, Any],
                   hf_config_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a LoRA checkpoint records about its base (extra file LORA_FILE): the adapters'
    config, the base's name or path (policy.model_name), the hf_config_overrides it was built with
    and the SHA-256 of its config as loaded (`CausalLM.config.to_hf_dict()`), so that resuming or
    exporting onto another base is refused (`base_problem`)."""
    return {"lora": lora.to_dict(), "base": {"model_name": str(model_name),
                                             "hf_config_overrides": hf_config_overrides or {},
                                             "config_sha256": config_hash(hf_config)}}


def base_problem(reference: dict[str, Any], model_name: str, hf_config: dict[str, Any]) -> str | None:
    """None when `hf_config` (of the base at `model_name`) is the one `reference` was trained on;
    else one sentence saying what differs."""
    if config_hash(hf_config) == reference["base"]["config_sha256"]:
        return None
    return (f"the base model {model_name} is not the one these LoRA adapters were trained on "
            f"({reference['base']['model_name']}): its config.json differs (SHA-256 of the loaded config "
            f"{config_hash(hf_config)[:12]}... != {reference['base']['config_sha256'][:12]}...)")


def config_hash(hf_config: dict[str, Any]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(hf_config, sort_keys=True).encode()).hexdigest()


def hf_module_name(layer: int | None, proj: str) -> str:
    """The projection's module name in a transformers causal LM (PEFT's key names build on it)."""
    if proj == LM_HEAD:
        return LM_HEAD
    parent = "self_attn" if proj in ATTENTION else "mlp"
    return f"model.layers.{layer}.{parent}.{proj}"


@lru_cache(maxsize=256)
def _wildcard_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$")


def wildcard_match(pattern: str, full_name: str) -> bool:
    """Whether `pattern` ("*" = any characters, everything else literal) matches the whole name."""
    return _wildcard_regex(pattern).match(full_name) is not None


class LoRA(nnx.Module):
    """The adapter of one projection: `delta(x)` = scale * (x @ A) @ B in the compute dtype.

    in_dims / out_dims: the base kernel's input and output dimension sizes with their logical
    axis names; `in_subscripts` / `out_subscripts`: their einsum letters in the projection."""

    def __init__(self, cfg: LoraConfig, in_dims: tuple[tuple[int, str], ...], out_dims: tuple[tuple[int, str], ...],
                 in_subscripts: str, out_subscripts: str, *, dtype, rngs: nnx.Rngs):
        r = cfg.dim
        in_shape, in_names = tuple(d for d, _ in in_dims), tuple(n for _, n in in_dims)
        out_shape, out_names = tuple(d for d, _ in out_dims), tuple(n for _, n in out_dims)
        meta = lambda *names: {"out_sharding": names, "eager_sharding": False}  # noqa: E731
        self.lora_a = LoRAParam(init_a(cfg.a_init, rngs.params(), in_shape + (r,)),
                                **meta(*in_names, "lora_rank"))
        self.lora_b = LoRAParam(jnp.zeros((r,) + out_shape, jnp.float32), **meta("lora_rank", *out_names))
        self.scale = cfg.scale
        self.dropout = float(cfg.dropout)
        self.dropout_position = cfg.dropout_position
        self.dtype = dtype
        self.in_subscripts, self.out_subscripts = in_subscripts, out_subscripts

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """x: [..., *in_dims] -> [..., *out_dims] in the compute dtype. dropout_key: None = no
        dropout (evaluation, or dropout 0)."""
        drop = dropout_key is not None and self.dropout > 0.0
        if drop and self.dropout_position == "pre":
            x = _dropout(x, self.dropout, dropout_key)
        a = self.lora_a[...].astype(self.dtype)
        b = self.lora_b[...].astype(self.dtype)
        h = jnp.einsum(f"...{self.in_subscripts},{self.in_subscripts}r->...r", x.astype(self.dtype), a)
        h = h * jnp.asarray(self.scale, self.dtype)
        y = jnp.einsum(f"...r,r{self.out_subscripts}->...{self.out_subscripts}", h, b)
        if drop and self.dropout_position == "post":
            y = _dropout(y, self.dropout, dropout_key)
        return y

    def delta_kernel(self) -> jax.Array:
        """scale * A @ B as a [*in_dims, *out_dims] float32 kernel (merging into the base)."""
        ins, outs = self.in_subscripts, self.out_subscripts
        return self.scale * jnp.einsum(f"{ins}r,r{outs}->{ins}{outs}", self.lora_a[...].astype(jnp.float32),
                                       self.lora_b[...].astype(jnp.float32))


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def init_a(method: str, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A's initial value [*in_dims, dim] float32 (see the module docstring)."""
    fan_in, r = math.prod(shape[:-1]), shape[-1]
    if method == "xavier":
        return jax.random.normal(key, shape, jnp.float32) * math.sqrt(2.0 / (fan_in + r))
    if method == "uniform":
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    raise ValueError(f"lora_A_init={method!r}: expected one of {list(A_INITS)}")


def site_key(seed: int, layer: int | None, proj: str) -> jax.Array:
    """The init key of one site's A: a function of the seed and the site only, so that adapters
    start equal whatever the mesh or whether layers are scanned."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(f"{layer}.{proj}".encode()))


def site_of(path: tuple) -> tuple[int | None, str]:
    """(layer index or None when scan-stacked / lm_head, projection) of an adapter's state path,
    e.g. ("layers", 3, "self_attn", "q_proj", "lora", "lora_a") -> (3, "q_proj")."""
    if path[0] == "lm_head_lora":
        return None, LM_HEAD
    layer = path[1] if isinstance(path[1], int) or str(path[1]).isdigit() else None
    return (None if layer is None else int(layer)), str(path[-3])


def initial_value(cfg: LoraConfig, path: tuple, shape: tuple[int, ...], num_layers: int) -> jax.Array:
    """An adapter's starting value (float32): B zeros, A drawn with `site_key` per layer (a
    scan-stacked A [num_layers, ...] stacks the per-layer draws, so it equals the unrolled one)."""
    if path[-1] == "lora_b":
        return jnp.zeros(shape, jnp.float32)
    layer, proj = site_of(path)
    stacked = path[0] == "layers" and layer is None
    if not stacked:
        return init_a(cfg.a_init, site_key(cfg.seed, layer, proj), shape)
    return jnp.stack([init_a(cfg.a_init, site_key(cfg.seed, i, proj), shape[1:]) for i in range(num_layers)])
