"""A stand-in trainer for launcher tests: takes the trainer's distributed flags, prints "ready",
waits for SIGTERM/SIGUSR1 (as `jax_sft.train` catches them) and exits like a preempted run.

    PYTHONPATH=tests python -m jax_sft.launch_local ... --module signal_probe -- [args]
"""

import sys
import time

from jax_sft import config as config_lib
from jax_sft import distributed

_, _, extra = config_lib.parse_args(sys.argv[1:])
flags = distributed.parse_flags(extra)
with distributed.StopSignals() as stop:
    print(f"ready process {flags['process_id']} of {flags['num_processes']}", flush=True)
    deadline = time.time() + 60
    while not stop.signum and time.time() < deadline:
        time.sleep(0.01)
print(f"stopping on signal {stop.signum}", flush=True)
sys.exit(distributed.PREEMPTED_EXIT_CODE if stop.signum else 1)
