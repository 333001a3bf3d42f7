"""Process start-up: `jax.distributed` for multi-host runs, and which devices a run uses.

One process per host drives that host's accelerators. `initialize` must run before any other
JAX call: under Slurm (several tasks) JAX reads the coordinator, process count and id from the
Slurm environment; elsewhere they come from `--coordinator_address`, `--num_processes` and
`--process_id`; with neither, the run is a single process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

_FLAGS = ("coordinator_address", "num_processes", "process_id")


def under_slurm() -> bool:
    """True inside a Slurm job step with more than one task (srun -n >1)."""
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(flags: Mapping[str, Any]) -> None:
    """Starts jax.distributed from command-line flags or Slurm; no-op for a single process."""
    given = {k: flags[k] for k in _FLAGS if flags.get(k) is not None}
    if given:
        missing = [f"--{k}" for k in _FLAGS if k not in given]
        if missing:
            raise ValueError(
                f"multi-process launch needs all of --coordinator_address, --num_processes and "
                f"--process_id; missing {', '.join(missing)}"
            )
        jax.distributed.initialize(
            coordinator_address=str(given["coordinator_address"]),
            num_processes=int(given["num_processes"]),
            process_id=int(given["process_id"]),
            initialization_timeout=int(flags.get("initialization_timeout", 300)),
        )
    elif under_slurm():
        jax.distributed.initialize()


def select_devices(cluster: Any) -> list[jax.Device]:
    """The devices of the run: `cluster.num_nodes * cluster.gpus_per_node` of them.

    Across several processes the product must equal the devices present. In a single process
    it may be smaller (the first N devices are used, as NeMo RL uses `gpus_per_node` of a node).
    """
    wanted = int(cluster.num_nodes) * int(cluster.gpus_per_node)
    present = jax.device_count()
    if jax.process_count() > 1 and wanted != present:
        raise ValueError(
            f"cluster.num_nodes * cluster.gpus_per_node = {cluster.num_nodes} * "
            f"{cluster.gpus_per_node} = {wanted}, but the {jax.process_count()} processes have "
            f"{present} devices; set cluster.* to match the launch"
        )
    if wanted > present:
        raise ValueError(
            f"cluster.num_nodes * cluster.gpus_per_node = {wanted} devices requested, but only "
            f"{present} are present ({jax.devices()[0].platform}); lower cluster.gpus_per_node"
        )
    return jax.devices()[:wanted]
