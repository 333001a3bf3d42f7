"""NeMo RL's LoRA sections -> `jax_sft.models.options.LoraConfig`: `policy.dtensor_cfg.lora_cfg` (HF
module names) or, with `policy.megatron_cfg.enabled`, `policy.megatron_cfg.peft` (Megatron's)."""

from __future__ import annotations

from ml_collections import ConfigDict

from jax_sft.config.keys import get, problem
from jax_sft.models.options import LoraConfig

DTENSOR_LORA = "policy.dtensor_cfg.lora_cfg"
MEGATRON_LORA = "policy.megatron_cfg.peft"
# lora_dtype values that mean float32 adapters ("None": NeMo RL's sft.yaml writes `lora_dtype: None`,
# which YAML reads as that string).
LORA_DTYPES = (None, "None", "float32", "torch.float32")


def _lora_section(c: ConfigDict) -> str | None:
    """The key of the section that enables LoRA (Megatron's peft when megatron_cfg is enabled, as
    NeMo RL picks its backend), or None for full fine-tuning."""
    if c.policy.megatron_cfg.enabled:
        return MEGATRON_LORA if c.policy.megatron_cfg.peft.enabled else None
    return DTENSOR_LORA if c.policy.dtensor_cfg.lora_cfg.enabled else None


def _lora_of(c: ConfigDict, key: str) -> LoraConfig:
    s, megatron = get(c, key), key == MEGATRON_LORA
    return LoraConfig(
        dim=s.dim,
        alpha=s.alpha,
        dropout=s.dropout,
        dropout_position=s.dropout_position,
        a_init=s.lora_A_init_method if megatron else s.lora_A_init,
        target_modules=tuple(s.target_modules),
        exclude_modules=tuple(s.exclude_modules),
        match_all_linear=False if megatron else s.match_all_linear,
        naming="megatron" if megatron else "hf",
        seed=c.sft.seed,
    )


def lora_config(cfg: ConfigDict) -> LoraConfig | None:
    """The run's `jax_sft.models.lora.LoraConfig` (cfg: a validated config), or None when LoRA is
    off: from policy.dtensor_cfg.lora_cfg (HF module names), or with policy.megatron_cfg.enabled
    from policy.megatron_cfg.peft (Megatron module names); the adapters' seed is sft.seed."""
    key = _lora_section(cfg)
    return None if key is None else _lora_of(cfg, key)


def lora_problems(c: ConfigDict) -> list[str]:
    """The problems of the enabled LoRA section (each naming its full key)."""
    problems = []
    if c.policy.megatron_cfg.enabled and c.policy.dtensor_cfg.lora_cfg.enabled:
        problems.append(
            problem(
                f"{DTENSOR_LORA}.enabled",
                True,
                "false with policy.megatron_cfg.enabled=true",
                f"NeMo RL's Megatron backend takes LoRA from {MEGATRON_LORA}",
            )
        )
    key = _lora_section(c)
    if key is None:
        return problems
    s = get(c, key)
    for name in ("target_modules", "exclude_modules"):
        if not all(isinstance(m, str) and m for m in s[name]):
            problems.append(
                problem(f"{key}.{name}", list(s[name]), "a list of module names or wildcard patterns (strings)")
            )
    rename = {"lora_A_init": "lora_A_init_method"} if key == MEGATRON_LORA else {}
    for line in _lora_of(c, key).problems():
        name, eq, rest = line.partition("=")
        problems.append(f"{key}.{rename.get(name, name)}{eq}{rest}")
    if key == MEGATRON_LORA:
        if s.lora_B_init_method != "zero":
            problems.append(
                problem(
                    f"{key}.lora_B_init_method",
                    s.lora_B_init_method,
                    '"zero"',
                    "B starts at zero, so training starts from the base model",
                )
            )
        if s.lora_dtype not in LORA_DTYPES:
            problems.append(
                problem(
                    f"{key}.lora_dtype",
                    s.lora_dtype,
                    'null, "float32" or "torch.float32"',
                    "LoRA adapters are always float32 here (the frozen base follows policy.jax_cfg.param_dtype)",
                )
            )
    return problems
