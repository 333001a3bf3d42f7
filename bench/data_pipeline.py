"""Throughput of the whole data pipeline on one CPU core, and padding with and without packing.

    python bench/data_pipeline.py [--tokenizer DIR] [--conversations 1000] [--seq 8192] [--batch 64]

Synthetic multi-turn conversations of realistic lengths (2-6 turns; user turns lognormal around
~100 tokens, assistant turns lognormal 100-1500 tokens, some with reasoning_content) in the
Qwen3 chat template, built from English words of the tokenizer's vocabulary (about one token per
word). The pipeline is `SFTData` end to end: render once per conversation (+ the prefix renders
that locate assistant turns), tokenise, mask, then an epoch of steps (pack or pad, batch).
Pinned to one core, with the Rust tokenizer single-threaded. Reported: tokens/s of the whole
pipeline and of its parts, for reference the rate of a bare render + encode, and the padding
fraction (pad tokens / row tokens) of an epoch's micro-batches without and with packing.

Packing is per optimizer step (a step is train_global_batch_size sequences, NeMo RL's meaning),
so a step's last row is partly empty: padding with packing is about (seq / 2) / (tokens per
step), below 5% once a step holds ~10 rows of tokens (here: global batch 64 at seq 8192).
"""

from __future__ import annotations

import argparse
import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers" / "qwen3"


def english_words(tokenizer, n: int = 20000) -> list[str]:
    """Whole-word tokens ("Ġword") of the vocabulary, lowest ids (most frequent merges) first."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    words = [t[1:] for t, _ in vocab if t.startswith("Ġ") and t[1:].isalpha() and t[1:].isascii() and len(t) > 2]
    return words[:n]


class Synthetic:
    def __init__(self, words: list[str], seed: int):
        self.words = np.asarray(words)
        ranks = np.arange(1, len(words) + 1)
        self.p = (1 / ranks) / (1 / ranks).sum()  # Zipf
        self.rng = np.random.default_rng(seed)

    def text(self, tokens: float) -> str:
        n = max(1, int(tokens))
        w = self.rng.choice(self.words, size=n, p=self.p)
        out, sentence = [], []
        for word in w:
            sentence.append(word)
            if len(sentence) > 8 and self.rng.random() < 0.12:
                out.append(" ".join(sentence).capitalize() + ("." if self.rng.random() < 0.9 else "?"))
                sentence = []
                if self.rng.random() < 0.15:
                    out.append("\n\n")
        if sentence:
            out.append(" ".join(sentence).capitalize() + ".")
        return " ".join(out).replace(" \n\n ", "\n\n")

    def conversation(self) -> dict:
        messages = [{"role": "system", "content": self.text(self.rng.lognormal(3.5, 0.5))}]
        for _ in range(int(self.rng.integers(1, 4))):  # 2-6 turns: 1-3 user/assistant exchanges
            messages.append({"role": "user", "content": self.text(self.rng.lognormal(4.3, 0.9))})
            answer = {"role": "assistant", "content": self.text(np.clip(self.rng.lognormal(5.9, 0.7), 100, 1500))}
            if self.rng.random() < 0.3:
                answer["reasoning_content"] = self.text(self.rng.lognormal(5.0, 0.6))
            messages.append(answer)
        return {"messages": messages}


class BenchDataset:
    def __init__(self, train: list[dict], val: list[dict]):
        from jax_sft.data import PreservingDataset, TaskDataSpec

        self.formatted_ds = {"train": PreservingDataset(train), "validation": PreservingDataset(val)}
        self.task_spec = TaskDataSpec("bench")


def padding_fraction(data, steps: int) -> tuple[float, float]:
    """(pad fraction of the micro-batches' tokens, seconds) over `steps` steps."""
    it = data.train_iterator()
    real = total = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        step = next(it)
        for mb in step.micro_batches:
            real += int((mb["segment_ids"] > 0).sum())
            total += mb["segment_ids"].size
    return 1 - real / total, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=str(FIXTURE))
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--seq", type=int, default=4096, help="max_total_sequence_length (row length)")
    parser.add_argument("--batch", type=int, default=64, help="train_global_batch_size (sequences per step)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    from jax_sft.config import load_config, make_plan
    from jax_sft.data import SFTData, load_tokenizer

    def cfg(packing: bool, batch: int = args.batch):
        return load_config(
            None,
            [
                f"policy.tokenizer.name={args.tokenizer}",
                "policy.tokenizer.chat_template=default",
                f"policy.max_total_sequence_length={args.seq}",
                f"policy.train_global_batch_size={batch}",
                "policy.train_micro_batch_size=1",
                f"policy.sequence_packing.enabled={str(packing).lower()}",
                "data.overlength=truncate",
                "data.add_generation_prompt=true",
                "sft.val_global_batch_size=1",
            ],
        )

    tokenizer = load_tokenizer(cfg(False))
    synth = Synthetic(english_words(tokenizer), args.seed)
    train = [synth.conversation() for _ in range(args.conversations)]
    dataset = BenchDataset(train, train[:1])

    # Reference: one render and one encode per conversation, nothing else.
    t0 = time.perf_counter()
    texts = [tokenizer.apply_chat_template(c["messages"], tokenize=False) for c in train]
    t_render = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_tokens = sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    t_encode = time.perf_counter() - t0

    t0 = time.perf_counter()
    padded = SFTData(make_plan(cfg(False), devices=1).data, tokenizer, dp_ranks=[0], dataset=dataset)
    t_tokenise = time.perf_counter() - t0
    tokens = padded.stats["data/train_tokens"]
    pad_padded, t_pad_steps = padding_fraction(padded, padded.steps_per_epoch)
    packed = SFTData(make_plan(cfg(True), devices=1).data, tokenizer, dp_ranks=[0], dataset=dataset)
    pad_packed, t_pack_steps = padding_fraction(packed, packed.steps_per_epoch)
    epoch_tokens = packed.steps_per_epoch * args.batch * tokens / len(padded.train_split)

    by_batch = {}
    for g in (32, 64, 128):  # the last row of a step is partly empty: ~seq / 2 of G * mean length tokens
        c = cfg(True) if g == args.batch else cfg(True, batch=g)
        data = (
            packed
            if g == args.batch
            else SFTData(make_plan(c, devices=1).data, tokenizer, dp_ranks=[0], dataset=dataset)
        )
        by_batch[g] = round(padding_fraction(data, data.steps_per_epoch)[0], 4)
    lengths = padded.train_split.lengths
    report = {
        "conversations": args.conversations,
        "tokens": tokens,
        "tokens_per_conversation": {
            "mean": round(float(lengths.mean())),
            "p50": int(np.median(lengths)),
            "max": int(lengths.max()),
        },
        "truncated_to_seq": padded.stats["data/train_truncated"],
        "reference_render_only_tokens_per_s": round(n_tokens / t_render),
        "reference_render_and_encode_tokens_per_s": round(n_tokens / (t_render + t_encode)),
        "template_tokenise_mask_tokens_per_s": round(tokens / t_tokenise),
        "pack_and_batch_tokens_per_s": round(epoch_tokens / t_pack_steps),
        "pad_and_batch_tokens_per_s": round(epoch_tokens / t_pad_steps),
        "whole_pipeline_packed_tokens_per_s": round(tokens / (t_tokenise + t_pack_steps * tokens / epoch_tokens)),
        "padding_fraction_padded_rows": round(pad_padded, 4),
        "padding_fraction_packed": round(pad_packed, 4),
        "padding_fraction_packed_by_global_batch": by_batch,
        "seq": args.seq,
        "global_batch": args.batch,
    }
    print(json.dumps(report, indent=2))
    print(
        f"whole pipeline (template, tokenise, mask, pack, batch), 1 core: "
        f"{report['whole_pipeline_packed_tokens_per_s']:,} tokens/s (target >= 250,000)"
    )
    print(f"padding: {pad_padded:.1%} padded rows, {pad_packed:.1%} packed (target < 5%)")


if __name__ == "__main__":
    main()
