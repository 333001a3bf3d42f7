"""Logical axis names -> mesh axes, and the device mesh.

Every parameter of the decoder carries logical axis names in its `out_sharding` metadata:

    embed_tokens.embedding          ("vocab", "embed")
    lm_head.kernel                  ("embed", "vocab")
    self_attn.{q}_proj.kernel       ("embed", "q_heads", "head_dim")    bias ("q_heads", "head_dim")
    self_attn.{k,v}_proj.kernel     ("embed", "kv_heads", "head_dim")   bias ("kv_heads", "head_dim")
    self_attn.o_proj.kernel         ("q_heads", "head_dim", "embed")    bias ("embed",)
    mlp.{gate,up}_proj.kernel       ("embed", "mlp")                    bias ("mlp",)
    mlp.down_proj.kernel            ("mlp", "embed")                    bias ("embed",)
    *norm.weight                    ("norm",)
    mlp.router (MoE)                ("embed", "router")
    mlp.{gate,up}_proj (MoE)        ("expert", "embed", "expert_mlp")
    mlp.down_proj (MoE)             ("expert", "expert_mlp", "embed")
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
"expert", "tensor"): FSDP shards the model dimension, tensor parallelism shards heads / mlp / vocab
(Megatron layout) and Mamba heads with their B / C groups (the heads of a group stay on the
group's device: the tensor size must divide n_groups), "expert" shards the experts of MoE layers
(each device holds num_experts / expert of them) and, like "data", splits the batch for everything
else. "data" only replicates.
Changing the layout means editing this table only. The expert axis has size 1 unless asked for
(`policy.jax_cfg.mesh.expert`, or NeMo RL's `policy.dtensor_cfg.expert_parallel_size`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jax_sft.errors import UsageError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the data-parallel axes: each holds different rows

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
    ("mamba_heads", "tensor"),
    ("mamba_head_dim", None),
    ("ssm_groups", "tensor"),
    ("ssm_bc", None),
    ("ssm_state", None),
    ("conv_in", None),
    ("conv_kernel", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int, expert: int = 1) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes over `n_devices` with an `expert` axis of the given size;
    `fsdp=-1` takes the devices left over. Pure arithmetic (no devices touched): `--dry_run`
    checks a layout with it."""
    for name, size in (("data", data), ("tensor", tensor), ("expert", expert)):
        if not (isinstance(size, int) and size >= 1):
            raise UsageError(f"policy.jax_cfg.mesh {name}={size!r} must be a positive integer")
    others = data * tensor * expert
    named = f"data={data} x tensor={tensor}" + (f" x expert={expert}" if expert > 1 else "")
    if fsdp == -1:
        if n_devices % others:
            raise UsageError(f"policy.jax_cfg.mesh {named} = {others} does not divide the {n_devices} devices")
        fsdp = n_devices // others
    elif not (isinstance(fsdp, int) and fsdp >= 1):
        raise UsageError(f"policy.jax_cfg.mesh fsdp={fsdp!r} must be a positive integer or -1 (the remaining devices)")
    if fsdp * others != n_devices:
        ep = f" x expert={expert}" if expert > 1 else ""
        raise UsageError(
            f"policy.jax_cfg.mesh data={data} x fsdp={fsdp} x tensor={tensor}{ep} = {fsdp * others} "
            f"does not match the {n_devices} devices"
        )
    return data, fsdp, tensor


def make_mesh(
    data: int, fsdp: int, tensor: int, devices: Sequence[jax.Device] | None = None, *, expert: int = 1
) -> Mesh:
    """A ("data", "fsdp", "expert", "tensor") mesh with Auto axes; `fsdp=-1` takes the devices
    left over; the expert axis has size `expert` (1: no expert parallelism)."""
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp, tensor = mesh_shape(data, fsdp, tensor, len(devices), expert)
    return jax.make_mesh((data, fsdp, expert, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices)


def describe_mesh(mesh: Mesh) -> dict[str, int]:
    """The mesh's axis sizes for the run log; the expert axis only when it is used (> 1)."""
    return {k: v for k, v in mesh.shape.items() if k != "expert" or v > 1}


def dp_size(mesh: Mesh) -> int:
    """How many different row blocks a batch is split into (the BATCH_AXES' sizes multiplied)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_spec(names: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry these logical names (None: replicated)."""
    unknown = [n for n in names if n is not None and n not in _RULES]
    if unknown:
        raise ValueError(f"logical axis names {unknown} are not in LOGICAL_AXIS_RULES {sorted(_RULES)}")
    return PartitionSpec(*(None if n is None else _RULES[n] for n in names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[batch, seq] inputs: the batch dimension split over BATCH_AXES ("data", "fsdp", "expert")."""
    return NamedSharding(mesh, logical_to_spec(("batch", None)))


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
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        if names is None:
            raise ValueError(f"parameter {_path_str(path)} has no logical axis names (out_sharding)")
        spec = logical_to_spec(names)
        for dim, (size, axes) in enumerate(zip(var.shape, spec)):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts:
                raise ValueError(
                    f"parameter {_path_str(path)} {tuple(var.shape)}: dimension {dim} "
                    f"({names[dim]!r}, size {size}) cannot be split over mesh axes {axes} "
                    f"of total size {parts}; choose a mesh whose {'x'.join(axes)} size divides {size}"
                )
    with nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        return nnx.get_named_sharding(state, mesh)


def _path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)
