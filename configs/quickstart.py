"""The offline quickstart's run (see `python -m jax_sft.quickstart`, which makes its assets).

A tiny Llama-architecture model learns single-digit arithmetic from a synthetic chat dataset on
the CPU in about a minute. The paths below are those `jax_sft.quickstart` writes under `.quickstart/`; it passes
them again as overrides when another `--out` folder is used.
"""

from jax_sft.config import default_config


def get_config():
    c = default_config()
    # Measured (README): a 2-layer model learns faster than a 4-layer one here, at half the cost
    # per step; rows of 32 tokens hold every conversation (at most 31 with eos), so no compute
    # goes to padding beyond that.
    c.sft.max_num_steps = 400
    c.sft.max_num_epochs = 4
    c.sft.val_period = 100
    c.sft.val_batches = 2
    c.sft.val_global_batch_size = 64
    c.sft.val_micro_batch_size = 64
    c.sft.val_at_end = True

    c.policy.model_name = ".quickstart/model"
    c.policy.tokenizer.chat_template = "default"  # the tokenizer's own (Llama-3 style)
    c.policy.train_global_batch_size = 64
    c.policy.train_micro_batch_size = 64
    c.policy.max_total_sequence_length = 32
    c.policy.precision = "float32"
    c.policy.optimizer.kwargs.lr = 3e-3
    c.policy.optimizer.kwargs.weight_decay = 0.0
    c.policy.scheduler = [
        {
            "name": "torch.optim.lr_scheduler.LinearLR",
            "kwargs": {"start_factor": 0.1, "end_factor": 1.0, "total_iters": 20},
        },
        {"name": "torch.optim.lr_scheduler.CosineAnnealingLR", "kwargs": {"T_max": 380, "eta_min": 3e-4}},
        {"milestones": [20]},
    ]
    c.policy.jax_cfg.loss_chunk_size = 32

    # 8,000 conversations seen over 3 epochs: tokenising them once at start-up costs less CPU than the
    # default (lazy: each step encodes its own), and gives the same batches.
    c.data.tokenize = "upfront"
    c.data.dataset_name = "openai_format"
    c.data.train_data_path = ".quickstart/data/train.jsonl"
    c.data.val_data_path = ".quickstart/data/val.jsonl"

    c.checkpointing.checkpoint_dir = ".quickstart/checkpoints"
    c.checkpointing.save_period = 200
    c.checkpointing.hf_export_dir = ".quickstart/export"
    c.logger.log_dir = ".quickstart/logs"
    c.logger.tensorboard_enabled = True
    return c
