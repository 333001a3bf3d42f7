"""Chat templates, token ids and loss masks.

The token ids of an example are the tokenizer's encoding of the whole rendered conversation, what
the model sees at inference; they are not a concatenation of separately tokenised messages. The
loss mask is computed on characters and mapped onto those tokens with the fast tokenizer's offsets.

How an assistant message is found in the full rendering F (one render of the whole conversation):

  * B_k, where message k starts in F, comes from rendering the first k messages, Q_k. Where Q_k is
    a prefix of F (prefix-preserving templates), B_k = len(Q_k). Where it is not, the template
    renders earlier messages differently when more messages follow (Qwen3 drops the reasoning of
    assistant turns before the last user turn and gives only the final turn
    `<think>\n\n</think>\n\n`). Such templates drop or change the start of a turn and keep its
    end, so Q_k is aligned to F as runs of equal text with pieces of Q_k that F lacks between
    them, and B_k is where F stands when Q_k is used up (`_boundary`).
  * A trained assistant message spans [B_a, B_{a+1}) with `data.add_generation_prompt=false`: its
    header is trained on, as in NeMo RL, where it sits in the assistant's chunk. With `true`, the
    span starts after the header: the generation prompt (the text `add_generation_prompt=True`
    appends to Q_a), matched into F as far as F agrees with it.
  * The span includes what the assistant emits after its header: reasoning that the template
    keeps, the content, tool calls and the end-of-turn token (`<|im_end|>`, `<|eot_id|>`). Whitespace
    the template writes after a special token that ends the span (Qwen's "\\n" after `<|im_end|>`)
    is not trained on: generation stops at the end-of-turn token, so the model never emits it.
  * Every span is checked to contain the end of its message's content (the text after an inline
    `</think>`, stripped); a template that renders a message so that it cannot be found is an error
    naming the example, never a silently wrong mask.

Tokens overlapping a span (even partly) are loss tokens. `add_bos` prepends the bos token when
the encoding does not already start with it; `add_eos` appends eos when the rendering, trailing
whitespace aside, does not already end with it (a loss token when the conversation ends with a
trained assistant message). `sft.only_unmask_final`: only the final message is trained, if it is
the assistant's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from jax_sft.errors import DataError, MissingFileError

log = logging.getLogger(__name__)

__all__ = [
    "PASSTHROUGH_TEMPLATE",
    "ROLES",
    "load_tokenizer",
    "resolve_chat_template",
    "ConversationEncoder",
    "Encoded",
    "apply_task_spec",
    "check_conversation",
    "content_text",
]

# NeMo RL's passthrough template (chat_template: null): the message contents, concatenated.
PASSTHROUGH_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
ROLES = ("system", "user", "assistant", "tool")


class ToolArgumentsWarning(UserWarning):
    """A tool call's `arguments` is a string that is not a JSON object (rendered as it is)."""


def template_key(tok_cfg) -> str:
    """The config key the chat template comes from (for messages)."""
    if tok_cfg.get("custom_template") is not None:
        return "policy.tokenizer.custom_template"
    return "policy.tokenizer.chat_template"


def resolve_chat_template(tok_cfg, tokenizer: PreTrainedTokenizerBase, tokenizer_name: str) -> str:
    """The Jinja text of the chat template that `tok_cfg` (`policy.tokenizer`) asks for.

    `custom_template` (the guide's key), when set, wins over `chat_template`. `chat_template`:
    absent or "default": the tokenizer's own; None: passthrough (contents concatenated); a string
    ending in ".jinja": that file; any other string: the template itself.
    """
    if tok_cfg.get("custom_template") is not None:
        key, spec = "policy.tokenizer.custom_template", tok_cfg.custom_template
    elif "chat_template" not in tok_cfg:
        key, spec = "policy.tokenizer.chat_template", "default"
    else:
        key, spec = "policy.tokenizer.chat_template", tok_cfg.chat_template
    if spec is None:
        return PASSTHROUGH_TEMPLATE
    if not isinstance(spec, str):
        raise TypeError(f"{key}: expected a string or null, got {type(spec).__name__}")
    if spec == "default":
        if tokenizer.chat_template is None:
            raise DataError(
                f"{key}='default' but tokenizer {tokenizer_name!r} has no chat template. Set {key} to a Jinja "
                "template, a path to a .jinja file, or null (passthrough: the message contents concatenated)"
            )
        if isinstance(tokenizer.chat_template, dict):
            return tokenizer.get_chat_template()
        return tokenizer.chat_template
    if spec.endswith(".jinja"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise MissingFileError(f"{key}={spec!r}: no such template file")
        return path.read_text(encoding="utf-8")
    return spec


def open_tokenizer(name: str | Path) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name)` that never runs code from the tokenizer's folder: a
    tokenizer_config.json whose `auto_map` / `tokenizer_class` names a class only the folder's own
    Python code defines is refused with one line (DataError) instead of a transformers prompt or
    traceback."""
    try:
        return AutoTokenizer.from_pretrained(str(name), trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise DataError(
            f"tokenizer {str(name)!r}: its tokenizer_config.json names a tokenizer class defined by Python code "
            "in the model's folder (auto_map / tokenizer_class), and jax_sft never runs such code. Use a "
            "tokenizer that transformers defines: remove auto_map and set tokenizer_class to "
            '"PreTrainedTokenizerFast" (the folder needs a tokenizer.json), or point policy.tokenizer.name '
            "at such a tokenizer"
        ) from None


def check_template(tokenizer: PreTrainedTokenizerBase, key: str) -> None:
    """Renders a user message, and a user and an assistant message, with the tokenizer's chat
    template, so that syntax errors and sandbox violations fail at start-up (DataError naming
    `key`), not at the first example."""
    user, assistant = {"role": "user", "content": "probe"}, {"role": "assistant", "content": "probe"}
    try:
        for messages in ([user], [user, assistant]):
            tokenizer.apply_chat_template(messages, tokenize=False)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"{key}: the chat template does not parse: {e} (line {e.lineno})") from e
    except jinja2.exceptions.SecurityError as e:
        raise DataError(f"{key}: the chat template does something the sandbox forbids: {e}; fix {key}") from e


def load_tokenizer(cfg) -> PreTrainedTokenizerBase:
    """The fast tokenizer of `policy.tokenizer.name` (null: `policy.model_name`; a local folder or a
    hub id) with the chat template of `policy.tokenizer` set as its `chat_template`."""
    tok_cfg = cfg.policy.tokenizer
    name = tok_cfg.get("name") or cfg.policy.model_name
    tokenizer = open_tokenizer(name)
    if not tokenizer.is_fast:
        raise DataError(
            f"tokenizer {name!r} is not a fast (Rust) tokenizer; jax_sft maps loss masks onto tokens "
            "with its offsets and needs a tokenizer.json"
        )
    tokenizer.chat_template = resolve_chat_template(tok_cfg, tokenizer, name)
    check_template(tokenizer, template_key(tok_cfg))
    return tokenizer


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One conversation as the model sees it: `ids` int32 [n], `loss` uint8 [n] (1: token i is a
    training target) and the rendered `text` (before bos/eos are added)."""

    ids: np.ndarray
    loss: np.ndarray
    text: str


def check_conversation(
    row: Any,
    where: Any,
    spec=None,
    *,
    content_parts: bool = False,
    null_content: bool = True,
    string_arguments: bool = False,
) -> tuple[list[dict], list | None]:
    """(messages, tools) of a formatted row, validated: a dict with a non-empty `messages` list of
    dicts with a known `role` and a `content` that is a string or a list of OpenAI content parts.
    Keys whose value is None are dropped (Arrow fills them in), except the content of an
    assistant message with `tool_calls`: None (or absent) stays None (`null_content`, for templates
    that render the calls then: DeepSeek-V3 renders them only then), or is "" for templates that
    expect a string (see `ConversationEncoder`), as an OpenAI client's message renders at inference.
    A tool call's `arguments` is handed over as an object (a JSON string is parsed), or, with
    `string_arguments` (templates that concatenate it as text: DeepSeek-V3), as a JSON string (an
    object is encoded as `tojson` would, a string is kept as written).

    Content parts (`[{"type": "text", "text": ...}, ...]`): only text parts are accepted; they are
    joined with "\\n" (what vLLM and NeMo RL's multimodal path hand a template that expects a
    string), or kept as a list when `content_parts` (the template iterates over parts itself).
    `spec` (a TaskDataSpec) applies its prompt to the first user message and its system prompt.
    `where` names the row in errors (a string, or an object whose str() is computed only then)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a dict with 'messages', got {type(row).__name__}")
    raw = row.get("messages")
    if raw is None:  # absent, or null (Arrow fills in the keys that other rows of the file have)
        present = sorted(k for k, v in row.items() if v is not None)
        raise DataError(f"{where}: missing key 'messages', or it is null; the row's keys are {present}")
    if not isinstance(raw, (list, tuple)) or len(raw) == 0:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages, got {raw!r:.80}")
    forms = dict(content_parts=content_parts, null_content=null_content, string_arguments=string_arguments)
    messages = apply_task_spec([_check_message(m, f"{where}: message {j}", **forms) for j, m in enumerate(raw)], spec)
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise DataError(f"{where}: 'tools' must be a list of tool schemas, got {type(tools).__name__}")
    return messages, (list(tools) if tools else None)


def _check_message(message: Any, where: str, *, content_parts: bool, null_content: bool, string_arguments: bool):
    """One message of `check_conversation`, checked and in the form the template takes."""
    if not isinstance(message, dict):
        raise DataError(f"{where}: expected a dict with 'role' and 'content', got {message!r:.80}")
    message = {k: v for k, v in message.items() if v is not None}
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
    if isinstance(message.get("tool_calls"), (list, tuple)):
        message["tool_calls"] = [
            _arguments_as_text(call) if string_arguments else _parse_arguments(call, f"{where}: tool call {c}")
            for c, call in enumerate(message["tool_calls"])
        ]
    content = message.get("content")
    if content is None and role == "assistant" and message.get("tool_calls"):
        message["content"] = None if null_content else ""
    elif isinstance(content, (list, tuple)):
        message["content"] = _text_parts(content, content_parts, f"{where} ({role})")
    elif not isinstance(content, str):
        raise DataError(
            f"{where} ({role}): 'content' must be a string or a list of text parts, got {type(content).__name__}"
        )
    return message


def _text_parts(parts, keep: bool, where: str) -> str | list[dict]:
    """OpenAI content parts, text only: joined with "\\n", or (keep) as a list of text parts."""
    texts = []
    for k, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise DataError(
                f"{where}: content part {k} is of type {kind!r}; jax_sft trains text-only models and "
                "takes only {'type': 'text', 'text': ...} parts"
            )
        texts.append(part["text"])
    return [{"type": "text", "text": t} for t in texts] if keep else "\n".join(texts)


def content_text(message: dict) -> str:
    """The text of a message's content (a string, text parts joined with "\\n", or "" for None)."""
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content)
    return content or ""


def apply_task_spec(messages: list, spec) -> list:
    """`messages` with a TaskDataSpec applied (a new list; None: unchanged): its prompt formatted with
    the content of the first user message, its system prompt put first when no system message is."""
    if spec is None or (spec.prompt is None and spec.system_prompt is None):
        return messages
    messages = list(messages)
    if spec.prompt is not None:
        j = next((j for j, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), None)
        content = messages[j].get("content") if j is not None else None
        if isinstance(content, str):
            messages[j] = {**messages[j], "content": spec.prompt.format(content)}
        elif isinstance(content, list):  # text parts: each formatted, as NeMo RL does
            messages[j] = {**messages[j], "content": [{**p, "text": spec.prompt.format(p["text"])} for p in content]}
    first = messages[0] if messages else None
    if spec.system_prompt is not None and not (isinstance(first, dict) and first.get("role") == "system"):
        messages.insert(0, {"role": "system", "content": spec.system_prompt})
    return messages


_warned_tool_arguments = False


def _parse_arguments(call: Any, where: str) -> Any:
    """A tool call whose `arguments` (in `function`, or at the top) is a JSON string gets them as
    a dict, as templates expect (they apply `tojson`, which would encode the string twice). A
    string that is not a JSON object stays as it is, with one warning per process."""
    global _warned_tool_arguments
    if not isinstance(call, dict):
        return call
    nested = isinstance(call.get("function"), dict)
    target = call["function"] if nested else call
    arguments = target.get("arguments")
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        if not _warned_tool_arguments:
            _warned_tool_arguments = True
            warnings.warn(
                f"{where}: 'arguments' is a string that is not a JSON object ({arguments!r:.60}); it is "
                "rendered as that string (this warning is shown once)",
                ToolArgumentsWarning,
                stacklevel=2,
            )
        return call
    target = {**target, "arguments": parsed}
    return {**call, "function": target} if nested else target


def _arguments_as_text(call: Any) -> Any:
    """A tool call whose `arguments` (in `function`, or at the top) is an object gets them as JSON
    text, as `tojson` writes it (templates that concatenate the arguments, such as DeepSeek-V3's)."""
    if not isinstance(call, dict):
        return call
    nested = isinstance(call.get("function"), dict)
    target = call["function"] if nested else call
    arguments = target.get("arguments")
    if isinstance(arguments, str) or arguments is None:
        return call
    target = {**target, "arguments": json.dumps(arguments, ensure_ascii=False)}
    return {**call, "function": target} if nested else target


def _common_prefix(a: str, b: str, i: int = 0, j: int = 0) -> int:
    """Length of the common prefix of a[i:] and b[j:] (binary search on C-speed slice compares)."""
    n = min(len(a) - i, len(b) - j)
    if a[i : i + n] == b[j : j + n]:
        return n
    lo, hi = 0, n - 1  # a[i:i+lo] == b[j:j+lo]; a[i:i+hi+1] != b[j:j+hi+1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[i : i + mid] == b[j : j + mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


_PROBE = 16


def _boundary(full: str, prefix: str) -> int:
    """Where the messages rendered in `prefix` (a render of the first k messages) end in `full`.

    `prefix` is aligned to `full` as runs of equal text separated by pieces of `prefix` that `full`
    lacks (what the template drops from a turn once more messages follow, e.g. Qwen3's reasoning);
    after each piece the alignment resumes at the next occurrence in `prefix` of the text `full`
    continues with. The boundary is where `full` stands when `prefix` is used up.
    """
    if full.startswith(prefix):
        return len(prefix)
    i = j = 0
    while True:
        m = _common_prefix(prefix, full, i, j)
        i, j = i + m, j + m
        if i >= len(prefix) or j >= len(full):
            return j
        resume = prefix.find(full[j : j + _PROBE], i + 1)
        if resume < 0:  # a tail of `prefix` shorter than the probe, or nothing, resumes in `full`
            for r in range(max(i + 1, len(prefix) - _PROBE + 1), len(prefix)):
                if full.startswith(prefix[r:], j):
                    return j + len(prefix) - r
            return j
        i = resume


class ConversationEncoder:
    """Renders, tokenises and loss-masks conversations (see the module docstring).

    Picklable (Grain worker processes get a copy). `encode(rows, wheres)` -> list[Encoded]; rows
    are formatted dataset rows, `wheres` name them in errors ("file.jsonl:13 (train)").
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        add_bos: bool,
        add_eos: bool,
        add_generation_prompt: bool,
        only_unmask_final: bool,
        chat_template_kwargs: dict | None = None,
        task_spec=None,
        template_key: str = "policy.tokenizer.chat_template",
    ):
        if not tokenizer.is_fast:
            raise ValueError("ConversationEncoder needs a fast tokenizer (offsets)")
        kwargs = dict(chat_template_kwargs or {})
        clash = set(kwargs) & {"tools", "add_generation_prompt", "messages", "conversation", "tokenize"}
        if clash:
            raise DataError(f"policy.tokenizer.chat_template_kwargs: {sorted(clash)} are set by jax_sft; remove them")
        self.tokenizer = tokenizer
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_generation_prompt = add_generation_prompt
        self.only_unmask_final = only_unmask_final
        self.template_kwargs = kwargs
        self.task_spec = task_spec
        self.template_key = template_key
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token is not None else None
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token is not None else None
        special = set(tokenizer.all_special_tokens) | {
            t.content for t in tokenizer.added_tokens_decoder.values() if t.special
        }
        self._special_tokens = tuple(sorted(special, key=len, reverse=True))
        self.content_parts = self._takes_content_parts()
        self.null_content, self.string_arguments = self._tool_call_form()

    def _tool_call_form(self) -> tuple[bool, bool]:
        """(null_content, string_arguments): how an assistant turn with tool calls and no content
        must reach the template for the calls to be rendered, found by rendering one: content None
        (the OpenAI value; DeepSeek-V3 renders the calls only then) or "" (templates that expect a
        string), arguments an object (most templates apply `tojson`) or a JSON string (templates that
        concatenate it: DeepSeek-V3). The first form whose rendering holds the call's name and its
        arguments as JSON, with no "None" and no Python repr, wins, in that order. A template that
        renders no form of the call (no tool support) gets None where it takes None, else ""."""
        arguments = {"jaxsft_probe_arg": 1}
        for null_content, as_text in ((True, False), (True, True), (False, False), (False, True)):
            call = {"name": "jaxsft_probe_tool", "arguments": json.dumps(arguments) if as_text else arguments}
            text = self._probe_tool_turn(None if null_content else "", call)
            if (
                text is not None
                and "jaxsft_probe_tool" in text
                and '"jaxsft_probe_arg"' in text
                and "'jaxsft_probe_arg'" not in text
                and "None" not in text
            ):
                return null_content, as_text
        text = self._probe_tool_turn(None, {"name": "jaxsft_probe_tool", "arguments": arguments})
        return text is not None and "None" not in text, False

    def _probe_tool_turn(self, content: str | None, function: dict) -> str | None:
        """The template's rendering of a user turn and an assistant turn with `content` and one tool
        call of `function`; None when the template fails on it."""
        probe = [
            {"role": "user", "content": "jaxsft-probe"},
            {"role": "assistant", "content": content, "tool_calls": [{"type": "function", "function": function}]},
        ]
        try:
            return self._render_raw([probe], None, False)[0]
        except (jinja2.TemplateError, TypeError, AttributeError):  # `in`, `+` or string methods on None / dicts
            return None

    def _takes_content_parts(self) -> bool:
        """Whether the template renders a list of text parts itself (iterates over `content`), rather
        than expecting a string: a probe with two parts shows both texts and no Python list repr."""
        probe = [
            {
                "role": "user",
                "content": [{"type": "text", "text": "jaxsft-part-one"}, {"type": "text", "text": "jaxsft-part-two"}],
            }
        ]
        try:
            text = self._render_raw([probe], None, False)[0]
        except (jinja2.TemplateError, TypeError, AttributeError):  # string methods or + on a list
            return False
        return "jaxsft-part-one" in text and "jaxsft-part-two" in text and "'type'" not in text

    @classmethod
    def from_config(cls, cfg, tokenizer, task_spec=None) -> ConversationEncoder:
        return cls(
            tokenizer,
            add_bos=cfg.data.add_bos,
            add_eos=cfg.data.add_eos,
            add_generation_prompt=cfg.data.add_generation_prompt,
            only_unmask_final=cfg.sft.only_unmask_final,
            chat_template_kwargs=cfg.policy.tokenizer.get("chat_template_kwargs"),
            task_spec=task_spec,
            template_key=template_key(cfg.policy.tokenizer),
        )

    # ------------------------------------------------------------------ rendering

    def _render_raw(self, conversations: list[list[dict]], tools, gen: bool) -> list[str]:
        """The template applied as `apply_chat_template(tokenize=False)` does, except that messages are
        passed as given: transformers 5 drops keys whose value is None, but the content of an
        assistant message with tool calls is None at inference (OpenAI clients, vLLM, transformers 4)
        and templates test for it (DeepSeek-V3 renders the tool calls only then).
        `check_conversation` has dropped every other None."""
        template = self.tokenizer.get_chat_template(None, tools)
        rendered, _ = render_jinja_template(
            conversations=conversations,
            tools=tools,
            chat_template=template,
            add_generation_prompt=gen,
            **{**self.tokenizer.special_tokens_map, **self.template_kwargs},
        )
        return rendered

    def _render(self, conversations: list[list[dict]], tools, gen: bool, where: str) -> list[str]:
        try:
            return self._render_raw(conversations, tools, gen)
        except jinja2.exceptions.SecurityError as e:
            raise DataError(
                f"{where}: the chat template ({self.template_key}) does something the sandbox "
                f"forbids: {e}; fix {self.template_key}"
            ) from e
        except jinja2.TemplateError as e:
            raise DataError(f"{where}: the chat template ({self.template_key}) failed on this conversation: {e}") from e

    def spans(self, messages: list[dict], tools, where: str) -> tuple[str, list[tuple[int, int]]]:
        """(full rendering, character spans [start, end) of the trained assistant messages)."""
        n = len(messages)
        trained = [a for a in range(n) if messages[a]["role"] == "assistant"]
        if self.only_unmask_final:
            trained = [a for a in trained if a == n - 1]
        if trained and trained[0] == 0:
            raise DataError(
                f"{where}: message 0 is an assistant message; a conversation must open with a system or user message"
            )
        cuts = sorted({k for a in trained for k in (a, a + 1) if k < n})
        renders = self._render([messages] + [messages[:k] for k in cuts], tools, False, where)
        full, prefix_of = renders[0], dict(zip(cuts, renders[1:]))
        bound = {k: _boundary(full, prefix_of[k]) for k in cuts}
        bound[n] = len(full)
        gen_prompts = {}
        if self.add_generation_prompt and trained:
            for a, text in zip(trained, self._render([messages[:a] for a in trained], tools, True, where)):
                if not text.startswith(prefix_of[a]):
                    raise DataError(
                        f"{where}: the chat template's generation prompt is not appended to the "
                        f"rendering of messages 0..{a - 1}; set data.add_generation_prompt=false"
                    )
                gen_prompts[a] = text[len(prefix_of[a]) :]
        spans = []
        for a in trained:
            start, end = bound[a], bound[a + 1]
            if a in gen_prompts:
                start += _common_prefix(gen_prompts[a], full[start:end])
            end = self._trim_after_special(full, start, end)
            # The end of the content survives templates; reasoning inlined as <think>...</think> may not.
            tail = content_text(messages[a]).split("</think>")[-1].strip()[-64:]
            if end < start or tail not in full[start:end]:
                raise DataError(
                    f"{where}: cannot locate assistant message {a} in the rendered conversation (characters "
                    f"{start}..{end}: {full[start:end]!r:.200}); the chat template renders it in a way jax_sft "
                    "cannot align. Use a template that renders each message's content verbatim"
                )
            spans.append((start, end))
        return full, spans

    def _trim_after_special(self, full: str, start: int, end: int) -> int:
        stripped = len(full[start:end].rstrip())
        if start + stripped < end and full[start : start + stripped].endswith(self._special_tokens):
            return start + stripped
        return end

    # ------------------------------------------------------------------ encoding

    def encode(self, rows: list[Any], wheres: list[str]) -> list[Encoded]:
        texts, all_spans, ends_trained = [], [], []
        for row, where in zip(rows, wheres):
            messages, tools = check_conversation(
                row,
                where,
                self.task_spec,
                content_parts=self.content_parts,
                null_content=self.null_content,
                string_arguments=self.string_arguments,
            )
            full, spans = self.spans(messages, tools, where)
            texts.append(full)
            all_spans.append(spans)
            ends_trained.append(bool(spans) and spans[-1][1] >= len(full.rstrip()))
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [
            self._finish(enc, text, spans, end_trained)
            for enc, text, spans, end_trained in zip(encodings, texts, all_spans, ends_trained)
        ]

    def _finish(self, enc, text: str, spans: list[tuple[int, int]], end_trained: bool) -> Encoded:
        ids = np.asarray(enc.ids, dtype=np.int32)
        loss = np.zeros(len(ids), dtype=np.uint8)
        for start, end in spans:
            first, last = _token_at(enc, start, end, 1), _token_at(enc, end - 1, start - 1, -1)
            if first is not None and last is not None and first <= last:
                loss[first : last + 1] = 1
        if self.add_bos and self.bos_id is not None and (len(ids) == 0 or ids[0] != self.bos_id):
            ids = np.concatenate([np.asarray([self.bos_id], np.int32), ids])
            loss = np.concatenate([np.zeros(1, np.uint8), loss])
        if self.add_eos and self.eos_id is not None and not text.rstrip().endswith(self.tokenizer.eos_token):
            ids = np.concatenate([ids, np.asarray([self.eos_id], np.int32)])
            loss = np.concatenate([loss, np.asarray([end_trained], np.uint8)])
        return Encoded(ids, loss, text)


def _token_at(enc, pos: int, stop: int, step: int) -> int | None:
    """The token holding the character at `pos`, or the nearest one towards `stop` (exclusive)."""
    while pos != stop:
        token = enc.char_to_token(pos)
        if token is not None:
            return token
        pos += step
    return None
