"""Context parallelism (`jax_sft.models.context`): rows split over the mesh's context axis give
the losses, token counts and gradients of whole rows (fp32, 8 CPU devices), attention across the
axis is `attention.py`'s xla kernel (masks, windows, soft-capping, segments), and the split cuts
the per-device memory of long rows."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_sft import train
from jax_sft.config import IgnoredKeysWarning, load_config
from jax_sft.models import CausalLM, ModelConfig, sharding
from jax_sft.models import context as context_lib
from jax_sft.models.attention import _xla_attention
from jax_sft.models.options import LoraConfig, ModelOptions
from jax_sft.optim import make_optimizer
from jax_sft.step import make_loss_fn, make_step_fns, opt_state_shardings, split_model

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,  # (compile time: the split is per layer; the scanned case has 2)
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
# Qwen3 (q/k norms, head_dim 16 != hidden / heads, tied) with the 128k recipe's YaRN, scaled down:
# rows of 64 tokens run past the original 16 positions.
QWEN3_YARN = {
    **LLAMA,
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "head_dim": 16,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "rope_scaling": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "truncate": True,
        "beta_fast": 32,
        "beta_slow": 1,
    },
}
QWEN3_MOE = {
    **QWEN3_YARN,
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "router_aux_loss_coef": 0.01,
    "output_router_logits": True,
    "num_hidden_layers": 2,  # scanned
}
SHAPES = {"llama": LLAMA, "qwen3_yarn": QWEN3_YARN, "qwen3_moe": QWEN3_MOE}
OPT = {"name": "torch.optim.AdamW", "kwargs": {"lr": 1e-3}}
SEQ, ROWS = 64, 4
ROOT = Path(__file__).resolve().parents[1]


def rows(packed: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """ROWS rows of SEQ tokens: packed (two sequences and trailing padding per row) or padded (one
    sequence, right padding); ragged loss masks."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 96, (ROWS, SEQ)).astype(np.int32)
    col = np.arange(SEQ)[None]
    end = rng.integers(SEQ - 12, SEQ - 2, ROWS)[:, None]
    if packed:
        cut = rng.integers(5, SEQ - 20, ROWS)[:, None]
        seg = np.where(col < cut, 1, 2)
        pos = np.where(col < cut, col, col - cut)
    else:
        seg, pos = np.ones_like(ids), np.broadcast_to(col, ids.shape)
    seg, pos = np.where(col < end, seg, 0), np.where(col < end, pos, 0)
    mask = (rng.random(ids.shape) < 0.7) & (seg > 0)
    return {
        "input_ids": ids,
        "targets": np.roll(ids, -1, 1),
        "loss_mask": mask.astype(np.int32),
        "segment_ids": seg.astype(np.int32),
        "positions": pos.astype(np.int32),
    }


def compiled(fn, *args):
    """fn compiled for args without LLVM's optimisations (compile time; the values are fp32 alike)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


@functools.cache
def initial_state(shape: str, options: ModelOptions) -> tuple:
    """(trainable parameters, frozen ones, the rest) of the model, drawn once per shape and options
    (the values do not depend on the mesh)."""
    model = CausalLM(ModelConfig.from_hf_dict(SHAPES[shape]), options, rngs=nnx.Rngs(0))
    _, params, _, frozen, rest = split_model(model, lora=options.lora is not None)
    return params, frozen, rest


def loss_and_grads(shape: str, options: ModelOptions, packed: bool, mesh=None):
    """The trainer's loss function (`jax_sft.step.make_loss_fn`) on `rows(packed)` on `mesh` (None:
    one device), compiled with its gradient: (summed NLL, router aux loss, gradients of the
    trainable parameters) as numpy, and the model's attention line."""
    mesh = mesh or sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params, frozen, rest = initial_state(shape, dataclasses.replace(options, context_attention="auto"))
    abstract = nnx.eval_shape(
        lambda: CausalLM(ModelConfig.from_hf_dict(SHAPES[shape]), options, rngs=nnx.Rngs(0), mesh=mesh)
    )
    graphdef = split_model(abstract, lora=options.lora is not None)[0]
    params = jax.device_put(params, sharding.param_shardings(params, mesh))
    frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh))
    loss_fn = make_loss_fn(graphdef, rest, chunk_size=16, packed=packed)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in rows(packed).items()}
    no_fp8 = nnx.State({})
    step = compiled(jax.value_and_grad(loss_fn, has_aux=True), params, no_fp8, frozen, batch)
    (_, (nll, aux)), grads = step(params, no_fp8, frozen, batch)
    line = nnx.merge(graphdef, params, frozen, rest).describe_attention(packed, SEQ)
    return jax.tree.map(np.asarray, (nll, aux, grads)), line


@functools.cache
def whole_rows(shape: str, options: ModelOptions, packed: bool):
    return loss_and_grads(shape, dataclasses.replace(options, context_attention="auto"), packed)[0]


F32 = dict(dtype="float32", param_dtype="float32", attention="xla")
LORA = LoraConfig(dim=4, alpha=8, match_all_linear=True)
# (shape, context, fsdp, tensor, expert, rows, options): every context size with padded and
# packed rows, for both shapes, with fsdp 2 and with tensor 2, both strategies, and once experts
# split over an expert axis with LoRA, remat and two scanned layers.
CASES = [
    ("llama", 2, 4, 1, 1, "padded", {}),  # auto: all_gather (kv 2 x context 2 <= 4 heads)
    ("llama", 4, 2, 1, 1, "packed", {}),  # auto: ring
    ("llama", 8, 1, 1, 1, "packed", {"context_attention": "all_gather"}),
    ("qwen3_yarn", 2, 2, 2, 1, "packed", {"context_attention": "ring"}),
    ("qwen3_yarn", 4, 1, 2, 1, "padded", {}),
    ("qwen3_yarn", 8, 1, 1, 1, "padded", {}),
    ("qwen3_moe", 2, 2, 1, 2, "packed", {"lora": LORA, "remat": "full", "scan_layers": True}),
]


@pytest.mark.parametrize("shape,context,fsdp,tensor,expert,layout,extra", CASES, ids=lambda x: str(x))
def test_split_rows_give_the_losses_and_gradients_of_whole_rows(shape, context, fsdp, tensor, expert, layout, extra):
    options = ModelOptions(**F32, **extra)
    packed = layout == "packed"
    mesh = sharding.make_mesh(1, fsdp, tensor, expert=expert, context=context)
    (nll, aux, grads), line = loss_and_grads(shape, options, packed, mesh)
    whole_nll, whole_aux, whole_grads = whole_rows(shape, options, packed)
    strategy = extra.get("context_attention") or ("all_gather" if 2 * context <= 4 else "ring")
    assert f"context={context}: rows of {SEQ} tokens in {2 * context} chunks" in line
    assert {"ring": "ring attention", "all_gather": "K/V all-gathered"}[strategy] in line
    np.testing.assert_allclose(nll, whole_nll, rtol=1e-5)
    np.testing.assert_allclose(aux, whole_aux, rtol=1e-5)
    assert (aux > 0) == (shape == "qwen3_moe")
    leaves = jax.tree_util.tree_leaves_with_path(whole_grads)
    for (path, a), b in zip(leaves, jax.tree.leaves(grads)):
        err = np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-30)
        assert err < 1e-5 or np.linalg.norm(a) == np.linalg.norm(b) == 0, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("strategy", ["ring", "all_gather"])
def test_attention_across_the_axis_is_the_xla_kernel(strategy, monkeypatch):
    """Causal mask, HF's sliding window, soft-capping and packed segments (padding attending only
    to padding), keys in several sub-blocks: values and gradients as `attention.py`'s xla kernel."""
    monkeypatch.setattr(context_lib, "MAX_BLOCK", 4)  # chunks of 8 keys: two sub-blocks each
    n, b, t, d = 4, 2, 64, 8
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(b, t, 4, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, 2, d)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    col = np.arange(t)[None]
    seg = jnp.asarray(np.where(col < np.array([[20], [37]]), 1, np.where(col < 57, 2, 0)), jnp.int32)
    cp = context_lib.ContextParallel(sharding.make_mesh(1, -1, 2, context=n), strategy)
    kw = dict(sliding_window=9, softcap=3.0)

    def whole(q, k, v):
        return (_xla_attention(q, k, v, seg, kw["sliding_window"], 0.3, kw["softcap"]) * w).sum()

    def split(q, k, v):
        zz = functools.partial(context_lib.to_zigzag, n=n)
        out = context_lib.attention(zz(q), zz(k), zz(v), zz(seg), cp, scale=0.3, **kw)
        return (context_lib.from_zigzag(out, n) * w).sum()

    a, grads_a = compiled(jax.value_and_grad(whole, (0, 1, 2)), q, k, v)(q, k, v)
    b_, grads_b = compiled(jax.value_and_grad(split, (0, 1, 2)), q, k, v)(q, k, v)
    np.testing.assert_allclose(b_, a, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        assert np.linalg.norm(gb - ga) / np.linalg.norm(ga) < 1e-5


def test_zigzag_layout():
    order = context_lib.zigzag_order(16, 2)  # chunks of 4: device 0 holds 0 and 3, device 1 holds 1 and 2
    assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    x = jnp.arange(2 * 48).reshape(2, 48)
    np.testing.assert_array_equal(context_lib.from_zigzag(context_lib.to_zigzag(x, 4), 4), x)
    with pytest.raises(ValueError, match="a multiple of 8"):
        context_lib.zigzag_order(20, 4)
    assert context_lib.choose_strategy("auto", 32, 8, 4) == "all_gather"  # Llama 1B, context 4
    assert context_lib.choose_strategy("auto", 16, 8, 8) == "ring"  # Qwen3-0.6B, context 8
    assert context_lib.block_size(8192) == 1024 and context_lib.block_size(96) == 96


def temporary_bytes(context: int, seq: int) -> int:
    """XLA's temporary memory per device of the trainer's compiled micro-step (`jax_sft.step`) for
    a tiny Llama and one packed row of `seq` tokens, split over `context` devices (fp32)."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:context], context=context)
    model = CausalLM(ModelConfig.from_hf_dict(LLAMA), ModelOptions(**F32), rngs=nnx.Rngs(0), mesh=mesh)
    graphdef, params, no_fp8, _, rest = split_model(model, lora=False)
    shardings = sharding.param_shardings(params, mesh)
    tx, schedule = make_optimizer(OPT, None, 1.0)
    fns = make_step_fns(
        graphdef,
        rest,
        tx,
        schedule,
        mesh=mesh,
        param_shardings=shardings,
        opt_shardings=opt_state_shardings(tx, params, shardings, mesh),
        chunk_size=1024,
        packed=True,
        compute_dtype=jnp.float32,
    )

    def abstract(tree):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    acc = jax.eval_shape(fns.init_accumulator, params, no_fp8)
    acc = type(acc)(abstract(acc.grads), *(jax.ShapeDtypeStruct((), jnp.float32) for _ in range(3)), no_fp8)
    row = jax.ShapeDtypeStruct((1, seq), jnp.int32, sharding=sharding.batch_sharding(mesh))
    batch = dict.fromkeys(("input_ids", "targets", "loss_mask", "segment_ids", "positions"), row)
    lowered = fns.micro_step.lower((abstract(params), nnx.State({})), no_fp8, acc, batch, None)
    return lowered.compile().memory_analysis().temp_size_in_bytes


def test_split_rows_need_a_quarter_of_the_temporary_memory_at_32k():
    """One row of 32768 tokens: whole on one device, against split over context 8."""
    figures = {n: temporary_bytes(n, 32768) for n in (1, 8)}
    print(
        "\ntemporary memory per device: " + ", ".join(f"context={n}: {b / 2**20:.1f} MiB" for n, b in figures.items())
    )
    assert figures[8] < figures[1] / 4, figures


# ----------------------------------------------------------------------------- runs

RECIPE = (
    Path(__file__).resolve().parents[2]
    / "shared/reference/nemo-rl-configs/examples/configs/recipes/llm/sft-qwen3-0.6B-1n8g-megatron-yarn-128k.yaml"
)
# Qwen3-0.6B's kind of model (q/k norms, GQA, tied embeddings, no biases, 40960 positions that the
# recipe's YaRN stretches 3.2 times), tiny.
TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # (every head costs 16384^2 / 2 scores per row and layer on the CPU)
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
}


def long_math_assets(out: Path) -> tuple[Path, Path]:
    """(a tiny Qwen3 with a BPE tokenizer, 40 conversations of 500-900 tokens in
    Nemotron-Cascade-2-SFT-Math's columns), from the quickstart's arithmetic."""
    from jax_sft.models import save_pretrained
    from jax_sft.quickstart import make_dataset, make_tokenizer

    out.mkdir()
    make_dataset(out, train=2000, val=1)
    turns = [json.loads(line)["messages"] for line in open(out / "train.jsonl")]
    tokenizer = make_tokenizer([m["content"] for t in turns for m in t], vocab_size=320)
    rng = np.random.default_rng(0)
    with open(out / "math.jsonl", "w") as f:
        for _ in range(40):
            pick = [turns[i] for i in rng.integers(0, len(turns), rng.integers(25, 45))]
            user = "Solve each: " + " ; ".join(t[0]["content"] for t in pick)
            answer = " ; ".join(t[1]["content"] for t in pick)
            f.write(
                json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
            )
            f.write("\n")
    hf = {**TINY_QWEN3, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id}
    hf["eos_token_id"] = tokenizer.eos_token_id
    model = CausalLM(ModelConfig.from_hf_dict(hf), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    save_pretrained(model, out / "model", tokenizer=tokenizer)
    return out / "model", out / "math.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(not RECIPE.is_file(), reason="../shared/reference/nemo-rl-configs is absent")
def test_nemo_rl_128k_recipe_plans_and_trains_split_over_context_8(tmp_path, capsys):
    """NeMo RL's sft-qwen3-0.6B-1n8g-megatron-yarn-128k.yaml as it is (Megatron, context_parallel_size
    8, packing, YaRN, bfloat16), a tiny Qwen3 and only paths and sizes overridden: its --dry_run
    plan at 131072 tokens per row, then 2 steps on 8 CPU devices at 16384 tokens per row."""
    model, data = long_math_assets(tmp_path / "assets")
    paths = [
        f"policy.model_name={model}",
        f"data.train.data_path={data}",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
        f"logger.log_dir={tmp_path / 'logs'}",
        "logger.wandb_enabled=false",
        "logger.tensorboard_enabled=false",
        "logger.monitor_gpus=false",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        train.main(["--config", str(RECIPE), *paths, "--dry_run"])  # (exits 2 on a problem)
        plan = capsys.readouterr().out
        assert "  mesh: data=1 x fsdp=1 x expert=1 x context=8 x tensor=1 over 8 devices" in plan, plan
        assert "  context: rows of 131072 tokens split over context=8: 16384 tokens per device" in plan, plan
        assert "attention across it: ring" in plan and "  memory per device (estimate): training state" in plan
        sizes = ["policy.max_total_sequence_length=16384", "sft.max_num_steps=2", "sft.val_batches=1"]
        cfg = load_config(RECIPE, [*paths, *sizes, "sft.val_global_batch_size=1"])
    result = train.run(cfg)
    out = capsys.readouterr().out
    assert "mesh: {'data': 1, 'fsdp': 1, 'context': 8, 'tensor': 1} over 8 cpu devices" in out, out
    assert "context=8: rows of 16384 tokens in 16 chunks of 1024 (2048 tokens per device)" in out, out
    rows = [json.loads(line) for line in open(result.run_dir / "metrics.jsonl")]
    tokens = [r["train/global_valid_toks"] for r in rows if "train/loss" in r]
    print(f"\nlosses {result.train_losses}, tokens per step {tokens}, validation {result.val_losses}")
    assert result.final_step == 2 and all(np.isfinite(list(result.train_losses.values())))
    assert min(tokens) > 8192  # a row of 16 packed sequences per step
    assert (tmp_path / "ckpt" / "step_2").is_dir()


@pytest.mark.slow
def test_a_checkpoint_saved_with_context_4_resumes_with_context_1(tmp_path):
    """The tiny Llama run: 4 steps split over context 4 (saved every 2), and a run with whole rows
    resumed from its step 2: steps 3 and 4 have the same losses."""
    from tiny_run import make_tiny_run_assets

    assets = make_tiny_run_assets(tmp_path / "assets")
    common = [
        f"policy.model_name={assets / 'model'}",
        "data.dataset_name=openai_format",
        "policy.tokenizer.chat_template=default",
        f"data.train_data_path={assets / 'data' / 'train.jsonl'}",
        f"data.val_data_path={assets / 'data' / 'val.jsonl'}",
        f"checkpointing.checkpoint_dir={tmp_path / 'ckpt'}",
        "checkpointing.save_period=2",
        f"logger.log_dir={tmp_path / 'logs'}",
        "logger.tensorboard_enabled=false",
        "logger.monitor_gpus=false",
        "cluster.gpus_per_node=8",
        "sft.val_period=0",
        "sft.val_at_start=false",
        "sft.max_num_steps=4",
        "policy.train_global_batch_size=16",
        "policy.train_micro_batch_size=2",
        "policy.max_total_sequence_length=96",
        "policy.precision=float32",
        "policy.jax_cfg.loss_chunk_size=32",
        "policy.sequence_packing.enabled=true",
        "policy.sequence_packing.train_mb_tokens=192",
    ]
    split = train.run(load_config(ROOT / "configs" / "sft.py", [*common, "policy.jax_cfg.mesh.context=4"]))
    assert split.final_step == 4
    shutil.rmtree(tmp_path / "ckpt" / "step_4")
    whole = train.run(load_config(ROOT / "configs" / "sft.py", [*common, "policy.jax_cfg.mesh.context=1"]))
    assert sorted(whole.train_losses) == [3, 4]
    print(
        f"\nsteps 3, 4: context 4 {[split.train_losses[s] for s in (3, 4)]}, resumed at context 1 {whole.train_losses}"
    )
    np.testing.assert_allclose(
        [whole.train_losses[s] for s in (3, 4)], [split.train_losses[s] for s in (3, 4)], rtol=1e-5
    )


def test_the_plan_refuses_rows_the_context_axis_cannot_split():
    from jax_sft.config.plan import make_plan
    from jax_sft.errors import ConfigError

    def plan(*overrides):
        return make_plan(load_config(None, ["policy.jax_cfg.mesh.context=8", *overrides]), devices=8)

    assert plan().mesh.context == 8 and plan().mesh.dp == 1  # (derived: rows a multiple of 16)
    # The axis does not split the batch: the data-parallel ranks are fsdp's, whole rows each.
    mesh = sharding.make_mesh(1, 2, 1, context=4)
    assert sharding.dp_size(mesh) == 2 and sharding.local_dp_ranks(mesh) == (0, 1)
    assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None)
    with pytest.raises(ConfigError, match="splits rows into 2 x 8 equal chunks .* rows have 1000 tokens"):
        plan("policy.make_sequence_length_divisible_by=8", "policy.max_total_sequence_length=1000")
    # 260 tokens per device: chunks of 65 (the largest divisor up to 100); 262 = 2 x 131: only 2.
    chunked = plan("policy.max_total_sequence_length=2080", "policy.jax_cfg.loss_chunk_size=100")
    assert chunked.loss_chunk == 65
    assert (
        "loss: chunks of 65 tokens (policy.jax_cfg.loss_chunk_size=100 does not divide the 260 tokens per row "
        "and device" in "\n".join(chunked.describe(1, 8))
    )
    with pytest.raises(
        ConfigError, match="2096 tokens / context=8 = 262 tokens per device: no divisor of 262 between 12 and"
    ):
        plan("policy.max_total_sequence_length=2096", "policy.jax_cfg.loss_chunk_size=100")
