"""Vocabularies that the tensor axis does not divide: the embedding and lm_head rows are padded to
a multiple of it (zeros from the checkpoint), the padding is outside the softmax of the loss and
of the logits, never exported, and checkpoints restore across tensor sizes. A tiny Qwen2 with 251
tokens (prime) and 8 heads, in float32: padded and unpadded agree to float32 rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

from jax_sft.checkpoint import Checkpointer, restore_params
from jax_sft.checkpoint_shapes import ShapeMismatch
from jax_sft.loss import masked_nll_sum
from jax_sft.models import from_pretrained, save_pretrained, sharding
from jax_sft.models.lora import LoRAParam
from jax_sft.models.options import LoraConfig
from jax_sft.models.peft_io import save_peft_adapter

VOCAB = 251
QWEN2 = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2") / "model"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2)).float()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def test_padded_model_matches_unpadded_and_exports_unpadded(qwen2, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=8)
    padded = from_pretrained(qwen2, dtype=jnp.float32, mesh=mesh)
    plain = from_pretrained(qwen2, dtype=jnp.float32)
    assert (padded.vocab_rows, plain.vocab_rows) == (256, VOCAB)
    embedding = padded.embed_tokens.embedding[...]
    assert embedding.shape == (256, 64) and embedding.sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(embedding[VOCAB:], 0.0)  # zeros where the checkpoint has no row
    np.testing.assert_array_equal(padded.lm_head.kernel[...][:, VOCAB:], 0.0)
    np.testing.assert_array_equal(embedding[:VOCAB], plain.embed_tokens.embedding[...])

    rng = np.random.default_rng(0)
    ids, targets = (jnp.asarray(rng.integers(0, VOCAB, (2, 16))) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 16)) < 0.8, jnp.float32)

    def loss(model):
        hidden = model.hidden_states(ids)
        nll = masked_nll_sum(hidden, model.lm_head_kernel(), targets, mask, 8, vocab_size=model.config.vocab_size)
        return nll, model.unembed(hidden)

    grad_fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    with jax.set_mesh(mesh):
        (value, logits), grads = grad_fn(padded)
    (plain_value, plain_logits), plain_grads = grad_fn(plain)
    assert logits.shape == (2, 16, VOCAB)  # no padding logits
    np.testing.assert_allclose(logits, plain_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    head, plain_head = grads["lm_head"]["kernel"][...], plain_grads["lm_head"]["kernel"][...]
    np.testing.assert_array_equal(head[:, VOCAB:], 0.0)  # the padding gets no gradient
    np.testing.assert_allclose(head[:, :VOCAB], plain_head, rtol=1e-4, atol=1e-7)
    emb = grads["embed_tokens"]["embedding"][...]
    np.testing.assert_allclose(emb[:VOCAB], plain_grads["embed_tokens"]["embedding"][...], rtol=1e-4, atol=1e-7)

    save_pretrained(padded, tmp_path / "out")
    with (
        safe_open(str(qwen2 / "model.safetensors"), "np") as a,
        safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as b,
    ):
        for name in a.keys():  # noqa: SIM118
            np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name), err_msg=name)


def test_lm_head_adapter_is_padded_and_exported_unpadded(qwen2, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    lora = LoraConfig(dim=2, alpha=2.0, match_all_linear=True)  # lm_head included
    model = from_pretrained(qwen2, dtype=jnp.float32, mesh=sharding.make_mesh(1, 1, 8), lora=lora)
    assert model.lm_head_lora.lora_b[...].shape == (2, 256)
    model.lm_head_lora.lora_b[...] = jnp.ones((2, 256))  # an adapter that changes the model
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(qwen2))
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "np") as f:
        assert f.get_tensor("base_model.model.lm_head.lora_B.weight").shape == (VOCAB, 2)
    save_pretrained(model, tmp_path / "merged")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "np") as f:
        assert f.get_tensor("lm_head.weight").shape == (VOCAB, 64)
    assert len(jax.tree.leaves(nnx.state(model, LoRAParam))) > 2


def test_checkpoints_restore_across_tensor_sizes(qwen2, tmp_path):
    """Saved on tensor 8 (256 rows), resumed on tensor 2 (252 rows: the padding cut, the moments
    too) and exported unpadded (251); another model's checkpoint is refused before reading."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    tx = optax.adam(1e-3)

    def state_of(mesh):
        params = nnx.state(from_pretrained(qwen2, dtype=jnp.float32, mesh=mesh), nnx.Param)
        return params, jax.jit(tx.init)(params)

    params, opt_state = state_of(sharding.make_mesh(1, 1, 8))
    opt_state = jax.tree.map(lambda x: x + 1.0 if x.ndim else x, opt_state)  # moments that show
    ckpt = Checkpointer(tmp_path / "ckpt", enable_async=False)
    ckpt.save(1, params=params, opt_state=opt_state, train_info={"step": 1}, data_state={}, extra_files={})
    ckpt.wait()

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

    two = state_of(sharding.make_mesh(1, 4, 2))
    restored = ckpt.restore(
        1, abstract_params=abstract(two[0]), abstract_opt_state=abstract(two[1]), with_data=False, vocab_size=VOCAB
    )
    got, got_opt = restored.params, restored.opt_state
    emb = got["embed_tokens"]["embedding"][...]
    assert emb.shape == (252, 64) and emb.sharding.spec == P("tensor", "fsdp")
    np.testing.assert_array_equal(emb[:VOCAB], params["embed_tokens"]["embedding"][...][:VOCAB])
    np.testing.assert_array_equal(emb[VOCAB:], 0.0)
    mu = got_opt[0].mu["lm_head"]["kernel"][...]
    assert mu.shape == (64, 252)
    np.testing.assert_array_equal(mu, 1.0)
    ckpt.close()

    unpadded = abstract(nnx.state(from_pretrained(qwen2, dtype=jnp.float32), nnx.Param))
    exported = restore_params(tmp_path / "ckpt" / "step_1", unpadded, VOCAB)
    np.testing.assert_array_equal(exported["lm_head"]["kernel"][...], params["lm_head"]["kernel"][...][:, :VOCAB])
    wider = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((*x.shape[:-1], x.shape[-1] * 2), x.dtype, sharding=x.sharding), unpadded
    )
    with pytest.raises(ShapeMismatch, match="the checkpoint is of another model"):
        restore_params(tmp_path / "ckpt" / "step_1", wider, VOCAB)


def test_unshardable_shapes_fail_in_the_plan_in_one_line(qwen2):
    """Vocabulary rows pad; kv heads that the tensor axis does not divide are refused by the
    plan (the dry run's and the run's first check), in one line for all layers."""
    from jax_sft.config import load_config, make_plan
    from jax_sft.errors import ConfigError
    from jax_sft.models.hf_read import read_config

    keys = [f"policy.model_name={qwen2}", "policy.max_total_sequence_length=64", "policy.train_global_batch_size=8"]
    plan = make_plan(
        load_config(None, [*keys, "policy.jax_cfg.mesh.tensor=8"]), devices=8, model_config=read_config(qwen2)
    )
    assert "model: vocabulary 251 padded to 256 rows (a multiple of tensor=8)" in "\n".join(plan.describe(1, 8))
    config = read_config(qwen2, {"num_key_value_heads": 2})
    with pytest.raises(ConfigError) as e:
        make_plan(load_config(None, [*keys, "policy.jax_cfg.mesh.tensor=8"]), devices=8, model_config=config)
    assert len(e.value.problems) == 1, e.value.problems
    assert "('kv_heads', size 2) cannot be split over mesh axis tensor=8" in str(e.value)
    assert "(nor can 7 more parameters)" in str(e.value)  # the k and v kernels and biases of the 2 layers
