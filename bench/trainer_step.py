"""The real trainer measured: `python -m jax_sft.train` on NeMo RL's own sft.yaml, against the
benchmark's step of the same shape.

    python bench/trainer_step.py --config path/to/nemo_rl/examples/configs/sft.yaml --out DIR
    python bench/trainer_step.py --config ... --out DIR --dry     # CPU: tiny assets, --dry_run only

Makes, under DIR/work (or --work): a byte-level BPE tokenizer with a Llama-3-style chat template
(jax_sft.quickstart's), synthetic SQuAD-shaped rows (a ~`--context-tokens` context, a question, an
answer; sft.yaml trains on squad, so its dataset, template and keys stay as they are) and a
Llama-3.2-1B-shaped random model written with `save_pretrained` (bench/train_step.py's shape;
`--dry`: its tiny shape). Then runs the trainer twice on sft.yaml with only the model, the data
location, sizes and output folders overridden (W&B off, no checkpoints, no validation: the steps
are what is timed):

  as-configured   micro-batch 1, padded rows of 1024 (sft.yaml's own settings)
  micro8-packed   micro-batch 8 and sequence packing (train_mb_tokens 8 x 1024)

From each run's metrics.jsonl: the median step time over the steps after the first two, and the
trainer's own tokens/s (real tokens). Compared with DIR/bench.jsonl when bench/train_step.py wrote
it: as-configured against `padded-1024-mb1` (32 x 1024, micro-batch 1), micro8-packed against
`padded-1024` (micro-batch 8, full rows: with contexts near 1024 tokens each packed row holds one
sequence, so the work is alike). Writes DIR/trainer.jsonl and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "as-configured": ([], "padded-1024-mb1"),
    "micro8-packed": (
        ["policy.train_micro_batch_size=8", "policy.sequence_packing.enabled=true"],
        "padded-1024",
    ),
}
WORDS = [f"w{i}" for i in range(300)]


def make_rows(path: Path, n: int, context_tokens: int, seed: int) -> None:
    """n SQuAD-shaped rows (context, question, answers) of random words from a small lexicon."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            context = " ".join(rng.choice(WORDS) for _ in range(context_tokens // 2))
            answer = " ".join(rng.choice(WORDS) for _ in range(8))
            row = {
                "id": str(i),
                "title": "t",
                "context": context,
                "question": f"Which words follow {answer[:6]}?",
                "answers": {"text": [answer], "answer_start": [0]},
            }
            f.write(json.dumps(row) + "\n")


def make_assets(work: Path, tiny: bool, context_tokens: int) -> tuple[Path, Path]:
    """(model folder, data folder) under `work`, made once."""
    sys.path.insert(0, str(ROOT / "bench"))
    from train_step import LLAMA_1B, TINY  # noqa: PLC0415  (the benchmark's shapes)

    from jax_sft.quickstart import make_tokenizer  # noqa: PLC0415

    model_dir, data_dir = work / "model", work / "data"
    if not (data_dir / "val.jsonl").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        make_rows(data_dir / "train.jsonl", 64 if tiny else 1024, context_tokens, 0)
        make_rows(data_dir / "val.jsonl", 32, context_tokens, 1)
    if not (model_dir / "config.json").exists():
        import jax.numpy as jnp  # noqa: PLC0415
        from flax import nnx  # noqa: PLC0415

        from jax_sft.models import CausalLM, ModelConfig, save_pretrained  # noqa: PLC0415

        tokenizer = make_tokenizer(WORDS * 20 + ["Which words follow", "Context", "Question", "Answer"], 512)
        shape = TINY if tiny else LLAMA_1B
        hf = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **shape,
            "torch_dtype": "bfloat16",
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        t0 = time.time()
        model = CausalLM(ModelConfig.from_hf_dict(hf), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        save_pretrained(model, model_dir, tokenizer=tokenizer)
        print(
            f"[trainer] model {model.config.param_count():,} parameters written in {time.time() - t0:.0f} s", flush=True
        )
    return model_dir, data_dir


def overrides(model_dir: Path, data_dir: Path, out: Path, steps: int) -> list[str]:
    """sft.yaml's overrides: the model, the data location, sizes and output folders only."""
    return [
        f"policy.model_name={model_dir}",
        f"data.train.data_path={data_dir / 'train.jsonl'}",
        f"data.validation.data_path={data_dir / 'val.jsonl'}",
        f"sft.max_num_steps={steps}",
        "sft.val_at_start=false",
        "sft.val_period=0",
        "checkpointing.enabled=false",
        f"checkpointing.checkpoint_dir={out / 'ckpt'}",
        f"logger.log_dir={out / 'logs'}",
        "logger.wandb_enabled=false",
        "logger.tensorboard_enabled=false",
    ]


def run_trainer(config: str, args: list[str], timeout: float, dry: bool) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "jax_sft.train", "--config", config, *args] + (["--dry_run"] if dry else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout[-4000:] + proc.stderr[-4000:]


def step_figures(log_dir: Path) -> dict:
    """Median step time after the first two steps, tokens/s and the steps seen, from metrics.jsonl."""
    (metrics,) = log_dir.glob("exp_*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "timing/train/total_step_time" in r]
    timed = rows[2:] or rows
    step_s = statistics.median(r["timing/train/total_step_time"] for r in timed)
    tokens = statistics.median(r["train/global_valid_toks"] for r in timed)
    mfu = [r["train/mfu"] for r in timed if "train/mfu" in r]
    return dict(
        steps=len(rows),
        step_s=step_s,
        tokens_per_s=tokens / step_s,
        mfu=statistics.median(mfu) if mfu else None,
        loss=rows[-1]["train/loss"],
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="NeMo RL's examples/configs/sft.yaml")
    p.add_argument("--out", default="trainer_out")
    p.add_argument("--work", help="where the assets are made (default OUT/work)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--context-tokens", type=int, default=900)
    p.add_argument("--time-budget", type=float, default=180.0, help="seconds for both runs")
    p.add_argument("--dry", action="store_true", help="tiny assets and --dry_run only (CPU)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = make_assets(
        Path(args.work or out / "work").resolve(), args.dry, 64 if args.dry else args.context_tokens
    )
    bench = {}
    if (out / "bench.jsonl").exists():
        bench = {
            r["case"]: r
            for r in map(json.loads, (out / "bench.jsonl").read_text().splitlines())
            if r["framework"] == "jax_sft" and r["variant"] == "unrolled"
        }
    deadline, results = time.time() + args.time_budget, []
    for name, (extra, case) in RUNS.items():
        run_out = out / name
        code, text = run_trainer(
            args.config,
            overrides(model_dir, data_dir, run_out, args.steps) + extra,
            max(deadline - time.time(), 10),
            args.dry,
        )
        shown = text[text.find("plan:") :] if args.dry and "plan:" in text else text[-1500:] if code else ""
        print(f"[trainer] {name}: exit {code}\n{shown}", flush=True)
        if code or args.dry:
            results.append(dict(run=name, exit=code))
            continue
        row = dict(run=name, exit=code, **step_figures(run_out / "logs"))
        same = bench.get(case)
        row["bench_case"], row["bench_step_s"] = case, same and same["step_s"]
        row["vs_bench"] = same and row["step_s"] / same["step_s"]
        results.append(row)
    with open(out / "trainer.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    print(table(results), flush=True)
    if any(r["exit"] for r in results):
        raise SystemExit(1)


def table(results: list[dict]) -> str:
    lines = [
        f"{'trainer run':<15} {'exit':>4} {'step s':>7} {'tokens/s':>10} {'MFU%':>5} {'bench case':<16} "
        f"{'bench s':>7} {'trainer/bench':>13}"
    ]
    for r in results:

        def f(key, spec, scale=1.0, r=r):
            return "-" if r.get(key) is None else format(r[key] * scale, spec)

        lines.append(
            f"{r['run']:<15} {r['exit']:>4} {f('step_s', '.3f'):>7} {f('tokens_per_s', ',.0f'):>10} "
            f"{f('mfu', '.1f', 100):>5} {r.get('bench_case') or '-':<16} {f('bench_step_s', '.3f'):>7} "
            f"{f('vs_bench', '.3f'):>13}"
        )
    lines.append("target: the trainer's step within 5% of the bench's same-shape step (trainer/bench <= 1.05)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
