"""Validation during a run: the mean loss over the validation batches (NeMo RL's: summed NLL over
loss tokens), logged and printed, and `logger.num_val_samples_to_print` greedy completions."""

from __future__ import annotations

import time

from jax_sft.generate import format_samples, sample_conversations
from jax_sft.metrics import MetricsLogger
from jax_sft.models import attention as attention_lib
from jax_sft.trainer.setup import Run, to_global


class Validator:
    """Validates a set-up `Run`: `validate(step)` -> the loss; `losses` by step; `last` the
    newest as checkpoints record it ({"val:val_loss": ...})."""

    def __init__(self, run: Run, logger: MetricsLogger):
        self.run, self.logger = run, logger
        self.losses: dict[int, float] = {}
        self.last: dict[str, float] = {}

    def validate(self, step: int) -> float:
        r = self.run
        if r.data.num_val_examples == 0:  # no validation data: skipped, as NeMo RL does
            return float("nan")
        t0 = time.time()
        nll, tokens = 0.0, 0.0
        for mb in r.data.val_batches():
            if r.check_rows:
                attention_lib.check_packed_rows(mb["segment_ids"], r.plan.model.options.max_segments)
            n, t = r.fns.eval_step(r.state.params, r.state.fp8, r.frozen, to_global(mb, r.batch_sharding))
            nll, tokens = nll + float(n), tokens + float(t)
        val_loss = nll / max(tokens, 1.0)
        metrics = {"validation/val_loss": val_loss, "timing/validation/total_validation_time": time.time() - t0}
        self.logger.log(metrics, step)
        self.logger.write(f"step {step}: val_loss {val_loss:.4f} over {int(tokens)} tokens")
        if r.plan.config.logger.num_val_samples_to_print:
            self.samples(step)
        self.losses[step] = val_loss
        self.last.clear()
        self.last.update({"val:val_loss": val_loss})
        return val_loss

    def samples(self, step: int) -> None:
        """logger.num_val_samples_to_print greedy completions of the first validation conversations,
        printed and logged as text (TensorBoard, W&B, MLflow)."""
        r, cfg = self.run, self.run.plan.config
        rows = r.data.dataset.formatted_ds["validation"]
        rows = [rows[i] for i in range(min(int(cfg.logger.num_val_samples_to_print), len(rows)))]
        if not rows:
            return
        samples = sample_conversations(
            r.model(),
            r.tokenizer,
            rows,
            mesh=r.mesh,
            max_new_tokens=r.plan.batch.max_total_length,
            add_bos=bool(cfg.data.add_bos),
            template_kwargs=cfg.policy.tokenizer.get("chat_template_kwargs"),
        )
        text = format_samples([(s["prompt"], s["reference"]) for s in samples], [s["completion"] for s in samples])
        self.logger.write(f"step {step}: validation samples\n{text}")
        self.logger.log_text("validation/samples", text, step)
