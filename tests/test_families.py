"""Gemma 2 / Gemma 3 and the mixture-of-experts families (Qwen3-MoE, Mixtral): what the shared
parity, packing, bf16 and round-trip tests (test_model.py, test_hf_io.py, run over every family
of hf_models.FAMILIES) do not cover: config reading, that each family feature changes the logits,
Gemma 3 multimodal checkpoints, soft-capped loss gradients, grouped expert matmuls, the router
aux loss against transformers, experts sharded over the expert mesh axis, and a short training
run per family whose export reproduces the validation loss in transformers.

Relative error is max|a - b| / max|b|, b the reference.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import FAMILIES, MOE_FAMILIES, hf_logits, hf_val_loss, jax_logits, make_gemma3_multimodal, make_hf_model
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from jax_sft.config import make_plan
from jax_sft.loss import masked_nll_sum
from jax_sft.models import CausalLM, CheckpointError, ModelConfig, from_pretrained, save_pretrained, sharding
from jax_sft.models.layers import ACTIVATIONS
from jax_sft.models.moe import dense_experts, glu_of, grouped_experts

VOCAB = 256
NEW = ("gemma2", "gemma3", "qwen3_moe", "mixtral", "gpt_oss")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: (make_hf_model(f, root / f), root / f) for f in NEW}


def _with_config(model: CausalLM, **changes) -> CausalLM:
    config = dataclasses.replace(model.config, **changes)
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(abstract), nnx.state(model))


# --- config.json reading -----------------------------------------------------------------------

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)


def test_gemma_configs_follow_transformers_defaults():
    g2 = ModelConfig.from_hf_dict({**BASE, "architectures": ["Gemma2ForCausalLM"]})
    assert g2.sliding_windows == (4096, None, 4096, None)  # even layers slide
    assert (g2.attn_softcap, g2.final_softcap, g2.head_dim, g2.tie_word_embeddings) == (50.0, 30.0, 256, True)
    assert g2.query_scale == 256**-0.5 and g2.norm_offset == 1.0 and g2.activation == "gelu_tanh"
    assert g2.local_rope is None and not g2.qk_norm
    # A hub-style Gemma 3 config.json: old rope keys, linear scaling of the global layers only.
    g3 = ModelConfig.from_hf_dict(
        {
            **BASE,
            "num_hidden_layers": 7,
            "architectures": ["Gemma3ForCausalLM"],
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window": 512,
        }
    )
    assert g3.sliding_windows == (512,) * 5 + (None, 512)  # sliding_window_pattern 6
    assert (g3.rope.rope_type, g3.rope.factor, g3.rope.theta) == ("linear", 8.0, 1e6)
    assert g3.local_rope.rope_type == "default" and g3.local_rope.theta == 1e4
    assert g3.qk_norm and g3.attn_softcap is None and g3.final_softcap is None
    with pytest.raises(ValueError, match="use_bidirectional_attention=true is not supported"):
        ModelConfig.from_hf_dict({**BASE, "architectures": ["Gemma3ForCausalLM"], "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="hidden_activation='gelu_new' is not supported"):
        ModelConfig.from_hf_dict({**BASE, "architectures": ["Gemma2ForCausalLM"], "hidden_activation": "gelu_new"})


def test_gemma3_multimodal_config_reads_its_text_config():
    """gemma-3-4b-it's config.json lists only the text keys that differ from Gemma3TextConfig."""
    d = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "torch_dtype": "bfloat16",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    c = ModelConfig.from_hf_dict(d, source="m/config.json")
    assert c.architecture == "Gemma3ForCausalLM" and c.text_of_multimodal and c.torch_dtype == "bfloat16"
    assert (c.vocab_size, c.num_heads, c.num_kv_heads, c.head_dim) == (262208, 8, 4, 256)
    assert c.sliding_windows.count(None) == 5 and c.rope.factor == 8.0 and c.local_rope.theta == 10000.0
    exported = c.to_hf_dict()
    assert exported["architectures"] == ["Gemma3ForCausalLM"] and exported["model_type"] == "gemma3_text"
    with pytest.raises(ValueError, match="m/config.json: Gemma3ForConditionalGeneration needs a text_config"):
        ModelConfig.from_hf_dict({"architectures": ["Gemma3ForConditionalGeneration"]}, source="m/config.json")


def test_moe_configs():
    q = dict(
        BASE,
        architectures=["Qwen3MoeForCausalLM"],
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=2,
        mlp_only_layers=[3],
    )
    c = ModelConfig.from_hf_dict(q)
    assert c.moe_layers == (False, True, False, False) and c.num_experts == 8 and not c.norm_topk_prob
    assert c.router_aux_loss_coef == 0.0  # output_router_logits false: not in the loss (as HF)
    c = ModelConfig.from_hf_dict({**q, "output_router_logits": True, "num_local_experts": 6, "norm_topk_prob": True})
    assert c.router_aux_loss_coef == 0.001 and c.num_experts == 6 and c.norm_topk_prob
    m = ModelConfig.from_hf_dict(dict(BASE, architectures=["MixtralForCausalLM"], sliding_window=7))
    assert m.moe_layers == (True,) * 4 and (m.num_experts, m.experts_per_token) == (8, 2) and m.norm_topk_prob
    assert m.moe_intermediate_size == 128 and m.sliding_windows == (7,) * 4
    with pytest.raises(ValueError, match="router_jitter_noise=0.1 is not supported"):
        ModelConfig.from_hf_dict(dict(BASE, architectures=["MixtralForCausalLM"], router_jitter_noise=0.1))
    with pytest.raises(ValueError, match="num_experts_per_tok=9 must be within 1..num experts=8"):
        ModelConfig.from_hf_dict(dict(BASE, architectures=["MixtralForCausalLM"], num_experts_per_tok=9))


# --- each feature shows in the logits (so the HF parity tests would notice it wrong) ------------


def test_gemma_features_change_the_logits(hf_models):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 16)))
    g2 = from_pretrained(hf_models["gemma2"][1], dtype=jnp.float32)
    assert g2.config.sliding_windows == (5, None)
    base = jax_logits(g2, ids)
    for change in (
        dict(attn_softcap=None),
        dict(final_softcap=None),
        dict(query_scale=None),
        dict(embed_scale=False),
        dict(sliding_windows=(None, None)),
    ):
        assert rel_err(jax_logits(_with_config(g2, **change), ids), base) > 1e-3, change
    assert np.abs(base).max() <= 2.0  # final_logit_softcapping=2
    g3 = from_pretrained(hf_models["gemma3"][1], dtype=jnp.float32)
    assert g3.config.local_rope.theta == 10000.0 and g3.config.rope.rope_type == "linear"
    assert rel_err(jax_logits(_with_config(g3, local_rope=None), ids), jax_logits(g3, ids)) > 1e-3


def test_cudnn_cannot_soft_cap(hf_models):
    from jax_sft.models import attention as attention_lib

    with pytest.raises(ValueError, match="attention='cudnn' with attention logit soft-capping"):
        attention_lib.resolve_implementation("cudnn", jnp.bfloat16, 64, packed=False, softcap=True)
    assert attention_lib.resolve_implementation("auto", jnp.bfloat16, 64, False, softcap=True) == "xla"
    g2 = from_pretrained(hf_models["gemma2"][1], dtype=jnp.bfloat16)
    assert "soft-capped scores: no cudnn kernel" in g2.describe_attention(packed=False)
    assert g2.attention_kernel(packed=True) == "xla"


def test_soft_capped_loss_and_gradients_match_autodiff():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 32, (2, 8)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 8)), jnp.float32)

    def naive(h, w):
        logits = 3.0 * jnp.tanh(jnp.einsum("bsd,dv->bsv", h, w) / 3.0)
        logp = jax.nn.log_softmax(logits, -1)
        return -(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum()

    ref, ref_grads = jax.value_and_grad(naive, argnums=(0, 1))(hidden, kernel)
    for chunk in (8, 4):
        val, grads = jax.value_and_grad(
            lambda h, w, chunk=chunk: masked_nll_sum(h, w, targets, mask, chunk, softcap=3.0), argnums=(0, 1)
        )(hidden, kernel)
        np.testing.assert_allclose(val, ref, rtol=1e-6)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    assert abs(float(masked_nll_sum(hidden, kernel, targets, mask, 8)) - float(ref)) > 1e-2


# --- Gemma 3 multimodal checkpoints ------------------------------------------------------------


def test_gemma3_multimodal_text_model_loads_and_exports_as_causal_lm(tmp_path):
    hf = make_gemma3_multimodal(tmp_path / "mm")
    model = from_pretrained(tmp_path / "mm", dtype=jnp.float32)
    assert model.config.text_of_multimodal and model.config.tie_word_embeddings
    ids = np.random.default_rng(2).integers(0, 250, (2, 12))  # text tokens only
    err = rel_err(jax_logits(model, ids), hf_logits(hf, ids))
    assert err < 1e-4, f"multimodal text part vs HF: {err:.2e}"

    save_pretrained(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    causal = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert type(causal) is transformers.Gemma3ForCausalLM
    text = {
        k.removeprefix("model.language_model."): v
        for k, v in hf.state_dict().items()
        if k.startswith("model.language_model.")
    }
    mine = {k.removeprefix("model."): v for k, v in causal.state_dict().items() if k.startswith("model.")}
    assert text.keys() == mine.keys()
    for k in text:
        np.testing.assert_array_equal(text[k].numpy(), mine[k].numpy(), err_msg=k)
    np.testing.assert_array_equal(hf_logits(causal, ids), hf_logits(hf, ids))

    # The hub's older layout: language_model.model.* beside vision_tower.* / multi_modal_projector.*
    old = tmp_path / "old"
    old.mkdir()
    tensors = load_file(str(tmp_path / "mm" / "model.safetensors"))
    renamed = {
        (
            "language_model.model." + k.removeprefix("model.language_model.")
            if k.startswith("model.language_model.")
            else k.removeprefix("model.")
        ): v
        for k, v in tensors.items()
    }
    assert any(k.startswith("vision_tower.") for k in renamed)
    save_file(renamed, str(old / "model.safetensors"))
    (old / "config.json").write_text((tmp_path / "mm" / "config.json").read_text())
    again = from_pretrained(old, dtype=jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again), nnx.state(model))
    save_file({k: v for k, v in renamed.items() if not k.startswith("language_model.")}, str(old / "model.safetensors"))
    with pytest.raises(CheckpointError, match="without text-model tensors"):
        from_pretrained(old)


# --- mixture of experts ------------------------------------------------------------------------


def test_grouped_expert_matmuls_match_a_dense_loop():
    rng = np.random.default_rng(3)
    n, d, m, e, k = 24, 16, 8, 6, 2
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    gate, up = (jnp.asarray(rng.normal(size=(e, d, m)) * 0.3, jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.normal(size=(e, m, d)) * 0.3, jnp.float32)
    weights, experts = jax.lax.top_k(jax.nn.softmax(jnp.asarray(rng.normal(size=(n, e)), jnp.float32)), k)
    experts = experts.at[:5].set(jnp.array([0, 1]))  # uneven groups; expert 5 may get none
    act = ACTIVATIONS["silu"]
    biases = tuple(jnp.asarray(rng.normal(size=(e, n)) * 0.3, jnp.float32) for n in (m, m, d))
    clamped = ModelConfig.from_hf_dict(dict(BASE, architectures=["GptOssForCausalLM"], swiglu_limit=0.5))
    cases = [(lambda g, u: act(g) * u, (None, None, None)), (glu_of(clamped), biases)]  # Mixtral's; gpt-oss's

    for glu, bias in cases:

        def loss(fn, *ws, glu=glu, bias=bias):
            return jnp.sum(jnp.sin(fn(x, experts, weights, *ws, glu, bias)))

        a, ga = jax.value_and_grad(lambda *w: loss(grouped_experts, *w), argnums=(0, 1, 2))(gate, up, down)
        b, gb = jax.value_and_grad(lambda *w: loss(dense_experts, *w), argnums=(0, 1, 2))(gate, up, down)
        np.testing.assert_allclose(
            grouped_experts(x, experts, weights, gate, up, down, glu, bias),
            dense_experts(x, experts, weights, gate, up, down, glu, bias),
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(a, b, rtol=1e-5)
        for u, v in zip(ga, gb):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6)
    assert "ragged_dot" in str(
        jax.make_jaxpr(grouped_experts, static_argnums=6)(x, experts, weights, gate, up, down, cases[1][0])
    )


@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f in NEW])  # Nemotron-H has no aux loss
def test_router_aux_loss_matches_transformers(family, hf_models):
    hf, path = hf_models[family]
    model = from_pretrained(path, dtype=jnp.float32)
    assert model.config.router_aux_loss_coef == hf.config.router_aux_loss_coef > 0
    rng = np.random.default_rng(4)
    ids = rng.integers(0, VOCAB, (2, 16))
    mask = np.ones((2, 16), np.int64)
    mask[1, 11:] = 0  # right padding: excluded from the loss, as HF's attention_mask does
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), labels=torch.as_tensor(ids))
    fwd = nnx.jit(lambda m, i, t: m.hidden_states_and_aux(i, token_mask=t))
    _, aux = fwd(model, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(aux), float(out.aux_loss), rtol=1e-5)
    _, aux_all = fwd(model, jnp.asarray(ids), None)
    assert abs(float(aux_all) - float(aux)) > 1e-6  # the mask matters


def test_dense_models_have_zero_aux_loss(hf_models):
    model = from_pretrained(hf_models["gemma2"][1], dtype=jnp.float32)
    _, aux = model.hidden_states_and_aux(jnp.zeros((1, 4), jnp.int32))
    assert float(aux) == 0.0


@pytest.mark.parametrize(
    "family, data, fsdp, expert, tensor",
    [("qwen3_moe", 1, 2, 4, 1), ("qwen3_moe", 2, 1, 2, 2), ("gpt_oss", 1, 2, 2, 2)],
)
def test_experts_sharded_over_the_expert_axis_match_unsharded(hf_models, family, data, fsdp, expert, tensor):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    _, path = hf_models[family]
    mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor, expert=expert)
    assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "expert": expert, "context": 1, "tensor": tensor}
    sharded = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
    plain = from_pretrained(path, dtype=jnp.float32)
    gate = sharded.layers[0].mlp.gate_proj[...]
    assert gate.sharding.spec == P("expert", "fsdp", "tensor")
    # [4 experts, 64, 32] split over (expert, fsdp, tensor)
    assert gate.addressable_shards[0].data.shape == (4 // expert, 64 // fsdp, 32 // tensor)
    assert sharded.layers[0].mlp.router[...].sharding.spec == P("fsdp", None)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(sharded), nnx.state(plain))

    ids = np.random.default_rng(5).integers(0, VOCAB, (8, 16))
    ids_sharded = jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh))
    assert ids_sharded.sharding.spec == P(("data", "fsdp", "expert"), None)

    def loss(model, x):
        hidden, aux = model.hidden_states_and_aux(x)
        return jnp.mean(model.unembed(hidden) ** 2) + aux

    grad_fn = nnx.jit(nnx.value_and_grad(loss))
    jaxpr = str(jax.make_jaxpr(sharded.hidden_states)(ids_sharded))
    assert "shard_map" in jaxpr and "reduce_scatter" in jaxpr and "ragged_dot" in jaxpr  # expert_parallel
    with jax.set_mesh(mesh):
        a = jax_logits(sharded, ids_sharded)
        (va, ga) = grad_fn(sharded, ids_sharded)
    b = jax_logits(plain, ids)
    vb, gb = grad_fn(plain, jnp.asarray(ids))
    assert rel_err(a, b) < 1e-5
    np.testing.assert_allclose(va, vb, rtol=1e-5)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-7), ga, gb)
    with pytest.raises(ValueError, match=r"mlp\.\w+ \(4, .*dimension 0 \('expert', size 4\) cannot be split"):
        sharding.param_shardings(plain, sharding.make_mesh(1, 1, 1, expert=8))


def test_scan_layers_rejects_mixed_dense_and_moe_layers(hf_models):
    with pytest.raises(ValueError, match="mixes dense and mixture-of-experts layers"):
        from_pretrained(hf_models["qwen3_moe"][1], scan_layers=True)
    mixtral = from_pretrained(hf_models["mixtral"][1], dtype=jnp.float32)
    scanned = from_pretrained(hf_models["mixtral"][1], dtype=jnp.float32, scan_layers=True)
    ids = jnp.asarray(np.random.default_rng(6).integers(0, VOCAB, (2, 12)))
    assert rel_err(jax_logits(scanned, ids), jax_logits(mixtral, ids)) < 1e-5
    a = scanned.hidden_states_and_aux(ids)[1]
    b = mixtral.hidden_states_and_aux(ids)[1]
    np.testing.assert_allclose(a, b, rtol=1e-5)


# --- a short training run per family -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])  # llama: tests/test_train.py
def test_training_run_val_loss_falls_and_export_reproduces_it(family, tmp_path):
    from test_train import load, read_metrics
    from tiny_run import make_tiny_run_assets

    from jax_sft import data as data_lib
    from jax_sft import train

    assets = make_tiny_run_assets(tmp_path / "assets", family)
    cfg = load(
        assets,
        tmp_path,
        sft__max_num_steps=8,
        sft__val_period=8,
        checkpointing__enabled=False,
        checkpointing__hf_export_dir=tmp_path / "hf",
    )
    result = train.run(cfg)
    vals = [result.val_losses[s] for s in sorted(result.val_losses)]
    assert sorted(result.val_losses) == [0, 8] and vals[1] < 0.8 * vals[0], vals
    rows = [r for r in read_metrics(result.run_dir) if "train/loss" in r]
    moe = family in MOE_FAMILIES
    assert all(("train/router_aux_loss" in r) == moe for r in rows)
    if moe:  # E * sum(f * p) >= top_k by Cauchy-Schwarz when f sums to top_k and p to 1
        assert all(r["train/router_aux_loss"] >= 2.0 - 1e-4 for r in rows), rows

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    loss = hf_val_loss(hf, data_lib.SFTData(make_plan(cfg, devices=1).data, data_lib.load_tokenizer(cfg)).val_batches())
    print(
        f"\n{family}: val_loss step 0 {vals[0]:.4f} -> step 8 {vals[1]:.4f}; exported, in transformers: "
        f"{loss:.6f} (jax_sft {result.val_losses[8]:.6f})"
    )
    np.testing.assert_allclose(loss, result.val_losses[8], rtol=1e-5)


@pytest.mark.slow
def test_moe_training_with_expert_parallelism_matches_one_device(tmp_path):
    """NeMo RL's expert_parallel_size maps to the expert axis: 8 devices (fsdp 2 x expert 4)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    from test_train import load, read_metrics
    from tiny_run import make_tiny_run_assets

    from jax_sft import train

    assets = make_tiny_run_assets(tmp_path / "assets", "mixtral")
    common = dict(sft__max_num_steps=4, sft__val_period=0, sft__val_at_start=False, checkpointing__enabled=False)
    one = train.run(load(assets, tmp_path / "one", **common))
    eight = train.run(
        load(
            assets,
            tmp_path / "eight",
            **common,
            cluster__gpus_per_node=8,
            policy__dtensor_cfg__expert_parallel_size=4,
            policy__train_micro_batch_size=2,
            sft__val_micro_batch_size=4,
        )
    )
    losses = [[r.train_losses[s] for s in range(1, 5)] for r in (one, eight)]
    print("\nstep  1 device      8 devices (fsdp 2 x expert 4)")
    for s, (a, b) in enumerate(zip(*losses), 1):
        print(f"{s:>4}  {a:.7f}   {b:.7f}")
    # Step 1 (same weights): equal. Later, discrete routing may flip an almost tied top-k choice
    # between the two reduction orders; one flip changes one token's loss, moving the mean over
    # the ~1000 loss tokens of a step by about 1e-3 at most.
    np.testing.assert_allclose(losses[1][0], losses[0][0], rtol=1e-5)
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-3)
    aux = [[r["train/router_aux_loss"] for r in read_metrics(run.run_dir) if "train/loss" in r] for run in (one, eight)]
    # The aux loss counts the top-k choices of every real token (prompts included), so a flip can
    # show from step 1; one flip moves it by at most 2 * 4 experts / rows (~2000 rows of routed
    # tokens x MoE layers per step here), i.e. < 4e-3.
    np.testing.assert_allclose(aux[1], aux[0], atol=4e-3)


def test_mfu_counts_active_expert_parameters():
    from jax_sft.models.counts import training_flops

    moe = ModelConfig.from_hf_dict(
        dict(
            BASE, architectures=["MixtralForCausalLM"], num_local_experts=8, num_experts_per_tok=2, intermediate_size=32
        )
    )
    # The same model with one dense MLP of top_k x the expert width, plus the router's matmul.
    dense = dataclasses.replace(moe, num_experts=0, intermediate_size=2 * 32)
    lengths = np.array([10, 20])
    router = 3 * 2 * (64 * 8) * lengths.sum() * 4  # 3x (fwd + bwd), 2 flops per MAC, 4 layers
    assert training_flops(moe, lengths) == pytest.approx(training_flops(dense, lengths) + router, rel=1e-12)


def test_dry_run_names_the_family_and_the_experts(hf_models):
    from jax_sft import config as config_lib
    from jax_sft.models import read_config

    for family, expected in (
        ("gemma2", "Gemma2ForCausalLM (gemma2 family)"),
        ("qwen3_moe", "Qwen3MoeForCausalLM (qwen3moe family)"),
    ):
        cfg = config_lib.load_config(
            None, [f"policy.model_name={hf_models[family][1]}", "policy.dtensor_cfg.expert_parallel_size=2"]
        )
        path = hf_models[family][1]
        plan = make_plan(cfg, devices=2, model_dir=path, model_config=read_config(path))
        lines = [line for line in plan.describe(1, 2) if line.startswith("model: ")]
        assert lines[0].startswith(f"model: {expected} from "), lines
    assert lines[1] == (
        "model: mixture of experts: 4 experts, top 2, 1 of 2 layers sparse; router aux "
        "loss coef 0.01; experts over mesh expert=2"
    ), lines
    cfg = config_lib.load_config(
        None,
        [
            "policy.dtensor_cfg.expert_parallel_size=2",
            "cluster.gpus_per_node=8",
            "policy.train_global_batch_size=16",
            "sft.val_global_batch_size=16",
        ],
    )
    mesh_line = make_plan(cfg, devices=8).describe(1, 8)[0]
    assert mesh_line.startswith("mesh: data=1 x fsdp=4 x expert=2 x tensor=1 over 8 devices"), mesh_line


# --- OLMo 2 and Phi-3 (added through the family registry) --------------------------------------


def test_olmo2_and_phi3_configs_read_their_layer_kinds():
    olmo2 = ModelConfig.from_hf_dict({**BASE, "architectures": ["Olmo2ForCausalLM"], "attention_bias": True})
    assert (olmo2.norm_placement, olmo2.qk_norm, olmo2.rms_norm_eps) == ("post", "projection", 1e-5)
    assert olmo2.qkv_bias and olmo2.o_bias and not olmo2.mlp_bias and olmo2.family == "olmo2"
    phi3 = ModelConfig.from_hf_dict({**BASE, "architectures": ["Phi3ForCausalLM"], "sliding_window": 7})
    assert (phi3.norm_placement, phi3.qk_norm, phi3.sliding_windows) == ("pre", None, (7,) * 4)
    assert not (phi3.qkv_bias or phi3.o_bias or phi3.mlp_bias) and phi3.max_position_embeddings == 4096
    with pytest.raises(ValueError, match="resid_pdrop=0.1 is not supported; set it to 0.0"):
        ModelConfig.from_hf_dict({**BASE, "architectures": ["Phi3ForCausalLM"], "resid_pdrop": 0.1})


def test_olmo2_norms_are_where_transformers_puts_them(tmp_path):
    """OLMo 2 has no norm before attention or the MLP, one after each, and q/k norms over whole
    projections: [heads, head_dim] here, [heads * head_dim] in the file."""
    hf = make_hf_model("olmo2", tmp_path / "olmo2")
    model = from_pretrained(tmp_path / "olmo2", dtype=jnp.float32)
    layer = model.layers[0]
    assert not hasattr(layer, "input_layernorm") and not hasattr(layer, "pre_feedforward_layernorm")
    assert layer.self_attn.q_norm.weight.shape == (4, 16) and layer.self_attn.k_norm.weight.shape == (2, 16)
    np.testing.assert_array_equal(
        layer.self_attn.k_norm.weight[...].reshape(-1), hf.model.layers[0].self_attn.k_norm.weight.detach().numpy()
    )
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
    assert rel_err(jax_logits(model, ids), hf_logits(hf, ids)) < 1e-5
    # A per-head norm (Qwen3's) with the same weights is another model: the placement matters.
    per_head = CausalLM(dataclasses.replace(model.config, qk_norm="head"), dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert per_head.layers[0].self_attn.q_norm.weight.shape == (16,)


def test_phi3_fused_tensors_split_on_load_and_fuse_on_save(tmp_path):
    hf = make_hf_model("phi3", tmp_path / "phi3")
    model = from_pretrained(tmp_path / "phi3", dtype=jnp.float32)
    qkv = hf.model.layers[1].self_attn.qkv_proj.weight.detach().numpy()  # [(4 + 2 + 2) * 16, 64]
    attn = model.layers[1].self_attn
    np.testing.assert_array_equal(attn.q_proj.kernel[...].reshape(64, -1).T, qkv[:64])
    np.testing.assert_array_equal(attn.k_proj.kernel[...].reshape(64, -1).T, qkv[64:96])
    np.testing.assert_array_equal(attn.v_proj.kernel[...].reshape(64, -1).T, qkv[96:])
    gate_up = hf.model.layers[1].mlp.gate_up_proj.weight.detach().numpy()  # [2 * 128, 64]
    np.testing.assert_array_equal(model.layers[1].mlp.up_proj.kernel[...].T, gate_up[128:])
    save_pretrained(model, tmp_path / "out")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(".q_proj." in k or ".gate_proj." in k for k in written)
    np.testing.assert_array_equal(written["model.layers.1.self_attn.qkv_proj.weight"], qkv)
    np.testing.assert_array_equal(written["model.layers.1.mlp.gate_up_proj.weight"], gate_up)
    # A fused tensor whose rows do not add up is named, with the shape config.json implies.
    written["model.layers.0.self_attn.qkv_proj.weight"] = written["model.layers.0.self_attn.qkv_proj.weight"][:-16]
    save_file(written, str(tmp_path / "out" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"fused tensor model.layers.0.self_attn.qkv_proj.weight has shape "
        r"\(112, 64\), but config.json implies \(128, 64\)",
    ):
        from_pretrained(tmp_path / "out", dtype=jnp.float32)


def test_phi3_lora_exports_merged_but_refuses_a_peft_adapter_on_fused_modules(tmp_path):
    from jax_sft.errors import SettingError
    from jax_sft.models.options import LoraConfig
    from jax_sft.models.peft_io import save_peft_adapter

    make_hf_model("phi3", tmp_path / "phi3")
    model = from_pretrained(tmp_path / "phi3", dtype=jnp.float32, lora=LoraConfig(dim=4, alpha=8, seed=1))
    with pytest.raises(
        SettingError,
        match=r"PEFT adapter of a Phi3ForCausalLM with adapters on "
        r"\['gate_proj', 'k_proj', 'q_proj', 'up_proj', 'v_proj'\]",
    ):
        save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "phi3"))
    save_pretrained(model, tmp_path / "merged")  # the merged model is plain Phi-3
    assert (
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").__class__.__name__ == "Phi3ForCausalLM"
    )
