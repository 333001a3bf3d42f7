"""The choice lists of jax_sft's settings, in one place (no JAX, no other jax_sft import).

The config checks, the data pipeline and the models all validate against these tuples, and the
README's tables are generated from them, so a choice is added or renamed here only.
"""

from __future__ import annotations

# policy.precision: the compute dtype (weights are cast to it once per step).
PRECISIONS = ("bfloat16", "float32")
# policy.jax_cfg.param_dtype: how weights are stored (full fine-tuning: the master weights).
PARAM_DTYPES = ("float32", "bfloat16")
# data.overlength: what happens to an example longer than data.max_input_seq_length.
OVERLENGTH = ("truncate", "drop", "mask")
# data.tokenize: when examples are templated and tokenised.
TOKENIZE = ("lazy", "upfront")
# data.mixture_by: what the weights of data.train entries share out.
MIXTURE_BY = ("examples", "tokens")
# policy.jax_cfg.attention: the attention kernel.
ATTENTION = ("auto", "xla", "cudnn")
# policy.jax_cfg.context_attention: attention across the mesh's context axis (models/context.py).
CONTEXT_ATTENTION = ("auto", "ring", "all_gather")
# policy.jax_cfg.remat: activation checkpointing per layer ("none", "full", or a
# jax.checkpoint_policies name).
REMAT = (
    "none",
    "full",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
    "nothing_saveable",
    "everything_saveable",
)
# policy.sequence_packing.algorithm: how a step's sequences are packed into rows.
PACKING = ("modified_first_fit_decreasing", "first_fit", "best_fit", "first_fit_decreasing")
# policy.jax_cfg.fp8: FP8 matmuls in the projection layers ("hybrid": e4m3 forward, e5m2 gradients).
FP8 = ("none", "hybrid", "e4m3")
# policy.jax_cfg.fp8_recipe: how the per-tensor scales are chosen (delayed: amax history; tensorwise:
# current scaling).
FP8_RECIPES = ("delayed", "tensorwise")
# Megatron's optimizer and scheduler choices (policy.megatron_cfg.{optimizer,scheduler}).
MEGATRON_OPTIMIZERS = ("adam", "sgd")
MEGATRON_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
MEGATRON_WSD_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
MEGATRON_WD_STYLES = ("constant", "linear", "cosine")
# LoRA (policy.dtensor_cfg.lora_cfg / policy.megatron_cfg.peft).
LORA_DROPOUT_POSITIONS = ("pre", "post")
LORA_A_INITS = ("xavier", "uniform")
LORA_NAMINGS = ("hf", "megatron")


def one_of(choices: tuple[str, ...]) -> str:
    """ "one of a, b, c": the wording every check uses."""
    return "one of " + ", ".join(choices)
