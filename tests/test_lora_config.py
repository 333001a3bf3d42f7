"""NeMo RL's LoRA keys (policy.dtensor_cfg.lora_cfg, policy.megatron_cfg.peft): defaults, mapping
onto LoraConfig, one-line errors naming the key, command-line lists, and the parameter counts the
dry run reports (jax_sft.models.counts) against HF models and the model built with adapters."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from jax_sft.config import ConfigError, IgnoredKeysWarning, load_config, lora_config, parse_args

ROOT = Path(__file__).resolve().parents[1]
NEMO = ROOT.parent / "shared" / "reference" / "nemo-rl-configs" / "examples" / "configs"
NEMO_SFT = NEMO / "sft.yaml"
RECIPES = NEMO / "recipes" / "llm"
needs_nemo = pytest.mark.skipif(not NEMO_SFT.is_file(), reason="../shared/reference/nemo-rl-configs is absent")
DTENSOR = "policy.dtensor_cfg.lora_cfg"
PEFT = "policy.megatron_cfg.peft"
MEGATRON = ["policy.megatron_cfg.enabled=true", "policy.optimizer=null", "policy.dtensor_cfg.enabled=false"]


def load(path=None, overrides=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(path, overrides)


def problems(path=None, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, overrides)
    return info.value.problems


@needs_nemo
def test_defaults_are_nemo_rl_sft_yaml_lora_sections():
    nemo = yaml.safe_load(NEMO_SFT.read_text())["policy"]
    cfg = load()
    assert cfg.policy.dtensor_cfg.lora_cfg.to_dict() == nemo["dtensor_cfg"]["lora_cfg"]
    # sft.yaml writes `lora_dtype: None`, which YAML reads as the string "None"; ours is null.
    assert cfg.policy.megatron_cfg.peft.to_dict() == {**nemo["megatron_cfg"]["peft"], "lora_dtype": None}
    assert lora_config(cfg) is None and lora_config(load(NEMO_SFT, MEGATRON)) is None
    megatron = load(NEMO_SFT, [*MEGATRON, f"{PEFT}.enabled=true"])  # the file's "None" is accepted
    assert megatron.policy.megatron_cfg.peft.lora_dtype == "None"
    assert lora_config(megatron).dim == 8


@needs_nemo
@pytest.mark.parametrize(
    "name, expected",
    [
        ("sft-llama3.1-8b-1n8g-fsdp2tp1-lora.yaml", dict(dim=128, alpha=128, match_all_linear=True, naming="hf")),
        (
            "sft-llama3.1-8b-1n8g-megatron-lora.yaml",
            dict(dim=128, alpha=128, match_all_linear=False, naming="megatron"),
        ),
        (
            "sft-nanov3-30BA3B-2n4g-fsdp2-lora.yaml",
            dict(dim=256, alpha=512, match_all_linear=False, naming="hf", exclude_modules=("*out_proj*",)),
        ),
    ],
)
def test_the_lora_recipes_map(name, expected):
    lora = lora_config(load(RECIPES / name))
    assert {k: getattr(lora, k) for k in expected} == expected
    assert (lora.dropout, lora.dropout_position, lora.a_init, lora.seed) == (0.0, "post", "xavier", 42)


def test_every_dtensor_key_maps():
    lora = lora_config(
        load(
            None,
            [
                f"{DTENSOR}.enabled=true",
                f"{DTENSOR}.match_all_linear=false",
                f"{DTENSOR}.dim=4",
                f"{DTENSOR}.alpha=12",
                f"{DTENSOR}.dropout=0.25",
                f"{DTENSOR}.dropout_position=pre",
                f"{DTENSOR}.lora_A_init=uniform",
                f"{DTENSOR}.target_modules=[q_proj,v_proj]",
                f"{DTENSOR}.exclude_modules=['*.layers.1.*']",
                f"{DTENSOR}.use_triton=false",
                "sft.seed=7",
            ],
        )
    )
    assert lora.to_dict() == dict(
        dim=4,
        alpha=12,
        dropout=0.25,
        dropout_position="pre",
        a_init="uniform",
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["*.layers.1.*"],
        match_all_linear=False,
        naming="hf",
        seed=7,
    )
    assert lora.scale == 3.0
    assert lora.adapted(2, (True, True)) == {(0, "q_proj"), (0, "v_proj")}  # targets minus exclusions


def test_every_megatron_key_maps_and_megatron_names_select_projections():
    cfg = load(
        None,
        [
            *MEGATRON,
            f"{PEFT}.enabled=true",
            f"{PEFT}.dim=16",
            f"{PEFT}.alpha=8",
            f"{PEFT}.dropout=0.1",
            f"{PEFT}.dropout_position=pre",
            f"{PEFT}.lora_A_init_method=uniform",
            f"{PEFT}.lora_dtype=torch.float32",
            f"{PEFT}.target_modules=[linear_qkv,'*.layers.1.*.linear_fc1']",
            "sft.seed=3",
        ],
    )
    lora = lora_config(cfg)
    assert lora.to_dict() == dict(
        dim=16,
        alpha=8,
        dropout=0.1,
        dropout_position="pre",
        a_init="uniform",
        target_modules=["linear_qkv", "*.layers.1.*.linear_fc1"],
        exclude_modules=[],
        match_all_linear=False,
        naming="megatron",
        seed=3,
    )
    qkv = {(i, p) for i in range(3) for p in ("q_proj", "k_proj", "v_proj")}
    assert lora.adapted(3, (True,) * 3) == qkv | {(1, "gate_proj"), (1, "up_proj")}
    # No targets: Megatron's four layer projections (not output_layer); exclusions remove from them.
    default = lora_config(load(None, [*MEGATRON, f"{PEFT}.enabled=true", f"{PEFT}.exclude_modules=[linear_fc2]"]))
    attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
    dense, sparse = attention | {"gate_proj", "up_proj"}, attention  # layer 1: MoE, experts not adapted
    assert default.adapted(2, (True, False)) == {(0, p) for p in dense} | {(1, p) for p in sparse}


def test_megatron_peft_needs_megatron_and_dtensor_lora_is_refused_with_it():
    assert lora_config(load(None, [f"{PEFT}.enabled=true"])) is None  # the DTensor path: peft unused
    assert problems(None, [*MEGATRON, f"{DTENSOR}.enabled=true"]) == [
        f"{DTENSOR}.enabled=True: expected false with policy.megatron_cfg.enabled=true; NeMo RL's "
        f"Megatron backend takes LoRA from {PEFT}"
    ]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([f"{DTENSOR}.dim=0"], f"{DTENSOR}.dim=0: expected a positive integer (the LoRA rank)"),
        ([f"{DTENSOR}.alpha=-1"], f"{DTENSOR}.alpha=-1: expected a positive number (scale = alpha / dim)"),
        ([f"{DTENSOR}.dropout=1.0"], f"{DTENSOR}.dropout=1.0: expected a probability in [0, 1)"),
        ([f"{DTENSOR}.dropout_position=mid"], f"{DTENSOR}.dropout_position='mid': expected one of ['pre', 'post']"),
        ([f"{DTENSOR}.lora_A_init=kaiming"], f"{DTENSOR}.lora_A_init='kaiming': expected one of ['xavier', 'uniform']"),
        ([f"{DTENSOR}.target_modules=[q_proj]"], f"{DTENSOR}.match_all_linear=true adapts every linear layer"),
        (
            [f"{DTENSOR}.match_all_linear=false", f"{DTENSOR}.target_modules=[1]"],
            f"{DTENSOR}.target_modules=[1]: expected a list of module names or wildcard patterns (strings)",
        ),
        ([f"{DTENSOR}.dim=two"], f"{DTENSOR}.dim='two': expected int, got str"),
    ],
)
def test_bad_dtensor_values_are_one_line_naming_the_key(overrides, expected):
    (line,) = problems(None, [f"{DTENSOR}.enabled=true", *overrides])
    assert line.startswith(expected), line


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([f"{PEFT}.dim=0"], f"{PEFT}.dim=0: expected a positive integer (the LoRA rank)"),
        (
            [f"{PEFT}.lora_A_init_method=normal"],
            f"{PEFT}.lora_A_init_method='normal': expected one of ['xavier', 'uniform']",
        ),
        ([f"{PEFT}.lora_B_init_method=xavier"], f"{PEFT}.lora_B_init_method='xavier': expected \"zero\""),
        (
            [f"{PEFT}.lora_dtype=bfloat16"],
            f"{PEFT}.lora_dtype='bfloat16': expected null, \"float32\" or "
            '"torch.float32"; LoRA adapters are always float32 here',
        ),
    ],
)
def test_bad_megatron_values_are_one_line_naming_the_key(overrides, expected):
    (line,) = problems(None, [*MEGATRON, f"{PEFT}.enabled=true", *overrides])
    assert line.startswith(expected), line


def test_all_problems_come_together_and_disabled_sections_are_unchecked():
    found = problems(None, [f"{DTENSOR}.enabled=true", f"{DTENSOR}.dim=0", f"{DTENSOR}.dropout=2"])
    assert [p.split("=")[0] for p in found] == [f"{DTENSOR}.dim", f"{DTENSOR}.dropout"]
    assert lora_config(load(None, [f"{DTENSOR}.dim=0"])) is None  # off: as NeMo RL, not read


def test_a2a_experimental_is_listed_as_ignored_and_use_triton_is_silent():
    args = [*MEGATRON, f"{PEFT}.enabled=true", f"{PEFT}.a2a_experimental=true", f"{DTENSOR}.use_triton=false"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(None, args)
    (warning,) = [w for w in caught if w.category is IgnoredKeysWarning]
    assert f"{PEFT}.a2a_experimental=True" in str(warning.message)
    assert "use_triton" not in str(warning.message)


def test_target_modules_from_the_command_line_and_yaml(tmp_path):
    path, overrides, _ = parse_args(
        [
            "--config",
            "configs/sft.py",
            f"{DTENSOR}.enabled=true",
            f"--config.{DTENSOR}.match_all_linear=false",
            f"{DTENSOR}.target_modules=[q_proj,v_proj]",
            f"--config.{DTENSOR}.exclude_modules",
            "['*.layers.0.*']",
        ]
    )
    lora = lora_config(load(ROOT / path, overrides))
    assert (lora.target_modules, lora.exclude_modules) == (("q_proj", "v_proj"), ("*.layers.0.*",))
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "policy": {
                    "dtensor_cfg": {
                        "lora_cfg": {
                            "enabled": True,
                            "match_all_linear": False,
                            "target_modules": ["o_proj", "down_proj"],
                        }
                    }
                }
            }
        )
    )
    assert lora_config(load(recipe)).target_modules == ("o_proj", "down_proj")
    assert lora_config(load(recipe, [f"{DTENSOR}.target_modules=[gate_proj]"])).target_modules == ("gate_proj",)


def test_policy_lora_cfg_enabled_points_to_the_real_place():
    (line,) = problems(None, ["++policy.lora_cfg.enabled=true"])
    assert line.startswith(f"policy.lora_cfg.enabled=True: expected false; LoRA's keys go under {DTENSOR}")


def test_dry_run_with_a_bad_lora_value_exits_2_with_one_error_line():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_sft.train",
            "--config",
            "configs/sft.py",
            f"{DTENSOR}.enabled=true",
            f"{DTENSOR}.dim=0",
            "--dry_run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{DTENSOR}.dim=0: expected a positive integer (the LoRA rank)" in errors[0]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ parameter counts (jax_sft.models.counts)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "qwen3_moe", "mixtral", "gpt_oss"])
def test_parameter_counts_match_hf_and_the_model_built_with_adapters(family):
    """base_param_count == the HF model's parameter count; lora_param_count == the LoRAParams
    (and all Params) of the CausalLM built with the adapters (abstractly: no arrays)."""
    import math

    import jax
    from flax import nnx
    from hf_models import COMMON, FAMILIES

    from jax_sft.models import CausalLM, ModelConfig
    from jax_sft.models.counts import base_param_count, lora_param_count
    from jax_sft.models.lora import LoRAParam
    from jax_sft.models.options import LoraConfig

    config_cls, model_cls, extra = FAMILIES[family]
    hf_config = config_cls(**{**COMMON, **extra})
    hf_params = sum(p.numel() for p in model_cls(hf_config).parameters())
    m = ModelConfig.from_hf_dict({**hf_config.to_dict(), "architectures": [model_cls.__name__]})
    assert base_param_count(m) == hf_params
    for lora in (
        LoraConfig(dim=4, alpha=8, match_all_linear=True),  # lm_head included
        LoraConfig(dim=3, alpha=3, target_modules=("*.layers.1.*", "k_proj"), exclude_modules=("v_proj",)),
        LoraConfig(dim=2, alpha=2, naming="megatron", target_modules=("linear_fc1", "output_layer")),
    ):
        model = nnx.eval_shape(lambda lora=lora: CausalLM(m, rngs=nnx.Rngs(0), lora=lora))
        count = lambda kind, model=model: sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, kind)))
        assert lora_param_count(m, lora) == (count(LoRAParam), count(nnx.Param)), lora


def test_dry_run_plan_counts_adapters_of_a_local_model(tmp_path, capsys):
    from tiny_run import write_model_config

    from jax_sft.train import main

    model = write_model_config(tmp_path / "model")
    args = [
        "--config",
        str(ROOT / "configs" / "sft.py"),
        f"policy.model_name={model}",
        "policy.max_total_sequence_length=256",
        f"checkpointing.checkpoint_dir={tmp_path}/ckpt",
        f"logger.log_dir={tmp_path}/logs",
        f"{DTENSOR}.enabled=true",
        f"{DTENSOR}.match_all_linear=false",
        f"{DTENSOR}.target_modules=[q_proj,v_proj]",
        "--dry_run",
    ]

    def run(*extra):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                main([*args, *extra])
                code = 0
            except SystemExit as e:
                code = e.code
        return (code, *capsys.readouterr())

    code, out, err = run()
    assert code == 0, err
    # q_proj 8 * (64 + 64) + v_proj 8 * (64 + 32) per layer, 2 layers; the base: embeddings and the
    # untied lm_head 2 * 320 * 64, per layer 12,288 (attention) + 24,576 (MLP) + 128 (norms), final norm 64.
    assert (
        "  LoRA (policy.dtensor_cfg.lora_cfg, hf module names): rank 8, alpha 32, scale 4, targets "
        "['q_proj', 'v_proj']; dropout 0 (post); float32 adapters, frozen base; 4 adapted projections, "
        "3,584 trainable parameters of 118,592 (3.02%)"
    ) in out
    code, out, err = run(f"{DTENSOR}.match_all_linear=true", f"{DTENSOR}.target_modules=[]", f"{DTENSOR}.dropout=0.1")
    assert code == 2 and "LoRA dropout=0.1 with an adapter on lm_head" in err and "Traceback" not in err


def test_lora_config_round_trips_through_config_yaml(tmp_path):
    from jax_sft.config import save_config

    for overrides in (
        [
            f"{DTENSOR}.enabled=true",
            f"{DTENSOR}.match_all_linear=false",
            f"{DTENSOR}.target_modules=['*.layers.0.*', o_proj]",
        ],
        [*MEGATRON, f"{PEFT}.enabled=true", f"{PEFT}.exclude_modules=[linear_qkv]"],
    ):
        cfg = load(None, overrides)
        again = load(save_config(cfg, tmp_path / "config.yaml"))
        assert again == cfg and lora_config(again) == lora_config(cfg) is not None


def test_a_target_module_that_matches_nothing_is_named_even_when_another_matches():
    from jax_sft.errors import SettingError
    from jax_sft.models.config import ModelConfig
    from jax_sft.models.options import LoraConfig

    config = ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        }
    )
    LoraConfig(dim=2, alpha=2, target_modules=("q_proj", "*.layers.1.*.o_proj")).by_layer(config, False)  # both match
    for lora, named in (
        (LoraConfig(dim=2, alpha=2, target_modules=("q_proj", "qproj")), r"entry \['qproj'\] matches"),
        (
            LoraConfig(dim=2, alpha=2, target_modules=("v_proj", "*.layers.7.*", "c_attn")),
            r"entries \['\*.layers.7.\*', 'c_attn'\] match",
        ),
        (
            LoraConfig(dim=2, alpha=2, naming="megatron", target_modules=("linear_qkv", "q_proj")),
            r"\['q_proj'\] matches",
        ),
    ):
        with pytest.raises(SettingError, match=named + " no linear layer of this LlamaForCausalLM") as err:
            lora.by_layer(config, False)
        assert "\n" not in str(err.value)
    print("\n" + str(err.value))
