"""The compiled step: micro-batch split invariance, the chunked loss, compilation count."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_sft.loss import masked_nll_sum
from jax_sft.models import CausalLM, ModelConfig, sharding
from jax_sft.optim import make_optimizer
from jax_sft.step import make_step_fns, opt_state_shardings, split_model

HF = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
OPT = {"name": "torch.optim.AdamW", "kwargs": {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.98], "eps": 1e-5}}


def rows(n: int, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """n packed rows: two segments each, ragged loss masks (so token counts differ per row)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, HF["vocab_size"], (n, seq)).astype(np.int32)
    cut = rng.integers(3, seq - 3, n)
    col = np.arange(seq)[None]
    seg = np.where(col < cut[:, None], 1, 2).astype(np.int32)
    pos = np.where(seg == 1, col, col - cut[:, None]).astype(np.int32)
    mask = (rng.random((n, seq)) < rng.uniform(0.2, 0.9, (n, 1))).astype(np.int32)
    return dict(input_ids=ids, targets=np.roll(ids, -1, 1), loss_mask=mask, segment_ids=seg, positions=pos)


NO_FP8 = nnx.State({})  # the FP8 histories of a model without FP8


def setup(devices, dtype=jnp.float32, **step_kwargs):
    """(fns, params, frozen, opt_state, batch sharding) of a tiny Llama, all parameters trainable
    (frozen is empty)."""
    mesh = sharding.make_mesh(1, len(devices), 1, devices=devices)
    model = CausalLM(ModelConfig.from_hf_dict(HF), dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params, _, frozen, rest = split_model(model, lora=False)
    shardings = sharding.param_shardings(params, mesh)
    params = jax.device_put(params, shardings)
    tx, schedule = make_optimizer(OPT, None, 1.0)
    opt_shardings = opt_state_shardings(tx, params, shardings, mesh)
    fns = make_step_fns(
        graphdef,
        rest,
        tx,
        schedule,
        mesh=mesh,
        param_shardings=shardings,
        opt_shardings=opt_shardings,
        chunk_size=8,
        packed=True,
        compute_dtype=dtype,
        **step_kwargs,
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return fns, params, frozen, opt_state, sharding.batch_sharding(mesh)


def micro_steps(fns, params, frozen, batch_sharding, micro_batches, step=0):
    """The step's accumulator: the weights cast once, then one micro-step per micro-batch."""
    compute = fns.cast(params, frozen)
    acc = fns.init_accumulator(params, NO_FP8)
    for i, mb in enumerate(micro_batches):
        batch = {k: jax.device_put(v, batch_sharding) for k, v in mb.items()}
        acc = fns.micro_step(compute, NO_FP8, acc, batch, jnp.asarray([step, i], jnp.int32))
    return acc


def one_step(fns, params, frozen, opt_state, batch_sharding, micro_batches):
    acc = micro_steps(fns, params, frozen, batch_sharding, micro_batches)
    params, opt_state, _, metrics = fns.apply(params, opt_state, NO_FP8, acc, jnp.asarray(0))
    return params, opt_state, metrics


def test_one_micro_batch_of_8_equals_four_of_2():
    batch = rows(8)
    with jax.default_matmul_precision("highest"):
        fns, params, frozen, opt_state, bs = setup(jax.devices()[:1])
        p1, _, m1 = one_step(fns, params, frozen, opt_state, bs, [batch])
        fns, params, frozen, opt_state, bs = setup(jax.devices()[:1])
        split = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
        p4, _, m4 = one_step(fns, params, frozen, opt_state, bs, split)
    # The loss is the token mean over the whole global batch, not a mean of micro-batch means.
    mask = batch["loss_mask"]
    assert float(m1["train/num_unmasked_tokens"]) == float(m4["train/num_unmasked_tokens"]) == mask.sum()
    np.testing.assert_allclose(float(m4["train/loss"]), float(m1["train/loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["train/grad_norm"]), float(m1["train/grad_norm"]), rtol=1e-5)
    # lr = 1e-2. AdamW's first update is g / (|g| + eps): for gradient entries far below eps it
    # is g / eps, which turns fp32 summation-order noise (~1e-7 of the largest gradient) into
    # parameter differences of a few 1e-6; 1e-5 is still a thousandth of one update.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # Micro-batch means would differ: the test would catch a per-micro-batch normalisation.
    per_mb = [m.sum() for m in np.split(mask, 4)]
    assert len(set(per_mb)) > 1


def test_weights_are_cast_once_per_step_with_the_same_loss_and_gradients():
    """bf16 compute: the micro-steps take a bf16 copy of the kernels and embeddings made once per
    step (norm weights stay fp32, as the model uses them), and give bit-for-bit the loss and
    gradients of casting inside every micro-step."""
    micro = [rows(2, seed=i) for i in range(3)]
    fns, params, frozen, _, bs = setup(jax.devices()[:1], dtype=jnp.bfloat16)
    compute, _ = fns.cast(params, frozen)
    dtypes = {
        jax.tree_util.keystr(p, simple=True, separator="."): x.dtype
        for p, x in jax.tree_util.tree_leaves_with_path(compute)
    }
    assert dtypes["embed_tokens.embedding.value"] == jnp.bfloat16
    assert dtypes["layers.0.self_attn.q_proj.kernel.value"] == jnp.bfloat16
    assert dtypes["layers.0.input_layernorm.weight.value"] == jnp.float32
    once = micro_steps(fns, params, frozen, bs, micro)
    fns, params, frozen, _, bs = setup(jax.devices()[:1], dtype=jnp.bfloat16, cast_once=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fns.cast(params, frozen)))
    every = micro_steps(fns, params, frozen, bs, micro)
    assert float(once.loss_sum) == float(every.loss_sum)
    for a, b in zip(jax.tree.leaves(once.grads), jax.tree.leaves(every.grads)):
        assert a.dtype == b.dtype == jnp.float32
        # The cotangent of the model's own cast is the bf16 gradient converted: the same values.
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_micro_steps_compile_once_for_any_number_of_micro_batches():
    fns, params, frozen, opt_state, bs = setup(jax.devices()[:1])
    for step, count in enumerate([1, 3, 2]):
        acc = micro_steps(fns, params, frozen, bs, [rows(2, seed=i) for i in range(count)], step)
        params, opt_state, _, _ = fns.apply(params, opt_state, NO_FP8, acc, jnp.asarray(step))
    assert fns.micro_step._cache_size() == 1 and fns.apply._cache_size() == 1


U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of fp32


def gamma(n: int) -> float:
    """Higham's bound on the relative error of an fp32 sum of n products (any order)."""
    return n * U32 / (1 - n * U32)


def nll_reference_f64(h, w, targets, mask):
    """Float64 loss and gradients of the masked NLL sum, and the fp32 error bounds that follow
    from the arithmetic: logits are fp32 dot products over `dim` terms (error <= gamma(dim) |h||w|),
    softmax/logsumexp add a few roundings, and the gradients are sums over the vocabulary (dh)
    or over all tokens of all chunks (dw), in any order."""
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    m = np.asarray(mask, np.float64)[..., None]
    dim, vocab = w.shape
    logits = h @ w
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    p = np.exp(logits - log_z[..., None])
    onehot = np.eye(vocab)[np.asarray(targets)]
    loss = float(((log_z[..., None] - logits) * onehot * m).sum())
    g = (p - onehot) * m
    dh, dw = g @ w.T, np.einsum("btd,btv->dv", h, g)
    d_logit = gamma(dim) * (np.abs(h) @ np.abs(w))  # [b, t, vocab]
    d_max = d_logit.max(-1, keepdims=True)
    d_g = (p * (2 * d_max + 8 * U32)) * m  # softmax of logits off by <= d_max, plus exp/log roundings
    n_tokens = h.shape[0] * h.shape[1]
    dh_tol = d_g @ np.abs(w).T + gamma(vocab) * (np.abs(g) @ np.abs(w).T)
    dw_tol = np.einsum("btd,btv->dv", np.abs(h), d_g) + gamma(n_tokens) * np.einsum("btd,btv->dv", np.abs(h), np.abs(g))
    nll = (log_z[..., None] - logits) * onehot * m
    loss_tol = float(
        (m[..., 0] * (2 * d_max[..., 0] + 8 * U32 * np.abs(log_z))).sum() + gamma(n_tokens) * np.abs(nll).sum()
    )
    return loss, (dh, dw), loss_tol, (dh_tol, dw_tol)


@pytest.mark.parametrize("chunk", [4, 8, 32])
def test_chunked_loss_and_grads_equal_full_log_softmax(chunk):
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (2, 32, 16))
    kernel = jax.random.normal(k[1], (16, 50))
    targets = jax.random.randint(k[2], (2, 32), 0, 50)
    mask = (jax.random.uniform(k[3], (2, 32)) > 0.3).astype(jnp.int32)

    with jax.default_matmul_precision("highest"):
        got, got_g = jax.value_and_grad(lambda h, w: masked_nll_sum(h, w, targets, mask, chunk), argnums=(0, 1))(
            hidden, kernel
        )
    ref, ref_g, loss_tol, grad_tols = nll_reference_f64(hidden, kernel, targets, mask)
    assert abs(float(got) - ref) <= loss_tol, (float(got), ref, loss_tol)
    for name, a, b, tol in zip(("d_hidden", "d_kernel"), got_g, ref_g, grad_tols):
        err = np.abs(np.asarray(a, np.float64) - b)
        assert (err <= tol).all(), (name, float(err.max()), float((err / tol).max()))
        # The bound is not vacuous: it is far below the gradients' own size.
        assert tol.max() < 1e-3 * np.abs(b).max(), name


def test_chunked_loss_never_holds_whole_fp32_logits():
    """The compiled loss's largest fp32 buffer is one chunk of logits, not [batch, seq, vocab]."""
    batch, seq, dim, vocab, chunk = 2, 256, 16, 4096, 32
    f = jax.jit(
        jax.grad(
            lambda h, w: masked_nll_sum(
                h, w, jnp.zeros((batch, seq), jnp.int32), jnp.ones((batch, seq), jnp.int32), chunk
            ),
            argnums=(0, 1),
        )
    )
    mem = f.lower(jnp.zeros((batch, seq, dim)), jnp.zeros((dim, vocab))).compile().memory_analysis()
    whole = batch * seq * vocab * 4
    assert mem.temp_size_in_bytes < whole / 2, (mem.temp_size_in_bytes, whole)


def test_chunk_size_must_divide_sequence():
    with pytest.raises(ValueError, match="not a multiple of the loss chunk 24"):
        masked_nll_sum(jnp.zeros((1, 64, 4)), jnp.zeros((4, 8)), jnp.zeros((1, 64), jnp.int32), jnp.ones((1, 64)), 24)


@pytest.mark.parametrize("poison", ["loss", "grad"])
def test_non_finite_step_leaves_params_and_optimizer_state_unchanged(poison):
    fns, params, frozen, opt_state, bs = setup(jax.devices()[:1])
    before = [np.asarray(x).copy() for x in jax.tree.leaves((params, opt_state))]
    acc = micro_steps(fns, params, frozen, bs, [rows(2)])
    if poison == "loss":
        acc = dataclasses.replace(acc, loss_sum=acc.loss_sum * jnp.nan)
    else:  # one NaN gradient entry (the loss stays finite)
        leaves, treedef = jax.tree.flatten(acc.grads)
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
        acc = dataclasses.replace(acc, grads=jax.tree.unflatten(treedef, leaves))
    params, opt_state, _, metrics = fns.apply(params, opt_state, NO_FP8, acc, jnp.asarray(0))
    finite = np.isfinite(float(metrics["train/loss"])) and np.isfinite(float(metrics["train/grad_norm"]))
    assert not finite
    after = [np.asarray(x) for x in jax.tree.leaves((params, opt_state))]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)  # bit for bit: the update was not applied
    assert fns.apply._cache_size() == 1


def test_the_trainers_one_transfer_per_micro_batch_gives_the_same_step():
    """`trainer.setup.to_global` moves a micro-batch as one stacked int32 [5, rows, seq] array: the
    micro-step reads it as the five arrays, bit for bit, and needs no counter without dropout."""
    from jax_sft.trainer.setup import to_global

    fns, params, frozen, _, bs = setup(jax.devices()[:1])
    mb = rows(4)
    stacked = to_global(mb, bs)
    assert stacked.shape == (5, *mb["input_ids"].shape) and stacked.dtype == jnp.int32
    assert fns.counter(3, 1) is None
    compute = fns.cast(params, frozen)
    one = fns.micro_step(compute, NO_FP8, fns.init_accumulator(params, NO_FP8), stacked, fns.counter(0, 0))
    five = micro_steps(fns, params, frozen, bs, [mb])
    assert float(one.loss_sum) == float(five.loss_sum) and float(one.num_tokens) == float(five.num_tokens)
    for a, b in zip(jax.tree.leaves(one.grads), jax.tree.leaves(five.grads)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_plan_cuts_the_loss_into_chunks_that_tile_the_rows():
    """NeMo RL's recipes with rows of 16000 (sft-qwen2.5-32b-4n8g) and 3200 tokens
    (sft-qwen2.5-math7b-1n8g-megatron_fused_linear_logprobs) and the default loss_chunk_size 1024:
    chunks of 1000 and 800 tokens, said in the plan; rows with no fitting divisor are refused."""
    from jax_sft.config import ConfigError, load_config, make_plan
    from jax_sft.loss import loss_chunk

    assert (loss_chunk(16000, 1024), loss_chunk(3200, 1024), loss_chunk(4096, 1024), loss_chunk(96, 1024)) == (
        1000,
        800,
        1024,
        96,
    )
    plan = make_plan(load_config(None, ["policy.max_total_sequence_length=16000"]), devices=1)
    assert plan.loss_chunk == 1000
    assert (
        "loss: chunks of 1000 tokens (policy.jax_cfg.loss_chunk_size=1024 does not divide the 16000 tokens per row; "
        "the largest divisor below it)" in plan.describe(1, 1)
    )
    assert make_plan(load_config(None), devices=1).loss_chunk == 1024
    with pytest.raises(ConfigError, match="rows of 2062 tokens: no divisor of 2062 between 128 and"):
        make_plan(load_config(None, ["policy.max_total_sequence_length=2062"]), devices=1)
    # The chunked loss over rows of 48 tokens in chunks of 24 (not 32) equals the whole log-softmax.
    rng = np.random.default_rng(0)
    h, w = (
        jnp.asarray(rng.standard_normal((2, 48, 8)), jnp.float32),
        jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
    )
    t, m = jnp.asarray(rng.integers(0, 16, (2, 48)), jnp.int32), jnp.ones((2, 48), jnp.int32)
    whole = -jnp.take_along_axis(
        jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w, precision="highest")), t[..., None], -1
    ).sum()
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(float(masked_nll_sum(h, w, t, m, loss_chunk(48, 32))), float(whole), rtol=1e-6)
