"""A user's ml-collections config: the defaults with a few keys changed."""

from jax_sft.config import default_config


def get_config(size: str = "small"):
    c = default_config()
    c.policy.model_name = "Qwen/Qwen3-0.6B"
    c.policy.max_total_sequence_length = 512 if size == "small" else 4096
    c.sft.max_num_steps = 5
    return c
