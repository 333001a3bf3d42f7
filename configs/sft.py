"""Default SFT run: NeMo RL's examples/configs/sft.yaml, key for key, plus `policy.jax_cfg`.

Run:  python -m jax_sft.train --config configs/sft.py --config.policy.model_name=/path/to/model

The keys and their defaults live in `jax_sft/config/defaults.py` (read it for the contract), so that an
installed package has them too; this file is the same config as a `--config` file.
"""

from jax_sft.config.defaults import SQUAD_TEMPLATE, get_config

__all__ = ["SQUAD_TEMPLATE", "get_config"]
