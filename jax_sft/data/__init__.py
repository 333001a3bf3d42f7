"""The data side of jax_sft, layered one way: file readers (`readers`) <- row formats and the
dataset protocol (`formats`) <- NeMo RL's datasets (`builtin`) <- the config layouts (`sections`) <-
weighted mixtures (`mixture`), tokens and batches (`tokens`, `batches`) <- the Grain pipeline
(`pipeline`); `chat` renders, tokenises and loss-masks conversations.

    tokenizer = load_tokenizer(cfg)                     # policy.tokenizer + chat-template choice
    describe_data(cfg)                                  # one line per dataset; checks, loads nothing
    data = SFTData(plan.data, tokenizer)                # builds the dataset; tokenises lazily (or up front)
    data.describe_mixture()                             # a weighted mixture's proportions (start-up log)
    it = data.train_iterator()                          # StepBatch per optimizer step
    state = it.get_state(); it.set_state(state)         # JSON-serialisable, exact resume
    for mb in data.val_batches(): ...                   # fresh from the start on every call
    data.steps_per_epoch, data.stats                    # counts: truncated/dropped/masked/skipped
"""

from jax_sft.data.batches import ARRAY_KEYS, BatchPlan, ProcessRows, StepBatch, pad_micro_batches
from jax_sft.data.build import MixedRows, build_dataset
from jax_sft.data.builtin import REGISTRY as DATASETS
from jax_sft.data.chat import PASSTHROUGH_TEMPLATE, ConversationEncoder, Encoded, load_tokenizer, resolve_chat_template
from jax_sft.data.describe import describe_data
from jax_sft.data.formats import NoneFilledToolsWarning, RawDataset, SFTDataset, TaskDataSpec
from jax_sft.data.pipeline import DataPlan, SFTData, TrainIterator
from jax_sft.data.readers import PreservingDataset
from jax_sft.data.sections import check_data
from jax_sft.data.tokens import TokenizedSplit, apply_overlength

__all__ = [
    "ARRAY_KEYS",
    "DATASETS",
    "PASSTHROUGH_TEMPLATE",
    "BatchPlan",
    "ConversationEncoder",
    "DataPlan",
    "Encoded",
    "MixedRows",
    "NoneFilledToolsWarning",
    "PreservingDataset",
    "ProcessRows",
    "RawDataset",
    "SFTData",
    "SFTDataset",
    "StepBatch",
    "TaskDataSpec",
    "TokenizedSplit",
    "TrainIterator",
    "apply_overlength",
    "build_dataset",
    "check_data",
    "describe_data",
    "load_tokenizer",
    "pad_micro_batches",
    "resolve_chat_template",
]
