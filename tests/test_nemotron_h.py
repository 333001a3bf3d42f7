"""Nemotron-H (hybrid Mamba-2 / attention / MLP / MoE) beyond the shared table tests of
hf_models.FAMILIES (fp32 parity, packed rows, bf16, round trip, generation, a training run): config
reading, the sigmoid router against transformers', fsdp x tensor x expert sharding (values,
gradients, greedy generation), LoRA sites / counts / PEFT adapters with NeMo RL's module names,
parameter and FLOP counts, and NeMo RL's four nanov3 recipes on 8 CPU devices.

Relative error is max|a - b| / max|b|, b the reference. float32 throughout but for the recipes
(bfloat16, as they are written).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import COMMON, FAMILIES, hf_logits, jax_logits, make_hf_model
from jax.sharding import PartitionSpec as P

from jax_sft.generate import Generator, Sampling
from jax_sft.models import CausalLM, ModelConfig, from_pretrained, save_pretrained, sharding
from jax_sft.models.counts import lora_param_count, lora_sites
from jax_sft.models.lora import LoRAParam
from jax_sft.models.options import Fp8Config, LoraConfig

VOCAB = 256
ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT.parent / "shared" / "reference" / "nemo-rl-configs" / "examples" / "configs" / "recipes" / "llm"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("nemotron_h")
    return make_hf_model("nemotron_h", path), path


def hf_config_dict(**changes) -> dict:
    config_cls, model_cls, extra = FAMILIES["nemotron_h"]
    d = config_cls(**{**COMMON, **extra, **changes}).to_dict()
    return {**d, "architectures": [model_cls.__name__]}


# --- config.json ---------------------------------------------------------------------------------


def test_config_reads_the_layer_pattern_in_every_spelling():
    new = ModelConfig.from_hf_dict(hf_config_dict())  # transformers 5: layers_block_type, no num_hidden_layers
    assert new.layer_kinds == ("mamba", "attention", "mlp", "moe") and new.num_layers == 4
    assert new.moe_layers == (False, False, False, True) and not new.use_rope and not new.tie_word_embeddings
    assert (new.mamba.num_heads, new.mamba.head_dim, new.mamba.groups, new.mamba.state_size) == (8, 8, 2, 8)
    assert new.mamba.dt_limit == (0.0, math.inf) and new.mamba.proj_bias and new.mamba.conv_bias
    assert new.activation == "relu2" and new.rms_norm_eps == 1e-5 and new.head_dim == 16
    assert (new.moe_router, new.expert_groups, new.topk_groups, new.routed_scaling_factor) == ("sigmoid", 2, 1, 2.5)
    assert new.shared_expert_intermediate_size == 48 and new.router_aux_loss_coef == 0.0
    hub = {k: v for k, v in new.to_hf_dict().items() if k != "layers_block_type"}
    hub |= {"hybrid_override_pattern": "M*-E", "num_hidden_layers": 4, "time_step_limit": [0.0, float("inf")]}
    legacy = {**new.to_hf_dict(), "layers_block_type": ["mamba", "attention", "mlp", "moe"]}
    for d in (hub, legacy):
        c = ModelConfig.from_hf_dict(d)
        assert (c.layer_kinds, c.mamba, c.num_layers) == (new.layer_kinds, new.mamba, 4)
    with pytest.raises(ValueError, match="hybrid_override_pattern \\(characters of M\\*-E\\), got 'MX'"):
        ModelConfig.from_hf_dict({**hub, "hybrid_override_pattern": "MX"})
    with pytest.raises(ValueError, match="moe_latent_size=16 .* is not supported"):
        ModelConfig.from_hf_dict(hf_config_dict(moe_latent_size=16))
    with pytest.raises(ValueError, match="scan_layers=True needs the same layer on every layer"):
        CausalLM(new, scan_layers=True, rngs=nnx.Rngs(0))


def test_dry_run_describes_the_hybrid(hf):
    from jax_sft import config as config_lib
    from jax_sft.config import make_plan
    from jax_sft.models import read_config

    _, path = hf
    cfg = config_lib.load_config(None, [f"policy.model_name={path}", "policy.dtensor_cfg.expert_parallel_size=2"])
    plan = make_plan(cfg, devices=2, model_dir=path, model_config=read_config(path))
    lines = [line for line in plan.describe(1, 2) if line.startswith("model: ")]
    assert "rope none" in lines[0] and lines[1] == "model: hybrid layers: 1 mamba, 1 attention, 1 mlp, 1 moe (M*-E)"
    assert lines[2].startswith(
        "model: mixture of experts: 8 experts, top 2, 1 of 4 layers sparse; sigmoid routing over 1 of 2 "
        "groups, scaled by 2.5, a shared expert of 48; router aux loss coef 0.0; experts over mesh expert=2"
    ), lines


# --- the router ----------------------------------------------------------------------------------


def test_sigmoid_router_matches_transformers_and_each_feature_matters(hf):
    model = from_pretrained(hf[1], dtype=jnp.float32)
    moe, torch_router = model.layers[3].mixer, hf[0].model.layers[3].mixer.gate
    x = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    with torch.no_grad():
        _, want_w, want_e = torch_router(torch.as_tensor(x))
    _, weights, experts = moe.route(jnp.asarray(x))
    order = np.argsort(np.asarray(experts), axis=-1)  # top-k order is not specified
    want_order = np.argsort(want_e.numpy(), axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(experts), order, -1), np.sort(want_e.numpy(), -1))
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(weights), order, -1),
        np.take_along_axis(want_w.numpy(), want_order, -1),
        rtol=1e-6,
    )
    assert (np.asarray(experts) // 4 == np.asarray(experts)[:, :1] // 4).all()  # one group of 4 experts
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 2.5, rtol=1e-6)  # renormalised, scaled
    bias = moe.gate.e_score_correction_bias[...]
    for change in ("bias", "groups"):  # without the correction bias, or with every group allowed
        moe.gate.e_score_correction_bias[...] = jnp.zeros(8) if change == "bias" else bias
        moe.topk_groups = 2 if change == "groups" else 1
        assert (np.sort(np.asarray(moe.route(jnp.asarray(x))[2]), -1) != np.sort(want_e.numpy(), -1)).any(), change


def test_fp8_runs_the_attention_and_mlp_mixers_projections_only(hf):
    """policy.jax_cfg.fp8 on a hybrid model: the attention and MLP mixers' projections keep FP8
    histories (delayed scaling) and change the logits by FP8's rounding (current scaling); Mamba and
    MoE do not."""
    ids = np.random.default_rng(1).integers(0, 128, size=(2, 16))
    exact = jax_logits(from_pretrained(hf[1], dtype=jnp.float32), ids)
    fp8 = from_pretrained(hf[1], dtype=jnp.float32, fp8=Fp8Config("hybrid", "delayed", 1))
    kinds = [layer.kind for layer in fp8.layers]
    assert kinds == ["mamba", "attention", "mlp", "moe"]
    with_history = [
        (layer.kind, ".".join(map(str, path[:-1])))
        for layer in fp8.layers
        for path, _ in nnx.iter_graph(layer)
        if path and path[-1] == "fp8_history"
    ]
    assert sorted({kind for kind, _ in with_history}) == ["attention", "mlp"], with_history
    assert len(with_history) == 4 + 2, with_history  # q, k, v, o; up, down
    current = from_pretrained(hf[1], dtype=jnp.float32, fp8=Fp8Config("hybrid", "tensorwise", 1))
    err = rel_err(jax_logits(current, ids), exact)  # delayed scales start at 1 (empty histories)
    # Rounding to e4m3 changes the logits, and finitely. This random 4-layer model is too sensitive for a
    # bound (3% noise on the attention weights alone moves its logits by 31%); the FP8 arithmetic
    # itself is checked exactly in tests/test_fp8.py.
    assert 1e-3 < err < math.inf, err


# --- sharding and generation ---------------------------------------------------------------------


def test_fsdp_tensor_expert_sharding_matches_and_generates_as_transformers(hf):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    hf_model, path = hf
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, expert=2)
    sharded = from_pretrained(path, dtype=jnp.float32, param_dtype=jnp.float32, mesh=mesh)
    plain = from_pretrained(path, dtype=jnp.float32, param_dtype=jnp.float32)
    mamba, moe = sharded.layers[0].mixer, sharded.layers[3].mixer
    assert mamba.in_proj.kernel_x[...].sharding.spec == P("fsdp", "tensor", None)  # heads over tensor
    assert mamba.in_proj.kernel_bc[...].sharding.spec == P("fsdp", None, "tensor", None)  # groups over tensor
    assert mamba.conv1d.kernel_x[...].sharding.spec == P("tensor", None, None, None)
    assert mamba.out_proj.kernel[...].sharding.spec == P("tensor", None, "fsdp")
    assert moe.experts.up_proj[...].sharding.spec == P("expert", "fsdp", "tensor")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(sharded), nnx.state(plain))

    rng = np.random.default_rng(1)
    a, b = rng.integers(0, VOCAB, 7), rng.integers(0, VOCAB, 13)
    ids = np.zeros((4, 20), np.int64)
    ids[0], ids[1, :7], ids[1, 7:], ids[2:] = rng.integers(0, VOCAB, 20), a, b, rng.integers(0, VOCAB, (2, 20))
    segments = np.ones((4, 20), np.int64)
    segments[1, 7:] = 2  # a packed row

    def loss(model, x, s):
        hidden, aux = model.hidden_states_and_aux(x, segment_ids=s)
        logits = model.unembed(hidden)
        return jnp.mean(logits**2) + aux, logits

    grad_fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    put = lambda x: jax.device_put(jnp.asarray(x), sharding.batch_sharding(mesh))  # noqa: E731
    with jax.set_mesh(mesh):
        (va, la), ga = grad_fn(sharded, put(ids), put(segments))
    (vb, lb), gb = grad_fn(plain, jnp.asarray(ids), jnp.asarray(segments))
    unpacked = [0, 2, 3]
    assert rel_err(la, lb) < 1e-5 and rel_err(np.asarray(lb)[unpacked], hf_logits(hf_model, ids[unpacked])) < 1e-5
    np.testing.assert_allclose(va, vb, rtol=1e-5)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-7), ga, gb)
    assert not np.asarray(gb["layers"][3]["mixer"]["gate"]["e_score_correction_bias"][...]).any()  # a buffer

    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (3, 9, 17)]
    got = Generator(sharded, None, mesh=mesh, batch_size=3, stop_ids=[2]).generate(prompts, Sampling(max_new_tokens=16))
    want = []
    for p in prompts:
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([p]), do_sample=False, max_new_tokens=16, eos_token_id=2, pad_token_id=0
            )
        want.append(out[0, len(p) :].tolist())
    assert got == want


# --- LoRA ----------------------------------------------------------------------------------------


def test_lora_with_nanov3_exclusions_sites_counts_and_peft_adapter(hf, tmp_path):
    peft = pytest.importorskip("peft")
    from jax_sft.export import abstract_adapters, attach_lora
    from jax_sft.models.peft_io import save_peft_adapter

    hf_model, path = hf
    lora = LoraConfig(dim=4, alpha=8.0, exclude_modules=("*out_proj*",))  # the nanov3 LoRA recipes' rule
    model = from_pretrained(path, dtype=jnp.float32, param_dtype=jnp.float32)
    m = model.config
    assert lora_sites(m, lora) == {
        (0, "in_proj"),
        *((1, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
        (2, "up_proj"),
        (2, "down_proj"),
        (3, "up_proj"),  # the shared expert's; experts and router get none
        (3, "down_proj"),
        (None, "lm_head"),
    }
    abstract = nnx.eval_shape(lambda: CausalLM(m, lora=lora, rngs=nnx.Rngs(0)))
    count = lambda kind: sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, kind)))  # noqa: E731
    assert lora_param_count(m, lora) == (count(LoRAParam), count(nnx.Param))
    buffers = sum(b.numel() for _, b in hf_model.named_buffers())
    assert m.param_count() == sum(p.numel() for p in hf_model.parameters()) + buffers

    rng = np.random.default_rng(2)
    flat = nnx.to_flat_state(abstract_adapters(model, lora))
    values = [(p, v.replace(jnp.asarray(0.2 * rng.standard_normal(v.shape), jnp.float32))) for p, v in flat]
    adapted = attach_lora(model, lora, nnx.from_flat_state(values))
    ids = rng.integers(0, VOCAB, (2, 12))
    ours, base = jax_logits(adapted, ids), hf_logits(hf_model, ids)
    save_peft_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "mixer\\.shared_experts\\.(?:up_proj|down_proj)" in config["target_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_peft = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "adapter")).eval()
    assert rel_err(hf_logits(with_peft, ids), ours) < 1e-4 and rel_err(ours, base) > 1e-2
    with_peft.unload()  # the fixture's model without adapters again
    np.testing.assert_array_equal(hf_logits(hf_model, ids), base)
    save_pretrained(adapted, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert rel_err(hf_logits(merged, ids), ours) < 1e-4


# --- counts --------------------------------------------------------------------------------------


# Nemotron-3-Nano-30B-A3B's config.json, the keys its readers use (hub spelling).
NANO_V3 = dict(
    architectures=["NemotronHForCausalLM"],
    hidden_size=2688,
    hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    num_hidden_layers=52,
    intermediate_size=1856,
    mamba_head_dim=64,
    mamba_num_heads=64,
    n_groups=8,
    ssm_state_size=128,
    moe_intermediate_size=1856,
    moe_shared_expert_intermediate_size=3712,
    n_routed_experts=128,
    num_experts_per_tok=6,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=128,
    routed_scaling_factor=2.5,
    vocab_size=131072,
    tie_word_embeddings=False,
)


def test_parameter_and_flop_counts():
    v3 = ModelConfig.from_hf_dict(NANO_V3)
    assert v3.layer_kinds.count("mamba") == v3.layer_kinds.count("moe") == 23 and v3.layer_kinds.count("attention") == 6
    assert round(v3.param_count() / 1e9, 1) == 31.6  # NVIDIA's "31.6B total parameters"
    m = ModelConfig.from_hf_dict(hf_config_dict())
    n = np.array([10, 30])
    e, v, mb = 64, VOCAB, m.mamba
    mamba = 2 * (e * (2 * 64 + 2 * 2 * 8 + 8) + 64 * e) + 2 * (64 + 32) * 4 + 7 * 64 * 8
    attention = 2 * (e * 64 + 2 * e * 32 + 64 * e)
    mlp = 2 * 2 * e * 128
    moe = 2 * (2 * e * 48 + e * 8 + 2 * 2 * e * 32)  # shared expert, router, top-2 ungated experts
    pairs = 2 * 2 * 64 * (10 * 11 / 2 + 30 * 31 / 2)
    assert mb.inner == 64 and mb.conv_channels == 96
    want = 3 * ((mamba + attention + mlp + moe + 2 * e * v) * n.sum() + pairs)
    assert m.training_flops(n) == pytest.approx(want, rel=1e-12)


# --- NeMo RL's nanov3 recipes --------------------------------------------------------------------

NANOV3 = sorted(p.name for p in RECIPES.glob("sft-nanov3-*.yaml"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for the recipe runs (the two LoRA recipes compile the same
    programs), switched off again afterwards."""
    from jax.experimental.compilation_cache import compilation_cache

    yield tmp_path_factory.mktemp("compile_cache")
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def recipe_assets(tmp_path_factory) -> Path:
    """A tiny Nemotron-H (Mamba-2, attention and MoE layers: the kinds of Nemotron-Nano v3) with its
    tokenizer, and squad-format jsonl files (the recipes' dataset): 64 / 16 rows, enough for 2 steps
    of 16 and one validation batch of 8."""
    from tiny_run import make_tiny_run_assets

    assets = make_tiny_run_assets(
        tmp_path_factory.mktemp("nanov3"), "nemotron_h", rows=(64, 16), hybrid_override_pattern="M*E"
    )
    for name in ("train", "val"):
        rows = [json.loads(line)["messages"] for line in open(assets / "data" / f"{name}.jsonl")]
        squad = [
            {"context": "Arithmetic.", "question": r[-2]["content"], "answers": {"text": [r[-1]["content"]]}}
            for r in rows
        ]
        (assets / "data" / f"squad_{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in squad))
    return assets


@pytest.mark.slow
@pytest.mark.skipif(not NANOV3, reason="../shared/reference/nemo-rl-configs is absent")
@pytest.mark.parametrize("recipe", NANOV3)
def test_nanov3_recipe_trains_two_steps_on_8_cpu_devices(recipe, recipe_assets, compile_cache, tmp_path, capsys):
    """The recipe as written, but for model, data location, sizes (devices, steps, batch and row
    lengths, data workers) and output folders (and a compilation cache shared by the runs)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    from jax_sft import config as config_lib
    from jax_sft import train

    overrides = {
        "policy.model_name": recipe_assets / "model",
        "data.train.data_path": recipe_assets / "data" / "squad_train.jsonl",
        "data.validation.data_path": recipe_assets / "data" / "squad_val.jsonl",
        "cluster.num_nodes": 1,
        "cluster.gpus_per_node": 8,
        "sft.max_num_steps": 2,
        "sft.val_global_batch_size": 8,
        "sft.val_batches": 1,
        "policy.max_total_sequence_length": 128,
        "data.num_workers": 0,  # the rows are tokenised in this process (no worker to start)
        "checkpointing.checkpoint_dir": tmp_path / "ckpt",
        "logger.log_dir": tmp_path / "logs",
        "logger.wandb_enabled": False,
        "logger.tensorboard_enabled": False,
        "logger.monitor_gpus": False,
        "policy.jax_cfg.compilation_cache_dir": compile_cache,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = config_lib.load_config(str(RECIPES / recipe), [f"{k}={v}" for k, v in overrides.items()])
    result = train.run(cfg)
    out = capsys.readouterr().out
    losses = [result.train_losses[s] for s in sorted(result.train_losses)]
    with capsys.disabled():
        print(f"\n{recipe}: exit 0, final loss {losses[-1]:.4f} (losses {[round(x, 4) for x in losses]})")
    assert result.final_step == 2 and all(np.isfinite(losses))
    assert ("trainable of" in out and "(100.00%)" not in out) == recipe.endswith("-lora.yaml"), out
    expert = cfg.policy.dtensor_cfg.expert_parallel_size  # 8, 4 (full) or 1 (LoRA): as the recipe says
    assert (f"'expert': {expert}" in out) == (expert > 1), out
