"""Sample completions from a checkpoint, an export or any Hugging Face model, with a KV cache.

    python -m jax_sft.generate --model results/sft/step_60 --prompt "What is 2 plus 2?"
    python -m jax_sft.generate --model hf_model --input val.jsonl --output samples.jsonl --num 20
    echo "Tell me a joke." | python -m jax_sft.generate --model Qwen/Qwen3-0.6B --temperature 0.7
    python -m jax_sft.generate --model hf_model --prompt Hi --config.policy.precision=float32 \\
        --config.policy.jax_cfg.mesh.tensor=2

--model: a `step_N` folder of a jax_sft run (weights, tokenizer and config from the checkpoint),
an HF folder (an export) or a hub id. Prompts: `--prompt` (repeatable), `--input` a jsonl of
conversations ({"messages": [...]}, OpenAI format; a final assistant turn is dropped from the
prompt and kept as the reference), else one prompt per line of stdin. Each prompt goes through
the tokenizer's chat template with add_generation_prompt. Decoding: greedy by default
(`--temperature 0`), else sampling with `--temperature`, `--top_k` (0: off) and `--top_p`;
`--max_new_tokens`; a row stops at the template's end-of-turn token or an eos id.

Overrides in the trainer's syntax (`--config.a.b=v` or `a.b=v`) set policy.precision (compute dtype;
a checkpoint's own by default, else bfloat16), policy.jax_cfg.mesh.* / attention,
cluster.gpus_per_node (default: all local devices) and policy.tokenizer.chat_template. The model is
sharded as in training (fsdp over the devices by default); prompts are batched (`--batch_size` rows,
a multiple of the data-parallel size), each batch right-padded to a power of two (>= 16) so that a
few shapes compile: one jitted function runs the prefill and the whole decode loop.

Output: the prompts and completions on the console, or with `--output` a jsonl of
{"prompt": [messages], "reference": text or null, "completion": text}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_sft.errors import DataError, MissingFileError, UsageError, exit_on_input_error

MIN_BUCKET = 16  # > 1: a prefill is never taken for a one-token decode step (kv_cache.py)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy when temperature == 0; top_k 0 = off."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0: greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0: off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise UsageError(f"--{name}={getattr(self, name)}: expected {expected}")


# ----------------------------------------------------------------------------- jitted core


def sample_next(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """[b, vocab] fp32 logits -> [b] int32 tokens (HF's order: temperature, top-k, top-p)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.float32(sampling.temperature)
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < sampling.top_p  # the most likely token is always kept
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "sampling"))
def generate_ids(graphdef, params, cache, rest, input_ids, lengths, active, stop_ids, key, *, sampling: Sampling):
    """Prefill right-padded prompts [b, P] of `lengths` [b], then decode up to max_new_tokens;
    rows with `active` [b] false (batch filler) count as finished from the start.

    Returns (tokens [b, max_new_tokens] int32, count [b]): row r generated tokens[r, :count[r]],
    the last of which is a stop id unless the row ran out of tokens; later entries are 0.
    `cache` is the empty `nnx.Cache` state of a model with `kv_cache.attach`ed caches of
    P + max_new_tokens slots.
    """
    from jax_sft.models import kv_cache

    model = nnx.merge(graphdef, params, kv_cache.set_prompt_lengths(cache, lengths), rest)
    b, p = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    hidden = model.hidden_states(input_ids, positions)
    last = hidden[jnp.arange(b), lengths - 1]  # [b, hidden]
    key, sub = jax.random.split(key)
    token = sample_next(model.unembed(last), sub, sampling)
    cache = kv_cache.set_lengths(nnx.state(model, nnx.Cache), lengths)
    n = sampling.max_new_tokens
    out = jnp.zeros((b, n), jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, stop_ids) | ~active

    def cond(carry):
        t, _, _, _, done, _ = carry
        return (t < n) & ~jnp.all(done)

    def body(carry):
        t, token, cache, out, done, key = carry
        model = nnx.merge(graphdef, params, cache, rest)
        hidden = model.hidden_states(token[:, None], (lengths + t - 1)[:, None])
        key, sub = jax.random.split(key)
        new = sample_next(model.unembed(hidden[:, 0]), sub, sampling)
        new = jnp.where(done, 0, new)
        out = out.at[:, t].set(new)
        return t + 1, new, nnx.state(model, nnx.Cache), out, done | jnp.isin(new, stop_ids), key

    t, _, _, out, done, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, out, done, key))
    is_stop = jnp.isin(out, stop_ids) & (jnp.arange(n)[None] < t)
    first_stop = jnp.where(is_stop.any(-1), jnp.argmax(is_stop, axis=-1) + 1, t)
    return out, first_stop


# ----------------------------------------------------------------------------- batching


def bucket(length: int) -> int:
    """The padded prompt length: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length())


class Generator:
    """Batched generation from an nnx `CausalLM` (sharded or not) and its tokenizer.

    `complete(conversations)` -> completion texts; `generate(prompt_ids)` -> token id lists.
    Rows per batch: `batch_size` rounded up to a multiple of the mesh's data-parallel size.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        mesh: jax.sharding.Mesh | None = None,
        batch_size: int = 8,
        stop_ids: Sequence[int] | None = None,
        add_bos: bool = True,
        template_kwargs: dict | None = None,
    ):
        from jax_sft.models import sharding as sharding_lib

        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        if model.remat != "none":  # no gradients here; the caches are written in the plain layer call
            model.options = dataclasses.replace(model.options, remat="none")
        dp = 1 if mesh is None else sharding_lib.dp_size(mesh)
        self.batch_size = -(-max(batch_size, 1) // dp) * dp
        self.batch_sharding = None if mesh is None else sharding_lib.batch_sharding(mesh)
        self.stop_ids = sorted(set(stop_token_ids(tokenizer, model.config) if stop_ids is None else stop_ids))
        pad = getattr(tokenizer, "pad_token_id", None)  # tokenizer None: token ids in and out only
        self.pad_id = pad if pad is not None else 0
        self.add_bos, self.template_kwargs = add_bos, dict(template_kwargs or {})

    def prompt_ids(self, messages: list[dict], tools: Any = None) -> list[int]:
        """The chat template's prompt with add_generation_prompt, tokenised as training does
        (no special tokens added by the tokenizer; bos put first when missing, as data.add_bos)."""
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True, **self.template_kwargs
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token is not None else None
        if self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def complete(
        self, conversations: Sequence[list[dict]], sampling: Sampling, seed: int = 0, tools: Sequence[Any] | None = None
    ) -> list[str]:
        tools = tools or [None] * len(conversations)
        ids = self.generate([self.prompt_ids(m, t) for m, t in zip(conversations, tools)], sampling, seed)
        stops = set(self.stop_ids)
        return [self.tokenizer.decode([t for t in row if t not in stops], skip_special_tokens=True) for row in ids]

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int = 0) -> list[list[int]]:
        """Generated ids per prompt (stop token included when reached), in the order given."""
        limit = self.model.config.max_position_embeddings
        for i, p in enumerate(prompts):
            if not p:
                raise DataError(f"prompt {i + 1} is empty after the chat template")
            if limit and len(p) + sampling.max_new_tokens > limit:
                raise UsageError(
                    f"prompt {i + 1} has {len(p)} tokens; with --max_new_tokens={sampling.max_new_tokens} it "
                    f"exceeds the model's max_position_embeddings={limit}; lower --max_new_tokens"
                )
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
        results: list[list[int]] = [[] for _ in prompts]
        key = jax.random.key(seed)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            key, sub = jax.random.split(key)
            for i, row in zip(chunk, self._batch([prompts[i] for i in chunk], sampling, sub)):
                results[i] = row
        return results

    def _batch(self, prompts: list[Sequence[int]], sampling: Sampling, key) -> list[list[int]]:
        from jax_sft.models import kv_cache

        b, p = self.batch_size, bucket(max(len(x) for x in prompts))
        ids = np.full((b, p), self.pad_id, np.int32)
        lengths = np.ones((b,), np.int32)  # filler rows: one pad token, inactive
        for r, x in enumerate(prompts):
            ids[r, : len(x)], lengths[r] = x, len(x)
        active = np.arange(b) < len(prompts)
        if self.mesh is None:
            put = put_vector = jnp.asarray
        else:
            vector = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.batch_sharding.spec[0]))
            put = lambda x: jax.device_put(x, self.batch_sharding)  # noqa: E731
            put_vector = lambda x: jax.device_put(x, vector)  # noqa: E731
        kv_cache.attach(self.model, b, p + sampling.max_new_tokens, self.mesh)
        try:
            graphdef, params, cache, rest = nnx.split(self.model, nnx.Param, nnx.Cache, ...)
        finally:
            kv_cache.detach(self.model)
        out, count = generate_ids(
            graphdef,
            params,
            cache,
            rest,
            put(ids),
            put_vector(lengths),
            put_vector(active),
            jnp.asarray(self.stop_ids or [-1], jnp.int32),
            key,
            sampling=sampling,
        )
        out, count = np.asarray(out), np.asarray(count)
        return [out[r, : count[r]].tolist() for r in range(len(prompts))]


def stop_token_ids(tokenizer, model_config) -> list[int]:
    """The eos ids (generation_config.json, the tokenizer) and the chat template's end-of-turn
    token: the special token the template puts right after an assistant message."""
    ids = set()
    if model_config.generation_config_json:
        eos = json.loads(model_config.generation_config_json).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    end = end_of_turn_id(tokenizer)
    if end is not None:
        ids.add(end)
    return sorted(ids)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token right after the assistant's content in the rendered template, if any."""
    if not tokenizer.chat_template:
        return None
    marker = "XyZzY 42"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    cut = text.rfind(marker)
    if cut < 0:
        return None
    rest = tokenizer(text[cut + len(marker) :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    return rest[0] if rest and rest[0] in special else None


def sample_conversations(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    mesh=None,
    max_new_tokens: int = 256,
    add_bos: bool = True,
    template_kwargs: dict | None = None,
) -> list[dict[str, Any]]:
    """Greedy completions of dataset rows ({"messages": [...], "tools"?: ...}; a final assistant
    message is the reference): [{"prompt": messages, "reference": ..., "completion": ...}]."""
    prompts = [split_reference(list(r["messages"])) for r in rows]
    gen = Generator(model, tokenizer, mesh=mesh, batch_size=len(rows), add_bos=add_bos, template_kwargs=template_kwargs)
    completions = gen.complete(
        [m for m, _ in prompts], Sampling(max_new_tokens=max_new_tokens), tools=[r.get("tools") for r in rows]
    )
    return [{"prompt": m, "reference": ref, "completion": c} for (m, ref), c in zip(prompts, completions)]


# ----------------------------------------------------------------------------- inputs


def read_conversations(path: str | Path) -> list[tuple[list[dict], str | None]]:
    """A jsonl of {"messages": [...]} -> (prompt messages, reference or None) per line; a final
    assistant message is the reference and is left out of the prompt."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--input {path}: no such file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        ):
            raise DataError(f'{path}:{n}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        out.append(split_reference(messages))
    return out


def split_reference(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(prompt messages, the final assistant message's content or None)."""
    if messages[-1]["role"] == "assistant":
        return list(messages[:-1]), messages[-1]["content"]
    return list(messages), None


# ----------------------------------------------------------------------------- loading


def load_for_generation(source: str, overrides: Sequence[str]):
    """-> (model, tokenizer, mesh, cfg): a step_N checkpoint or an HF folder / hub id, sharded over
    a mesh of all local devices (or of `cluster.*` when the overrides set it). `cfg`: the defaults,
    the checkpoint's precision, attention and scan_layers (its parameter layout), then `overrides`."""
    from jax_sft import checkpoint, distributed  # noqa: PLC0415
    from jax_sft import config as config_lib  # noqa: PLC0415
    from jax_sft.config import plan as plan_lib  # noqa: PLC0415
    from jax_sft.models import sharding as sharding_lib  # noqa: PLC0415

    step_dir = Path(source)
    is_checkpoint = checkpoint.looks_like_checkpoint(step_dir)
    inherited = []
    if is_checkpoint:
        step_dir = checkpoint.complete_step_dir(step_dir)  # every file it lists, before any is read
        saved = checkpoint.extra_path(step_dir, checkpoint.CONFIG_FILE)
        if not saved.is_file():
            raise MissingFileError(f"{saved}: missing; {step_dir} is not a complete jax_sft checkpoint")
        trained = config_lib.load_config(str(saved))
        inherited = [
            f"policy.precision={trained.policy.precision}",
            f"policy.jax_cfg.attention={trained.policy.jax_cfg.attention}",
            f"policy.jax_cfg.scan_layers={str(bool(trained.policy.jax_cfg.scan_layers)).lower()}",
        ]
    cfg = config_lib.load_config(None, [*inherited, *overrides])
    cluster_set = any(o.lstrip("+~").startswith("cluster.") for o in overrides)
    devices = distributed.select_devices(cfg.cluster) if cluster_set else jax.devices()
    m = plan_lib.mesh_plan(cfg, len(devices))
    # Generation attends within whole rows: a context axis of the config serves as more fsdp.
    mesh = sharding_lib.make_mesh(m.data, m.fsdp * m.context, m.tensor, devices=devices, expert=m.expert)
    # Inference: the weights in the compute dtype, no LoRA of the trained run (an export merges it).
    options = plan_lib.model_options(cfg)
    options = dataclasses.replace(options, param_dtype=options.dtype, remat="none", lora=None, fp8=None)
    if is_checkpoint:
        model = _restore_checkpoint(step_dir, mesh, options)
        tokenizer_dir = checkpoint.extra_path(step_dir, checkpoint.TOKENIZER_DIR)
    else:
        from jax_sft.models import from_pretrained  # noqa: PLC0415
        from jax_sft.models.hf_read import resolve_model_dir  # noqa: PLC0415

        try:
            model_dir = resolve_model_dir(source)
        except FileNotFoundError as e:
            raise MissingFileError(
                f"--model {e}; expected a step_N checkpoint folder, an HF model folder or a hub id"
            ) from None
        model = from_pretrained(model_dir, options, mesh=mesh)
        tokenizer_dir = model_dir
    tokenizer = _tokenizer(tokenizer_dir, cfg, overrides)
    return model, tokenizer, mesh, cfg


def _restore_checkpoint(step_dir: Path, mesh, options):
    """The CausalLM of a step_N folder, parameters restored straight into their shardings."""
    from jax_sft.checkpoint import restore_params, saved_model_config  # noqa: PLC0415
    from jax_sft.models import CausalLM, ModelConfig  # noqa: PLC0415
    from jax_sft.models import sharding as sharding_lib  # noqa: PLC0415

    hf_config, source, generation = saved_model_config(step_dir)
    config = ModelConfig.from_hf_dict(hf_config, source=source)
    if generation is not None:
        config = dataclasses.replace(config, generation_config_json=generation)
    abstract = nnx.eval_shape(lambda: CausalLM(config, options, rngs=nnx.Rngs(0), mesh=mesh))
    graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)
    shardings = sharding_lib.param_shardings(abs_params, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_params, shardings)
    return nnx.merge(graphdef, restore_params(step_dir, target, config.vocab_size), rest)


def _tokenizer(path: Path, cfg, overrides: Sequence[str]):
    """The saved tokenizer with its own chat template, unless the command line sets
    policy.tokenizer.chat_template / custom_template."""
    from jax_sft.data.chat import check_template, open_tokenizer, resolve_chat_template, template_key

    tokenizer = open_tokenizer(path)
    key = f"the chat template of the tokenizer in {path}"
    if any(
        o.lstrip("+~").startswith(("policy.tokenizer.chat_template", "policy.tokenizer.custom_template"))
        for o in overrides
    ):
        tokenizer.chat_template = resolve_chat_template(cfg.policy.tokenizer, tokenizer, str(path))
        key = template_key(cfg.policy.tokenizer)
    if not tokenizer.chat_template:
        raise UsageError(
            f"the tokenizer in {path} has no chat template; set "
            "--config.policy.tokenizer.chat_template to a Jinja template or a .jinja file"
        )
    check_template(tokenizer, key)
    return tokenizer


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m jax_sft.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", required=True, help="step_N checkpoint folder, HF model folder or hub id")
    ap.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    ap.add_argument("--input", help='jsonl of {"messages": [...]} conversations')
    ap.add_argument("--num", type=int, default=None, help="only the first N conversations of --input")
    ap.add_argument("--system", help="a system message before each --prompt / stdin prompt")
    ap.add_argument("--output", help="write a jsonl of prompt, reference, completion here")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--top_k", type=int, default=0, help="0: off")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=8)
    return ap


def _prompts(args) -> list[tuple[list[dict], str | None]]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.input:
        rows = read_conversations(args.input)
        return rows[: args.num] if args.num is not None else rows
    texts = args.prompt or [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise UsageError("no prompts: give --prompt TEXT, --input FILE.jsonl, or lines on stdin")
    return [([*system, {"role": "user", "content": t}], None) for t in texts]


def main(argv: Sequence[str] | None = None) -> None:
    exit_on_input_error(lambda: _main(list(sys.argv[1:] if argv is None else argv)))


def _main(argv: list[str]) -> None:
    from jax_sft import config as config_lib

    args, rest = parser().parse_known_args(argv)
    _, overrides, extra = config_lib.parse_args(rest)
    if extra:
        raise UsageError(f"unknown option(s) {sorted('--' + k for k in extra)}; see --help")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size={args.batch_size}: expected an integer >= 1 (prompts per batch)")
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    prompts = _prompts(args)
    model, tokenizer, mesh, cfg = load_for_generation(args.model, overrides)
    gen = Generator(model, tokenizer, mesh=mesh, batch_size=args.batch_size)
    exact = jax.default_matmul_precision("highest") if cfg.policy.precision == "float32" else contextlib.nullcontext()
    with exact:  # true fp32 matmuls for float32 (GPUs would use TF32), as training
        completions = gen.complete([m for m, _ in prompts], sampling, seed=args.seed)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for (messages, reference), completion in zip(prompts, completions):
                f.write(
                    json.dumps(
                        {"prompt": messages, "reference": reference, "completion": completion}, ensure_ascii=False
                    )
                    + "\n"
                )
        print(f"wrote {len(completions)} completions to {args.output}")
        return
    print(format_samples(prompts, completions))


def format_samples(prompts: Sequence[tuple[list[dict], str | None]], completions: Sequence[str]) -> str:
    """Console text: each prompt's last user message, the completion and the reference."""
    blocks = []
    for i, ((messages, reference), completion) in enumerate(zip(prompts, completions), 1):
        lines = [f"=== sample {i} ===", f"prompt:     {messages[-1]['content']}", f"completion: {completion}"]
        if reference is not None:
            lines.append(f"reference:  {reference}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


if __name__ == "__main__":
    main()
