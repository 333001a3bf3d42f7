"""One-GPU training-step benchmark: jax_sft's compiled step against PyTorch + transformers.

    python bench/train_step.py [--out DIR] [--time-budget 420] [--scan] [--no-torch-compile]
    python bench/train_step.py --only jax:padded-4096:scan torch-eager:padded-4096
    python bench/train_step.py --cpu-tiny          # a tiny model on the CPU, for CI (< 2 min)
    python bench/train_step.py --model qwen3-4b --only jax:padded-4096 torch-eager:padded-4096
    python bench/train_step.py --long --warmup 1 --steps 2   # rows of 32k and 128k tokens

The model is Llama-3.2-1B-shaped with random weights (vocab 128256, hidden 2048, 16 layers,
32 heads, 8 kv heads, intermediate 8192, tied embeddings; `--model qwen3-4b`: Qwen3-4B's shape,
vocab 151936, hidden 2560, 36 layers, 32 heads of 128, 8 kv heads, intermediate 9728, q/k norms,
tied, torch running Qwen3ForCausalLM), bf16 compute, fp32 master weights,
AdamW (NeMo RL's defaults: lr 5e-6, betas 0.9/0.98, eps 1e-5, weight decay 0.1), gradient
clipping at 1.0. Every optimizer step sees ~32768 tokens:

  padded-1024       global batch 32 x seq 1024, micro-batches of 8: NeMo RL's default SFT step
  padded-1024-mb16  the same step in micro-batches of 16 (loss chunk 512)
  padded-1024-mb1   the same step in micro-batches of 1 (sft.yaml's train_micro_batch_size; what
                    bench/trainer_step.py's as-configured trainer run is compared with)
  padded-4096       global batch 8 x seq 4096, micro-batches of 2
  packed-4096       56 sequences per step of lognormal lengths (mean ~600, <= 4096; ~33k
                    tokens) packed first-fit decreasing into rows of 4096, one row per
                    micro-batch (train_mb_tokens 4096; jax_sft only)
  packed-4096-mb2   the same, two rows per micro-batch (an odd row count leaves one row empty)
  padded-4096-lora  padded-4096 training LoRA adapters (rank 16, every linear layer incl. lm_head)
                    on a frozen bf16 base (jax_sft only; its MFU counts full-training FLOPs, so
                    read its tokens/s and peak memory)

Long context (`--long`, or `--only jax:long-32k:ctx1 jax:long-32k:ctxall`): one full row of 32768
(long-32k) or 131072 (long-128k) tokens per step, remat "full", split over a context axis of
every device available (variant ctxall: the ring or all-gather attention of
`jax_sft.models.context`) against the whole row on one device (ctx1: cuDNN flash attention on a
GPU); MFU counts the devices the row ran on. On a one-GPU machine only ctx1 runs.

"padded" rows are full (no padding), so the padded cases give the dense-step ceiling that the
packed case is measured against. jax_sft runs its real step functions (`jax_sft.step`): one
compiled micro-step per micro-batch accumulating gradients, one compiled AdamW apply; layers
unrolled (the trainer's default, `policy.jax_cfg.scan_layers=false`), `--scan` adds
padded-4096 and padded-1024 with scanned layers. PyTorch runs `LlamaForCausalLM(LlamaConfig(...))` (sdpa
attention), autocast bf16, fused AdamW, eagerly and under `torch.compile`. Each case runs in
its own process (peak memory is per case; XLA and PyTorch never share the GPU), `warmup` steps
then `steps` timed steps (median). Cases run in order of importance until --time-budget is spent.

MFU = analytic training FLOPs (`ModelConfig.training_flops`: 6 x matmul params per token
plus causal attention over each sequence's own n(n+1)/2 pairs) / step time / dense bf16 peak;
packed tokens/s and MFU count real tokens only. Compile time (jax) is lower + compile of the
micro-step and the apply, through a persistent compilation cache (a fresh folder per benchmark
run, or --cache-dir): `padded-1024-warm` repeats padded-1024 in a fresh process to show what a
restart costs with the cache. torch.compile's "compile" is its first step's time minus a steady
step. Measured tables: bench/RESULTS.md.

Results: DIR/bench.jsonl (one JSON object per case) and DIR/bench_table.txt (printed last).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
)
QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
# --model: (HF architecture, config.json shape).
MODELS = {"llama-1b": ("LlamaForCausalLM", LLAMA_1B), "qwen3-4b": ("Qwen3ForCausalLM", QWEN3_4B)}
ADAMW = dict(lr=5e-6, betas=(0.9, 0.98), eps=1e-5, weight_decay=0.1)
MAX_SEGMENTS = 64


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    seq: int
    global_rows: int  # rows per optimizer step; packed: sequences per optimizer step
    micro_rows: int
    packed: bool = False
    scan: bool = False  # the trainer's default (policy.jax_cfg.scan_layers=false)
    loss_chunk: int | None = None  # None: --loss-chunk
    lora: int = 0  # LoRA rank on every linear layer (alpha = 2 x rank), bf16 frozen base; 0: full
    fp8: str | None = None  # FP8 projections: "delayed" or "tensorwise" scaling ("hybrid" format); None: bf16
    remat: str | None = None  # None: --remat
    context: int = 1  # the mesh's context axis (the row split over that many devices)


def long_cases(tiny: bool) -> list[Case]:
    """One full row per step, remat "full" (a 1B model at 128k tokens keeps ~9 GiB of layer inputs
    and one layer's ~11 GiB working set that way; without remat ~180 GiB)."""
    if tiny:
        return [Case("long-32k", 1024, 1, 1, remat="full"), Case("long-128k", 2048, 1, 1, remat="full")]
    return [Case("long-32k", 32768, 1, 1, remat="full"), Case("long-128k", 131072, 1, 1, remat="full")]


def cases(tiny: bool) -> list[Case]:
    if tiny:
        return [
            Case("padded-1024", 64, 8, 4),
            Case("padded-4096", 128, 4, 2),
            Case("packed-4096", 128, 56, 1, packed=True),
            Case("padded-4096-lora", 128, 4, 2, lora=8),
            Case("padded-4096-fp8", 128, 4, 2, fp8="delayed"),
        ]
    return [
        Case("padded-1024", 1024, 32, 8),
        Case("padded-4096", 4096, 8, 2),
        Case("packed-4096", 4096, 56, 1, packed=True),
        Case("padded-1024-mb16", 1024, 32, 16, loss_chunk=512),
        Case("padded-1024-mb1", 1024, 32, 1),
        Case("packed-4096-mb2", 4096, 56, 2, packed=True),
        Case("padded-4096-lora", 4096, 8, 2, lora=16),
        Case("padded-4096-fp8", 4096, 8, 2, fp8="delayed"),
        Case("padded-4096-fp8-tensorwise", 4096, 8, 2, fp8="tensorwise"),
    ]


# ----------------------------------------------------------------------------- batches


def packed_steps(seq: int, sequences: int, num_steps: int, micro_rows: int, vocab: int, seed: int = 0):
    """Per step, a list of micro-batches of packed rows (numpy int32 [micro_rows, seq] arrays)
    and the lengths of its `sequences` sequences: lognormal, mean ~600 (scaled by seq / 4096),
    clipped to [16, seq], packed per step (NeMo RL packs each global batch)."""
    rng = np.random.default_rng(seed)
    scale = seq / 4096
    steps = []
    for _ in range(num_steps):
        raw = rng.lognormal(np.log(600 * scale) - 0.5, 1.0, sequences)
        lengths = np.clip(raw, max(2, 16 * scale), seq).astype(int).tolist()
        bins, free = [], []
        for i in np.argsort(lengths)[::-1]:  # first fit decreasing
            fit = next((b for b, f in enumerate(free) if f >= lengths[i]), None)
            if fit is None:
                bins.append([]), free.append(seq)
                fit = len(bins) - 1
            bins[fit].append(lengths[i])
            free[fit] -= lengths[i]
        rows = len(bins) + (-len(bins)) % micro_rows  # the last micro-batch padded with empty rows
        seg = np.zeros((rows, seq), np.int32)
        pos = np.zeros((rows, seq), np.int32)
        for r, row in enumerate(bins):
            o = 0
            for k, n in enumerate(row, start=1):
                seg[r, o : o + n], pos[r, o : o + n] = k, np.arange(n)
                o += n
        ids = rng.integers(0, vocab, (rows, seq)).astype(np.int32)
        batch = dict(
            input_ids=ids,
            targets=np.roll(ids, -1, 1),
            loss_mask=(seg > 0).astype(np.int32),
            segment_ids=seg,
            positions=pos,
        )
        micro = [{k: v[i : i + micro_rows] for k, v in batch.items()} for i in range(0, rows, micro_rows)]
        steps.append((micro, np.asarray(lengths)))
    return steps


def padded_steps(seq: int, global_rows: int, micro_rows: int, num_steps: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(num_steps):
        ids = rng.integers(0, vocab, (global_rows, seq)).astype(np.int32)
        batch = dict(
            input_ids=ids,
            targets=np.roll(ids, -1, 1),
            loss_mask=np.ones_like(ids),
            segment_ids=np.ones_like(ids),
            positions=np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
        )
        micro = [{k: v[i : i + micro_rows] for k, v in batch.items()} for i in range(0, global_rows, micro_rows)]
        steps.append((micro, np.full(global_rows, seq)))
    return steps


def model_shape(args) -> tuple[str, dict]:
    """(HF architecture, config.json shape) of the benchmarked model (--model; --cpu-tiny: TINY)."""
    return ("LlamaForCausalLM", TINY) if args.cpu_tiny else MODELS[args.model]


def flops_config(shape: dict, architecture: str = "LlamaForCausalLM"):
    """The ModelConfig of a benchmark shape (what `ModelConfig.training_flops` takes)."""
    from jax_sft.models import ModelConfig

    return ModelConfig.from_hf_dict({"architectures": [architecture], **shape})


# ----------------------------------------------------------------------------- jax worker


def jax_worker(case: Case, args) -> dict:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from flax import nnx

    from jax_sft.metrics import peak_flops_per_device, peak_memory_bytes
    from jax_sft.models import CausalLM, sharding
    from jax_sft.models import attention as attention_lib
    from jax_sft.models.options import Fp8Config, LoraConfig
    from jax_sft.optim import make_optimizer
    from jax_sft.step import make_step_fns, opt_state_shardings, split_model

    arch, shape = model_shape(args)
    cfg = flops_config(shape, arch)
    t0 = time.perf_counter()
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[: case.context], context=case.context)
    lora = LoraConfig(dim=case.lora, alpha=2 * case.lora, match_all_linear=True) if case.lora else None
    model = CausalLM(
        cfg,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16 if lora else jnp.float32,
        attention=args.attention,
        remat=case.remat or args.remat,
        scan_layers=case.scan,
        max_segments=MAX_SEGMENTS,
        rngs=nnx.Rngs(0),
        lora=lora,
        fp8=Fp8Config("hybrid", case.fp8) if case.fp8 else None,
        mesh=mesh,
    )
    kernel = model.describe_attention(case.packed, case.seq)
    graphdef, params, fp8, frozen, rest = split_model(model, lora=lora is not None)
    del model
    shardings = sharding.param_shardings(params, mesh)
    params = jax.device_put(params, shardings)
    frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh))
    opt = {"name": "torch.optim.AdamW", "kwargs": {**ADAMW, "betas": list(ADAMW["betas"])}}
    tx, schedule = make_optimizer(opt, None, 1.0)
    opt_shardings = opt_state_shardings(tx, params, shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    fns = make_step_fns(
        graphdef,
        rest,
        tx,
        schedule,
        mesh=mesh,
        param_shardings=shardings,
        opt_shardings=opt_shardings,
        fp8_shardings=jax.tree.map(lambda x: x.sharding, fp8),
        chunk_size=case.loss_chunk or args.loss_chunk,
        packed=case.packed,
        compute_dtype=jnp.bfloat16,
    )
    batch_sharding = sharding.batch_sharding(mesh)
    jax.block_until_ready(opt_state)
    init_s = time.perf_counter() - t0

    n_steps = args.warmup + args.steps
    if case.packed:
        steps = packed_steps(case.seq, case.global_rows, n_steps, case.micro_rows, cfg.vocab_size)
        for micro, _ in steps:
            for mb in micro:
                attention_lib.check_packed_rows(mb["segment_ids"], MAX_SEGMENTS)
    else:
        steps = padded_steps(case.seq, case.global_rows, case.micro_rows, n_steps, cfg.vocab_size)
    put = lambda mb: {k: jax.device_put(v, batch_sharding) for k, v in mb.items()}  # noqa: E731

    t0 = time.perf_counter()
    acc = fns.init_accumulator(params, fp8)
    compute = fns.cast(params, frozen)
    counter = jnp.zeros((2,), jnp.int32)
    micro_step = fns.micro_step.lower(compute, fp8, acc, put(steps[0][0][0]), counter).compile()
    apply = fns.apply.lower(params, opt_state, fp8, acc, jnp.asarray(0, jnp.int32)).compile()
    compile_s = time.perf_counter() - t0

    times, flops, tokens, rows = [], [], [], []
    for i, (micro, lengths) in enumerate(steps):
        t0 = time.perf_counter()
        compute = fns.cast(params, frozen)
        acc = fns.init_accumulator(params, fp8)
        for j, mb in enumerate(micro):
            acc = micro_step(compute, fp8, acc, put(mb), jnp.asarray([i, j], jnp.int32))
        del compute
        params, opt_state, fp8, metrics = apply(params, opt_state, fp8, acc, jnp.asarray(i, jnp.int32))
        loss = float(metrics["train/loss"])  # waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            flops.append(cfg.training_flops(lengths))
            tokens.append(int(lengths.sum()))
            rows.append(len(micro) * case.micro_rows)
    if not np.isfinite(loss):
        raise RuntimeError(f"{case.name}: loss is {loss}")
    step_s = statistics.median(times)
    peak = peak_flops_per_device(jax.devices()[0], "bfloat16")
    return dict(
        framework="jax_sft",
        case=case.name,
        variant="scan" if case.scan else "unrolled",
        context=case.context,
        device=jax.devices()[0].device_kind,
        kernel=kernel,
        seq=case.seq,
        tokens_per_step=float(np.mean(tokens)),
        fill=float(np.sum(tokens) / (np.sum(rows) * case.seq)),
        step_s=step_s,
        tokens_per_s=float(np.sum(tokens) / np.sum(times)),
        mfu=None if peak is None else float(np.sum(flops) / np.sum(times) / peak / case.context),
        peak_gib=(peak_memory_bytes() or 0) / 2**30,
        compile_s=compile_s,
        init_s=init_s,
        loss=loss,
        versions=f"jax {jax.__version__}",
    )


# ----------------------------------------------------------------------------- torch worker


def torch_worker(case: Case, compiled: bool, args) -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    arch, shape = model_shape(args)
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = getattr(transformers, arch)(config).to(device)  # fp32 master weights
    model.train()
    opt = torch.optim.AdamW(model.parameters(), **ADAMW, fused=cuda)
    forward = torch.compile(model, dynamic=False) if compiled else model
    init_s = time.perf_counter() - t0
    steps = padded_steps(case.seq, case.global_rows, case.micro_rows, args.warmup + args.steps, shape["vocab_size"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times, first = [], None
    for i, (micro, _lengths) in enumerate(steps):
        sync()
        t0 = time.perf_counter()
        for mb in micro:
            ids = torch.as_tensor(mb["input_ids"], dtype=torch.long, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward(input_ids=ids, labels=ids).loss / len(micro)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss)  # waits for the step
        dt = time.perf_counter() - t0
        if i == 0:
            first = dt
        if i >= args.warmup:
            times.append(dt)
    step_s = statistics.median(times)
    tokens = case.global_rows * case.seq
    peak = None
    if cuda:
        from jax_sft.metrics import PEAK_TFLOPS

        name = torch.cuda.get_device_name()
        peak = next((p["bfloat16"] * 1e12 for k, p in PEAK_TFLOPS if k in name), None)
    flops = flops_config(shape, arch).training_flops(np.full(case.global_rows, case.seq))
    return dict(
        framework="torch.compile" if compiled else "torch eager",
        case=case.name,
        variant="",
        device=torch.cuda.get_device_name() if cuda else "cpu",
        kernel="sdpa",
        seq=case.seq,
        tokens_per_step=float(tokens),
        fill=1.0,
        step_s=step_s,
        tokens_per_s=tokens / step_s,
        mfu=None if peak is None else flops / step_s / peak,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        compile_s=(first - step_s) if compiled else None,
        init_s=init_s,
        loss=value * len(steps[0][0]),
        versions=f"torch {torch.__version__}, transformers {transformers.__version__}",
    )


# ----------------------------------------------------------------------------- orchestration


def _context_variant(spec: str) -> int:
    """ "ctx4" -> 4; "ctxall" -> every device of this process (the worker's)."""
    import jax

    return jax.device_count() if spec == "ctxall" else int(spec.removeprefix("ctx"))


def device_count() -> int:
    """The devices a worker sees (asked in a fresh process: the orchestrator never starts JAX)."""
    code = "import jax; print(jax.device_count())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def run_worker(spec: list[str], args, timeout: float) -> dict | None:
    """Runs this script as `--worker ...` in a fresh process; its last stdout line is JSON."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        *spec,
        "--out",
        args.out,
        "--cache-dir",
        args.cache_dir,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--attention",
        args.attention,
        "--remat",
        args.remat,
        "--loss-chunk",
        str(args.loss_chunk),
        "--model",
        args.model,
    ] + (["--cpu-tiny"] if args.cpu_tiny else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if "flags" in spec:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.xla_flags_variant).strip()
    print(f"[bench] {' '.join(spec)} (timeout {timeout:.0f}s)", flush=True)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        print(f"[bench] {' '.join(spec)}: timed out after {timeout:.0f}s\n{out[-2000:]}", flush=True)
        return None
    log = Path(args.out) / "workers.log"
    with open(log, "a") as f:
        f.write(f"===== {' '.join(spec)} (exit {proc.returncode})\n{proc.stdout}\n--- stderr ---\n{proc.stderr}\n")
    if proc.returncode != 0:
        print(
            f"[bench] {' '.join(spec)}: failed (exit {proc.returncode}); see {log}\n{proc.stderr[-3000:]}", flush=True
        )
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(Path(args.out) / "bench.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"[bench] {' '.join(spec)}: {fmt_row(result)}", flush=True)
    return result


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def fmt_row(r: dict) -> str:
    return (
        f"{r['framework'] + (' ' + r['variant'] if r['variant'] else ''):<22} {r['case']:<17} "
        f"{fmt(r['step_s'], '.3f'):>7} {fmt(r['tokens_per_s'], ',.0f'):>10} "
        f"{fmt(None if r['mfu'] is None else 100 * r['mfu'], '.1f'):>5} {fmt(r['peak_gib'], '.1f'):>6} "
        f"{fmt(r['compile_s'], '.1f'):>8} {fmt(r['fill'], '.2f'):>5}"
    )


def table(results: list[dict]) -> str:
    head = (
        f"{'framework':<22} {'case':<17} {'step s':>7} {'tokens/s':>10} {'MFU%':>5} {'peakGiB':>6} "
        f"{'compile s':>8} {'fill':>5}"
    )
    lines = [head, "-" * len(head)] + [fmt_row(r) for r in results]
    by = {(r["framework"], r["case"], r["variant"]): r for r in results}
    lines.append("")
    lines.append("ratio jax_sft / PyTorch, tokens/s:")
    for case in ("padded-1024", "padded-4096"):
        j = by.get(("jax_sft", case, "unrolled"))
        for fw in ("torch eager", "torch.compile"):
            t = by.get((fw, case, ""))
            ratio = "-" if not (j and t) else f"{j['tokens_per_s'] / t['tokens_per_s']:.2f}x"
            lines.append(f"  {case:<12} vs {fw:<14} {ratio}")
    long = [r for r in results if r["case"].startswith("long-")]
    if long:
        lines += ["", "long context, tokens/s per device (the row over `context` devices; peak GiB: device 0):"]
        for r in long:
            per = r["tokens_per_s"] / r.get("context", 1)
            lines.append(f"  {r['case']:<10} context {r.get('context', 1):<3} {per:>10,.0f}   {r['kernel']}")
    lines.append("")
    lines.append("targets (one H200, issue 25; n/a on a CPU or another model):")
    j4, j1, jp = (by.get(("jax_sft", c, "unrolled")) for c in ("padded-4096", "padded-1024", "packed-4096"))
    e1, c1 = by.get(("torch eager", "padded-1024", "")), by.get(("torch.compile", "padded-1024", ""))
    e4, c4 = by.get(("torch eager", "padded-4096", "")), by.get(("torch.compile", "padded-4096", ""))

    on_gpu = any(r["device"] != "cpu" for r in results)

    def verdict(ok):
        return "-" if ok is None or not on_gpu else ("MET" if ok else "MISSED")

    def target(text, value, ok):
        lines.append(f"  {text:<52} {value:<28} {verdict(ok)}")

    mfu4 = j4 and j4["mfu"]
    target(">= 50% MFU at 8 x 4096 (1B)", fmt(mfu4 and 100 * mfu4, ".1f") + "%", None if not mfu4 else mfu4 >= 0.50)
    nemo = [r for r in (j1, by.get(("jax_sft", "padded-1024-mb16", "unrolled"))) if r]
    best = min(nemo, key=lambda r: r["step_s"]) if nemo else None
    target(
        "NeMo RL default step (32 x 1024) < 0.55 s on one GPU",
        fmt(best and best["step_s"], ".3f") + f" s ({best['case'] if best else '-'})",
        None if not best else best["step_s"] < 0.55,
    )
    for name, j, e, c in (("1024", j1, e1, c1), ("4096", j4, e4, c4)):
        r = j and e and j["tokens_per_s"] / e["tokens_per_s"]
        target(f">= 1.3x torch eager tokens/s (seq {name})", fmt(r, ".2f") + "x", None if not r else r >= 1.3)
        r = j and c and j["tokens_per_s"] / c["tokens_per_s"]
        target(f">= 1.05x torch.compile tokens/s (seq {name})", fmt(r, ".2f") + "x", None if not r else r >= 1.05)
    r = jp and j4 and jp["mfu"] and j4["mfu"] and jp["mfu"] / j4["mfu"]
    target("packed MFU >= 90% of padded-full MFU (4096)", fmt(r and 100 * r, ".1f") + "%", None if not r else r >= 0.9)
    f8 = by.get(("jax_sft", "padded-4096-fp8", "unrolled"))
    r = f8 and j4 and j4["step_s"] / f8["step_s"]
    target("FP8 (delayed) step >= 1.3x bf16 at 8 x 4096", fmt(r, ".2f") + "x", None if not r else r >= 1.3)
    devices = sorted({r["device"] for r in results})
    versions = sorted({r["versions"] for r in results})
    kernels = sorted({f"{r['case']}: {r['kernel']}" for r in results if r["framework"] == "jax_sft"})
    lines += [
        "",
        f"device: {', '.join(devices)}",
        f"versions: {'; '.join(versions)}",
        "jax attention: " + "; ".join(kernels),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-tiny", action="store_true", help="tiny model on the CPU (CI)")
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="llama-1b",
        help="the benchmarked shape (random weights): Llama-3.2-1B or Qwen3-4B",
    )
    p.add_argument("--out", default="bench_out")
    p.add_argument("--cache-dir", help="persistent XLA compilation cache (default: a fresh temp folder)")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds for all cases")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--attention", default="auto")
    p.add_argument("--remat", default="none")
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-torch-compile", action="store_true")
    p.add_argument("--scan", action="store_true", help="also time padded-4096 with scan_layers=True")
    p.add_argument(
        "--xla-flags-variant",
        default="",
        help="also time padded-4096 with these XLA_FLAGS (e.g. --xla_gpu_enable_triton_gemm=false)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="KIND:CASE[:VARIANT]",
        help="run just these, e.g. jax:padded-4096:scan torch-eager:padded-1024",
    )
    p.add_argument("--dry", action="store_true", help="check the plan and the imports, run nothing")
    p.add_argument(
        "--long",
        action="store_true",
        help="only the long-context cases: rows of 32k and 128k tokens, context 1 vs every device",
    )
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    all_cases = {c.name: c for c in cases(args.cpu_tiny) + long_cases(args.cpu_tiny)}

    if args.worker:
        kind, name, *rest = args.worker
        case = all_cases[name.removesuffix("-warm")]
        if "scan" in rest:
            case = dataclasses.replace(case, scan=True)
        variant = "scan" if case.scan else "unrolled"
        if any(r.startswith("ctx") for r in rest):
            case = dataclasses.replace(case, context=_context_variant(next(r for r in rest if r.startswith("ctx"))))
            variant = f"context {case.context}"
        if "flags" in rest:
            variant += " " + os.environ.get("XLA_FLAGS", "")
        if kind == "jax":
            result = jax_worker(case, args)
            result["variant"] = variant
            if name.endswith("-warm"):
                result["case"] = name
        else:
            result = torch_worker(case, kind == "torch-compile", args)
        print(json.dumps(result))
        return

    if args.cpu_tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
        args.loss_chunk = min(args.loss_chunk, 64)
    for name in ("bench.jsonl", "workers.log"):
        (Path(args.out) / name).unlink(missing_ok=True)
    own_cache = args.cache_dir is None
    if own_cache:
        args.cache_dir = tempfile.mkdtemp(prefix="jax_sft_bench_cache_")
    deadline = time.time() + args.time_budget
    left = lambda: deadline - time.time()  # noqa: E731
    # (worker spec, seconds of budget it needs to be started), most important first.
    main_cases = ("padded-1024", "padded-4096", "packed-4096")
    plan = [(["jax", c], 0) for c in main_cases]
    compile_ok = not (args.no_torch or args.no_torch_compile or args.cpu_tiny)  # inductor on a CPU: minutes
    if not args.no_torch:
        plan += [(["torch-eager", c], 20) for c in main_cases[:2]]
    if compile_ok:
        plan.append((["torch-compile", "padded-1024"], 110))
    plan.append((["jax", "padded-1024-warm"], 30))
    if compile_ok:
        plan.append((["torch-compile", "padded-4096"], 110))
    plan += [(["jax", c], 40) for c in ("padded-1024-mb16", "packed-4096-mb2", "padded-4096-lora") if c in all_cases]
    if args.xla_flags_variant:
        plan.append((["jax", "padded-4096", "flags"], 60))
    if args.scan:
        plan.append((["jax", "padded-4096", "scan"], 40))
        if not args.cpu_tiny:  # (the CPU test runs the scanned worker once)
            plan.append((["jax", "padded-1024", "scan"], 40))
    if args.long:
        n = device_count()
        plan = [(["jax", c.name, ctx], 0) for c in long_cases(args.cpu_tiny) for ctx in ["ctx1"] + ["ctxall"] * (n > 1)]
        if n == 1:
            print("[bench] long context: one device here, so only context 1 runs", flush=True)
    if args.only:
        plan = [(spec.split(":"), 0) for spec in args.only]
    unknown = [spec for spec, _ in plan if spec[1].removesuffix("-warm") not in all_cases]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {sorted(all_cases)}")
    if args.dry:
        import jax  # noqa: F401, PLC0415  (the workers' imports work)
        import torch  # noqa: F401, PLC0415

        print("[bench] dry: would run " + ", ".join(":".join(spec) for spec, _ in plan), flush=True)
        if own_cache:
            shutil.rmtree(args.cache_dir, ignore_errors=True)
        return
    results = []
    try:
        for spec, needs in plan:
            if left() < max(needs, 15):
                print(f"[bench] {' '.join(spec)}: skipped, {left():.0f}s of the time budget left", flush=True)
                continue
            r = run_worker(spec, args, timeout=left())
            if r is not None:
                results.append(r)
    finally:
        if own_cache:
            shutil.rmtree(args.cache_dir, ignore_errors=True)
    text = table(results)
    (Path(args.out) / "bench_table.txt").write_text(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
