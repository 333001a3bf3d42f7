"""A static-shape key/value cache for generation, held by the attention modules of a `CausalLM`.

    kv_cache.attach(model, batch=8, length=320, mesh=mesh)   # every attention layer gets a cache
    hidden = model.hidden_states(prompt_ids, positions)      # prefill: writes slots [0, t)
    state = kv_cache.set_lengths(nnx.state(model, nnx.Cache), lengths)  # per-row next slot
    hidden = model.hidden_states(next_ids[:, None], lengths[:, None])   # decode: one token a row
    kv_cache.detach(model)

Each attention layer gets a `LayerCache`: `k`, `v` [batch, length, kv_heads, head_dim] in the
compute dtype, and `index` [batch] int32, the slot the row's next token goes to. Slot j holds the
key/value of position j of its row, so a query at position i attends slots j <= i (and within
the layer's sliding window): slots past a row's position (right padding of a shorter prompt, or
tokens not generated yet) are never seen, and generated tokens overwrite the padding.

A call with more than one token per row is a prefill from an empty cache (every index 0): it
attends among its own tokens with the model's ordinary kernel (cuDNN where it applies) and writes
them; a call with one token attends over the cache. With `scan_layers` the caches are stacked
like the layer parameters ([num_layers, ...]) and carried through the scan.
The arrays are sharded like activations: batch over ("data", "fsdp"), kv heads over "tensor".

A Mamba-2 mixer (hybrid models) gets a `MambaCache` instead: its conv window and SSM state, which
a prefill leaves at each row's last prompt token (`set_prompt_lengths` before it) and each
one-token call advances.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_sft.models import sharding as sharding_lib


class LayerCache(nnx.Module):
    """One attention layer's cache (see the module docstring)."""

    def __init__(self, k: jax.Array, v: jax.Array, index: jax.Array):
        self.k = nnx.Cache(k)
        self.v = nnx.Cache(v)
        self.index = nnx.Cache(index)

    def write(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Stores k, v [b, t, kv, d] at slots index..index+t-1 of each row and advances index.
        Returns the whole cache (k, v) and the positions [b, t] of the written tokens."""
        b, t = k.shape[:2]
        slots = self.index[...][:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [b, t]
        rows = jnp.arange(b)[:, None]
        self.k[...] = self.k[...].at[rows, slots].set(k.astype(self.k.dtype))
        self.v[...] = self.v[...].at[rows, slots].set(v.astype(self.v.dtype))
        self.index[...] = self.index[...] + t
        return self.k[...], self.v[...], slots


class MambaCache(nnx.Module):
    """One Mamba-2 mixer's generation state (models/mamba.py): the last K - 1 conv inputs of each
    channel block, the SSM state [b, heads, head_dim, state] (float32) and each row's prompt
    length (`set_prompt_lengths`, before the prefill)."""

    def __init__(self, conv_x: jax.Array, conv_bc: jax.Array, ssm: jax.Array, prompt_length: jax.Array):
        self.conv_x = nnx.Cache(conv_x)
        self.conv_bc = nnx.Cache(conv_bc)
        self.ssm = nnx.Cache(ssm)
        self.prompt_length = nnx.Cache(prompt_length)


def _attention_modules(model: nnx.Module) -> list[nnx.Module]:
    return [m for _, m in nnx.iter_modules(model) if hasattr(m, "kv_cache")]


def _mamba_modules(model: nnx.Module) -> list[nnx.Module]:
    return [m for _, m in nnx.iter_modules(model) if hasattr(m, "ssm_cache")]


def attach(model: nnx.Module, batch: int, length: int, mesh: jax.sharding.Mesh | None = None) -> None:
    """Gives every attention layer of `model` an empty cache of `length` slots for `batch` rows, and
    every Mamba-2 mixer an empty `MambaCache`."""
    cfg = model.config
    lead = (cfg.num_layers,) if model.scan_layers else ()
    kv_shape = (*lead, batch, length, cfg.num_kv_heads, cfg.head_dim)
    names = (*((None,) if lead else ()), "batch", None, "kv_heads", "head_dim")

    def sharding(names):  # activations' layout (None without a mesh)
        return None if mesh is None else jax.sharding.NamedSharding(mesh, sharding_lib.logical_to_spec(names))

    for module in _attention_modules(model):
        k, v = (jnp.zeros(kv_shape, module.dtype, device=sharding(names)) for _ in range(2))
        index = jnp.zeros((*lead, batch), jnp.int32, device=sharding(names[: len(lead) + 1]))
        module.kv_cache = LayerCache(k, v, index)
    for module in _mamba_modules(model):
        m = cfg.mamba
        heads, bc = (m.num_heads, m.head_dim), (2, m.groups, m.state_size)
        head_names, bc_names = ("mamba_heads", "mamba_head_dim"), ("ssm_bc", "ssm_groups", "ssm_state")
        window = m.conv_kernel - 1
        module.ssm_cache = MambaCache(
            jnp.zeros((batch, window, *heads), module.dtype, device=sharding(("batch", None, *head_names))),
            jnp.zeros((batch, window, *bc), module.dtype, device=sharding(("batch", None, *bc_names))),
            jnp.zeros((batch, *heads, m.state_size), jnp.float32, device=sharding(("batch", *head_names, "ssm_state"))),
            jnp.zeros((batch,), jnp.int32, device=sharding(("batch",))),
        )


def detach(model: nnx.Module) -> None:
    """Removes the caches (the model is then as before `attach`)."""
    for module in _attention_modules(model):
        module.kv_cache = None
    for module in _mamba_modules(model):
        module.ssm_cache = None


def set_prompt_lengths(cache: nnx.State, lengths: jax.Array) -> nnx.State:
    """`cache` with every Mamba-2 mixer's prompt lengths set to `lengths` [b], before a prefill of
    right-padded prompts (the scan then keeps each row's state at its own last token)."""
    return _set(cache, "prompt_length", lengths)


def _set(cache: nnx.State, name: str, lengths: jax.Array) -> nnx.State:
    flat = [
        (path, var.replace(jnp.broadcast_to(lengths.astype(jnp.int32), var.shape)) if path[-1] == name else var)
        for path, var in nnx.to_flat_state(cache)
    ]
    return nnx.from_flat_state(flat)


def set_lengths(cache: nnx.State, lengths: jax.Array) -> nnx.State:
    """`cache` (nnx.state(model, nnx.Cache)) with every layer's next slot set to `lengths` [b]
    (after a right-padded prefill: each row continues after its own prompt)."""
    return _set(cache, "index", lengths)
