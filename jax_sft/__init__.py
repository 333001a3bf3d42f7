"""jax_sft: supervised fine-tuning of causal LMs in JAX/Flax, a backend for NeMo RL's SFT.

Entry points: `python -m jax_sft.train`, `jax_sft.export`, `jax_sft.inspect_data`,
`jax_sft.quickstart`, `jax_sft.launch_local`. See README.md.
"""

__version__ = "0.1.0"
