"""jax_sft.config: Python and NeMo RL YAML configs into one validated ConfigDict."""

import warnings
from pathlib import Path

import pytest

from jax_sft.config import (
    ConfigError,
    IgnoredKeysWarning,
    apply_overrides,
    default_config,
    load_config,
    parse_args,
    save_config,
    to_yaml,
    validate,
)

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]
NEMO_YAML = DATA / "nemo_rl_sft.yaml"  # NeMo RL's examples/configs/sft.yaml shape


def load_quiet(path, overrides=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        return load_config(path, overrides)


def errors(path, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_quiet(path, overrides)
    return info.value


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_defaults_load_validate_and_fill_derived_keys():
    cfg = load_config(None)
    assert cfg == validate(default_config())
    assert cfg == load_config(REPO / "configs" / "sft.py")  # the checkout's config file
    p = cfg.policy
    assert p.tokenizer.name == p.model_name == "meta-llama/Llama-3.2-1B"
    assert cfg.data.max_input_seq_length == 1024
    assert p.sequence_packing.train_mb_tokens == p.dynamic_batching.train_mb_tokens == 1024
    assert p.make_sequence_length_divisible_by == 1 and p.jax_cfg.mesh.tensor == 1
    assert p.jax_cfg.remat == "none"
    assert default_config().policy.tokenizer.name is None  # validate leaves its input alone
    with pytest.raises(AttributeError, match="does not exist"):
        cfg.policy.modle_name = "x"  # the validated config is locked: no new keys


def test_python_config_with_overrides_including_null_default_keys():
    cfg = load_config(
        f"{DATA / 'user_config.py'}:large",
        [
            "--config.data.val_data_path=/x.jsonl",  # default null (a placeholder)
            "--config.policy.max_grad_norm=null",
            "--config.checkpointing.keep_top_k=null",
            "--config.policy.optimizer.kwargs.lr=1e-5",  # YAML reads "1e-5" as a string
            "--config.policy.optimizer.kwargs.weight_decay=0",  # int -> float field
            "--config.policy.optimizer.kwargs.betas=[0.9, 0.95]",
            "--config.policy.train_micro_batch_size=2",
            "--config.logger.wandb.name=123",  # a str field keeps the text
            "--config.policy.tokenizer.chat_template=null",
            "--config.policy.tokenizer.chat_template_kwargs={enable_thinking: false}",
            "--config.policy.optimizer.kwargs.amsgrad=false",  # optimizer kwargs are open
        ],
    )
    assert cfg.policy.model_name == "Qwen/Qwen3-0.6B" and cfg.sft.max_num_steps == 5
    assert cfg.policy.max_total_sequence_length == 4096  # get_config("large")
    assert cfg.data.val_data_path == "/x.jsonl"
    assert cfg.policy.max_grad_norm is None and cfg.checkpointing.keep_top_k is None
    kw = cfg.policy.optimizer.kwargs
    assert (kw.lr, kw.weight_decay, kw.betas, kw.amsgrad) == (1e-5, 0.0, [0.9, 0.95], False)
    assert type(kw.lr) is float and type(kw.weight_decay) is float
    assert cfg.policy.train_micro_batch_size == 2
    assert cfg.policy.sequence_packing.train_mb_tokens == 4096 * 2
    assert cfg.logger.wandb.name == "123"
    assert cfg.policy.tokenizer.chat_template is None
    assert cfg.policy.tokenizer.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.policy.tokenizer.name == "Qwen/Qwen3-0.6B"


def test_yaml_inheritance_interpolations_and_overrides():
    overrides = ["policy.model_name=/models/qwen", "++policy.train_micro_batch_size=4", "--config.sft.val_period=5"]
    cfg = load_quiet(DATA / "sft_child.yaml", overrides)
    p = cfg.policy
    assert p.model_name == "/models/qwen"
    assert p.tokenizer.name == "/models/qwen"  # ${policy.model_name} sees the override
    assert p.sequence_packing.enabled
    assert p.sequence_packing.train_mb_tokens == 2048 * 4  # ${mul:...} of the child's values
    assert cfg.data.max_input_seq_length == 2048
    assert cfg.logger.wandb.name == "run-/models/qwen-4"  # ${max:4, 3}
    assert cfg.logger.tensorboard.log_dir == "tb_logs-sft-dev-squad"  # from the parent
    assert (cfg.sft.max_num_steps, cfg.sft.val_period, cfg.sft.val_batches) == (200, 5, 8)
    assert p.train_global_batch_size == 16 and p.optimizer.kwargs.eps == 1e-5
    assert p.scheduler[2] == {"milestones": [10]} and p.scheduler[1]["kwargs"] == {"T_max": 190}
    assert p.tokenizer.chat_template.startswith("{% for message in messages %}")
    assert not cfg.logger.wandb_enabled


def test_yaml_defaults_list_relative_paths_and_override_marker(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text(
        "policy:\n  model_name: a\n  optimizer:\n    kwargs: {lr: 1.0e-4, eps: 1.0e-6}\nsft: {max_num_steps: 7}\n"
    )
    (tmp_path / "base" / "b.yaml").write_text("defaults: a.yaml\npolicy:\n  model_name: b\n")
    (tmp_path / "c.yaml").write_text("sft: {seed: 3}\n")
    (tmp_path / "child.yaml").write_text(
        "defaults: [base/b.yaml, c.yaml]\n"
        "sft: {_override_: true, max_num_epochs: 2}\n"  # replaces the inherited sft section
        "policy:\n  optimizer:\n    kwargs: {lr: 2.0e-4}\n"
    )
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.policy.model_name == "b"  # b.yaml over its parent a.yaml
    kw = cfg.policy.optimizer.kwargs
    assert (kw.lr, kw.eps) == (2e-4, 1e-6)  # merged key by key
    sft = default_config().sft
    assert (cfg.sft.max_num_epochs, cfg.sft.max_num_steps, cfg.sft.seed) == (2, sft.max_num_steps, sft.seed)


def test_nemo_rl_sft_yaml_loads_with_exactly_one_warning_listing_ignored_keys():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(NEMO_YAML)
    assert [w.category for w in caught] == [IgnoredKeysWarning]
    message = str(caught[0].message)
    assert message.startswith(str(NEMO_YAML))
    assert message.split("ignored: ")[1].split(", ") == [
        "checkpointing.model_save_format",
        "checkpointing.save_consolidated",
        "logger.swanlab",
        "logger.swanlab_enabled",
        "policy.dtensor_cfg._v2",
        "policy.dtensor_cfg.clear_cache_every_n_steps",
        "policy.dtensor_cfg.env_vars",
        "policy.megatron_cfg",
        "policy.offload_optimizer_for_logprob",
    ]
    # The rest is NeMo RL's default, which is ours: only these keys differ from the defaults.
    got, want = flat(cfg.to_dict()), flat(load_config(None).to_dict())
    assert {k: got[k] for k in got if got[k] != want[k]} == {
        "logger.wandb_enabled": True,
        "logger.wandb.name": "sft-dev-squad",
        "logger.tensorboard.log_dir": "tb_logs-sft-dev-squad",
        "logger.mlflow.run_name": "sft-dev-squad",
    }


def test_unknown_key_suggests_the_nearest_valid_key(tmp_path):
    e = errors(None, ["policy.optimzer.kwargs.lr=1e-5"])
    assert e.problems == ["policy.optimzer.kwargs.lr=1e-05: unknown key; did you mean policy.optimizer.kwargs.lr?"]
    e = errors(None, ["cluster.foo=1"])  # nothing near: the keys of the section
    assert e.problems == ["cluster.foo=1: unknown key; keys here: gpus_per_node, num_nodes"]
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"defaults: {NEMO_YAML}\npolicy:\n  max_total_seq_length: 8\n")
    e = errors(typo)
    assert e.problems == ["policy.max_total_seq_length=8: unknown key; did you mean policy.max_total_sequence_length?"]
    assert str(e) == f"{typo}: {e.problems[0]}"  # one problem, one line
    (tmp_path / "bad.py").write_text(
        "from jax_sft.config import default_config\n"
        "def get_config():\n    c = default_config()\n    c.sft.max_steps = 3\n    return c\n"
    )
    assert errors(tmp_path / "bad.py").problems == ["sft.max_steps=3: unknown key; did you mean sft.max_num_steps?"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("policy.train_micro_batch_size=two", "policy.train_micro_batch_size='two': expected int, got str"),
        ("policy.precision=null", "policy.precision=None: expected str; null is not allowed for this key"),
        ("policy.max_total_sequence_length=1.5", "policy.max_total_sequence_length=1.5: expected int, got float"),
        ("sft.val_at_start=1", "sft.val_at_start=1: expected bool, got int"),
        ("policy.dtensor_cfg=3", "policy.dtensor_cfg=3: expected a section with keys activation_checkpointing, "),
        ("policy.optimizer.kwargs.lr=fast", "policy.optimizer.kwargs.lr='fast': expected float"),
        ("policy.scheduler=3", "policy.scheduler=3: expected list or null, got int"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(override, message):
    e = errors(None, [override])
    assert len(e.problems) == 1 and e.problems[0].startswith(message), e.problems


@pytest.mark.parametrize(
    "override, message",
    [
        ("policy.precision=fp16", "policy.precision='fp16': expected one of bfloat16, float32"),
        ("data.overlength=skip", "data.overlength='skip': expected one of truncate, drop, mask"),
        ("policy.jax_cfg.attention=flash", "policy.jax_cfg.attention='flash': expected one of auto, xla, cudnn"),
        ("policy.jax_cfg.remat=some", "policy.jax_cfg.remat='some': expected one of none, full, dots_saveable, "),
        (
            "policy.sequence_packing.algorithm=greedy",
            "policy.sequence_packing.algorithm='greedy': expected one of modified_first_fit_",
        ),
        (
            "policy.jax_cfg.mesh.fsdp=0",
            "policy.jax_cfg.mesh.fsdp=0: expected a positive number, or -1 for all devices left",
        ),
        ("policy.jax_cfg.mesh.data=-1", "policy.jax_cfg.mesh.data=-1: expected a positive number"),
        ("sft.max_num_steps=-1", "sft.max_num_steps=-1: expected a number >= 0 (0: only validate)"),
        (
            "policy.max_total_sequence_length=-8",  # one problem, not one per derived key
            "policy.max_total_sequence_length=-8: expected a positive number",
        ),
        (
            "policy.train_micro_batch_size=5",
            "policy.train_global_batch_size=32: expected a multiple of policy.train_micro_batch_size=5",
        ),
        (
            "sft.val_micro_batch_size=3",
            "sft.val_global_batch_size=32: expected a multiple of sft.val_micro_batch_size=3",
        ),
        (
            "checkpointing.checkpoint_must_save_by=3h",
            "checkpointing.checkpoint_must_save_by='3h': expected \"DD:HH:MM:SS\"",
        ),
        (
            "checkpointing.checkpoint_must_save_by=00:24:00:00",
            "checkpointing.checkpoint_must_save_by='00:24:00:00': expected",
        ),
        ("checkpointing.metric_name='val loss'", "checkpointing.metric_name='val loss': expected"),
        ("policy.optimizer.kwargs.betas=[0.9]", "policy.optimizer.kwargs.betas=[0.9]: expected two numbers in [0, 1)"),
        ("policy.optimizer.kwargs.lr=0", "policy.optimizer.kwargs.lr=0.0: expected a positive"),
        ("policy.max_grad_norm=0", "policy.max_grad_norm=0.0: expected a positive number, or null for no clipping"),
        ("policy.scheduler=[1]", "policy.scheduler=[1]: expected null (constant LR), or a list"),
    ],
)
def test_impossible_value_names_the_key_value_and_expectation(override, message):
    e = errors(None, [override])
    assert len(e.problems) == 1 and e.problems[0].startswith(message), e.problems


def test_accepted_forms_of_checked_values():
    cfg = load_config(
        None,
        [
            "checkpointing.checkpoint_must_save_by=00:03:45:00",
            "checkpointing.metric_name=val_loss",
            "checkpointing.metric_name=null",
            "policy.jax_cfg.remat=dots_with_no_batch_dims_saveable",
            "policy.sequence_packing.algorithm=first_fit_decreasing",
            "policy.precision=float32",
            "policy.jax_cfg.mesh.fsdp=4",
        ],
    )
    assert cfg.checkpointing.checkpoint_must_save_by == "00:03:45:00"
    assert cfg.checkpointing.metric_name is None and cfg.policy.jax_cfg.mesh.fsdp == 4


def test_sequence_packing_checks():
    assert load_config(None, ["policy.sequence_packing.train_mb_tokens=100"])  # off: unchecked
    e = errors(None, ["policy.sequence_packing.enabled=true", "policy.sequence_packing.train_mb_tokens=100"])
    assert e.problems == [
        "policy.sequence_packing.train_mb_tokens=100: expected >= "
        "policy.max_total_sequence_length=1024; "
        "a sequence of the longest length must fit in one packed micro-batch"
    ]
    e = errors(None, ["policy.sequence_packing.enabled=true", "policy.dynamic_batching.enabled=true"])
    assert e.problems == [
        "policy.sequence_packing.enabled=True: expected false when "
        "policy.dynamic_batching.enabled; enable one of the two"
    ]


def test_several_problems_are_reported_in_one_error():
    e = errors(
        None,
        [
            "policy.precision=fp16",
            "policy.train_global_batch_size=7",
            "policy.train_micro_batch_size=2",
            "policy.jax_cfg.remat=all",
        ],
    )
    assert len(e.problems) == 3
    for key in ("policy.precision", "policy.train_global_batch_size", "policy.jax_cfg.remat"):
        assert sum(p.startswith(key + "=") for p in e.problems) == 1
    assert str(e).startswith("defaults + overrides: 3 config problems:\n  - ")
    # Unknown keys and wrong types (found before the values are checked) come together too.
    e = errors(None, ["policy.modl_name=x", "sft.seed=abc", "cluster.num_nodes=null"])
    assert [p.split("=")[0] for p in e.problems] == ["cluster.num_nodes", "policy.modl_name", "sft.seed"]


def test_lora_enabled_in_policy_lora_cfg_is_an_error():  # LoRA itself: test_lora_config.py
    e = errors(NEMO_YAML, ["++policy.lora_cfg.enabled=true"])
    assert e.problems == [
        "policy.lora_cfg.enabled=True: expected false; LoRA's keys go under "
        "policy.dtensor_cfg.lora_cfg (or policy.megatron_cfg.peft with Megatron), as in NeMo RL; "
        "move them there"
    ]


def test_megatron_enabled_maps_onto_this_backend():  # details: test_megatron.py
    cfg = load_quiet(
        NEMO_YAML,
        [
            "policy.megatron_cfg.enabled=true",
            "policy.optimizer=null",
            "policy.megatron_cfg.tensor_model_parallel_size=2",
        ],
    )
    assert cfg.policy.megatron_cfg.enabled and cfg.policy.jax_cfg.mesh.tensor == 2


def test_yaml_round_trip(tmp_path):
    (tmp_path / "literal.py").write_text(
        "from jax_sft.config import default_config\n"
        "def get_config():\n    c = default_config()\n"
        "    c.data.system_prompt = 'Prices in ${USD}: keep them'\n    return c\n"
    )
    cfg = load_config(tmp_path / "literal.py", ["policy.tokenizer.chat_template_kwargs={enable_thinking: true}"])
    assert cfg.data.system_prompt == "Prices in ${USD}: keep them"  # Python strings are literal
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert out.read_text() == to_yaml(cfg)
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temporary file left
    assert load_config(out) == cfg
    child = load_quiet(DATA / "sft_child.yaml", ["policy.model_name=/m"])
    assert load_config(save_config(child, tmp_path / "child.yaml")) == child


def test_derived_keys_follow_their_source():
    cfg = load_config(
        REPO / "configs" / "sft.py",
        [
            "--config.policy.model_name=/m",
            "--config.policy.max_total_sequence_length=64",
            "--config.policy.dtensor_cfg.tensor_parallel_size=2",
            "--config.policy.dtensor_cfg.activation_checkpointing=true",
        ],
    )
    p = cfg.policy
    assert p.tokenizer.name == "/m"
    assert cfg.data.max_input_seq_length == p.sequence_packing.train_mb_tokens == 64
    assert (p.make_sequence_length_divisible_by, p.jax_cfg.mesh.tensor) == (2, 2)
    assert p.jax_cfg.remat == "full"
    cfg = load_config(
        None,
        [
            "policy.model_name=/m",
            "policy.tokenizer.name=/tok",
            "policy.jax_cfg.remat=none",
            "policy.dtensor_cfg.activation_checkpointing=true",
        ],
    )
    assert (cfg.policy.tokenizer.name, cfg.policy.jax_cfg.remat) == ("/tok", "none")  # as set
    # apply_overrides, then validate: the derived key follows too.
    cfg = validate(apply_overrides(default_config(), ["policy.model_name=/n"]))
    assert cfg.policy.tokenizer.name == "/n"


def test_parse_args():
    argv = [
        "--config",
        "configs/sft.py",
        "--config.policy.model_name=/m",
        "--config.sft.seed",
        "3",
        "--num_processes=2",
        "--process_id",
        "1",
        "--coordinator_address=host:1234",
        "--dry_run",
    ]
    assert parse_args(argv) == (
        "configs/sft.py",
        ["policy.model_name=/m", "sft.seed=3"],
        {"num_processes": "2", "process_id": "1", "coordinator_address": "host:1234", "dry_run": True},
    )
    assert parse_args(["--config=x.yaml", "a.b=1", "++c.d=[1, 2]", "+e=null", "~f.g"]) == (
        "x.yaml",
        ["a.b=1", "+c.d=[1, 2]", "+e=null", "~f.g"],
        {},
    )
    assert parse_args([]) == (None, [], {})
    for bad in (["stray"], ["--config", "a.py", "--config", "b.py"], ["--config"], ["a..b=1"], ["--config.sft.seed"]):
        with pytest.raises(ConfigError):
            parse_args(bad)


def test_bad_files_name_the_file(tmp_path):
    for name, text, message in [
        ("cycle.yaml", "defaults: cycle.yaml\n", "defaults: cycle through"),
        ("list.yaml", "- 1\n", "expected a mapping at the top level"),
        ("broken.yaml", "a: [1\n", "invalid YAML"),
        ("missing.yaml", "policy:\n  model_name: ${policy.nope}\n", "cannot resolve"),
        ("noget.py", "x = 1\n", "defines no get_config()"),
        ("conf.toml", "", "expected a .py"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message) as info:
            load_config(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_plus_adds_unknown_keys_with_the_warning_and_tilde_removes():
    """NeMo RL (Hydra) overrides: `+a.b=v` adds a key: one unknown here is dropped and named in the
    one warning (with a near valid key when there is one), not an error; a known key is set.
    `~a.b` removes a key, so it falls back to the default."""
    with pytest.warns(IgnoredKeysWarning) as record:
        cfg = load_config(None, ["+policy.new_thing.x=3", "+sft.max_num_steps=7", "++policy.train_micro_batch_szie=2"])
    assert cfg.sft.max_num_steps == 7 and "new_thing" not in cfg.policy
    (message,) = [str(w.message) for w in record]
    assert "policy.new_thing (added with +)" in message
    assert ("policy.train_micro_batch_szie (added with +; did you mean policy.train_micro_batch_size?)") in message
    with pytest.raises(ConfigError, match="policy.new_thing.x=3: unknown key"):
        load_config(None, ["policy.new_thing.x=3"])
    cfg = load_config(None, ["sft.max_num_steps=7", "~sft.max_num_steps"])
    assert cfg.sft.max_num_steps == default_config().sft.max_num_steps
    with pytest.raises(ConfigError, match="no key sft.nope to remove"):
        load_config(None, ["~sft.nope"])


def test_todays_nemo_rl_keys_without_meaning_here_are_named_in_the_warning():
    keys = [
        "cluster.segment_size=4",
        "policy.sequence_packing.microbatch_order=packer",
        "policy.dtensor_cfg.sequence_parallel=true",
        "policy.dynamic_batching.enabled=true",
        "policy.dtensor_cfg.cpu_offload=true",
        "policy.tokenizer.video.num_frames=16",
    ]
    with pytest.warns(IgnoredKeysWarning) as record:
        load_config(None, keys)
    (message,) = [str(w.message) for w in record]
    for key in keys:
        assert key.split("=")[0].removesuffix(".num_frames") in message
    # A key that means something here (MXFP4 checkpoints: tests/test_gpt_oss.py), not warned about.
    assert load_config(None, ["policy.dequantize_base_checkpoint=true"]).policy.dequantize_base_checkpoint is True


def test_context_parallel_size_maps_to_the_context_mesh_axis():
    cfg = load_config(None, [])
    assert cfg.policy.jax_cfg.mesh.context == 1 and cfg.policy.make_sequence_length_divisible_by == 1
    cfg = load_config(None, ["policy.dtensor_cfg.context_parallel_size=4", "policy.dtensor_cfg.tensor_parallel_size=2"])
    # The zig-zag layout cuts rows in 2 x context chunks: the derived divisor is a multiple of 8.
    assert cfg.policy.jax_cfg.mesh.context == 4 and cfg.policy.make_sequence_length_divisible_by == 8
    megatron = ["policy.megatron_cfg.enabled=true", "policy.megatron_cfg.context_parallel_size=8"]
    cfg = load_config(None, [*megatron, "policy.dtensor_cfg.context_parallel_size=2"])
    assert cfg.policy.jax_cfg.mesh.context == 8 and cfg.policy.make_sequence_length_divisible_by == 16
    cfg = load_config(None, ["policy.dtensor_cfg.context_parallel_size=4", "policy.jax_cfg.mesh.context=2"])
    assert cfg.policy.jax_cfg.mesh.context == 2 and cfg.policy.make_sequence_length_divisible_by == 4
    with pytest.raises(ConfigError, match="policy.jax_cfg.mesh.context=0"):
        load_config(None, ["policy.jax_cfg.mesh.context=0"])
    with pytest.raises(ConfigError, match="policy.jax_cfg.context_attention='ringg'"):
        load_config(None, ["policy.jax_cfg.context_attention=ringg"])


def test_expert_parallel_size_maps_to_the_expert_mesh_axis():
    assert load_config(None, []).policy.jax_cfg.mesh.expert == 1
    cfg = load_config(None, ["policy.dtensor_cfg.expert_parallel_size=4"])
    assert cfg.policy.jax_cfg.mesh.expert == 4
    cfg = load_config(None, ["policy.dtensor_cfg.expert_parallel_size=4", "policy.jax_cfg.mesh.expert=2"])
    assert cfg.policy.jax_cfg.mesh.expert == 2
    with pytest.raises(ConfigError, match="policy.jax_cfg.mesh.expert=0"):
        load_config(None, ["policy.jax_cfg.mesh.expert=0"])


# ----------------------------------------------------------------------------- overrides as Hydra reads them

SCHEDULE = (
    "policy.scheduler=[{name:torch.optim.lr_scheduler.LinearLR,kwargs:{start_factor:0.1,end_factor:1.0,"
    "total_iters:10}},{name:torch.optim.lr_scheduler.CosineAnnealingLR,kwargs:{T_max:90}},{milestones:[10]}]"
)


def test_override_values_are_read_with_hydras_grammar(tmp_path):
    """NeMo RL's docs write dicts without a space after the colon; Hydra reads them as dicts (YAML
    would make "rope_theta:1000" a key); lists, quoted strings, null, numbers as Hydra does."""
    from tiny_run import write_model_config

    from jax_sft.config.keys import plain
    from jax_sft.models import read_config

    cfg = load_quiet(
        None,
        [
            "+policy.hf_config_overrides={rope_theta:1000,rope_scaling:null}",
            SCHEDULE,
            "policy.optimizer.kwargs={lr:2e-5,betas:[0.9,0.95]}",
            "policy.tokenizer.chat_template_kwargs={enable_thinking:false,name:'a, b'}",
            "sft.max_num_steps=1_000",
        ],
    )
    assert plain(cfg.policy.hf_config_overrides) == {"rope_theta": 1000, "rope_scaling": None}
    assert plain(cfg.policy.scheduler) == [
        {
            "name": "torch.optim.lr_scheduler.LinearLR",
            "kwargs": {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 10},
        },
        {"name": "torch.optim.lr_scheduler.CosineAnnealingLR", "kwargs": {"T_max": 90}},
        {"milestones": [10]},
    ]
    k = cfg.policy.optimizer.kwargs
    assert (k.lr, list(k.betas), k.weight_decay) == (2e-5, [0.9, 0.95], 0.1)  # a dict merges into the section
    assert plain(cfg.policy.tokenizer.chat_template_kwargs) == {"enable_thinking": False, "name": "a, b"}
    assert cfg.sft.max_num_steps == 1000
    # The RoPE change reaches the model's config.
    model = read_config(write_model_config(tmp_path / "model"), plain(cfg.policy.hf_config_overrides))
    assert model.rope.theta == 1000.0
    # A str key keeps its text (a Jinja template, a path) unless quoted or null.
    cfg = load_quiet(None, ["policy.tokenizer.chat_template={% for m in messages %}{{ m.content }}{% endfor %}"])
    assert cfg.policy.tokenizer.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert load_quiet(None, ["policy.tokenizer.chat_template=null"]).policy.tokenizer.chat_template is None
    for bad, why in (("sft.max_num_steps=1,2", "multirun sweep"), ("sft.seed=int(3)", "functions"), ("a.b=[1", "list")):
        assert why in str(errors(None, [bad])), bad


def test_tilde_on_an_optimizer_kwarg_leaves_torchs_default(tmp_path):
    """NeMo RL drops the key and torch's AdamW default applies (weight_decay 0.01, not sft.yaml's
    0.1); the saved config keeps it absent."""
    from jax_sft.optim import TORCH_ADAMW_DEFAULTS, optimizer_from_config

    cfg = load_quiet(None, ["~policy.optimizer.kwargs.weight_decay", "~policy.optimizer.kwargs.eps"])
    assert "weight_decay" not in cfg.policy.optimizer.kwargs and cfg.policy.optimizer.kwargs.lr == 5e-6
    description = optimizer_from_config(cfg, 10)[2]
    assert f"weight_decay={TORCH_ADAMW_DEFAULTS['weight_decay']}" in description and "eps=1e-08" in description
    assert TORCH_ADAMW_DEFAULTS["weight_decay"] == 0.01
    again = load_quiet(None, [])
    assert again.policy.optimizer.kwargs.weight_decay == 0.1  # untouched: sft.yaml's value
    assert "_override_: true" in to_yaml(cfg)
    assert load_quiet(save_config(cfg, tmp_path / "c.yaml")).to_dict() == cfg.to_dict()


def test_max_sequences_per_bin_and_mixture_by_are_checked():
    cfg = load_quiet(None, ["policy.sequence_packing.max_sequences_per_bin=4", "data.mixture_by=tokens"])
    assert cfg.policy.sequence_packing.max_sequences_per_bin == 4 and cfg.data.mixture_by == "tokens"
    assert default_config().policy.sequence_packing.max_sequences_per_bin is None
    assert default_config().data.tokenize == "lazy"
    e = errors(None, ["policy.sequence_packing.max_sequences_per_bin=0", "data.mixture_by=rows"])
    assert any("max_sequences_per_bin=0: expected a positive number" in p for p in e.problems)
    assert any("data.mixture_by='rows': expected one of examples, tokens" in p for p in e.problems)


def test_an_interpolation_that_cannot_resolve_names_its_key(tmp_path):
    """NeMo RL's sft.yaml names its W&B run after ${data.train.dataset_name}; a data.train list
    (a mixture) leaves that unresolvable: the error names the key that holds the interpolation."""
    path = tmp_path / "sft.yaml"
    path.write_text(
        'data:\n  train:\n    dataset_name: squad\nlogger:\n  wandb:\n    name: "sft-dev-${data.train.dataset_name}"\n'
    )
    assert load_quiet(path).logger.wandb.name == "sft-dev-squad"
    message = str(errors(path, ["data.train=[{dataset_name:squad,weight:3},{dataset_name:squad,weight:1}]"]))
    assert "logger.wandb.name: cannot resolve an interpolation" in message, message
    assert "set logger.wandb.name to a plain value" in message and "\n" not in message, message
