"""NeMo RL's SFT loss: masked next-token NLL, with an fp32 log-softmax computed chunk by chunk.

The vocabularies of current models are 128k-152k, so fp32 logits of shape [batch, seq, vocab]
would dwarf the activations. `masked_nll_sum` scans over sequence chunks and rematerialises each
chunk's logits in the backward pass, so at most [batch, chunk, vocab] fp32 logits live at once.
It returns the *sum* of the NLL over loss tokens: the train step divides by the number of loss
tokens of the whole global batch, so the update does not depend on the micro-batch split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, mask: jax.Array):
    """hidden [b, c, d] (compute dtype), kernel [d, vocab], targets/mask [b, c] -> fp32 nll sum."""
    logits = jnp.einsum("bcd,dv->bcv", hidden, kernel).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return ((log_z - target_logit) * mask).sum()


def masked_nll_sum(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    chunk_size: int,
) -> jax.Array:
    """Sum over masked positions of -log softmax(hidden @ kernel)[target], in fp32.

    hidden: [batch, seq, hidden] final-norm activations; kernel: [hidden, vocab] unembedding;
    targets: [batch, seq] int32 next tokens; loss_mask: [batch, seq] (1 = a training target).
    Returns the fp32 scalar NLL sum. `seq` must be a multiple of `chunk_size`
    when it is larger than it.
    """
    batch, seq, dim = hidden.shape
    mask = loss_mask.astype(jnp.float32)
    chunk = min(chunk_size, seq)
    if seq % chunk:
        raise ValueError(
            f"sequence length {seq} is not a multiple of policy.jax_cfg.loss_chunk_size={chunk}; "
            "pick a chunk size that divides the padded sequence length"
        )
    n = seq // chunk
    if n == 1:
        return _chunk_nll(hidden, kernel, targets, mask)

    def split(x):  # [batch, seq, ...] -> [n, batch, chunk, ...]
        return jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0)

    chunk_fn = jax.checkpoint(_chunk_nll)

    def body(total, xs):
        return total + chunk_fn(xs[0], kernel, xs[1], xs[2]), None

    zero = jnp.zeros((), jnp.float32)
    total, _ = jax.lax.scan(body, zero, (split(hidden), split(targets), split(mask)))
    return total
