"""The decoder: one Flax NNX model for every registered family (`jax_sft.models.registry`), whose
`ModelConfig` selects the layer kinds: norm placement, q/k norms, activation, soft-capping, RoPE
per layer type and mixture-of-experts layers. A hybrid model (`ModelConfig.layer_kinds`, Nemotron-H)
has instead one block per layer, Mamba-2, attention, MLP or MoE (`hybrid.HybridLayer`); its
Mamba layers restart their state at each segment of a packed row.

    model = CausalLM(config, ModelOptions(dtype="float32"), rngs=nnx.Rngs(0))   # or dtype=jnp.float32
    logits = model(input_ids, positions=None, segment_ids=None)   # [b, t, vocab] float32
    hidden = model.hidden_states(input_ids, positions, segment_ids)  # [b, t, hidden] compute dtype
    logits = model.unembed(hidden)                                   # hidden @ lm_head_kernel()

`input_ids`, `positions`, `segment_ids` are [batch, seq] integers. `positions` (default
0..seq-1) feed RoPE; for packed rows they restart at 0 in each segment. `segment_ids` restricts
attention to the token's own segment (convention in `attention.py`: 0 = padding).

Parameters are stored in `options.param_dtype`, the forward pass runs in `options.dtype` (compute);
RMSNorm, RoPE and softmax run in float32. Parameter layouts and their logical axis names are
listed in `sharding.py`. `options.remat` ("none", "full" or a `jax.checkpoint_policies` name)
applies per layer. `hidden_states_and_aux(...)` also returns the router's load-balancing loss
(mixture-of-experts models, `moe.py`), as transformers' `load_balancing_loss_func` computes it
over the real tokens (segment id > 0) of all MoE layers.

Vocabulary padding: built with a `mesh` whose tensor axis does not divide config.vocab_size, the
embedding and lm_head rows (and an lm_head adapter's) are padded to `vocab_rows`, the next
multiple of the tensor size (as Megatron's make_vocab_size_divisible_by), so that they shard over
it. The padding is no token: `unembed` returns config.vocab_size logits, the training loss masks
the padded columns out of its softmax (`jax_sft.loss`), `hf_write` never writes them and
`hf_read` fills them with zeros.

`options.scan_layers` stores the layers stacked (every layer parameter gets a leading
[num_layers] axis, path `layers.<name>` instead of `layers.<i>.<name>`) and runs them with one
`jax.lax.scan`, so compile time does not grow with depth; the values are the same as unrolled.
It needs the same attention window, MLP and layer kind on every layer. `hf_read` / `hf_write` read and write both
layouts (HF files are per layer). `options.attention` picks the kernel (see `attention.py`);
`options.max_segments` bounds the segments per packed row for the cuDNN packed layout.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from jax_sft.models import attention as attention_lib
from jax_sft.models import context as context_lib
from jax_sft.models.config import ModelConfig
from jax_sft.models.hybrid import HybridLayer
from jax_sft.models.layers import MLP, Attention, RMSNorm, meta, normal_init, projection
from jax_sft.models.lora import LoRA
from jax_sft.models.moe import MoE
from jax_sft.models.options import LM_HEAD, Fp8Config, LoraConfig, ModelOptions
from jax_sft.models.rope import rope_inv_freq
from jax_sft.models.sharding import MESH_AXES, activation_sharding, logical_to_spec, padded_vocab_size, shard_problems

# The norms of a layer by ModelConfig.norm_placement: which attribute (HF name) normalises the
# attention input / output and the MLP input / output (None: no norm there).
NORMS = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "sandwich": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
}


class DecoderLayer(nnx.Module):
    """Attention and an MLP (dense or mixture of experts), each with a residual, and the norms of
    the config's `norm_placement` (`NORMS`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        *,
        dtype,
        param_dtype,
        implementation: str,
        max_segments: int,
        rngs: nnx.Rngs,
        mesh=None,
        lora: LoraConfig | None = None,
        adapted: frozenset[str] = frozenset(),
        fp8: Fp8Config | None = None,
        context: context_lib.ContextParallel | None = None,
    ):
        norm = partial(
            RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, offset=cfg.norm_offset
        )
        self.norm_names = NORMS[cfg.norm_placement]
        for name in self.norm_names:
            if name is not None:
                setattr(self, name, norm())
        self.self_attn = Attention(
            cfg,
            layer,
            dtype=dtype,
            param_dtype=param_dtype,
            implementation=implementation,
            max_segments=max_segments,
            rngs=rngs,
            lora=lora,
            adapted=adapted,
            fp8=fp8,
            context=context,
        )
        if cfg.num_experts > 0 and cfg.moe_layers[layer]:
            self.mlp = MoE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, mesh=mesh)
        else:
            self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, lora=lora, adapted=adapted, fp8=fp8)
        self.num_experts = cfg.num_experts

    def _norm(self, slot: int, x: jax.Array) -> jax.Array:
        name = self.norm_names[slot]
        return x if name is None else getattr(self, name)(x)

    def __call__(self, x, cos, sin, segment_ids, token_mask=None, dropout_key=None):
        """-> (x, router statistics [2, num_experts]; zeros for a dense layer). dropout_key: LoRA
        dropout (None: none)."""
        ka, km = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key, 2))
        x = x + self._norm(1, self.self_attn(self._norm(0, x), cos, sin, segment_ids, ka))
        y, stats = self.mlp(self._norm(2, x), token_mask, km)
        if stats is None:
            stats = jnp.zeros((2, self.num_experts), jnp.float32)
        return x + self._norm(3, y), stats


def lora_sites(config: ModelConfig, lora: LoraConfig | None, scan_layers: bool) -> dict[int | None, frozenset[str]]:
    """{layer index: projections with adapters, None: {"lm_head"} or {}} for `lora` (None: none;
    see `LoraConfig.by_layer`)."""
    if lora is None:
        return dict.fromkeys([None, *range(config.num_layers)], frozenset())
    return lora.by_layer(config, scan_layers)


def _remat_policy(remat: str):
    return None if remat in ("none", "full") else getattr(jax.checkpoint_policies, remat)


def _layer_fn(remat: str, layer_class: type = DecoderLayer):
    """The layer class's __call__, wrapped in nnx.remat with the named policy unless remat == "none"."""
    if remat == "none":
        return layer_class.__call__
    return nnx.remat(layer_class.__call__, policy=_remat_policy(remat), prevent_cse=True)


def _layer_class(config: ModelConfig) -> type:
    """DecoderLayer (attention + MLP), or for a hybrid model (config.layer_kinds) HybridLayer."""
    return HybridLayer if config.layer_kinds else DecoderLayer


def _check_scannable(config: ModelConfig) -> None:
    if len(set(config.layer_kinds)) > 1:
        raise ValueError(
            f"scan_layers=True needs the same layer on every layer, but this {config.architecture} mixes "
            f"{', '.join(sorted(set(config.layer_kinds)))} layers; set policy.jax_cfg.scan_layers=false"
        )
    if len(set(config.sliding_windows)) != 1:
        raise ValueError(
            f"scan_layers=True needs the same attention window on every layer, but this "
            f"{config.architecture} has per-layer windows {config.sliding_windows}; set "
            "policy.jax_cfg.scan_layers=false"
        )
    if len(set(config.moe_layers)) > 1:
        raise ValueError(
            f"scan_layers=True needs the same MLP on every layer, but this {config.architecture} "
            "mixes dense and mixture-of-experts layers (mlp_only_layers / decoder_sparse_step); "
            "set policy.jax_cfg.scan_layers=false"
        )


def _check_attention(config: ModelConfig, implementation: str, dtype) -> None:
    """Raises at construction for a kernel choice this model cannot run ("cudnn" has neither
    soft-capping nor attention sinks)."""
    attention_lib.check_implementation(implementation, dtype, config.head_dim)
    if config.attn_softcap is not None or config.attention_sinks:
        softcap, sinks = config.attn_softcap is not None, config.attention_sinks
        attention_lib.resolve_implementation(
            implementation, dtype, config.head_dim, False, softcap=softcap, sinks=sinks
        )


def _layers(config, options: ModelOptions, adapted: dict, dtype, param_dtype, mesh, context, rngs: nnx.Rngs):
    """The decoder layers: an nnx.List, or with scan_layers one DecoderLayer whose parameters are
    stacked [num_layers, ...] (its initial values drawn per layer, as unrolled)."""
    layer = partial(
        _layer_class(config),
        config,
        dtype=dtype,
        param_dtype=param_dtype,
        implementation=options.attention,
        max_segments=options.max_segments,
        mesh=mesh,
        lora=options.lora,
        fp8=options.fp8,
        context=context,
    )
    if not options.scan_layers:
        return nnx.List([layer(i, rngs=rngs, adapted=adapted[i]) for i in range(config.num_layers)])

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def stacked(rngs):
        return layer(0, rngs=rngs, adapted=adapted[0])

    return stacked(rngs)


class CausalLM(nnx.Module):
    """Decoder-only LM; see the module docstring for the call signatures.

    `options` (a `ModelOptions`) says how it is built and run; the keyword form
    (`CausalLM(config, dtype=jnp.float32, rngs=...)`) replaces fields of `options` (default: the
    defaults). `mesh`: the device mesh, for expert and context parallelism (its "context" axis
    > 1 splits every row's sequence over it, see `hidden_states_and_aux`)."""

    def __init__(
        self,
        config: ModelConfig,
        options: ModelOptions | None = None,
        *,
        rngs: nnx.Rngs,
        mesh: jax.sharding.Mesh | None = None,
        **option_fields,
    ):
        options = ModelOptions.of(options, **option_fields)
        dtype, param_dtype = jnp.dtype(options.dtype), jnp.dtype(options.param_dtype)
        _check_attention(config, options.attention, dtype)
        if options.scan_layers:
            _check_scannable(config)
        self.config = config
        self.options = options
        self.vocab_rows = padded_vocab_size(config.vocab_size, 1 if mesh is None else dict(mesh.shape).get("tensor", 1))
        context = context_lib.context_parallel(mesh, options.context_attention, config.num_heads, config.num_kv_heads)
        if context is not None and options.attention == "cudnn":
            raise ValueError(
                f"attention='cudnn' with a context axis of {context.size}: attention across the context axis runs "
                "its blocks with XLA operations (models/context.py); use policy.jax_cfg.attention='auto' or 'xla'"
            )
        self.context = context
        adapted = lora_sites(config, options.lora, options.scan_layers)
        self.embed_tokens = nnx.Embed(
            self.vocab_rows,
            config.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=normal_init,
            embedding_metadata=meta("vocab", "embed"),
            rngs=rngs,
        )
        self.layers = _layers(config, options, adapted, dtype, param_dtype, mesh, context, rngs)
        self.norm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, offset=config.norm_offset
        )
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else projection(
                "bte,ev->btv",
                (config.hidden_size, self.vocab_rows),
                ("embed", "vocab"),
                None,
                (),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )
        # The lm_head's adapter (tied or not), folded into `lm_head_kernel()`.
        e, v = config.hidden_size, self.vocab_rows
        self.lm_head_lora = nnx.data(
            LoRA(options.lora, ((e, "embed"),), ((v, "vocab"),), "e", "v", dtype=dtype, rngs=rngs)
            if LM_HEAD in adapted[None]
            else None
        )

    # The options, as the model's code reads them.
    dtype = property(lambda self: jnp.dtype(self.options.dtype))
    param_dtype = property(lambda self: jnp.dtype(self.options.param_dtype))
    attention = property(lambda self: self.options.attention)
    remat = property(lambda self: self.options.remat)
    scan_layers = property(lambda self: self.options.scan_layers)
    max_segments = property(lambda self: self.options.max_segments)
    lora = property(lambda self: self.options.lora)

    def hidden_states(
        self, input_ids: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """[b, t] ints -> [b, t, hidden] in the compute dtype, after the final norm."""
        return self.hidden_states_and_aux(input_ids, positions, segment_ids)[0]

    def hidden_states_and_aux(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        token_mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        *,
        context_layout: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """-> (hidden states, router load-balancing loss: fp32 scalar, 0 for dense models).
        `token_mask` [b, t]: the tokens the loss averages over (None: all; HF's attention_mask).
        `dropout_key`: LoRA dropout while training (None: no dropout).

        Context parallelism (`context_size` n > 1, no KV cache attached): the rows are laid out
        in the context axis's zig-zag order (`context.to_zigzag`: every [b, t] input alike) and
        their sequence split over the axis; the hidden states come back in natural order. With
        `context_layout=True` the inputs are in that layout already and the hidden states stay
        in it (the train step, whose loss is a sum over tokens, permutes its targets instead)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        b, t = input_ids.shape
        for name, arr in (("positions", positions), ("segment_ids", segment_ids), ("token_mask", token_mask)):
            if arr is not None and arr.shape != input_ids.shape:
                raise ValueError(f"{name} shape {arr.shape} != input_ids shape {input_ids.shape}")
        n = self.context_size if self._splits_rows() else 1
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            positions = context_lib.to_zigzag(positions, n) if context_layout else positions
        if not context_layout:
            input_ids, positions, segment_ids, token_mask = (
                None if x is None else context_lib.to_zigzag(x, n)
                for x in (input_ids, positions, segment_ids, token_mask)
            )
        rope_of = partial(self._rope_tables, positions, {})
        x = self._embed(input_ids, n)
        if self.config.embed_scale:
            x = x * jnp.asarray(self.config.hidden_size**0.5, self.dtype)
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.config.num_layers)
        if self.scan_layers:
            x, stats = self._scan_layers(x, *rope_of(0), segment_ids, token_mask, keys)
        else:
            layer_fn = _layer_fn(self.remat, _layer_class(self.config))
            stats = jnp.zeros((2, self.config.num_experts), jnp.float32)
            for i, layer in enumerate(self.layers):
                key = None if keys is None else keys[i]
                x, layer_stats = layer_fn(layer, x, *rope_of(i), segment_ids, token_mask, key)
                stats = stats + layer_stats
        hidden = self.norm(x)
        hidden = hidden if context_layout else context_lib.from_zigzag(hidden, n)
        return hidden, self._aux_loss(stats, b * t if token_mask is None else token_mask.sum())

    def _embed(self, input_ids: jax.Array, n: int) -> jax.Array:
        """The embeddings of the ids; rows split over the context axis (n > 1) look them up in the
        table gathered over fsdp x context (as FSDP gathers every weight before use), so that the
        lookup comes out split like the rows and not like the table's embed dimension."""
        if n == 1:
            return self.embed_tokens(input_ids)
        mesh = self.context.mesh
        table = jax.lax.with_sharding_constraint(
            self.embed_tokens.embedding[...].astype(self.dtype),
            NamedSharding(mesh, logical_to_spec(("vocab", None), mesh)),
        )
        ids = jax.lax.with_sharding_constraint(input_ids, activation_sharding(mesh, 2))
        return jax.lax.with_sharding_constraint(jnp.take(table, ids, axis=0), activation_sharding(mesh))

    @property
    def context_size(self) -> int:
        """How many parts each row's sequence is split in (the mesh's context axis; 1: none)."""
        return 1 if self.context is None else self.context.size

    def _splits_rows(self) -> bool:
        """Whether calls split rows over the context axis: it is > 1 and no KV cache is attached
        (generation attends within whole rows)."""
        if self.context is None:
            return False
        first = self.layers if self.scan_layers else self.layers[0]
        return first.self_attn.kv_cache is None

    def _rope_tables(self, positions: jax.Array, tables: dict, layer: int) -> tuple[jax.Array, jax.Array]:
        """(cos, sin) [b, t, d/2] fp32 of `layer`'s RoPE (Gemma 3: the sliding layers' own), computed
        once per RopeConfig into `tables`; (None, None) for a model without RoPE (use_rope false)."""
        if not self.config.use_rope:
            return None, None
        rope = self.config.rope
        if self.config.local_rope is not None and self.config.sliding_windows[layer] is not None:
            rope = self.config.local_rope
        if rope not in tables:
            inv_freq = jnp.asarray(rope_inv_freq(rope, self.config.head_dim))
            freqs = positions.astype(jnp.float32)[..., None] * inv_freq
            cos, sin = jnp.cos(freqs), jnp.sin(freqs)
            if rope.attention_factor != 1.0:  # YaRN's attention scaling
                cos, sin = cos * jnp.float32(rope.attention_factor), sin * jnp.float32(rope.attention_factor)
            tables[rope] = (cos, sin)
        return tables[rope]

    def _aux_loss(self, stats: jax.Array, tokens) -> jax.Array:
        """transformers' load_balancing_loss_func from summed statistics: num_experts *
        sum_e (top-k count_e / rows) * (probability sum_e / rows), rows = tokens x MoE layers."""
        n_moe = sum(self.config.moe_layers)
        if not n_moe:
            return jnp.zeros((), jnp.float32)
        rows = jnp.maximum(jnp.asarray(tokens, jnp.float32) * n_moe, 1.0)
        return self.config.num_experts * jnp.sum((stats[0] / rows) * (stats[1] / rows))

    def _scan_layers(self, x, cos, sin, segment_ids, token_mask, keys):
        """The stacked layers as one lax.scan over their [num_layers, ...] parameters (and
        per-layer dropout keys, None when there is no dropout)."""
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            (h, stats), (layer_state, key) = carry, xs
            layer = nnx.merge(graphdef, layer_state)
            h, layer_stats = layer(h, cos, sin, segment_ids, token_mask, key)
            # The KV caches, when generating (kv_cache.py).
            return (h, stats + layer_stats), nnx.state(layer, nnx.Cache)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policy(self.remat), prevent_cse=False)
        zeros = jnp.zeros((2, self.config.num_experts), jnp.float32)
        (x, stats), caches = jax.lax.scan(body, (x, zeros), (state, keys))
        nnx.update(self.layers, caches)
        return x, stats

    def attention_kernel(self, packed: bool) -> str:
        """The attention kernel this model runs for padded or packed rows: "cudnn", "xla", or
        "cudnn+xla" when its full-attention and sliding-window layers differ; "xla" across a
        context axis (models/context.py)."""
        if self.context is not None:
            return "xla"
        kernels = {
            attention_lib.resolve_implementation(
                self.attention,
                self.dtype,
                self.config.head_dim,
                packed,
                w is not None,
                self.config.attn_softcap is not None,
                self.config.attention_sinks,
            )
            for w in self.config.sliding_windows
        }
        return "+".join(sorted(kernels))

    def describe_attention(self, packed: bool, seq: int | None = None) -> str:
        """One log line: the kernel chosen for this batch layout (rows of `seq` tokens)."""
        if self.context is not None:
            return f"attention={self.attention!r} -> {context_lib.describe(self.context, seq)}"
        return attention_lib.describe(
            self.attention,
            self.dtype,
            self.config.head_dim,
            packed,
            self.max_segments,
            self.config.sliding_windows,
            self.config.attn_softcap is not None,
            self.config.attention_sinks,
        )

    def lm_head_kernel(self) -> jax.Array:
        """[hidden, vocab_rows] unembedding in the compute dtype (the embedding transposed when
        tied), with the lm_head adapter's scale * A @ B added when there is one. Columns from
        config.vocab_size on are padding (`vocab_rows`): the loss masks them, `unembed` drops them."""
        if self.lm_head is None:
            kernel = self.embed_tokens.embedding[...].T
        else:
            kernel = self.lm_head.kernel[...]
        if self.lm_head_lora is not None:
            kernel = kernel.astype(jnp.float32) + self.lm_head_lora.delta_kernel()
        return kernel.astype(self.dtype)

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """[..., hidden] (compute dtype) -> [..., vocab] float32 logits (fp32 accumulation),
        soft-capped when the config says so (Gemma 2)."""
        logits = jnp.einsum(
            "...e,ev->...v", hidden.astype(self.dtype), self.lm_head_kernel(), preferred_element_type=jnp.float32
        )
        if self.vocab_rows != self.config.vocab_size:  # the padding rows are no tokens
            logits = logits[..., : self.config.vocab_size]
        cap = self.config.final_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def __call__(
        self, input_ids: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """[b, t] ints -> [b, t, vocab] float32 logits (whole: for tests and small evals)."""
        return self.unembed(self.hidden_states(input_ids, positions, segment_ids))


def sharding_problems(config: ModelConfig, options: ModelOptions, sizes: dict[str, int]):
    """What keeps the model of `config` (built with `options`) from sharding over a mesh of these
    axis sizes ({axis: size} of `sharding.MESH_AXES`, 1 where absent; `sharding.shard_problems`,
    one line per kind of dimension), the vocabulary padded as on that mesh; from an abstract
    model: nothing is allocated and no device is needed."""
    mesh = jax.sharding.AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)
    if options.lora is None and len(set(config.moe_layers)) <= 1:
        # Every layer alike but for its window, which shapes nothing: one stacked layer is traced
        # instead of each (0.1 s instead of 9 s for a 64-layer model). Layers that differ
        # otherwise (another per-layer kind) must keep this path off.
        config = dataclasses.replace(config, sliding_windows=(None,) * config.num_layers)
        options = dataclasses.replace(options, scan_layers=True)
    abstract = nnx.eval_shape(lambda: CausalLM(config, options, rngs=nnx.Rngs(0), mesh=mesh))
    return shard_problems(nnx.state(abstract), mesh)


def merge_lora(model: CausalLM) -> CausalLM:
    """The model with every adapter folded into its base kernel (W + scale * A @ B, float32), as
    a CausalLM without LoRA (and without vocabulary padding); `model` itself when it has none. A
    tied model whose lm_head has an adapter comes back untied (its lm_head = embedding^T + the
    adapter's delta)."""
    if model.lora is None:
        return model
    untie = model.lm_head is None and model.lm_head_lora is not None
    config = dataclasses.replace(model.config, tie_word_embeddings=False) if untie else model.config
    options = dataclasses.replace(model.options, param_dtype="float32", lora=None)
    abstract = nnx.eval_shape(lambda: CausalLM(config, options, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    source = dict(nnx.to_flat_state(nnx.state(model)))
    filled = []
    for path, var in nnx.to_flat_state(abs_state):
        if untie and path == ("lm_head", "kernel"):
            value = source[("embed_tokens", "embedding")][...].T.astype(jnp.float32)
            value = value + model.lm_head_lora.delta_kernel()
        else:
            value = source[path][...]
            # A projection's kernel and its adapter's B; a fused projection's kernel_<part> and lora_b_<part>.
            part = str(path[-1]).removeprefix("kernel")
            a, b = source.get(path[:-1] + ("lora", "lora_a")), source.get(path[:-1] + ("lora", "lora_b" + part))
            if str(path[-1]).startswith("kernel") and a is not None:
                value = value.astype(jnp.float32) + model.lora.scale * _lora_delta(a[...], b[...], value.ndim)
            elif path == ("lm_head", "kernel") and model.lm_head_lora is not None:
                value = value.astype(jnp.float32) + model.lm_head_lora.delta_kernel()
            value = value.astype(jnp.float32) if isinstance(var, nnx.Param) else value
        if value.shape != var.shape:  # the vocabulary padding, dropped
            value = value[tuple(slice(n) for n in var.shape)]
        filled.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _lora_delta(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
    """A @ B as a kernel: a [*lead, *in, r], b [*lead, r, *out] -> [*lead, *in, *out] float32
    (lead: the layer axis of scan-stacked adapters, or nothing)."""
    n_lead = a.ndim + b.ndim - 2 - kernel_ndim
    lead, ins, outs = a.shape[:n_lead], a.shape[n_lead:-1], b.shape[n_lead + 1 :]
    a2 = a.astype(jnp.float32).reshape(*lead, math.prod(ins), a.shape[-1])
    b2 = b.astype(jnp.float32).reshape(*lead, b.shape[n_lead], math.prod(outs))
    return jnp.matmul(a2, b2).reshape(*lead, *ins, *outs)
