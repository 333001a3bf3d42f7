"""The compiled train and eval steps: pure functions of (params, optimizer state, batch).

A step is a loop of compiled micro-steps, each adding one micro-batch's gradient of the *summed*
masked NLL into a donated accumulator, then one compiled `apply` that divides by the number of
loss tokens of the whole global batch (NeMo RL's normalisation: the update does not depend on
how the batch is split into micro-batches or devices), clips, and updates. Shapes are fixed per
micro-batch, so a varying number of micro-batches per step (packing) never recompiles. A step
whose loss or gradient norm is not finite leaves parameters and optimizer state as they were
(selected inside `apply`); the host sees it in the step's metrics and stops.

Batches are dicts of int32 arrays [rows, seq]: input_ids, targets, loss_mask, segment_ids,
positions (see jax_sft.data), or those arrays stacked [5, rows, seq] in `ARRAY_KEYS` order (the
trainer's form: one host-to-device transfer per micro-batch, not five).

A model is split (`split_model`) into `params`, the trainable ones (all `nnx.Param`s for full
fine-tuning; the `LoRAParam` adapters for LoRA), which get gradients and optimizer state; `fp8`,
the FP8 amax histories (`models.fp8.Fp8History`; empty without delayed-scaling FP8), whose
"gradients" are the amaxes a micro-batch saw: the step keeps their maximum and `apply` rolls them
into the histories; and `frozen`, the rest (the LoRA base; empty for full fine-tuning). All are
passed to every step as arguments (never baked into the compiled code); `frozen` is never updated.

Context parallelism (a model whose mesh has a context axis n > 1): the loss function permutes
every array of the batch into the axis's zig-zag layout inside the compiled step (a static
gather of the int32 rows, which arrive whole on every device of a context group), runs the model
on that layout and sums the NLL over the permuted targets, chunk by chunk within each device's
part (`masked_nll_sum(..., context=n)`): sums and token counts do not depend on the order, so
losses, gradients, validation and the logged token counts are those of the unsplit rows.

The fixed cost per micro-batch is kept small: `cast` turns the fp32 master weights into the
compute dtype once per step (`compute = fns.cast(params, frozen)`), and the micro-steps take that
copy. Only the weights the model would cast anyway are cast (kernels, embeddings, biases, expert
weights; RMSNorm weights, the lm_head adapter and `options.BUFFERS` stay fp32, as the model uses
them in fp32), so
the forward values are the same as casting inside every micro-step; the gradients with respect to
the compute copy are accumulated in fp32.

LoRA dropout (`dropout_seed` not None): micro-batch m of step s draws its masks from
fold_in(fold_in(key(seed), s), m), so a resumed run repeats them.

Mixture-of-experts models: each micro-batch's router load-balancing loss (over its real tokens)
is accumulated weighted by the micro-batch's loss tokens and logged as train/router_aux_loss; when
the model's `router_aux_loss_coef` is non-zero, coef x that loss joins the objective the same way
(so the update is mean NLL + coef x the token-weighted mean of the micro-batches' aux losses).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_sft.data.batches import ARRAY_KEYS
from jax_sft.loss import masked_nll_sum
from jax_sft.models.context import to_zigzag
from jax_sft.models.fp8 import Fp8History, roll_history
from jax_sft.models.lora import LoRAParam
from jax_sft.models.options import BUFFERS

Batch = dict[str, jax.Array]


def as_batch(batch: Batch | jax.Array) -> Batch:
    """A micro-batch as its dict of int32 [rows, seq] arrays (`batch`: that dict, or the arrays
    stacked [len(ARRAY_KEYS), rows, seq] in ARRAY_KEYS order)."""
    return batch if isinstance(batch, dict) else dict(zip(ARRAY_KEYS, batch))


@dataclasses.dataclass(frozen=True)
class Accumulator:
    """Running sums over the micro-batches of one step (fp32)."""

    grads: Any
    loss_sum: jax.Array
    num_tokens: jax.Array
    aux_sum: jax.Array  # router aux loss x loss tokens, summed (MoE; 0 for dense models)
    amax: Any  # the FP8 histories' gradients, their maximum (column 0: amaxes seen; empty without FP8)


jax.tree_util.register_dataclass(
    Accumulator, data_fields=["grads", "loss_sum", "num_tokens", "aux_sum", "amax"], meta_fields=[]
)


def split_model(model: nnx.Module, lora: bool) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State, nnx.State]:
    """(graphdef, params, fp8, frozen, rest) of a model (see the module docstring); `lora`: only the
    adapters train. `nnx.merge(graphdef, params, fp8, frozen, rest)` is the model again."""
    return nnx.split(model, LoRAParam if lora else nnx.Param, Fp8History, nnx.Param, ...)


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The jitted functions of a run (see `make_step_fns`)."""

    cast: Any  # (params, frozen) -> compute: the weights in the compute dtype, once per step (not jitted itself)
    init_accumulator: Any  # (params, fp8) -> Accumulator of zeros
    micro_step: Any  # (compute, fp8, acc, batch, counter) -> acc (acc donated; counter: see `counter`)
    apply: Any  # (params, opt_state, fp8, acc, step) -> (params, opt_state, fp8, metrics) (state donated)
    eval_step: Any  # (params, fp8, frozen, batch) -> (nll_sum, num_tokens)
    counter: Any  # (step, micro) -> micro_step's counter: int32 [2] for LoRA dropout's keys, else None


def needs_cast(path: tuple, x: jax.Array, dtype) -> bool:
    """Whether the compute copy of a weight is `x` cast to `dtype`: not when it already has that
    dtype, nor for the weights the model uses in fp32 (RMSNorm weights; the lm_head adapter,
    folded into the unembedding in fp32)."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    keep = "weight" in names[-2:] or "lm_head_lora" in names or any(b in names[-2:] for b in BUFFERS)
    return not keep and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.dtype(dtype)


def compute_caster(dtype):
    """tree -> the same tree with the weights the model casts anyway in `dtype` (one jitted
    cast of just those leaves; the others are passed through, not copied: a frozen bf16 base
    costs no memory)."""
    cast_all = jax.jit(lambda xs: [x.astype(dtype) for x in xs])

    def cast(tree: Any) -> Any:
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves = [x for _, x in flat]
        which = [i for i, (path, x) in enumerate(flat) if needs_cast(path, x, dtype)]
        if which:
            for i, y in zip(which, cast_all([leaves[i] for i in which])):
                leaves[i] = y
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return cast


def make_loss_fn(graphdef: nnx.GraphDef, rest: nnx.State, *, chunk_size: int, packed: bool):
    """(params, fp8, frozen, batch, dropout_key) -> (objective, (summed masked NLL, router aux loss)),
    fp32. The objective is the NLL sum plus, for MoE models with a router_aux_loss_coef, coef x
    aux x loss tokens. `rest` is the model's non-Param state."""

    def loss_sum(params: nnx.State, fp8: nnx.State, frozen: nnx.State, batch: Batch | jax.Array, dropout_key=None):
        model = nnx.merge(graphdef, params, fp8, frozen, rest)
        n = model.context_size
        batch = {k: to_zigzag(v, n) for k, v in as_batch(batch).items()}  # (n == 1: as it is)
        hidden, aux = model.hidden_states_and_aux(
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"] if packed else None,
            token_mask=batch["segment_ids"] > 0,
            dropout_key=dropout_key,
            context_layout=True,
        )
        nll = masked_nll_sum(
            hidden,
            model.lm_head_kernel(),
            batch["targets"],
            batch["loss_mask"],
            chunk_size,
            softcap=model.config.final_softcap,
            context=n,
            vocab_size=model.config.vocab_size,
        )
        coef = model.config.router_aux_loss_coef
        objective = nll + coef * aux * batch["loss_mask"].sum(dtype=jnp.float32) if coef else nll
        return objective, (nll, aux)

    return loss_sum


def _micro_step(grad_fn, dropout_seed: int | None):
    """(compute, fp8, acc, batch, counter) -> acc + this micro-batch's gradient of the summed NLL
    (and the maximum of the FP8 amaxes)."""

    def micro_step(compute, fp8, acc: Accumulator, batch: Batch, counter: jax.Array) -> Accumulator:
        params, frozen = compute
        key = None
        if dropout_seed is not None:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), counter[0]), counter[1])
        (_, (loss, aux)), (grads, amax) = grad_fn(params, fp8, frozen, batch, key)
        tokens = as_batch(batch)["loss_mask"].sum(dtype=jnp.float32)
        return Accumulator(
            jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc.grads, grads),
            acc.loss_sum + loss,
            acc.num_tokens + tokens,
            acc.aux_sum + aux * tokens,
            jax.tree.map(jnp.maximum, acc.amax, amax),
        )

    return micro_step


def _apply(tx: optax.GradientTransformation, schedule: optax.Schedule, moe: bool):
    """(params, opt_state, fp8, acc, step) -> the update of the accumulated step (NeMo RL's
    normalisation by the step's loss tokens) and the FP8 histories with its amaxes; unchanged state
    when it is not finite; and metrics."""

    def apply(params, opt_state, fp8, acc: Accumulator, step: jax.Array):
        denom = jnp.maximum(acc.num_tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, acc.grads)
        grad_norm = optax.tree.norm(grads)  # before clipping, as NeMo RL reports it
        loss = acc.loss_sum / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite step keeps the old state (element-wise select: no host round trip).
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        fp8 = jax.tree.map(lambda h, a: keep(roll_history(h, a), h), fp8, acc.amax)
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/lr": schedule(step),
            "train/num_unmasked_tokens": acc.num_tokens,
        }
        if moe:
            metrics["train/router_aux_loss"] = acc.aux_sum / denom
        return params, opt_state, fp8, metrics

    return apply


def make_step_fns(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
    opt_shardings: Any,
    fp8_shardings: Any = None,
    chunk_size: int,
    packed: bool,
    compute_dtype=jnp.bfloat16,
    moe: bool = False,
    dropout_seed: int | None = None,
    cast_once: bool = True,
) -> StepFns:
    """The jitted step functions. `graphdef` and `rest` come from `split_model`; `moe`: the model has experts
    (train/router_aux_loss is logged); `fp8_shardings`: of the FP8 histories (None: there are
    none); `dropout_seed`: LoRA dropout (None: none); `cast_once`
    False keeps fp32 weights in the micro-steps (the model casts them each time: for
    benchmarks)."""
    fp8_shardings = nnx.State({}) if fp8_shardings is None else fp8_shardings
    loss_sum = make_loss_fn(graphdef, rest, chunk_size=chunk_size, packed=packed)
    grad_fn = jax.value_and_grad(loss_sum, argnums=(0, 1), has_aux=True)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    acc_shardings = Accumulator(param_shardings, replicated, replicated, replicated, fp8_shardings)
    to_compute = compute_caster(compute_dtype if cast_once else jnp.float32)

    def cast(params, frozen):
        return to_compute(params), to_compute(frozen)

    def init_accumulator(params, fp8):
        zeros = lambda tree: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), tree)  # noqa: E731
        zero = jnp.zeros((), jnp.float32)
        return Accumulator(zeros(params), zero, zero, zero, zeros(fp8))

    def eval_step(params, fp8, frozen, batch: Batch | jax.Array):
        return loss_sum(params, fp8, frozen, batch)[1][0], as_batch(batch)["loss_mask"].sum(dtype=jnp.float32)

    def counter(step: int, micro: int) -> jax.Array | None:
        return None if dropout_seed is None else jnp.asarray([step, micro], jnp.int32)

    return StepFns(
        cast=cast,
        init_accumulator=jax.jit(init_accumulator, out_shardings=acc_shardings),
        micro_step=jax.jit(_micro_step(grad_fn, dropout_seed), donate_argnums=(2,), out_shardings=acc_shardings),
        apply=jax.jit(
            _apply(tx, schedule, moe),
            donate_argnums=(0, 1, 2),
            out_shardings=(param_shardings, opt_shardings, fp8_shardings, replicated),
        ),
        eval_step=jax.jit(eval_step),
        counter=counter,
    )


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh):
    """Shardings of `tx.init(params)`: param-shaped leaves follow their param, others replicate."""
    abstract = jax.eval_shape(tx.init, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
