"""Offline quickstart: make a tiny model, tokenizer and chat dataset, then train, all on the CPU.

    python -m jax_sft.quickstart [--out .quickstart] [--config.a.b=v ...]

Everything is made here, with no network: a synthetic arithmetic chat dataset (jsonl, OpenAI
message format), a byte-level BPE tokenizer trained on it with a Llama-3-style chat template,
and a small Llama-architecture model initialised from a config and written in Hugging Face
format by `jax_sft.models.save_pretrained`. The run itself is the ordinary trainer with
`configs/quickstart.py`; overrides after the flags go to it. It ends with the validation
accuracy of the exported model's greedy answers (`jax_sft.generate`) and three of them next to
their references, and the time it took.

Example:
    python -m jax_sft.quickstart --config.sft.max_num_steps=100
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MAX_OPERAND = 9  # single digits: 3 ops x 10 x 10 = 300 facts, learnt in a few hundred steps
MODEL_SIZE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)


def _example(rng: random.Random, max_operand: int = MAX_OPERAND) -> dict:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op, word, value = rng.choice([("+", "plus", a + b), ("-", "minus", a - b), ("*", "times", a * b)])
    question = rng.choice([f"What is {a} {word} {b}?", f"Compute {a} {op} {b}.", f"{a} {op} {b} = ?"])
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"{a} {op} {b} = {value}."},
        ]
    }


def make_dataset(
    out: Path, *, train: int = 8000, val: int = 256, seed: int = 0, max_operand: int = MAX_OPERAND
) -> None:
    rng = random.Random(seed)
    for name, n in (("train.jsonl", train), ("val.jsonl", val)):
        with open(out / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps(_example(rng, max_operand)) + "\n")


def make_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, with the Llama-3-style CHAT_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [  # one token per digit: arithmetic is learnable
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_model(out: Path, tokenizer, seed: int = 0) -> None:
    import jax.numpy as jnp
    from flax import nnx

    from jax_sft.models import CausalLM, ModelConfig, save_pretrained

    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        **MODEL_SIZE,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32",
    }
    model = CausalLM(
        ModelConfig.from_hf_dict(hf_config), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed)
    )
    save_pretrained(model, out, tokenizer=tokenizer)


def make_assets(out: Path) -> Path:
    """Creates out/data (jsonl) and out/model (HF model + tokenizer) unless present; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    data, model_dir = out / "data", out / "model"
    if not (data / "val.jsonl").exists():
        data.mkdir(exist_ok=True)
        make_dataset(data)
    if not (model_dir / "config.json").exists():
        rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
        texts = [m["content"] for r in rows for m in r["messages"]] + ["user", "assistant", "system"] * 100
        tokenizer = make_tokenizer(texts)
        make_model(model_dir, tokenizer)
    return out


def show_samples(export_dir: Path, val_path: Path, *, shown: int = 3) -> float:
    """Greedy answers of the exported model to every validation question: prints the exact-match
    accuracy and the first `shown` answers with their references; returns the accuracy."""
    from jax_sft.generate import Generator, Sampling, format_samples, load_for_generation, read_conversations

    model, tokenizer, mesh, _ = load_for_generation(str(export_dir), ["policy.precision=float32"])
    rows = read_conversations(val_path)
    answers = Generator(model, tokenizer, mesh=mesh, batch_size=64).complete(
        [messages for messages, _ in rows], Sampling(max_new_tokens=16)
    )
    right = sum(a.strip() == ref.strip() for (_, ref), a in zip(rows, answers))
    print(f"\nvalidation: {right} of {len(rows)} answers exactly right ({100 * right / len(rows):.1f}%), greedy, e.g.:")
    print(format_samples(rows[:shown], answers[:shown]))
    print(f"more: python -m jax_sft.generate --model {export_dir} --input {val_path} --num 10")
    return right / len(rows)


def main(argv: list[str] | None = None) -> None:
    start = time.time()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m jax_sft.quickstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trainer options: see python -m jax_sft.train --help",
    )
    parser.add_argument("--out", default=".quickstart", help="folder for the made assets and the run")
    args, overrides = parser.parse_known_args(argv)
    out = make_assets(Path(args.out))
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"
    from jax_sft import train

    out = out.absolute()
    paths = {
        "policy.model_name": out / "model",
        "policy.tokenizer.name": out / "model",
        "data.train_data_path": out / "data" / "train.jsonl",
        "data.val_data_path": out / "data" / "val.jsonl",
        "checkpointing.checkpoint_dir": out / "checkpoints",
        "checkpointing.hf_export_dir": out / "export",
        "logger.log_dir": out / "logs",
    }
    result = train.main(["--config", str(config), *(f"--config.{k}={v}" for k, v in paths.items()), *overrides])
    if result is None or result.exit_code:
        return
    export = out / "export"
    if not (export / "config.json").is_file():
        print(f"no export at {export} (delete {out} to start over)")
        return
    show_samples(export, out / "data" / "val.jsonl")
    print(f"quickstart: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
