"""The default SFT run: NeMo RL's examples/configs/sft.yaml, key for key, plus `policy.jax_cfg`.

This is the shared contract of config keys; `configs/sft.py` re-exports it so that
`--config configs/sft.py` works from a checkout, and this module keeps it importable from an
installed package. A user's Python config can start from it:

    from jax_sft.config import default_config

    def get_config():
        c = default_config()
        c.policy.model_name = "Qwen/Qwen3-0.6B"
        return c

Keys whose NeMo RL value is an interpolation (`${policy.model_name}`, `${mul:...}`) are `None`
here and are resolved by `jax_sft.config.validate` (see `DERIVED` in `nemo_rl.py`), so that overriding the
source key also moves the derived one. Keys whose default is null are ml-collections placeholders
so that they stay overridable from the command line (`--config.data.val_data_path=/x.jsonl`);
only placeholders and FieldReferences (a default that also accepts null) accept null.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import FieldReference, placeholder

# NeMo RL's sft.yaml template for squad on a base model: "Context: ... Question: ... Answer: ...".
SQUAD_TEMPLATE = (
    "{% for message in messages %}"
    "{%- if message['role'] == 'system'  %}{{'Context: ' + message['content'].strip()}}"
    "{%- elif message['role'] == 'user'  %}{{' Question: ' + message['content'].strip() + ' Answer:'}}"
    "{%- elif message['role'] == 'assistant'  %}{{' ' + message['content'].strip()}}"
    "{%- endif %}{% endfor %}"
)


def get_config() -> ConfigDict:
    """The default config, one builder per section (each key commented where it is set)."""
    c = ConfigDict()
    c.sft = _sft()
    c.checkpointing = _checkpointing()
    c.policy = _policy()
    c.data = _data()
    c.logger = _logger()
    c.cluster = dict(gpus_per_node=1, num_nodes=1)
    return c


def _sft() -> ConfigDict:
    """sft.*: steps, validation, seed."""
    c = ConfigDict(
        dict(
            max_num_epochs=1,
            max_num_steps=60,
            val_period=10,
            val_batches=8,  # <= 0: the whole validation set
            val_global_batch_size=32,
            val_micro_batch_size=1,
            val_at_start=True,
            val_at_end=False,
            seed=42,
            only_unmask_final=False,
        )
    )
    return c


def _checkpointing() -> ConfigDict:
    """checkpointing.*: NeMo RL's keys plus hf_export_dir."""
    c = ConfigDict(
        dict(
            enabled=True,
            checkpoint_dir="results/sft",
            metric_name=placeholder(str),  # "val:<name>" or "train:<name>"; null: keep the newest
            higher_is_better=False,
            keep_top_k=placeholder(int),  # NeMo RL: 3; null keeps every checkpoint
            save_period=10,
            checkpoint_must_save_by=placeholder(str),  # "DD:HH:MM:SS" after the start of the run
            save_optimizer=True,
            hf_export_dir=placeholder(str),  # jax_sft: write the final model here in HF format
        )
    )
    c.metric_name = "val:val_loss"
    c.keep_top_k = 3
    return c


def _policy() -> ConfigDict:
    """policy.*: the model, batches, precision, backends, optimizer and schedule."""
    c = ConfigDict(
        dict(
            model_name="meta-llama/Llama-3.2-1B",
            tokenizer=_tokenizer(),
            train_global_batch_size=32,
            train_micro_batch_size=1,
            max_total_sequence_length=1024,
            precision="bfloat16",  # "bfloat16" (fp32 master weights, bf16 compute) or "float32"
            max_grad_norm=placeholder(float),  # null: no clipping
            make_sequence_length_divisible_by=placeholder(int),  # null: tensor_parallel_size
            dtensor_cfg=_dtensor_cfg(),
            # Keys merged into the model's config.json before the model is built (and exported), e.g.
            # {rope_scaling: {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 32768}}.
            hf_config_overrides=placeholder(dict),
            # A quantized base checkpoint (gpt-oss's MXFP4 experts) is dequantized on load when this
            # is null (as Automodel: when config.json has a quantization_config) or true; false is
            # refused for one (jax_sft trains no quantized weights).
            dequantize_base_checkpoint=placeholder(bool),
            # NeMo RL's Megatron backend settings that mean something here (enabled: true maps them
            # onto this backend; see jax_sft/optim.py make_megatron_optimizer); the rest of NeMo RL's
            # megatron_cfg keys are listed in the IgnoredKeysWarning.
            megatron_cfg=_megatron_cfg(),
            dynamic_batching=dict(
                enabled=False,
                train_mb_tokens=placeholder(int),  # null: max_total_sequence_length * train_micro_batch_size
                sequence_length_round=64,
            ),
            sequence_packing=_sequence_packing(),
            optimizer=dict(
                name="torch.optim.AdamW",
                kwargs=dict(
                    lr=5.0e-6,
                    weight_decay=0.1,
                    betas=[0.9, 0.98],
                    eps=1.0e-5,
                    foreach=False,
                    fused=False,
                ),
            ),
            # NeMo RL: absent = constant LR. A list of {name, kwargs} plus {milestones: [...]}
            # is a sequential schedule (e.g. torch.optim.lr_scheduler.LinearLR then CosineAnnealingLR).
            scheduler=placeholder(list),
            # jax_sft's own keys: how this backend lays the model out and computes.
            jax_cfg=_jax_cfg(),
        )
    )
    c.max_grad_norm = 1.0
    c.megatron_cfg.scheduler.lr_decay_iters = 1000  # NeMo RL's sft.yaml
    c.tokenizer.chat_template = SQUAD_TEMPLATE
    return c


def _tokenizer() -> dict:
    return dict(
        name=placeholder(str),  # null: policy.model_name
        # "default": the tokenizer's own; None: passthrough; "*.jinja": a file; else Jinja text.
        chat_template=placeholder(str),  # set in _policy to NeMo RL's squad template
        chat_template_kwargs=placeholder(dict),
        custom_template=placeholder(str),  # the guide's key; when set it wins over chat_template
    )


def _sequence_packing() -> ConfigDict:
    """policy.sequence_packing.*: packed rows."""
    return ConfigDict(
        dict(
            enabled=False,
            train_mb_tokens=placeholder(int),  # null: max_total_sequence_length * train_micro_batch_size
            algorithm="modified_first_fit_decreasing",  # or first_fit, best_fit, first_fit_decreasing
            sequence_length_round=64,
            # NeMo RL's newest key (after 7ea279ab): at most this many sequences in a packed row; null: no bound.
            max_sequences_per_bin=placeholder(int),
        )
    )


def _dtensor_cfg() -> ConfigDict:
    """policy.dtensor_cfg.*: NeMo RL's DTensor (Automodel) keys, LoRA included."""
    c = ConfigDict(
        dict(
            enabled=True,
            cpu_offload=False,
            sequence_parallel=False,
            activation_checkpointing=False,  # maps to jax_cfg.remat="full" when remat is null
            tensor_parallel_size=1,  # maps to the mesh's tensor axis
            expert_parallel_size=1,  # maps to the mesh's expert axis (mixture-of-experts models)
            context_parallel_size=1,  # maps to the mesh's context axis (each row's sequence split over it)
            dp_replicate_size=1,  # HSDP: maps to the mesh's data axis (replicas; fsdp shards within)
            custom_parallel_plan=placeholder(str),
            # LoRA on the DTensor (Automodel) path, NeMo RL's keys: see README "LoRA" and
            # jax_sft/models/lora.py. Adapters are float32; the frozen base follows jax_cfg.param_dtype.
            lora_cfg=dict(
                enabled=False,
                target_modules=[],  # HF module names or wildcard patterns of full names
                exclude_modules=[],  # removed from the targets (NeMo RL: one or the other)
                match_all_linear=True,  # every linear layer, lm_head included; lists must be empty
                dim=8,  # the rank
                alpha=32,  # scale = alpha / dim
                dropout=0.0,
                dropout_position="post",  # "pre" (on the input) or "post" (on the adapter's output)
                lora_A_init="xavier",  # or "uniform"; B starts at zero
                use_triton=True,  # a CUDA kernel choice of NeMo RL's: accepted, no effect here
            ),
        )
    )
    return c


def _megatron_cfg() -> ConfigDict:
    """policy.megatron_cfg.*: the Megatron recipes' keys that mean something here."""
    c = ConfigDict(
        dict(
            enabled=False,
            tensor_model_parallel_size=1,  # maps to the mesh's tensor axis
            context_parallel_size=1,  # maps to the mesh's context axis (each row's sequence split over it)
            activation_checkpointing=False,  # maps to jax_cfg.remat="full" when remat is null
            optimizer=dict(
                optimizer="adam",  # "adam" (AdamW, decoupled weight decay) or "sgd"
                lr=5.0e-6,
                min_lr=4.9999e-6,
                weight_decay=0.1,  # not on biases and norm weights (Megatron's param groups)
                adam_beta1=0.9,
                adam_beta2=0.98,
                adam_eps=1.0e-5,
                sgd_momentum=0.9,
                clip_grad=placeholder(float),  # null: policy.max_grad_norm; 0: no clipping
            ),
            scheduler=dict(
                lr_decay_style="constant",  # constant, linear, cosine, inverse-square-root, WSD
                lr_decay_iters=placeholder(int),  # null: the run's number of steps
                lr_warmup_iters=50,
                lr_warmup_fraction=placeholder(float),  # of lr_decay_iters, instead of lr_warmup_iters
                lr_warmup_init=4.9999e-6,
                lr_wsd_decay_style="exponential",  # WSD: exponential, linear, cosine, minus_sqrt
                lr_wsd_decay_iters=placeholder(int),  # WSD; null: lr_decay_iters
                start_weight_decay=placeholder(float),  # null: optimizer.weight_decay
                end_weight_decay=placeholder(float),  # null: optimizer.weight_decay
                weight_decay_incr_style="constant",  # constant, linear, cosine
            ),
            # LoRA with enabled: true above, NeMo RL's Megatron keys (Megatron module names:
            # linear_qkv, linear_proj, linear_fc1, linear_fc2, output_layer).
            peft=dict(
                enabled=False,
                target_modules=[],  # empty: linear_qkv, linear_proj, linear_fc1, linear_fc2
                exclude_modules=[],
                dim=8,
                alpha=32,
                dropout=0.0,
                dropout_position="post",
                lora_A_init_method="xavier",  # or "uniform"
                lora_B_init_method="zero",  # the only choice
                a2a_experimental=False,  # Megatron's all-to-all strategy: listed as ignored when true
                lora_dtype=placeholder(str),  # null / "float32": adapters are always float32 here
            ),
            # FP8 matmuls in the projection layers (maps to jax_cfg.fp8 / fp8_recipe when those are null).
            fp8_cfg=dict(
                enabled=False,
                fp8="e4m3",  # "e4m3" (forward and gradients) or "hybrid" (e5m2 gradients)
                fp8_recipe="blockwise",  # jax_sft takes "tensorwise" or "delayed" (per-tensor scales)
                fp8_param=False,  # FP8 weight storage: not supported (master weights stay float32)
            ),
        )
    )
    return c


def _jax_cfg() -> ConfigDict:
    """policy.jax_cfg.*: jax_sft's own keys (mesh, dtypes, kernels, memory)."""
    c = ConfigDict(
        dict(
            mesh=dict(
                data=placeholder(int),  # replicas (HSDP); null: dtensor_cfg.dp_replicate_size
                fsdp=-1,  # -1: every device left after data, expert, context and tensor
                tensor=placeholder(int),  # null: dtensor_cfg.tensor_parallel_size
                expert=placeholder(int),  # null: dtensor_cfg.expert_parallel_size; shards MoE experts
                # Splits every row's sequence (long context; README "Long context"); null:
                # dtensor_cfg.context_parallel_size, or megatron_cfg's with Megatron enabled.
                context=placeholder(int),
            ),
            # Attention across mesh.context > 1: "ring" (K/V passed around the axis), "all_gather"
            # (K/V gathered once), "auto" (all_gather when kv_heads x context <= q heads, else ring).
            context_attention="auto",
            param_dtype="float32",  # master weights; compute dtype comes from policy.precision
            attention="auto",  # "auto", "xla" or "cudnn" (GPU flash attention, padded and packed rows)
            max_segments_per_row=64,  # packed rows, cudnn: static bound on sequences per row
            # "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable";
            # null: "full" if dtensor_cfg.activation_checkpointing else "none".
            remat=placeholder(str),
            scan_layers=False,  # true: one lax.scan over stacked layers (compile time flat in depth)
            loss_chunk_size=1024,  # tokens per chunk of the fp32 log-softmax
            # FP8 matmuls in the attention and MLP projections (jax_sft/models/fp8.py): "none", "hybrid"
            # (e4m3 forward, e5m2 gradients) or "e4m3"; null: megatron_cfg.fp8_cfg.fp8 when it is enabled.
            fp8=placeholder(str),
            # "delayed" (scales from an amax history) or "tensorwise" (current scaling); null:
            # megatron_cfg.fp8_cfg.fp8_recipe when it is enabled, else "delayed".
            fp8_recipe=placeholder(str),
            fp8_amax_history=1,  # delayed scaling: steps of amax history (Megatron's default: 1)
            compilation_cache_dir=placeholder(str),
        )
    )
    return c


def _data() -> ConfigDict:
    """data.*: both of NeMo RL's layouts plus jax_sft's pipeline keys."""
    c = ConfigDict(
        dict(
            max_input_seq_length=placeholder(int),  # null: policy.max_total_sequence_length
            add_bos=True,
            add_eos=True,
            add_generation_prompt=False,
            shuffle=True,
            # Today's layout (NeMo RL since 2026-01): data.train / data.validation = one dataset section
            # {dataset_name, data_path, split, ...} or a list of them, data.default = keys every section
            # lacks. When data.train is set it is used and the flat keys below must stay at their defaults.
            # See jax_sft/data/sections.py for the keys each dataset takes.
            train=placeholder(object),
            validation=placeholder(object),
            default=placeholder(object),
            # The guide's flat layout (used when data.train is null). null: the dataset's own default.
            dataset_name="squad",
            prompt_file=placeholder(str),
            system_prompt_file=placeholder(str),
            train_data_path=placeholder(str),
            val_data_path=placeholder(str),
            input_key=FieldReference("input", field_type=str),
            output_key=placeholder(str),  # null: "output" (OpenMathInstruct-2: "generated_solution")
            train_split=placeholder(str),
            val_split=placeholder(str),
            chat_key=FieldReference("messages", field_type=str),
            system_key=placeholder(str),
            system_prompt=placeholder(str),
            tool_key=FieldReference("tools", field_type=str),
            use_preserving_dataset=FieldReference(False, field_type=bool),
            # OpenMathInstruct-2 / open_assistant: the hub split, and the validation carve-out.
            split=placeholder(str),  # null: the dataset's default ("train_1M" for OpenMathInstruct-2)
            test_size=placeholder(float),  # null: the dataset's default (0.05)
            seed=placeholder(int),  # null: 42
            # jax_sft's own keys.
            overlength="mask",  # "truncate", "drop" or "mask" (NeMo RL: kept, no loss)
            skip_examples_without_loss=False,  # false: a conversation with no loss token is an error
            num_workers=0,  # Grain worker processes for templating/tokenising (0: in-process)
            # "lazy": each step's examples are templated and tokenised when the step is assembled (start-up
            # and memory independent of the dataset's size; a bad row fails when reached, or before training
            # with --validate_data). "upfront": this process's shards are tokenised at start-up.
            tokenize="lazy",
            # With a `weight` on every data.train entry: what the weights share out, "examples" (sequences)
            # or "tokens"; without weights the train datasets are concatenated.
            mixture_by="examples",
        )
    )
    return c


def _logger() -> ConfigDict:
    """logger.*: the metric sinks."""
    c = ConfigDict(
        dict(
            log_dir="logs",  # each run gets log_dir/exp_NNN
            wandb_enabled=False,
            tensorboard_enabled=True,
            mlflow_enabled=False,
            monitor_gpus=True,
            num_val_samples_to_print=0,
            wandb=dict(project="sft-dev", name="sft-dev"),
            tensorboard=dict(log_dir=placeholder(str)),
            mlflow=dict(experiment_name="sft-dev", run_name="sft-dev", tracking_uri=placeholder(str)),
            gpu_monitoring=dict(collection_interval=10, flush_interval=10),
        )
    )
    return c
