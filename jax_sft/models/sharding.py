"""Logical axis names -> mesh axes, and the device mesh.

Every parameter of the decoder carries logical axis names in its `out_sharding` metadata:

    embed_tokens.embedding          ("vocab", "embed")                  (vocab rows padded: see below)
    lm_head.kernel                  ("embed", "vocab")
    self_attn.{q}_proj.kernel       ("embed", "q_heads", "head_dim")    bias ("q_heads", "head_dim")
    self_attn.{k,v}_proj.kernel     ("embed", "kv_heads", "head_dim")   bias ("kv_heads", "head_dim")
    self_attn.o_proj.kernel         ("q_heads", "head_dim", "embed")    bias ("embed",)
    self_attn.sinks (gpt-oss)       ("q_heads",)
    mlp.{gate,up}_proj.kernel       ("embed", "mlp")                    bias ("mlp",)
    mlp.down_proj.kernel            ("mlp", "embed")                    bias ("embed",)
    *norm.weight                    ("norm",)
    mlp.router (MoE)                ("embed", "router")
    mlp.{gate,up}_proj (MoE)        ("expert", "embed", "expert_mlp")
    mlp.down_proj (MoE)             ("expert", "expert_mlp", "embed")
    mlp.router_bias (gpt-oss)       ("router",)
    mlp.{gate,up}_bias (gpt-oss)    ("expert", "expert_mlp")
    mlp.down_bias (gpt-oss)         ("expert", "embed")
    <projection>.lora.lora_a        (<the kernel's input axes>, "lora_rank")    LoRA (lora.py)
    <projection>.lora.lora_b        ("lora_rank", <the kernel's output axes>)
    Mamba-2 (mamba.py; hybrid layers' `mixer`):
    in_proj.kernel_{z,x}            ("embed", "mamba_heads", "mamba_head_dim")
    in_proj.kernel_bc               ("embed", "ssm_bc", "ssm_groups", "ssm_state")     B and C
    in_proj.kernel_dt               ("embed", "mamba_heads")
    conv1d.kernel_x                 ("mamba_heads", "mamba_head_dim", "conv_in", "conv_kernel")
    conv1d.kernel_bc                ("ssm_bc", "ssm_groups", "ssm_state", "conv_in", "conv_kernel")
    dt_bias, A_log, D               ("mamba_heads",)
    norm.weight                     ("mamba_heads", "mamba_head_dim")
    out_proj.kernel                 ("mamba_heads", "mamba_head_dim", "embed")
    gate.weight (sigmoid MoE)       ("embed", "router")      gate.e_score_correction_bias ("router",)
    experts.{up,down}_proj          ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed")

`LOGICAL_AXIS_RULES` below is the one place that maps them to the mesh axes ("data", "fsdp",
"expert", "context", "tensor"): FSDP shards the model dimension, tensor parallelism shards heads /
mlp / vocab (Megatron layout) and Mamba heads with their B / C groups (the heads of a group stay on
the group's device: the tensor size must divide n_groups), "expert" shards the experts of MoE layers (each device holds
num_experts / expert of them) and, like "data", splits the batch for everything else. "data" only
replicates. "context" splits the sequence of every row (`jax_sft.models.context`): activations
[batch, seq, ...] are split over it on seq, and parameters are sharded over fsdp x context (the
logical axes of `CONTEXT_SHARDED`: FSDP over the whole group of devices that share a row, as
torchtitan does), so a context group holds one copy of the training state, not one per device.
Changing the layout means editing these tables only. The expert and context axes have size 1
unless asked for (`policy.jax_cfg.mesh.expert` / `.context`, or NeMo RL's
`policy.dtensor_cfg.expert_parallel_size` / `.context_parallel_size`).

A vocabulary that the tensor axis does not divide is padded (`padded_vocab_size`: the embedding
and lm_head rows rounded up to a multiple of the tensor size, as Megatron's
make_vocab_size_divisible_by); any other dimension that its mesh axes cannot split is reported by
`shard_problems` (the run plan's checks, before any data or weights are read).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jax_sft.errors import UsageError

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the data-parallel axes: each holds different rows
CONTEXT = "context"  # the axis that splits each row's sequence

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),  # activations: [batch, seq, ...]
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("router", None),
    ("lora_rank", None),
    ("length", CONTEXT),  # activations' sequence dimension
    ("mamba_heads", "tensor"),
    ("mamba_head_dim", None),
    ("ssm_groups", "tensor"),
    ("ssm_bc", None),
    ("ssm_state", None),
    ("conv_in", None),
    ("conv_kernel", None),
)
# Logical axes that are also split over "context" when it is > 1 (after the axes above).
CONTEXT_SHARDED = ("embed",)
_RULES = dict(LOGICAL_AXIS_RULES)


def axis_rules(mesh: Mesh | None = None) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """`LOGICAL_AXIS_RULES` for `mesh`: with a context axis > 1, the `CONTEXT_SHARDED` logical
    axes split over it too (the specs of a mesh without one stay as the table says)."""
    if mesh is None or context_size(mesh) == 1:
        return LOGICAL_AXIS_RULES
    out = []
    for name, axes in LOGICAL_AXIS_RULES:
        if name in CONTEXT_SHARDED:
            axes = (*((axes,) if isinstance(axes, str) else axes or ()), CONTEXT)
        out.append((name, axes))
    return tuple(out)


def mesh_shape(
    data: int, fsdp: int, tensor: int, n_devices: int, expert: int = 1, context: int = 1
) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes over `n_devices` with `expert` and `context` axes of the given
    sizes; `fsdp=-1` takes the devices left over. Pure arithmetic (no devices touched):
    `--dry_run` checks a layout with it."""
    for name, size in (("data", data), ("tensor", tensor), ("expert", expert), ("context", context)):
        if not (isinstance(size, int) and size >= 1):
            raise UsageError(f"policy.jax_cfg.mesh {name}={size!r} must be a positive integer")
    others = data * tensor * expert * context
    extra = (f" x expert={expert}" if expert > 1 else "") + (f" x context={context}" if context > 1 else "")
    named = f"data={data} x tensor={tensor}" + extra
    if fsdp == -1:
        if n_devices % others:
            raise UsageError(f"policy.jax_cfg.mesh {named} = {others} does not divide the {n_devices} devices")
        fsdp = n_devices // others
    elif not (isinstance(fsdp, int) and fsdp >= 1):
        raise UsageError(f"policy.jax_cfg.mesh fsdp={fsdp!r} must be a positive integer or -1 (the remaining devices)")
    if fsdp * others != n_devices:
        raise UsageError(
            f"policy.jax_cfg.mesh data={data} x fsdp={fsdp} x tensor={tensor}{extra} = {fsdp * others} "
            f"does not match the {n_devices} devices"
        )
    return data, fsdp, tensor


def make_mesh(
    data: int,
    fsdp: int,
    tensor: int,
    devices: Sequence[jax.Device] | None = None,
    *,
    expert: int = 1,
    context: int = 1,
) -> Mesh:
    """A ("data", "fsdp", "expert", "context", "tensor") mesh with Auto axes; `fsdp=-1` takes the
    devices left over; the expert and context axes have sizes `expert` and `context` (1: no
    expert / context parallelism). Tensor is the innermost axis, context the next: the devices
    that exchange the most sit closest."""
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp, tensor = mesh_shape(data, fsdp, tensor, len(devices), expert, context)
    shape = (data, fsdp, expert, context, tensor)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def padded_vocab_size(vocab_size: int, tensor: int = 1) -> int:
    """The embedding / lm_head rows of a model on a mesh whose tensor axis has size `tensor`:
    `vocab_size` rounded up to a multiple of it, since it splits them."""
    return -(-vocab_size // tensor) * tensor


def describe_mesh(mesh: Mesh) -> dict[str, int]:
    """The mesh's axis sizes for the run log; the expert and context axes only when used (> 1)."""
    return {k: v for k, v in mesh.shape.items() if k not in ("expert", CONTEXT) or v > 1}


def context_size(mesh: Mesh | None) -> int:
    """The size of the mesh's context axis (1 without a mesh or without the axis)."""
    return 1 if mesh is None else dict(mesh.shape).get(CONTEXT, 1)


def dp_size(mesh: Mesh) -> int:
    """How many different row blocks a batch is split into (the BATCH_AXES' sizes multiplied)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_spec(names: Sequence[str | None], mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry these logical names (None: replicated),
    on `mesh` (`axis_rules`; None: the table as it is)."""
    unknown = [n for n in names if n is not None and n not in _RULES]
    if unknown:
        raise ValueError(f"logical axis names {unknown} are not in LOGICAL_AXIS_RULES {sorted(_RULES)}")
    rules = dict(axis_rules(mesh))
    return PartitionSpec(*(None if n is None else rules[n] for n in names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] inputs: the batch dimension split over BATCH_AXES ("data", "fsdp", "expert").
    The sequence stays whole (the context axis replicates the int32 rows; the model lays them out
    over it, `jax_sft.models.context`), so each process supplies whole rows."""
    return NamedSharding(mesh, logical_to_spec(("batch", None)))


def activation_sharding(mesh: Mesh, ndim: int = 3) -> NamedSharding:
    """[batch, seq, ...] activations: batch over BATCH_AXES, seq over "context", the rest whole."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length", *(None,) * (ndim - 2))))


def local_dp_ranks(mesh: Mesh) -> tuple[int, ...]:
    """The data-parallel ranks (positions along BATCH_AXES) of this process's devices, in the
    order their rows appear in `make_array_from_process_local_data`'s local data."""
    dp = dp_size(mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((dp, 1))
    return tuple(sorted({idx[0].start or 0 for idx in index_map.values()}))


def param_shardings(model_or_state: nnx.Module | nnx.State, mesh: Mesh) -> nnx.State:
    """The `NamedSharding` of every parameter, as an `nnx.State` shaped like `nnx.state(model)`.

    Raises when a dimension is not divisible by the mesh axes it is split over (jax cannot
    place such an array), naming the parameter and what to change.
    """
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    problems = shard_problems(state, mesh)
    if problems:
        raise ValueError(problems[0])
    with nnx.logical_axis_rules(axis_rules(mesh)):
        return nnx.get_named_sharding(state, mesh)


def shard_problems(state: nnx.State, mesh: Mesh | jax.sharding.AbstractMesh) -> list[str]:
    """One line per kind of parameter dimension (logical name, size, mesh axes) that `mesh` (an
    abstract one will do) cannot split, naming the first such parameter and how many more there are; []
    when every parameter of `state` (abstract values will do) shards. A scan-stacked parameter
    (`layers.<name>`, [num_layers, ...]) is named per layer (`layers.*.<name>`)."""
    sizes = dict(mesh.shape)
    found: dict[tuple, list[str]] = {}
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        if names is None:
            raise ValueError(f"parameter {_path_str(path)} has no logical axis names (out_sharding)")
        stacked = len(path) > 1 and path[0] == "layers" and not str(path[1]).isdigit()
        lead, name = (1, "layers.*." + _path_str(path[1:])) if stacked else (0, _path_str(path, fold=True))
        for dim, (size, axes) in enumerate(zip(var.shape, logical_to_spec(names, mesh))):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            parts = math.prod(sizes[a] for a in axes)
            if size % parts:
                where = f"parameter {name} {tuple(var.shape)[lead:]}: dimension {dim - lead}"
                found.setdefault((names[dim], size, axes, parts), []).extend([where] * (var.shape[0] if lead else 1))
    return [
        f"{wheres[0]} ({name!r}, size {size}) cannot be split over mesh axis "
        + " x ".join(f"{a}={sizes[a]}" for a in axes)
        + (f" (nor can {len(wheres) - 1} more parameters)" if len(wheres) > 1 else "")
        + "; "
        + (
            f"choose policy.jax_cfg.mesh.{axes[0]} dividing {size}"
            if len(axes) == 1
            else f"choose a mesh whose {'x'.join(axes)} size divides {size}"
        )
        for (name, size, axes, _), wheres in found.items()
    ]


def _path_str(path: Sequence, fold: bool = False) -> str:
    """path as dotted text; `fold`: layer indices as "*"."""
    return ".".join("*" if fold and isinstance(p, int) else str(p) for p in path)
