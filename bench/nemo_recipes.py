"""Every SFT config of a NeMo RL checkout, run as it is on 8 CPU devices: only the model (a tiny
random one of the config's family), the data location, the sizes and the output folders are
overridden. Prints one row per config: its family, exit code, and the losses of its steps (or the
one `error:` line a config that jax_sft refuses gets).

    python bench/nemo_recipes.py                                  # ../shared/reference/nemo-rl-configs
    python bench/nemo_recipes.py --nemo-rl ~/RL --only llama --steps 3

Run from anywhere: it works in a scratch folder shaped like a NeMo RL checkout (the recipes'
relative `examples/prompts/math.txt`), as a NeMo RL user runs from theirs. The datasets are local
jsonl files with the hub datasets' columns (squad, OpenMathInstruct-2, tulu-3 / Nemotron-Cascade
messages), made from the quickstart's arithmetic conversations."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from jax_sft import train  # noqa: E402
from jax_sft.config import IgnoredKeysWarning, load_config  # noqa: E402
from jax_sft.errors import InputError  # noqa: E402
from jax_sft.models import CausalLM, ModelConfig, save_pretrained  # noqa: E402
from jax_sft.quickstart import make_dataset, make_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_NEMO_RL = ROOT.parent / "shared" / "reference" / "nemo-rl-configs"

# 8 query and 8 key/value heads: every tensor size of the recipes (up to 8) divides them.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8)
# family: (the model_name substrings that pick it, its transformers config class, what it adds to TINY)
FAMILIES = {
    "llama": (("llama",), transformers.LlamaConfig, dict(rope_theta=500000.0, tie_word_embeddings=True)),
    "qwen2": (("qwen2",), transformers.Qwen2Config, dict(rope_theta=1000000.0)),
    "qwen3": (("qwen3",), transformers.Qwen3Config, dict(head_dim=16, rope_theta=1000000.0)),
    "gpt_oss": (
        ("gpt-oss",),
        transformers.GptOssConfig,
        dict(
            head_dim=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=32,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            output_router_logits=False,
        ),
    ),
    "nemotron_h": (
        ("nemotron",),
        transformers.NemotronHConfig,
        dict(
            hybrid_override_pattern="M*-E",
            head_dim=16,
            mamba_num_heads=8,
            mamba_head_dim=8,
            n_groups=2,
            ssm_state_size=8,
            chunk_size=8,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=48,
            n_group=2,
            topk_group=1,
        ),
    ),
}
# The hub datasets of NeMo RL's SFT configs (names lowercased, letters and digits only): the local
# file that has their columns.
DATA_FILES = {
    "squad": "squad_{split}.jsonl",
    "openmathinstruct2": "omi2.jsonl",
    "tulu3sftmixture": "messages.jsonl",
    "nemotroncascade2sftmath": "messages.jsonl",
}
SIZES = {
    "cluster.num_nodes": 1,
    "cluster.gpus_per_node": 8,
    "sft.max_num_steps": 2,
    "sft.val_batches": 1,
    "sft.val_global_batch_size": 8,
    "sft.val_micro_batch_size": 1,
    "policy.train_global_batch_size": 8,
    "policy.train_micro_batch_size": 1,
    "policy.max_total_sequence_length": 128,
    "data.num_workers": 0,
}


def make_assets(out: Path) -> Path:
    """out/examples/prompts/math.txt, out/data/*.jsonl (DATA_FILES) and out/models/<family>."""
    (out / "examples" / "prompts").mkdir(parents=True)
    (out / "examples" / "prompts" / "math.txt").write_text("Solve the following math problem.\n\n{}")
    data = out / "data"
    data.mkdir()
    make_dataset(data, train=256, val=32)
    splits = {s: [json.loads(line)["messages"] for line in (data / f"{s}.jsonl").open()] for s in ("train", "val")}
    write = lambda name, rows: (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    for split, rows in splits.items():
        write(f"squad_{split}.jsonl", [_squad(r) for r in rows])
    write("omi2.jsonl", [_omi2(r) for r in splits["train"]])
    write("messages.jsonl", [{"messages": r} for r in splits["train"]])
    tokenizer = make_tokenizer([m["content"] for r in splits["train"] for m in r], vocab_size=320)
    for family, (_, config_cls, extra) in FAMILIES.items():
        hf = config_cls(**{**TINY, **extra, "vocab_size": len(tokenizer)}).to_dict()
        hf.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, torch_dtype="float32")
        hf["architectures"] = [config_cls.__name__.replace("Config", "ForCausalLM")]
        model = CausalLM(ModelConfig.from_hf_dict(hf), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        save_pretrained(model, out / "models" / family, tokenizer=tokenizer)
    return out


def _squad(messages: list[dict]) -> dict:
    return {
        "context": "Arithmetic.",
        "question": messages[-2]["content"],
        "answers": {"text": [messages[-1]["content"]]},
    }


def _omi2(messages: list[dict]) -> dict:
    return {"problem": messages[-2]["content"], "generated_solution": messages[-1]["content"], "expected_answer": ""}


def family_of(model_name: str) -> str | None:
    name = model_name.lower()
    return next((f for f, (keys, _, _) in FAMILIES.items() if any(k in name for k in keys)), None)


def overrides(cfg, assets: Path, out: Path, steps: int) -> list[str]:
    """The model, data location, sizes and output folders of `cfg` (the config as written)."""
    family = family_of(cfg.policy.model_name)
    changes = {**SIZES, "sft.max_num_steps": steps}
    changes["policy.model_name"] = assets / "models" / family
    if cfg.policy.tokenizer.get("name"):
        changes["policy.tokenizer.name"] = assets / "models" / family
    for section in ("train", "validation"):
        entry = cfg.data.get(section)
        name = "".join(c for c in str(entry.get("dataset_name") if entry else "").lower() if c.isalnum())
        if name in DATA_FILES:
            split = "val" if section == "validation" else "train"
            changes[f"data.{section}.data_path"] = assets / "data" / DATA_FILES[name].format(split=split)
    changes.update(
        {
            "checkpointing.checkpoint_dir": out / "ckpt",
            "logger.log_dir": out / "logs",
            "logger.wandb_enabled": False,
            "logger.tensorboard_enabled": False,
            "logger.monitor_gpus": False,
        }
    )
    return [f"{k}={v}" for k, v in changes.items()]


def run_one(path: Path, assets: Path, out: Path, steps: int) -> dict:
    """{config, family, exit, losses or error, seconds}: the config as written, then with overrides."""
    row, start = {"config": path.name, "family": "-"}, time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        try:
            cfg = load_config(path, [])
            row["family"] = family_of(cfg.policy.model_name) or f"none for {cfg.policy.model_name}"
            if row["family"] not in FAMILIES:
                return {**row, "exit": "-", "error": "no tiny model of this family in the bench"}
            result = train.run(load_config(path, overrides(cfg, assets, out, steps)))
        except InputError as e:
            return {**row, "exit": 2, "error": " ".join(str(e).replace(str(path), path.name).split())}
    losses = [result.train_losses[s] for s in sorted(result.train_losses)]
    return {**row, "exit": result.exit_code, "losses": losses, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nemo-rl", type=Path, default=DEFAULT_NEMO_RL, help="a NeMo RL checkout (its examples/configs)")
    p.add_argument("--only", default="", help="configs whose file name contains this")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="a scratch folder (default: a temporary one)")
    args = p.parse_args(argv)
    configs = args.nemo_rl / "examples" / "configs"
    paths = sorted(configs.glob("sft*.yaml")) + sorted((configs / "recipes" / "llm").glob("sft*.yaml"))
    paths = [q for q in paths if args.only in q.name]
    if not paths:
        print(f"error: no SFT configs under {configs} (matching {args.only!r})", file=sys.stderr)
        return 2
    scratch = args.out or Path(tempfile.mkdtemp(prefix="jax_sft_recipes_"))
    assets = make_assets(scratch / "checkout")
    os.chdir(assets)  # relative prompt files resolve as in a NeMo RL checkout
    rows = [run_one(q, assets, scratch / "runs" / q.stem, args.steps) for q in paths]
    print(f"\n| config | family | exit | {' | '.join(f'loss step {s + 1}' for s in range(args.steps))} | s |")
    print("| --- | --- | --: |" + " --: |" * args.steps + " --: |")
    for r in rows:
        if "losses" in r:
            losses = " | ".join(f"{x:.4f}" for x in r["losses"])
            print(f"| {r['config']} | {r['family']} | {r['exit']} | {losses} | {r['seconds']:.0f} |")
        else:
            print(f"| {r['config']} | {r['family']} | {r['exit']} | error: {r['error']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
