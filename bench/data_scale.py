"""Start-up, memory and throughput of the data pipeline as the dataset grows, with the DEFAULT
settings (`data.tokenize=lazy`, `data.num_workers=0`), against up-front tokenisation.

    python bench/data_scale.py [--sizes 20000 1000000] [--upfront-max 20000] [--steps 20] \
        [--dir /tmp/jax_sft_data_scale]

Synthetic conversations with a realistic length mix for SFT on math and chat data (1-3 exchanges;
user turns lognormal around ~75 tokens, assistant turns lognormal around ~330 tokens, clipped to
50..2000; English words of the Qwen3 vocabulary, about a token per word) are written once per size
as an Arrow stream file and memory-mapped (`datasets.Dataset.from_file`), as `datasets` keeps a
loaded or formatted dataset. The rows cycle through 5000 distinct conversations (tokenising
costs the same per row; generating a million distinct ones would take longer than the runs).

Each measurement is a fresh process running `SFTData` + `train_iterator()` on the Qwen3 template
(packing, seq 4096, global batch 64) and nothing else of the config changed (the Rust tokenizer
single-threaded):

  first batch      wall time from process start (spawn; Python, jax and tokenizer imports
                   included) to the first StepBatch in hand; "of which data": from SFTData(...)
  restart          the same for a restart that resumes the data position at step 1000 (lazy;
                   up front a restart tokenises again, as a first start)
  peak RSS         VmHWM; RSS growth: peak minus the RSS after imports and tokenizer load, of which
                   "anonymous" is the process's own memory (RssAnon) and "file-backed" the pages of
                   the memory-mapped dataset it touched (the OS page cache, reclaimable)
  steady tok/s     tokens/s of `--steps` steps through the Grain iterator after the first (and 5 more
                   to let prefetching settle), pinned to one core with the default data.num_workers=0
                   ("1 core"), and with data.num_workers=2 on two cores ("2 workers"); "scaling" is
                   their ratio (target >= 1.6); "cores used": CPU seconds of the process and its
                   workers per second while timed (on a shared machine, what the load left them)
  pipeline tok/s   lazy: step assembly alone (template, tokenise, mask, pack, batch) on one core, timed
                   step by step alternating with a bare render + encode of the same step's
                   conversations (render+encode tok/s), so that the machine's load weighs on both
                   alike (the step's rows are read once before either is timed, so that page faults
                   of the memory-mapped file fall on neither); up front: tokens of the cache /
                   start-up time
  ratio            pipeline tok/s / render+encode tok/s (the tokenizer's limit on the same core;
                   target >= 0.8)

Sizes above --upfront-max are not run up front (a million conversations tokenise for tens of
minutes on one core and hold gigabytes); its figures are extrapolated linearly from the largest
measured size and marked so. The load average is printed with the table: the figures vary 2-3x
between machines and with load, the ratios much less (the 2-worker scaling needs two idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parents[1] / "shared" / "fixtures" / "tokenizers" / "qwen3"
POOL = 5000


def _status_mb(key: str) -> float:
    """A memory figure of /proc/self/status (VmRSS, VmHWM: peak RSS, RssAnon, RssFile) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _cpu_s() -> float:
    """CPU seconds used so far by this process and its live child processes (the Grain workers)."""
    own = os.times()
    total = own.user + own.system
    me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended
            continue
        if fields[1] == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def conversation(synth, rng) -> dict:
    import numpy as np

    messages = []
    for _ in range(int(rng.integers(1, 4))):
        messages.append({"role": "user", "content": synth.text(rng.lognormal(4.3, 0.7))})
        messages.append({"role": "assistant", "content": synth.text(np.clip(rng.lognormal(5.8, 0.6), 50, 2000))})
    return {"messages": messages}


def write_data(path: Path, n: int, tokenizer_dir: str) -> None:
    """n conversations as an Arrow stream file (the format of `datasets`' cache files)."""
    import numpy as np
    import pyarrow as pa
    from transformers import AutoTokenizer

    sys.path.insert(0, str(HERE))
    from data_pipeline import Synthetic, english_words  # noqa: PLC0415

    synth = Synthetic(english_words(AutoTokenizer.from_pretrained(tokenizer_dir)), 0)
    rng = np.random.default_rng(0)
    pool = [conversation(synth, rng) for _ in range(POOL)]
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("messages", pa.list_(message))])
    tmp = path.with_suffix(".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, n, 10_000):
            rows = [pool[i % POOL]["messages"] for i in range(start, min(n, start + 10_000))]
            writer.write_batch(pa.record_batch([pa.array(rows, pa.list_(message))], schema=schema))
    tmp.rename(path)


class ArrowConversations:
    """formatted_ds over a memory-mapped Arrow file (the guide's dataset protocol)."""

    def __init__(self, path: str):
        import datasets

        from jax_sft.data import TaskDataSpec

        train = datasets.Dataset.from_file(path)
        self.formatted_ds = {"train": train, "validation": train.select(range(8))}
        self.task_spec = TaskDataSpec("bench")


def child(args) -> None:
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, set(cores[: args.cores]))
    from jax_sft.config import load_config, make_plan
    from jax_sft.data import SFTData, load_tokenizer

    overrides = [
        f"policy.tokenizer.name={args.tokenizer}",
        "policy.tokenizer.chat_template=default",
        "policy.max_total_sequence_length=4096",
        "policy.train_global_batch_size=64",
        "policy.train_micro_batch_size=1",
        "policy.sequence_packing.enabled=true",
        "sft.val_global_batch_size=1",
    ]
    if args.child == "upfront":
        overrides.append("data.tokenize=upfront")  # else the default (lazy)
    if args.workers:
        overrides.append(f"data.num_workers={args.workers}")
    cfg = load_config(None, overrides)
    tokenizer = load_tokenizer(cfg)
    baseline, baseline_anon = _status_mb("VmRSS"), _status_mb("RssAnon")
    t0 = time.perf_counter()
    data = SFTData(make_plan(cfg, devices=1).data, tokenizer, dp_ranks=[0], dataset=ArrowConversations(args.data))
    it = data.train_iterator()
    if args.resume:
        it.set_state({**it.get_state(), "next_step": args.resume})
    first = next(it)
    first_at, t_first = time.time(), time.perf_counter() - t0
    for _ in range(5):  # prefetching settles
        next(it)
    t1, cpu1, tokens = time.perf_counter(), _cpu_s(), 0
    for _ in range(args.steps):
        tokens += next(it).num_tokens
    t_steps, cpu_steps = time.perf_counter() - t1, _cpu_s() - cpu1
    it.close()
    peak, anon, file_backed = _status_mb("VmHWM"), _status_mb("RssAnon"), _status_mb("RssFile")
    ratio = {} if args.workers else interleaved_ratio(data, tokenizer, first.step + args.steps + 6, args.steps)
    out = dict(
        first_batch_at=first_at,
        setup_to_first_s=t_first,
        steady_tok_s=tokens / t_steps,
        steady_cores=cpu_steps / t_steps,  # cores the run got (the machine's load takes the rest)
        peak_rss_mb=peak,
        rss_growth_mb=peak - baseline,
        anon_growth_mb=anon - baseline_anon,
        file_rss_mb=file_backed,
        cache_tokens=int(data.stats.get("data/train_tokens", 0)),
        **ratio,
    )
    print("RESULT " + json.dumps(out))


def interleaved_ratio(data, tokenizer, start: int, steps: int) -> dict:
    """Step assembly (template, tokenise, mask, pack, batch: what a Grain worker does per step) and a
    bare render + encode of the same step's conversations, alternated step by step so that the
    machine's load weighs on both alike. Lazy: the pipeline's own work; up front: the cache makes
    assembly cheap, so the ratio is taken against its start-up tokenisation instead (whole_tok_s)."""
    import numpy as np  # noqa: PLC0415

    from jax_sft.data.pipeline import _AssembleStep, _ShardPicks  # noqa: PLC0415
    from jax_sft.data.tokens import LazySplit  # noqa: PLC0415

    rows, G, seed = data.dataset.formatted_ds["train"], data.layout.global_batch, data.plan.seed
    split = data.train_split
    if not isinstance(split, LazySplit):
        split = LazySplit(
            rows,
            data.encoder,
            str,
            max_length=data.layout.max_length,
            overlength=data.plan.overlength,
            skip_without_loss=False,
        )
    dealt = np.random.default_rng(seed).permutation(len(rows))  # the lazy shards (data.shuffle)
    members = [[dealt[j::G] for j in shards] for shards in data._train_shards]
    assemble = _AssembleStep(split, _ShardPicks(members, data._train_shards, len(rows) // G, seed), data.layout)
    t_pipe = t_ref = 0.0
    tokens = ref_tokens = 0
    for step in range(start, start + steps):
        for rank in assemble.picks(step)[1]:  # page in the step's rows first: the memory map's page
            [rows[int(i)] for i in rank]  # faults (the page cache's cost, not the pipeline's) left out of both
        t0 = time.perf_counter()
        batch = assemble(step)
        t1 = time.perf_counter()
        texts = [tokenizer.apply_chat_template(rows[int(i)]["messages"], tokenize=False) for i in batch.indices]
        ref_tokens += sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
        t_ref += time.perf_counter() - t1
        t_pipe += t1 - t0
        tokens += batch.num_tokens
    return dict(assembly_tok_s=tokens / t_pipe, reference_tok_s=ref_tokens / t_ref)


def run(mode: str, path: Path, args, resume: int = 0, workers: int = 0, cores: int = 1) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--data",
        str(path),
        "--steps",
        str(args.steps),
        "--tokenizer",
        args.tokenizer,
        "--resume",
        str(resume),
        "--workers",
        str(workers),
        "--cores",
        str(cores),
    ]
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "RAYON_NUM_THREADS": "1",
        "JAX_PLATFORMS": "cpu",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    spawned = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("RESULT ") :])
    r["first_batch_s"] = r.pop("first_batch_at") - spawned
    return r


def _extrapolated(n: int, measured: dict[int, dict]) -> dict:
    """Up-front figures at size n, linear in the size from the largest measured one."""
    m = max(measured)
    up, k = measured[m], n / m
    return dict(
        n=n,
        mode=f"upfront (extrapolated x{k:.0f} from {m:,})",
        setup_to_first_s=up["setup_to_first_s"] * k,
        first_batch_s=up["first_batch_s"] + up["setup_to_first_s"] * (k - 1),
        restart_s=up["first_batch_s"] + up["setup_to_first_s"] * (k - 1),
        peak_rss_mb=up["peak_rss_mb"] + up["rss_growth_mb"] * (k - 1),
        rss_growth_mb=up["rss_growth_mb"] * k,
        anon_growth_mb=up["anon_growth_mb"] * k,
        file_rss_mb=up["file_rss_mb"],
        steady_tok_s=up["steady_tok_s"],
        steady_cores=up["steady_cores"],
        workers_tok_s=None,
        whole_tok_s=up["whole_tok_s"],
        assembly_tok_s=up["assembly_tok_s"],
        reference_tok_s=up["reference_tok_s"],
    )


def _table(rows: list[dict]) -> None:
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    print(
        "| examples | tokenisation | first batch (s) | of which data (s) | restart (s) | peak RSS (MB) "
        "| RSS growth (MB) | anonymous growth (MB) | file-backed RSS (MB) | steady tok/s, 1 core "
        "| steady tok/s, 2 workers on 2 cores | scaling | cores used (1 core / 2 workers) | pipeline tok/s "
        "| render+encode tok/s | ratio |"
    )
    print("| --- | --- | " + " | ".join(["---:"] * 14) + " |")
    for r in rows:
        default = r["mode"].startswith("default")
        pipe = r["assembly_tok_s"] if default else r["whole_tok_s"]
        workers = r.get("workers_tok_s")
        scaling = f"{workers / r['steady_tok_s']:.2f}" if workers else "-"
        cores = f"{r['steady_cores']:.2f} / {r['workers_cores']:.2f}" if workers else "-"
        print(
            f"| {r['n']:,} | {r['mode']} | {r['first_batch_s']:.1f} | {r['setup_to_first_s']:.1f} "
            f"| {r['restart_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | {r['anon_growth_mb']:.0f} "
            f"| {r['file_rss_mb']:.0f} | {r['steady_tok_s']:,.0f} | {f'{workers:,.0f}' if workers else '-'} "
            f"| {scaling} | {cores} | {pipe:,.0f} | {r['reference_tok_s']:,.0f} | {pipe / r['reference_tok_s']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 1_000_000])
    parser.add_argument("--upfront-max", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=20, help="steps timed after the first")
    parser.add_argument("--dir", default="/tmp/jax_sft_data_scale")
    parser.add_argument("--tokenizer", default=str(FIXTURE))
    parser.add_argument("--child", choices=["default", "upfront"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--resume", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    rows, measured_upfront = [], {}
    for n in args.sizes:
        path = Path(args.dir) / f"conversations_{n}.arrow"
        if not path.exists():
            t0 = time.perf_counter()
            write_data(path, n, args.tokenizer)
            print(
                f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
            )
        first = run("default", path, args)
        restart = run("default", path, args, resume=1000)
        two = run("default", path, args, workers=2, cores=2)
        rows.append(
            dict(
                n=n,
                mode="default (lazy)",
                **first,
                restart_s=restart["first_batch_s"],
                workers_tok_s=two["steady_tok_s"],
                workers_cores=two["steady_cores"],
            )
        )
        print(f"{n:,}: {rows[-1]}", file=sys.stderr)
        if n <= args.upfront_max:
            up = run("upfront", path, args)
            up["whole_tok_s"] = up["cache_tokens"] / up["setup_to_first_s"]
            measured_upfront[n] = up
            rows.append(dict(n=n, mode="upfront", **up, restart_s=up["first_batch_s"]))
        elif measured_upfront:
            rows.append(_extrapolated(n, measured_upfront))
    _table(rows)


if __name__ == "__main__":
    main()
