"""Chat templates, token ids and loss masks on the real Qwen3 and Llama 3.1 tokenizers."""

import functools

import numpy as np
import pytest
from ml_collections import ConfigDict
from transformers import AutoTokenizer

from jax_sft.config.defaults import SQUAD_TEMPLATE  # NeMo RL's default template
from jax_sft.data.chat import (
    PASSTHROUGH_TEMPLATE,
    ConversationEncoder,
    _boundary,
    check_conversation,
    load_tokenizer,
    resolve_chat_template,
)
from jax_sft.data.formats import TaskDataSpec

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@functools.lru_cache
def _load(path: str):
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture
def qwen(fixture_tokenizer_path):
    return _load(str(fixture_tokenizer_path("qwen3")))


@pytest.fixture
def llama(fixture_tokenizer_path):
    return _load(str(fixture_tokenizer_path("llama3_1")))


def encode(tokenizer, conversation, *, gen=False, final=False, bos=True, eos=True, kwargs=None, spec=None):
    encoder = ConversationEncoder(
        tokenizer,
        add_bos=bos,
        add_eos=eos,
        add_generation_prompt=gen,
        only_unmask_final=final,
        chat_template_kwargs=kwargs,
        task_spec=spec,
    )
    return encoder.encode([conversation], ["example 0"])[0]


def loss_spans(tokenizer, encoded) -> list[str]:
    """The decoded runs of loss tokens."""
    spans, run = [], []
    for token, loss in zip(encoded.ids.tolist(), encoded.loss.tolist()):
        if loss:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tokenizer.decode(s, skip_special_tokens=False, clean_up_tokenization_spaces=False) for s in spans]


def msgs(*pairs, **extra):
    return {"messages": [{"role": r, "content": c} for r, c in pairs], **extra}


# ----------------------------------------------------------------------------- Qwen3


def test_qwen3_single_turn_header_follows_add_generation_prompt(qwen):
    conv = msgs(("user", "What is 2+2?"), ("assistant", "4"))
    assert loss_spans(qwen, encode(qwen, conv)) == ["<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>"]
    assert loss_spans(qwen, encode(qwen, conv, gen=True)) == ["<think>\n\n</think>\n\n4<|im_end|>"]


def test_qwen3_ids_are_the_encoding_of_the_full_rendering(qwen):
    conv = msgs(
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Goodbye.")
    )
    e = encode(qwen, conv)
    full = qwen.apply_chat_template(conv["messages"], tokenize=False)
    assert e.text == full
    # Qwen3 has no bos; the rendering ends "<|im_end|>\n", so no eos is appended.
    assert e.ids.tolist() == qwen(full, add_special_tokens=False)["input_ids"]
    assert e.ids.dtype == np.int32 and e.loss.dtype == np.uint8 and e.ids.shape == e.loss.shape


def test_qwen3_multi_turn_reasoning_is_not_prefix_preserving(qwen):
    conv = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris.", "reasoning_content": "Easy geography."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome.", "reasoning_content": "Also easy."},
        ]
    }
    e = encode(qwen, conv, gen=True)
    # The template drops the first turn's reasoning and keeps the last's: the mask follows the rendering.
    assert "Easy geography" not in e.text
    assert loss_spans(qwen, e) == ["Paris.<|im_end|>", "<think>\nAlso easy.\n</think>\n\nRome.<|im_end|>"]
    e = encode(qwen, conv, gen=False)
    assert loss_spans(qwen, e) == [
        "<|im_start|>assistant\nParis.<|im_end|>",
        "<|im_start|>assistant\n<think>\nAlso easy.\n</think>\n\nRome.<|im_end|>",
    ]


def test_qwen3_tool_calls_with_tools(qwen):
    conv = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "reasoning_content": "Need the tool.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": "22C, sunny"},
            {"role": "assistant", "content": "22C and sunny.", "reasoning_content": "Got it."},
        ],
        "tools": [WEATHER_TOOL],
    }
    e = encode(qwen, conv, gen=True)
    assert '"name": "get_weather"' in e.text and "<tools>" in e.text  # the tool schema is rendered
    assert loss_spans(qwen, e) == [
        '<think>\nNeed the tool.\n</think>\n\nLet me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\nGot it.\n</think>\n\n22C and sunny.<|im_end|>",
    ]


def test_qwen3_earlier_tool_turns_lose_reasoning_after_a_new_user_turn(qwen):
    conv = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Call it.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": "22C"},
            {"role": "assistant", "content": "It is 22C.", "reasoning_content": "Answer."},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        "tools": [WEATHER_TOOL],
    }
    e = encode(qwen, conv, gen=True)
    assert loss_spans(qwen, e) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 22C.<|im_end|>",
        "<think>\n\n</think>\n\nYou're welcome.<|im_end|>",
    ]


def test_qwen3_enable_thinking_false_keeps_the_empty_think_block_out_of_the_loss(qwen):
    conv = msgs(("user", "Hi"), ("assistant", "Hello"), ("user", "Again"), ("assistant", "Hello again"))
    e = encode(qwen, conv, gen=True, kwargs={"enable_thinking": False})
    # With thinking off, "<think>\n\n</think>\n\n" is part of the generation prompt at inference.
    assert e.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nHello again<|im_end|>\n")
    assert loss_spans(qwen, e) == ["Hello<|im_end|>", "Hello again<|im_end|>"]


def test_qwen3_only_unmask_final(qwen):
    conv = msgs(("user", "A"), ("assistant", "first"), ("user", "B"), ("assistant", "second"))
    assert loss_spans(qwen, encode(qwen, conv, gen=True, final=True)) == ["<think>\n\n</think>\n\nsecond<|im_end|>"]
    # A conversation that ends with a user message has nothing to train on with only_unmask_final.
    conv = msgs(("user", "A"), ("assistant", "first"), ("user", "B"))
    assert not encode(qwen, conv, final=True).loss.any()


def test_qwen3_inline_think_in_content(qwen):
    conv = msgs(("user", "Q"), ("assistant", "<think>\nhmm\n</think>\n\nA1"), ("user", "Q2"), ("assistant", "A2"))
    assert loss_spans(qwen, encode(qwen, conv, gen=True)) == ["A1<|im_end|>", "<think>\n\n</think>\n\nA2<|im_end|>"]


# ----------------------------------------------------------------------------- Llama 3.1


def test_llama_multi_turn_system_bos_and_eos_not_duplicated(llama):
    conv = msgs(
        ("system", "Be kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", " Goodbye. ")
    )
    e = encode(llama, conv, bos=True, eos=True)
    full = llama.apply_chat_template(conv["messages"], tokenize=False)
    assert e.ids.tolist() == llama(full, add_special_tokens=False)["input_ids"]
    assert e.ids.tolist().count(llama.bos_token_id) == 1 and e.ids[0] == llama.bos_token_id
    assert e.ids[-1] == llama.eos_token_id and e.ids.tolist().count(llama.eos_token_id) == 5
    assert loss_spans(llama, e) == [
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\nGoodbye.<|eot_id|>",
    ]
    assert loss_spans(llama, encode(llama, conv, gen=True)) == ["Hello!<|eot_id|>", "Goodbye.<|eot_id|>"]


def test_llama_tool_conversation(llama):
    # The fixture's Llama template ignores tools and tool calls: the mask follows what it renders.
    conv = {
        "messages": [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
                ],
            },
            {"role": "tool", "content": "-3C"},
            {"role": "assistant", "content": "It is -3C."},
        ],
        "tools": [WEATHER_TOOL],
    }
    e = encode(llama, conv, gen=True)
    assert loss_spans(llama, e) == ["Checking.<|eot_id|>", "It is -3C.<|eot_id|>"]
    assert "<|start_header_id|>tool<|end_header_id|>\n\n-3C<|eot_id|>" in e.text


def test_squad_template_on_llama_appends_trained_eos_and_bos(llama):
    llama_squad = _load(llama.name_or_path)
    encoder = ConversationEncoder(
        llama_squad, add_bos=True, add_eos=True, add_generation_prompt=False, only_unmask_final=False
    )
    conv = msgs(("system", "Paris is in France."), ("user", "Where is Paris?"), ("assistant", "France"))
    template = llama_squad.chat_template
    llama_squad.chat_template = SQUAD_TEMPLATE
    try:
        e = encoder.encode([conv], ["squad 0"])[0]
    finally:
        llama_squad.chat_template = template
    assert e.text == "Context: Paris is in France. Question: Where is Paris? Answer: France"
    assert e.ids[0] == llama.bos_token_id and e.loss[0] == 0
    assert e.ids[-1] == llama.eos_token_id and e.loss[-1] == 1
    assert loss_spans(llama, e) == [" France<|eot_id|>"]


def test_passthrough_template_concatenates_contents(qwen):
    tok = AutoTokenizer.from_pretrained(qwen.name_or_path)
    tok.chat_template = PASSTHROUGH_TEMPLATE
    conv = msgs(("user", "2+2="), ("assistant", "4"), ("user", " 3+3="), ("assistant", "6"))
    e = encode(tok, conv)
    assert e.text == "2+2=4 3+3=6"
    assert e.ids[-1] == tok.eos_token_id and e.loss[-1] == 1  # eos appended to the trained final answer
    assert loss_spans(tok, e) == ["4", "6<|im_end|>"]


def test_task_spec_prompt_and_system_prompt(qwen, tmp_path):
    (tmp_path / "p.txt").write_text("Solve: {}")
    (tmp_path / "s.txt").write_text("You are a mathematician.")
    spec = TaskDataSpec("math", prompt_file=str(tmp_path / "p.txt"), system_prompt_file=str(tmp_path / "s.txt"))
    e = encode(qwen, msgs(("user", "1+1"), ("assistant", "2")), spec=spec)
    assert e.text.startswith("<|im_start|>system\nYou are a mathematician.<|im_end|>\n<|im_start|>user\nSolve: 1+1")
    (tmp_path / "bad.txt").write_text("no placeholder")
    with pytest.raises(ValueError, match=r"bad.txt.*must contain '\{\}'"):
        TaskDataSpec("math", prompt_file=str(tmp_path / "bad.txt"))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "row, match",
    [
        ({"messages": []}, "example 0: 'messages' must be a non-empty list"),
        ({"text": "hi"}, "example 0: missing key 'messages'"),
        (
            {"messages": None, "text": "hi"},
            r"example 0: missing key 'messages', or it is null; the row's keys are \['text'\]$",
        ),
        (msgs(("user", "hi"), ("robot", "beep")), "example 0: message 1: unknown role 'robot'"),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
            "example 0: message 0 \\(user\\): 'content' must be a string",
        ),
        (msgs(("assistant", "I start"), ("user", "hi")), "example 0: message 0 is an assistant message"),
    ],
)
def test_bad_conversations_name_the_example(qwen, row, match):
    with pytest.raises((ValueError, KeyError, TypeError), match=match):
        encode(qwen, row)


def test_assistant_tool_call_without_content_is_accepted():
    messages, tools = check_conversation(
        {
            "messages": [
                {"role": "user", "content": "x", "tool_calls": None},
                {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
            ]
        },
        "row 0",
    )
    assert messages[1]["content"] is None and "tool_calls" not in messages[0] and tools is None
    messages, _ = check_conversation(
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
            ]
        },
        "row 0",
        null_content=False,
    )  # a template that expects a string
    assert messages[1]["content"] == ""


# ----------------------------------------------------------------------------- template choice


def _tok_cfg(**kw):
    return ConfigDict(dict(name=None, chat_template_kwargs=None, **kw))


def test_resolve_chat_template(qwen, tmp_path):
    assert resolve_chat_template(_tok_cfg(chat_template="default"), qwen, "q") == qwen.chat_template
    assert resolve_chat_template(_tok_cfg(), qwen, "q") == qwen.chat_template  # absent: the tokenizer's own
    assert resolve_chat_template(_tok_cfg(chat_template=None), qwen, "q") == PASSTHROUGH_TEMPLATE
    assert resolve_chat_template(_tok_cfg(chat_template=SQUAD_TEMPLATE), qwen, "q") == SQUAD_TEMPLATE
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert (
        resolve_chat_template(_tok_cfg(chat_template=str(tmp_path / "t.jinja")), qwen, "q")
        == "{{ messages[0]['content'] }}"
    )
    # The guide's custom_template key wins over chat_template.
    assert (
        resolve_chat_template(_tok_cfg(chat_template="default", custom_template=SQUAD_TEMPLATE), qwen, "q")
        == SQUAD_TEMPLATE
    )
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        resolve_chat_template(_tok_cfg(chat_template=str(tmp_path / "missing.jinja")), qwen, "q")


def test_default_template_on_a_tokenizer_without_one_fails_at_start_up(qwen):
    bare = AutoTokenizer.from_pretrained(qwen.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match=r"tokenizer 'my/tok' has no chat template.*policy.tokenizer.chat_template"):
        resolve_chat_template(_tok_cfg(chat_template="default"), bare, "my/tok")


def test_load_tokenizer(fixture_tokenizer_path, tmp_path):
    path = str(fixture_tokenizer_path("llama3_1"))
    cfg = ConfigDict(dict(policy=dict(model_name=path, tokenizer=_tok_cfg(chat_template=SQUAD_TEMPLATE))))
    assert load_tokenizer(cfg).chat_template == SQUAD_TEMPLATE
    cfg.policy.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(ValueError, match="chat template does not parse"):
        load_tokenizer(cfg)


def test_boundary_aligns_renders_that_drop_pieces():
    full = "<u>q1</u><a>A1</a><u>q2</u><a><t>r2</t>A2</a>"
    assert _boundary(full, "<u>q1</u>") == len("<u>q1</u>")  # a prefix
    # The last-turn render of message 1 has a reasoning block that `full` drops.
    assert _boundary(full, "<u>q1</u><a><t></t>A1</a>") == len("<u>q1</u><a>A1</a>")
    # Two dropped pieces before the end of the prefix.
    full = "<u>q</u><a>A1</a><x>tool</x><a>A2</a><u>q2</u><a>A3</a>"
    assert _boundary(full, "<u>q</u><a><t>r1</t>A1</a><x>tool</x><a><t>r2</t>A2</a>") == len(
        "<u>q</u><a>A1</a><x>tool</x><a>A2</a>"
    )


def test_a_template_that_rewrites_assistant_text_is_an_error(qwen):
    tok = AutoTokenizer.from_pretrained(qwen.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(ValueError, match="example 0: cannot locate assistant message 1"):
        encode(tok, msgs(("user", "hi"), ("assistant", "hello")))


SANDBOX_ESCAPE = (
    "{{ messages.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
)


def test_sandbox_violation_names_the_template_key(fixture_tokenizer_path):
    path = str(fixture_tokenizer_path("llama3_1"))
    cfg = ConfigDict(dict(policy=dict(model_name=path, tokenizer=_tok_cfg(chat_template=SANDBOX_ESCAPE))))
    with pytest.raises(ValueError, match=r"^policy\.tokenizer\.chat_template: .*sandbox forbids.*__class__"):
        load_tokenizer(cfg)
    # A violation only some conversations reach is caught per example, with the key too.
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ m.__class__.__mro__ }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    encoder = ConversationEncoder(
        tok,
        add_bos=False,
        add_eos=False,
        add_generation_prompt=False,
        only_unmask_final=False,
        template_key="policy.tokenizer.custom_template",
    )
    row = msgs(("user", "q"), ("assistant", "a"), ("tool", "t"), ("assistant", "b"))
    with pytest.raises(
        ValueError,
        match=r"example 3: the chat template \(policy\.tokenizer\.custom_template\) "
        r"does something the sandbox forbids",
    ):
        encoder.encode([row], ["example 3"])


def _call(arguments):
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}],
    }


def test_tool_call_arguments_given_as_json_text_render_like_a_dict(qwen, llama):
    as_dict = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            _call({"city": "Paris"}),
            {"role": "tool", "content": "22C"},
            {"role": "assistant", "content": "22C."},
        ],
        "tools": [WEATHER_TOOL],
    }
    as_text = {**as_dict, "messages": [as_dict["messages"][0], _call('{"city": "Paris"}'), *as_dict["messages"][2:]]}
    for tok in (qwen, llama):
        a, b = encode(tok, as_dict), encode(tok, as_text)
        assert a.text == b.text and a.ids.tolist() == b.ids.tolist() and a.loss.tolist() == b.loss.tolist()
        assert '\\"city\\"' not in b.text  # not encoded twice
    messages, _ = check_conversation(as_text, "row 0")
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert as_text["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # input kept


def test_tool_call_arguments_that_are_not_json_warn_once(monkeypatch):
    from jax_sft.data import chat

    monkeypatch.setattr(chat, "_warned_tool_arguments", False)
    row = {"messages": [{"role": "user", "content": "q"}, _call("city=Paris")]}
    with pytest.warns(chat.ToolArgumentsWarning, match=r"row 0: message 1: tool call 0: 'arguments' is a string"):
        messages, _ = check_conversation(row, "row 0")
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == "city=Paris"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_conversation(row, "row 1")  # once per process
