"""NeMo RL's SFT loss: masked next-token NLL, with an fp32 log-softmax computed chunk by chunk.

The vocabularies of current models are 128k-152k, so fp32 logits of shape [batch, seq, vocab]
would dwarf the activations. `masked_nll_sum` walks over sequence chunks, so at most
[batch, chunk, vocab] fp32 logits live at once, and it is a fused "linear + cross-entropy": under
differentiation each chunk's gradient with respect to its logits, softmax - onehot(target), is
formed while the logits are at hand and contracted at once into the gradients of the hidden
states and of the unembedding (a custom VJP), so the backward pass neither stores nor recomputes
logits (the unembedding matmul runs once forward and twice for gradients, the minimum).
It returns the *sum* of the NLL over loss tokens: the train step divides by the number of loss
tokens of the whole global batch, so the update does not depend on the micro-batch split.

Under context parallelism (`context` n > 1: the sequence split over the mesh's context axis in n
equal parts, `jax_sft.models.context`) the chunks are cut within each part ([batch, n, chunks,
chunk] -> scan over chunks), so every device walks over its own tokens and no hidden state moves;
the sum does not depend on the order of the tokens, so the zig-zag layout needs no undoing.

Precision: logits come out of the matmul in the compute dtype and are upcast to fp32 for the
log-softmax (as torch autocast + NeMo RL's fp32 loss do); the gradient matmuls take the logit
gradients in the unembedding's dtype and accumulate in fp32.

Final logit soft-capping (Gemma 2's `final_logit_softcapping` c): the log-softmax runs over
c * tanh(logits / c) in fp32, and the chunk gradient carries the factor 1 - tanh^2.

Vocabulary padding (`CausalLM.vocab_rows`: the unembedding's columns padded to a multiple of the
tensor axis): the columns from `vocab_size` on get logit -inf, so they are outside the softmax
(probability 0, no gradient reaches them) and the NLL is that of the unpadded model.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def _chunk_logits(hidden: jax.Array, kernel: jax.Array, softcap: float | None = None) -> jax.Array:
    """hidden [..., c, d] (compute dtype), kernel [d, vocab] -> fp32 logits [..., c, vocab],
    soft-capped to c * tanh(logits / c) when `softcap` is c."""
    logits = jnp.einsum("...cd,dv->...cv", hidden, kernel).astype(jnp.float32)
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def _chunk_nll(hidden, kernel, targets, mask, softcap=None, vocab_size=None):
    """-> (fp32 nll sum over masked positions, fp32 logits with the padding columns (from
    `vocab_size` on) at -inf, fp32 log-normaliser [b, c])."""
    logits = _chunk_logits(hidden, kernel, softcap)
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return ((log_z - target_logit) * mask).sum(), logits, log_z


def _split(x: jax.Array, parts: int, n: int) -> jax.Array:
    """[batch, seq, ...] -> [n, batch, parts, seq / parts / n, ...]: n chunks of each of `parts`
    equal parts of the sequence."""
    b, seq = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, parts, n, seq // parts // n, *x.shape[2:]), 2, 0)


def _merge(x: jax.Array) -> jax.Array:
    """[n, batch, parts, chunk, ...] -> [batch, parts * n * chunk, ...]."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2] * x.shape[3], *x.shape[4:])


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _nll_sum(hidden, kernel, targets, mask, n_chunks: int, softcap: float | None, parts: int, vocab_size: int | None):
    """Forward only (evaluation): the summed NLL, chunk by chunk."""
    if n_chunks == 1:
        return _chunk_nll(hidden, kernel, targets, mask, softcap, vocab_size)[0]

    def body(total, xs):
        return total + _chunk_nll(xs[0], kernel, xs[1], xs[2], softcap, vocab_size)[0], None

    zero = jnp.zeros((), jnp.float32)
    total, _ = jax.lax.scan(body, zero, tuple(_split(x, parts, n_chunks) for x in (hidden, targets, mask)))
    return total


def _nll_sum_fwd(
    hidden, kernel, targets, mask, n_chunks: int, softcap: float | None, parts: int, vocab_size: int | None
):
    vocab = kernel.shape[-1]

    def chunk(h, t, m):
        nll, logits, log_z = _chunk_nll(h, kernel, t, m, softcap, vocab_size)
        probs = jnp.exp(logits - log_z[..., None])  # 0 on the padding columns
        g = jnp.where(jnp.arange(vocab) == t[..., None], probs - 1.0, probs) * m[..., None]
        if softcap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2 = 1 - (capped / c)^2
            g = g * jnp.where(jnp.isfinite(logits), 1.0 - jnp.square(logits / softcap), 0.0)
        g = g.astype(kernel.dtype)  # dNLL/dlogits [b, c, vocab]
        d_hidden = jnp.einsum("...cv,dv->...cd", g, kernel, preferred_element_type=jnp.float32)
        d_kernel = jnp.einsum("...cd,...cv->dv", h, g, preferred_element_type=jnp.float32)
        return nll, d_hidden.astype(hidden.dtype), d_kernel

    if n_chunks == 1:
        nll, d_hidden, d_kernel = chunk(hidden, targets, mask)
    else:

        def body(carry, xs):
            total, dk = carry
            nll, dh, dk_chunk = chunk(*xs)
            return (total + nll, dk + dk_chunk), dh

        zero = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
        xs = tuple(_split(x, parts, n_chunks) for x in (hidden, targets, mask))
        (nll, d_kernel), d_hidden = jax.lax.scan(body, zero, xs)
        d_hidden = _merge(d_hidden)
    return nll, (d_hidden, d_kernel.astype(kernel.dtype))


def _nll_sum_bwd(n_chunks, softcap, parts, vocab_size, res, g):
    d_hidden, d_kernel = res
    return d_hidden * g.astype(d_hidden.dtype), d_kernel * g.astype(d_kernel.dtype), None, None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def masked_nll_sum(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    chunk_size: int,
    softcap: float | None = None,
    context: int = 1,
    vocab_size: int | None = None,
) -> jax.Array:
    """Sum over masked positions of -log softmax(hidden @ kernel)[target], in fp32
    (of softcap * tanh(hidden @ kernel / softcap) when `softcap` is given), the softmax over the
    first `vocab_size` columns of the kernel (None: all; the rest is vocabulary padding).

    hidden: [batch, seq, hidden] final-norm activations; kernel: [hidden, vocab] unembedding;
    targets: [batch, seq] int32 next tokens; loss_mask: [batch, seq] (1 = a training target);
    `context`: the parts the sequence is split in over the context axis (chunks are cut within
    each). Returns the fp32 scalar NLL sum. `seq / context` must be a multiple of `chunk_size`
    when it is larger than it (`loss_chunk` gives one). Differentiable in `hidden` and `kernel` (see the
    module docstring).
    """
    batch, seq, dim = hidden.shape
    mask = loss_mask.astype(jnp.float32)
    part = seq // context
    chunk = min(chunk_size, part)
    if seq % context or part % chunk:
        raise ValueError(
            f"rows of {seq} tokens in {context} part(s) of {part} are not a multiple of the loss chunk {chunk_size}; "
            "pass a chunk that divides them (`loss_chunk`; the run plan's is)"
        )
    n_chunks = part // chunk
    return _nll_sum(hidden, kernel, targets.astype(jnp.int32), mask, n_chunks, softcap, context, vocab_size)


def loss_chunk(seq: int, chunk_size: int, context: int = 1) -> int:
    """Tokens per loss chunk for rows of `seq` tokens split in `context` parts: `chunk_size` (at
    most the part), or the largest divisor of the part below it (the chunks must tile each part:
    rows of 16000 tokens with chunk_size 1024 give chunks of 1000)."""
    part = seq // context
    return next(c for c in range(min(chunk_size, part), 0, -1) if part % c == 0)


def chunk_problem(seq: int, chunk_size: int, context: int = 1) -> str | None:
    """What keeps rows of `seq` tokens (split in `context` parts) from being cut into loss chunks
    of at most `chunk_size` tokens without a chunk far smaller (`loss_chunk` below an eighth of
    it: a long scan of tiny matmuls), or None."""
    part, where = seq // context, f"rows of {seq} tokens"
    if context > 1:
        where += f" / context={context} = {part} tokens per device"
    if seq % context:
        return f"{where}: {seq} is not a multiple of policy.jax_cfg.mesh.context={context}"
    chunk, limit = loss_chunk(seq, chunk_size, context), min(chunk_size, part)
    if chunk * 8 < limit:
        return (
            f"{where}: no divisor of {part} between {limit // 8} and policy.jax_cfg.loss_chunk_size={limit} "
            f"(the loss would run in chunks of {chunk} tokens); set policy.make_sequence_length_divisible_by to a "
            "power of two (e.g. 64), or loss_chunk_size to a divisor of the tokens per device"
        )
    return None
