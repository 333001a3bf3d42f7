"""Print training examples as the model sees them, loss tokens highlighted.

    python -m jax_sft.inspect_data --config configs/sft.py [overrides] --num 3
    python -m jax_sft.inspect_data --config run.yaml data.train_data_path=x.jsonl --format jsonl

The first `--num` examples of `--split` (train or validation, in dataset order; for train, a
validation path is not needed), templated,
tokenised and loss-masked exactly as training does, with `data.overlength` applied (dropped
examples are skipped with a note on stderr), before padding or packing. An example that fails to
encode is reported on stderr as `error: <split> example <i>: <file:line>: <why>` and the others are
still printed; the exit status is then 2.

`--format text` (default): the decoded tokens, loss tokens in colour on a terminal (ANSI) and
as [[...]] otherwise (`--color always|never|auto`). `--format jsonl`: one JSON object per
example, `{"input_ids": [...], "loss_mask": [...], "text": "..."}`, where loss_mask[i] is 1 when
token input_ids[i] is a training target (token-aligned, not shifted like the batches' mask) and
text is the decoded input_ids.

`--validate_data`: instead, encode every row of both splits as training does and report each that
fails (`error: <file>:<line> (<dataset>): <why>`), exit status 2 if any did: the check that
`data.tokenize=lazy` otherwise makes when a row is reached.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import numpy as np

from jax_sft.config import load_config, make_plan, parse_args
from jax_sft.config.plan import RunPlan
from jax_sft.data.build import build_dataset
from jax_sft.data.chat import ConversationEncoder, load_tokenizer
from jax_sft.data.pipeline import check_dataset
from jax_sft.data.readers import Place
from jax_sft.data.tokens import apply_overlength, dataset_place
from jax_sft.errors import USAGE_EXIT_CODE, DataError, exit_on_input_error

_OPTIONS = {"num": "1", "format": "text", "split": "train", "color": "auto", "validate_data": "false"}
_CHOICES = {
    "format": ("text", "jsonl"),
    "split": ("train", "validation"),
    "color": ("auto", "always", "never"),
    "validate_data": ("false", "true"),
}
_ON, _OFF = "\x1b[1;42;30m", "\x1b[0m"  # bold black on green


def highlight(tokenizer, ids: np.ndarray, loss: np.ndarray, color: bool) -> str:
    """The decoded ids, runs of loss tokens wrapped in ANSI colour or [[...]]."""
    out, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or loss[end] != loss[start]:
            text = tokenizer.decode(
                ids[start:end].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            if loss[start]:
                text = f"{_ON}{text}{_OFF}" if color else f"[[{text}]]"
            out.append(text)
            start = end
    return "".join(out)


def _options(extra: dict) -> dict[str, str]:
    unknown = set(extra) - set(_OPTIONS)
    if unknown:
        raise SystemExit(
            f"inspect_data: unknown option(s) {sorted('--' + k for k in unknown)}; "
            f"expected {sorted('--' + k for k in _OPTIONS)}"
        )
    opts = {**_OPTIONS, **{k: str(v) for k, v in extra.items()}}
    opts["validate_data"] = opts["validate_data"].lower()
    for key, choices in _CHOICES.items():
        if opts[key] not in choices:
            raise SystemExit(f"inspect_data: --{key}={opts[key]!r}: expected one of {choices}")
    if not opts["num"].isdigit():
        raise SystemExit(f"inspect_data: --num={opts['num']!r}: expected a non-negative integer")
    return opts


def validate(plan: RunPlan, dataset, encoder) -> int:
    """Encodes every row of both splits as training does (`jax_sft.data.pipeline.check_dataset`,
    in `data.num_workers` workers) and prints an `error:` line for each that fails; returns how
    many failed."""
    failed = 0
    for message in check_dataset(plan.data, dataset, encoder):
        print(f"error: {message}", file=sys.stderr)
        failed += 1
    n = {split: len(dataset.formatted_ds[split]) for split in ("train", "validation")}
    print(f"rows checked: {n['train']} train, {n['validation']} validation", file=sys.stderr)
    return failed


USAGE = (
    "usage: python -m jax_sft.inspect_data --config PATH [overrides] [--num N] [--format text|jsonl] "
    "[--split train|validation] [--color auto|always|never] [--validate_data true]"
)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(f"{USAGE}\n\n{__doc__}")
        return
    config_path, overrides, extra = parse_args(argv)
    opts = _options(extra)
    cfg = load_config(config_path, overrides)
    if opts["split"] == "train" and cfg.data.get("train_data_path") and cfg.data.get("val_data_path") is None:
        # Datasets that read local files want both paths; only the train split is looked at here.
        cfg = load_config(config_path, [*overrides, f"data.val_data_path={cfg.data.train_data_path}"])
    plan = make_plan(cfg, devices=cfg.cluster.num_nodes * cfg.cluster.gpus_per_node)
    tokenizer = load_tokenizer(cfg)
    dataset = build_dataset(cfg)
    encoder = ConversationEncoder.from_config(cfg, tokenizer, dataset.task_spec)
    if opts["validate_data"] == "true":
        failed = validate(plan, dataset, encoder)
        if failed:
            print(f"error: {failed} rows failed", file=sys.stderr)
            raise SystemExit(USAGE_EXIT_CODE)
        return
    rows = dataset.formatted_ds[opts["split"]]
    indices = list(range(min(int(opts["num"]), len(rows))))
    max_length = plan.batch.max_input_length
    place = dataset_place(dataset, opts["split"])
    color = opts["color"] == "always" or (opts["color"] == "auto" and sys.stdout.isatty())
    failed = 0
    for i in indices:
        try:
            e = encoder.encode([rows[i]], [Place(place, i)])[0]
        except DataError as error:  # the other rows are still shown; the exit status says some failed
            print(f"error: {opts['split']} example {i}: {error}", file=sys.stderr)
            failed += 1
            continue
        ids, loss, status = apply_overlength(e.ids, e.loss, max_length, plan.data.overlength)
        if ids is None:
            print(
                f"{opts['split']} example {i}: {len(e.ids)} tokens > {max_length}: dropped (data.overlength=drop)",
                file=sys.stderr,
            )
            continue
        if opts["format"] == "jsonl":
            text = tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            print(json.dumps({"input_ids": ids.tolist(), "loss_mask": loss.tolist(), "text": text}, ensure_ascii=False))
        else:
            note = "" if status == "ok" else f", {status} to {max_length} (data.overlength)"
            print(f"=== {opts['split']} example {i}: {len(ids)} tokens, {int(loss.sum())} loss tokens{note} ===")
            print(highlight(tokenizer, ids, loss, color))
    if failed:
        print(f"error: {failed} of {len(indices)} examples failed to encode", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE)


if __name__ == "__main__":
    exit_on_input_error(main)
