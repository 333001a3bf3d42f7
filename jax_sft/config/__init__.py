"""The run config: loading and overrides (`loading`), NeMo RL's keys (`nemo_rl`, `lora`), the checks
of its values (`checks`), and the typed run plan made from it once (`plan`).

    cfg = load_config("examples/configs/sft.yaml", ["policy.model_name=/m"])  # validated ConfigDict
    plan = make_plan(cfg, devices=8)                                           # frozen RunPlan
"""

from jax_sft.config.defaults import SQUAD_TEMPLATE
from jax_sft.config.loading import (
    IgnoredKeysWarning,
    apply_overrides,
    default_config,
    load_config,
    parse_args,
    save_config,
    to_yaml,
    validate,
)
from jax_sft.config.lora import lora_config
from jax_sft.config.plan import RunPlan, make_plan
from jax_sft.errors import ConfigError

__all__ = [
    "SQUAD_TEMPLATE",
    "ConfigError",
    "IgnoredKeysWarning",
    "RunPlan",
    "apply_overrides",
    "default_config",
    "load_config",
    "lora_config",
    "make_plan",
    "parse_args",
    "save_config",
    "to_yaml",
    "validate",
]
