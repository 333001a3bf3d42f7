"""NeMo RL's text SFT datasets as it registers them today (commit 7ea279ab), in its current protocol.

A dataset class is constructed from one dataset section of the config (`data.train`,
`data.validation`, or an entry of their lists, with `data.default` filled in) as
`Class(**keys)` and then gives

  * `dataset`: the rows, each `{"messages": [...], "tools": [...]?}` in Hugging Face chat format;
  * `val_dataset`: rows carved from `dataset` for validation (`split_validation_size` > 0), or None;
  * `task_name`: the name that binds the rows to their `task_spec` when datasets are mixed;
  * `set_task_spec(keys)` -> `task_spec` (prompt_file, system_prompt_file) and `set_processor()`.

Every class formats rows exactly as NeMo RL's class of the same name does (same messages, same
validation carve-out with `datasets`' `train_test_split(test_size, seed)`, same `max_samples`
sampling with `shuffle(seed).select(...)`). Hub datasets load with `datasets.load_dataset` as in
NeMo RL; each class also takes `data_path`, a local file (`.jsonl`, `.json`, `.parquet`, `.csv`,
`.arrow`, `.txt`) or a `save_to_disk` folder with the hub dataset's columns, which replaces the hub
split (jax_sft's addition, for machines without the hub). A saved `DatasetDict` folder gives the
split named by `split`.

Constructor keyword arguments are the keys a section may hold (besides `dataset_name`,
`prompt_file`, `system_prompt_file` and `processor`); `jax_sft.data.sections` checks them.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import datasets as hf_datasets

from jax_sft.data.formats import (
    PROCESSORS,
    OpenAIFormatRows,
    RawDataset,
    last_is_assistant,
    load_split,
    map_rows,
    oasst_conversations,
    oasst_tree_conversations,
    sample,
    task_name_from_path,
    user_assistant,
)
from jax_sft.data.readers import load_source, local_copy, read_json_records, require_column
from jax_sft.errors import DataError, MissingFileError

__all__ = ["REGISTRY", "ALIASES", "VISION_LANGUAGE", "NOT_SFT", "PROCESSORS"]


class SquadDataset(RawDataset):
    """rajpurkar/squad: system = context, user = question, assistant = the first answer."""

    HUB_ID = "rajpurkar/squad"

    def __init__(self, split: str = "train", data_path: str | None = None):
        self.task_name = "squad"
        split = split or "train"
        raw = load_split(type(self), data_path, split, lambda: hf_datasets.load_dataset(self.HUB_ID)[split])
        self.dataset = map_rows(
            raw, self.format_data, f"squad {data_path or split}", ("context", "question", "answers"), path=data_path
        )

    @staticmethod
    def format_data(row: dict, where: str) -> dict:
        answers = row["answers"]["text"]
        if not answers:
            raise DataError(f"{where}: 'answers.text' is empty")
        return {
            "messages": [
                {"role": "system", "content": row["context"]},
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": answers[0]},
            ]
        }


OASST_TREES = "2023-04-12_oasst_all.trees.jsonl.gz"


class OasstDataset(RawDataset):
    """OpenAssistant/oasst1 message trees (NeMo RL downloads `2023-04-12_oasst_all.trees.jsonl.gz`):
    every root-to-leaf path is a conversation opened by NeMo RL's system prompt; 5% carved for
    validation with seed 42 by default. data_path: a trees `.jsonl`/`.jsonl.gz` file, or message
    rows of the hub's parquet schema (message_id, parent_id, role, text)."""

    rows_are_records = False

    HUB_ID = "OpenAssistant/oasst1"

    def __init__(self, split_validation_size: float = 0.05, seed: int = 42, data_path: str | None = None):
        self.task_name = "oasst"
        if data_path is None:
            from huggingface_hub import hf_hub_download  # noqa: PLC0415

            data_path = hf_hub_download(repo_id=self.HUB_ID, filename=OASST_TREES, repo_type="dataset")
        if data_path.endswith((".jsonl", ".jsonl.gz")) and _first_record_is_tree(data_path):
            rows = oasst_tree_conversations(read_json_records(data_path), data_path)
        else:
            rows = oasst_conversations(local_copy(data_path, "train", "open_assistant data_path"), data_path)
        self.dataset = hf_datasets.Dataset.from_list(rows)
        self.split_train_validation(split_validation_size, seed)


def _first_record_is_tree(path: str) -> bool:
    if not Path(path).is_file():
        raise MissingFileError(f"open_assistant data_path={path!r}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        line = next((line for line in f if line.strip()), "{}")
    try:
        return "prompt" in json.loads(line)
    except json.JSONDecodeError:
        return False  # the row loader names the line


_OMI2_SPLITS = ("train", "train_1M", "train_2M", "train_5M")


class OpenMathInstruct2Dataset(RawDataset):
    """nvidia/OpenMathInstruct-2: user = problem, assistant = row[output_key]; 5% carved by default."""

    HUB_ID = "nvidia/OpenMathInstruct-2"

    def __init__(
        self,
        output_key: str = "expected_answer",
        split: str = "train_1M",
        split_validation_size: float = 0.05,
        seed: int = 42,
        data_path: str | None = None,
    ):
        self.task_name = "OpenMathInstruct-2"
        self.output_key, split = output_key or "expected_answer", split or "train_1M"
        if data_path is None and split not in _OMI2_SPLITS:
            raise ValueError(f"OpenMathInstruct-2: split={split!r}; expected one of {_OMI2_SPLITS}")
        raw = load_split(type(self), data_path, split, lambda: hf_datasets.load_dataset(self.HUB_ID, split=split))
        self.dataset = map_rows(
            raw,
            lambda r, w: user_assistant(r["problem"], r[self.output_key]),
            f"OpenMathInstruct-2 {data_path or split}",
            ("problem", self.output_key),
            path=data_path,
        )
        self.split_train_validation(split_validation_size, seed)


class NuminaMath15Dataset(RawDataset):
    """AI-MO/NuminaMath-1.5: user = problem, assistant = answer; by default only rows with a checkable
    answer (not "proof"/"notfound", question_type not "proof") marked valid (problem and solution)."""

    HUB_ID = "AI-MO/NuminaMath-1.5"

    def __init__(
        self,
        split: str = "train",
        verifiable_only: bool = True,
        require_valid: bool = True,
        split_validation_size: float = 0.0,
        seed: int = 42,
        data_path: str | None = None,
    ):
        self.task_name = "NuminaMath-1.5"
        split = split or "train"
        raw = load_split(type(self), data_path, split, lambda: hf_datasets.load_dataset(self.HUB_ID, split=split))
        if verifiable_only:
            raw = raw.filter(_numina_verifiable)
        if require_valid:
            raw = raw.filter(lambda r: r.get("problem_is_valid") == "Yes" and r.get("solution_is_valid") == "Yes")
        self.dataset = map_rows(
            raw,
            lambda r, w: user_assistant(r["problem"], r["answer"]),
            f"NuminaMath-1.5 {data_path or split}",
            ("problem", "answer"),
            path=data_path,
        )
        self.split_train_validation(split_validation_size, seed)


def _numina_verifiable(row: dict) -> bool:
    answer = (row.get("answer") or "").strip()
    if not answer or answer.lower() in ("proof", "notfound"):
        return False
    return (row.get("question_type") or "").strip().lower() != "proof"


class OpenR1Math220KDataset(RawDataset):
    """open-r1/OpenR1-Math-220k: user = problem, assistant = answer."""

    HUB_ID = "open-r1/OpenR1-Math-220k"

    def __init__(
        self,
        subset: str | None = "default",
        split: str = "train",
        split_validation_size: float = 0.0,
        seed: int = 42,
        data_path: str | None = None,
    ):
        self.task_name = "OpenR1-Math-220k"
        split = split or "train"
        raw = load_split(
            type(self),
            data_path,
            split,
            lambda: hf_datasets.load_dataset(self.HUB_ID, subset or "default", split=split),
        )
        self.dataset = map_rows(
            raw,
            lambda r, w: user_assistant(r["problem"], r["answer"]),
            f"OpenR1-Math-220k {data_path or split}",
            ("problem", "answer"),
            path=data_path,
        )
        self.split_train_validation(split_validation_size, seed)


class Tulu3SftMixtureDataset(RawDataset):
    """allenai/tulu-3-sft-mixture (train): the rows' own `messages`, whose last must be the assistant's;
    max_samples rows sampled with seed first; 5% carved by default."""

    HUB_ID = "allenai/tulu-3-sft-mixture"

    def __init__(
        self,
        split_validation_size: float = 0.05,
        seed: int = 42,
        max_samples: int | None = None,
        data_path: str | None = None,
    ):
        self.task_name = "tulu3_sft_mixture"
        seed = 42 if seed is None else seed
        raw = load_split(type(self), data_path, "train", lambda: hf_datasets.load_dataset(self.HUB_ID)["train"])
        raw = sample(raw, max_samples, seed)
        self.rows_are_records = not (max_samples and max_samples > 0)
        self.dataset = map_rows(
            raw,
            lambda r, w: {"messages": last_is_assistant(r["messages"], w)},
            f"tulu3_sft_mixture {data_path or 'train'}",
            ("messages",),
            path=data_path if self.rows_are_records else None,
        )
        self.split_train_validation(split_validation_size, seed)


class NemotronCascade2SFTMathDataset(RawDataset):
    """nvidia/Nemotron-Cascade-2-SFT-Data, subset math: the rows' own `messages` (last: assistant);
    max_samples rows sampled with seed first; 5% carved by default."""

    HUB_ID = "nvidia/Nemotron-Cascade-2-SFT-Data"

    def __init__(
        self,
        split: str = "train",
        split_validation_size: float = 0.05,
        seed: int = 42,
        max_samples: int | None = None,
        data_path: str | None = None,
    ):
        self.task_name = "Nemotron-Cascade-2-SFT-Math"
        split, seed = split or "train", 42 if seed is None else seed
        raw = load_split(
            type(self), data_path, split, lambda: hf_datasets.load_dataset(self.HUB_ID, "math", split=split)
        )
        raw = sample(raw, max_samples, seed)
        self.rows_are_records = not (max_samples and max_samples > 0)
        self.dataset = map_rows(
            raw,
            lambda r, w: {"messages": last_is_assistant(r["messages"], w)},
            f"Nemotron-Cascade-2-SFT-Math {data_path or split}",
            ("messages",),
            path=data_path if self.rows_are_records else None,
        )
        self.split_train_validation(split_validation_size, seed)


def _hash_answer(text: str, where: str) -> str:
    if "####" not in text:
        raise DataError(
            f"{where}: the answer has no '#### <answer>' line (set extract_answer=false to train on the whole solution)"
        )
    return text.split("####")[1].strip()


class GSM8KDataset(RawDataset):
    """openai/gsm8k: user = question, assistant = the answer after '####' (extract_answer) or all of it."""

    HUB_ID = "openai/gsm8k"

    def __init__(
        self,
        subset: str | None = "main",
        split: str = "train",
        extract_answer: bool = True,
        data_path: str | None = None,
    ):
        self.task_name = "gsm8k"
        split = split or "train"
        raw = load_split(
            type(self), data_path, split, lambda: hf_datasets.load_dataset(self.HUB_ID, subset or "main")[split]
        )
        answer = (lambda r, w: _hash_answer(r["answer"], w)) if extract_answer else (lambda r, w: r["answer"])
        self.dataset = map_rows(
            raw,
            lambda r, w: user_assistant(r["question"], answer(r, w)),
            f"gsm8k {data_path or split}",
            ("question", "answer"),
            path=data_path,
        )


class DeepScalerDataset(RawDataset):
    """agentica-org/DeepScaleR-Preview-Dataset (train): user = problem, assistant = answer."""

    HUB_ID = "agentica-org/DeepScaleR-Preview-Dataset"

    def __init__(self, data_path: str | None = None):
        self.task_name = "DeepScaler"
        raw = load_split(type(self), data_path, "train", lambda: hf_datasets.load_dataset(self.HUB_ID, split="train"))
        self.dataset = map_rows(
            raw,
            lambda r, w: user_assistant(r["problem"], r["answer"]),
            f"DeepScaler {data_path or 'train'}",
            ("problem", "answer"),
            path=data_path,
        )


class _AIMEDataset(RawDataset):
    """An AIME edition: user = the problem, assistant = str(answer); `repeat` copies of the rows."""

    VARIANT = ""
    INPUT_KEY = "problem"

    def __init__(self, repeat: int = 1, data_path: str | None = None):
        self.task_name = f"AIME{self.VARIANT}"
        raw = load_split(type(self), data_path, "train", self._hub)
        self.dataset = map_rows(
            raw,
            lambda r, w: user_assistant(r[self.INPUT_KEY], str(r["answer"])),
            f"{self.task_name} {data_path or 'hub'}",
            (self.INPUT_KEY, "answer"),
            path=data_path,
        )
        if repeat and repeat > 1:
            self.dataset = self.dataset.repeat(repeat)

    def _hub(self):
        return hf_datasets.load_dataset(self.HUB_ID, split="train")


class AIME2024Dataset(_AIMEDataset):
    VARIANT, HUB_ID = "2024", "HuggingFaceH4/aime_2024"


class AIME2025Dataset(_AIMEDataset):
    VARIANT, HUB_ID, INPUT_KEY = "2025", "opencompass/AIME2025", "question"

    def _hub(self):
        parts = [hf_datasets.load_dataset(self.HUB_ID, c, split="test") for c in ("AIME2025-I", "AIME2025-II")]
        return hf_datasets.concatenate_datasets(parts)


class AIME2026Dataset(_AIMEDataset):
    VARIANT, HUB_ID = "2026", "MathArena/aime_2026"


class DAPOMath17KDataset(RawDataset):
    """BytedTsinghua-SIA/DAPO-Math-17k: user = prompt[0].content, assistant = reward_model.ground_truth."""

    HUB_ID = "BytedTsinghua-SIA/DAPO-Math-17k"
    TASK = "DAPOMath17K"

    def __init__(self, data_path: str | None = None):
        self.task_name = self.TASK
        raw = load_split(type(self), data_path, "train", lambda: hf_datasets.load_dataset(self.HUB_ID, split="train"))
        self.dataset = map_rows(
            raw,
            lambda r, w: user_assistant(r["prompt"][0]["content"], r["reward_model"]["ground_truth"]),
            f"{self.TASK} {data_path or 'train'}",
            ("prompt", "reward_model"),
            path=data_path,
        )


class DAPOMathAIME2024Dataset(DAPOMath17KDataset):
    HUB_ID, TASK = "BytedTsinghua-SIA/AIME-2024", "DAPOMathAIME2024"


class ResponseDataset(RawDataset):
    """Input/output rows from a local file, a save_to_disk folder or a hub id: user = row[input_key],
    assistant = row[output_key]; rows with a `messages` column are taken as they are."""

    def __init__(
        self,
        data_path: str,
        input_key: str = "input",
        output_key: str = "output",
        subset: str | None = None,
        split: str | None = None,
        split_validation_size: float = 0,
        seed: int = 42,
    ):
        self.task_name = task_name_from_path(data_path)
        self.input_key, self.output_key = input_key or "input", output_key or "output"
        raw = load_source(data_path, subset, split, key="ResponseDataset data_path")
        if "messages" in raw.column_names:
            self.dataset = raw.select_columns(["messages"] + (["tools"] if "tools" in raw.column_names else []))
        else:
            self.dataset = map_rows(raw, self.format_data, data_path, (self.input_key, self.output_key), path=data_path)
        self.split_train_validation(split_validation_size, seed)

    def format_data(self, row: dict, where: str) -> dict:
        for key in (self.input_key, self.output_key):
            if row[key] is None:  # Arrow gives a row without the key None
                raise DataError(f"{where}: missing key {key!r}")
        return user_assistant(row[self.input_key], row[self.output_key])


class OpenAIFormatDataset(RawDataset):
    """OpenAI chat rows with tools (see jax_sft.data.formats.OpenAIFormatRows for the keys)."""

    def __init__(
        self,
        data_path: str,
        chat_key: str = "messages",
        system_key: str | None = None,
        system_prompt: str | None = None,
        tool_key: str | None = "tools",
        use_preserving_dataset: bool = False,
    ):
        self.task_name = task_name_from_path(data_path)
        keys = dict(
            chat_key=chat_key,
            system_key=system_key,
            system_prompt=system_prompt,
            tool_key=tool_key,
            use_preserving_dataset=use_preserving_dataset,
        )
        self.dataset = OpenAIFormatRows.load(data_path, keys, "data_path")


MEDIA_TAG = re.compile(r"<(image|video|audio|video-audio|speech|speeches|sound|audios|images|videos)>")
_SENDERS = {"user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant", "agent": "assistant"}


class GeneralConversationsJsonlDataset(RawDataset):
    """Rows `{"conversations": [{"from": ..., "value": ...}]}` (human/user -> user, gpt/agent/assistant
    -> assistant). jax_sft trains text only: a media tag (<image>, <sound>, ...) is an error."""

    task_name = "general-conversation-jsonl"

    def __init__(
        self, data_path: str, media_data_dir: str | None = None, split_validation_size: float = 0, seed: int = 42
    ):
        raw = load_source(data_path, None, None, key="general-conversation-jsonl data_path")
        self.dataset = map_rows(raw, self.format_data, data_path, (), path=data_path)
        self.split_train_validation(split_validation_size, seed)

    @staticmethod
    def format_data(row: dict, where: str) -> dict:
        messages = []
        for j, turn in enumerate(row.get("conversations") or []):
            role = _SENDERS.get(turn["from"])
            if role is None:
                raise DataError(
                    f"{where}: turn {j}: unknown conversation role {turn['from']!r}; expected one of {sorted(_SENDERS)}"
                )
            tag = MEDIA_TAG.search(turn["value"])
            if tag:
                raise DataError(
                    f"{where}: turn {j} holds the media tag {tag.group(0)}; jax_sft trains text-only causal LMs"
                )
            # NeMo RL keeps the text as one text fragment, none when it is blank.
            messages.append({"role": role, "content": turn["value"] if turn["value"].strip() else ""})
        return {"messages": messages}


class ArrowTextDataset(RawDataset):
    """Raw text as one assistant message per row (NeMo RL's `arrow_text`, task "x_token"); empty and
    non-string rows dropped; characters_per_sample > 0 joins consecutive rows with newlines until
    the running character count reaches it."""

    rows_are_records = False

    def __init__(
        self,
        data_files: str,
        subset: str | None = None,
        split: str = "train",
        text_key: str = "text",
        characters_per_sample: int | None = None,
        split_validation_size: float = 0.0,
        seed: int = 42,
    ):
        self.task_name = "x_token"
        raw = load_source(data_files, subset, split or "train", key="arrow_text data_files")
        require_column(raw, text_key, f"arrow_text {data_files}")
        texts = [t for t in raw[text_key] if isinstance(t, str) and t]
        if characters_per_sample and characters_per_sample > 0:
            texts = _pack_texts(texts, characters_per_sample)
        self.dataset = hf_datasets.Dataset.from_dict(
            {"messages": [[{"role": "assistant", "content": t}] for t in texts]}
        )
        self.split_train_validation(split_validation_size, seed)


def _pack_texts(texts: list[str], limit: int) -> list[str]:
    out, buf, n = [], [], 0
    for text in texts:
        buf.append(text)
        n += len(text)
        if n >= limit:
            out.append("\n".join(buf))
            buf, n = [], 0
    if buf:
        out.append("\n".join(buf))
    return out


REGISTRY: dict[str, type[RawDataset]] = {
    "squad": SquadDataset,
    "open_assistant": OasstDataset,
    "OpenMathInstruct-2": OpenMathInstruct2Dataset,
    "NuminaMath-1.5": NuminaMath15Dataset,
    "OpenR1-Math-220k": OpenR1Math220KDataset,
    "tulu3_sft_mixture": Tulu3SftMixtureDataset,
    "Nemotron-Cascade-2-SFT-Math": NemotronCascade2SFTMathDataset,
    "general-conversation-jsonl": GeneralConversationsJsonlDataset,
    "arrow_text": ArrowTextDataset,
    "GSM8K": GSM8KDataset,
    "gsm8k": GSM8KDataset,
    "DeepScaler": DeepScalerDataset,
    "AIME2024": AIME2024Dataset,
    "AIME2025": AIME2025Dataset,
    "AIME2026": AIME2026Dataset,
    "DAPOMath17K": DAPOMath17KDataset,
    "DAPOMathAIME2024": DAPOMathAIME2024Dataset,
    "openai_format": OpenAIFormatDataset,
    "ResponseDataset": ResponseDataset,
}
ALIASES = {"openmathinstruct2": "OpenMathInstruct-2", "prompt_response_dataset": "ResponseDataset"}
# NeMo RL's registered names whose rows carry images, video or audio.
VISION_LANGUAGE = (
    "audiomcq",
    "avqa",
    "clevr-cogent",
    "clevr_cogent",
    "daily-omni",
    "geometry3k",
    "mmpr-tiny",
    "refcoco",
    "intent-train",
    "intent-bench",
)
NOT_SFT = {
    "HelpSteer3": "a preference dataset (context and response pairs, for DPO and reward models)",
    "NemoGymDataset": "NeMo Gym environment data for GRPO (no target responses)",
}
