"""The data side of jax_sft: datasets, chat templates, loss masks and the Grain batch pipeline.

    tokenizer = load_tokenizer(cfg)                     # policy.tokenizer + chat-template choice
    describe_data(cfg)                                  # one line per dataset; checks, loads nothing
    data = SFTData(cfg, tokenizer, dp_size=dp)          # builds the dataset; tokenises up front or lazily
    it = data.train_iterator()                          # StepBatch per optimizer step
    state = it.get_state(); it.set_state(state)         # JSON-serialisable, exact resume
    for mb in data.val_batches(): ...                   # fresh from the start on every call
    data.steps_per_epoch, data.stats                    # counts: truncated/dropped/masked/skipped
"""

from jax_sft.data.chat import PASSTHROUGH_TEMPLATE, ConversationEncoder, Encoded, load_tokenizer, resolve_chat_template
from jax_sft.data.builtin import REGISTRY as DATASETS
from jax_sft.data.builtin import RawDataset
from jax_sft.data.datasets import NoneFilledToolsWarning, PreservingDataset, SFTDataset, TaskDataSpec
from jax_sft.data.layout import MixedRows, build_dataset, check_data, describe_data
from jax_sft.data.pipeline import (
    ARRAY_KEYS,
    Layout,
    SFTData,
    StepBatch,
    TokenizedSplit,
    TrainIterator,
    apply_overlength,
    pad_micro_batches,
)

__all__ = [
    "ARRAY_KEYS", "DATASETS", "PASSTHROUGH_TEMPLATE", "ConversationEncoder", "Encoded", "Layout", "MixedRows",
    "NoneFilledToolsWarning", "PreservingDataset", "RawDataset", "SFTData", "SFTDataset", "StepBatch",
    "TaskDataSpec", "TokenizedSplit", "TrainIterator", "apply_overlength", "build_dataset", "check_data",
    "describe_data", "load_tokenizer", "pad_micro_batches", "resolve_chat_template",
]
