"""The model-family registry: one `Family` entry per architecture, holding everything jax_sft knows
about it, so that adding a family is one entry (`jax_sft/models/families/`).

An entry has its HF config class's defaults and a reader of its fields (biases, windows, norm
placement, q/k norms, mixture of experts, ...: the `ModelConfig` fields its layer kinds need), its
weight table (jax parameter path -> HF tensor, fused tensors included), a line on its layer kinds
for the README, and its parameter and FLOP counts (`jax_sft.models.counts` unless it overrides
them). Families register themselves when `jax_sft.models.families` is imported, which importing
`jax_sft.models` does.

    family = family_of("Qwen3ForCausalLM")      # the entry, or ModelConfigError naming the supported ones
    family.weights["layers.{i}.self_attn.q_proj.kernel"]  # HfTensor(name, layout, part)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jax_sft.models import counts
from jax_sft.models.errors import ModelConfigError
from jax_sft.models.rope import RopeConfig, read_rope
from jax_sft.models.weights import HfTensor


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family (see the module docstring). `fields(d, source)` returns the family's
    `ModelConfig` fields from the config dict `d` (its `defaults` filled in); `text_config`, for a
    multimodal wrapper, returns the dict of the text model that jax_sft builds instead."""

    name: str  # as the dry run names it: "(llama family)"
    architectures: tuple[str, ...]  # config.json "architectures" this entry reads
    label: str  # the models, for the README ("Llama 2, 3, 3.1, 3.2")
    layer_kinds: str  # the layers, for the README
    weights: Mapping[str, HfTensor]
    fields: Callable[[dict[str, Any], str], dict[str, Any]]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    head_dim: int | None = None  # config.json without head_dim: this (Qwen3: 128), else hidden / heads
    activation_key: str = "hidden_act"  # the config key of the MLP activation
    rope: Callable[[dict[str, Any], str], RopeConfig] = read_rope
    text_config: Callable[[dict[str, Any], str], dict[str, Any]] | None = None
    # The config dict as the readers see it (keys derived from others, e.g. num_hidden_layers from
    # a layer pattern); config.json is written back as given.
    prepare: Callable[[dict[str, Any], str], dict[str, Any]] | None = None
    param_count: Callable[[Any], int] = counts.base_param_count
    training_flops: Callable[[Any, Any], float] = counts.training_flops
    projection_shapes: Callable[[Any, int | None], dict[str, tuple[int, int]]] = counts.layer_projection_shapes


FAMILIES: dict[str, Family] = {}  # name -> entry, in registration order
_BY_ARCHITECTURE: dict[str, Family] = {}

# What the architectures that jax_sft cannot build are, by model_type (and architecture name).
_UNSUPPORTED_KINDS = (
    (
        "a vision-language model",
        ("ForConditionalGeneration", "_vl", "vl_", "llava", "vision", "idefics", "smolvlm", "mllama", "paligemma"),
    ),
    ("a Mamba hybrid other than Nemotron-H", ("mamba", "jamba", "zamba", "falcon_h1")),
    (
        "a mixture-of-experts model other than Qwen3-MoE, Mixtral and gpt-oss",
        ("moe", "mixtral", "deepseek", "dbrx", "olmoe", "granitemoe"),
    ),
)


def register(family: Family) -> Family:
    """Adds `family` to the registry (its name and architectures must be new)."""
    taken = [a for a in family.architectures if a in _BY_ARCHITECTURE]
    if family.name in FAMILIES or taken:
        raise ValueError(f"family {family.name!r} or its architectures {taken} are registered already")
    FAMILIES[family.name] = family
    for architecture in family.architectures:
        _BY_ARCHITECTURE[architecture] = family
    return family


def supported_architectures() -> tuple[str, ...]:
    """Every architecture name jax_sft builds, in registration order."""
    return tuple(_BY_ARCHITECTURE)


def find(architectures: list) -> str | None:
    """The first of `architectures` (config.json's list) that a family reads, or None."""
    return next((a for a in architectures if a in _BY_ARCHITECTURE), None)


def family_of(architecture: str) -> Family:
    """The entry of `architecture`; ModelConfigError naming the supported ones otherwise."""
    family = _BY_ARCHITECTURE.get(architecture)
    if family is None:
        raise ModelConfigError(unsupported([architecture], None, "model"))
    return family


def unsupported(archs: list, model_type: Any, source: str) -> str:
    """One line: the architecture and model_type jax_sft cannot build, what it is, what can be."""
    names = " ".join([*(str(a) for a in archs), str(model_type or "")]).lower()
    kind = next((k for k, marks in _UNSUPPORTED_KINDS if any(m.lower() in names for m in marks)), None)
    what = f" ({kind})" if kind else ""
    return (
        f"{source}: architectures={archs!r} (model_type={model_type!r}){what} is not "
        f"supported by jax_sft; supported architectures: {', '.join(supported_architectures())}"
    )


def markdown_table() -> str:
    """The README's table of families, generated from the registry."""
    rows = ["| family | models | `architectures` in config.json | layers |", "| --- | --- | --- | --- |"]
    for f in FAMILIES.values():
        archs = ", ".join(f"`{a}`" for a in f.architectures)
        rows.append(f"| {f.name} | {f.label} | {archs} | {f.layer_kinds} |")
    return "\n".join(rows)
