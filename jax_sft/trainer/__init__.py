"""The trainer's phases, one module each: `setup` (devices, plan and checks, lock, data, model,
optimizer, compiled steps, resume), `loop` (steps, checkpoints, stopping), `validation`, and `run`
(the whole run and its result). `python -m jax_sft.train` is the command line."""
