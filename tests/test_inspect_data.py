"""`python -m jax_sft.inspect_data`: examples as the model sees them, loss tokens marked."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from jax_sft.inspect_data import main

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CONVERSATION = {
    "messages": [
        {"role": "system", "content": "You are a weather assistant."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "I need the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "22C, sunny"},
        {"role": "assistant", "content": "It is 22C and sunny in Paris."},
    ],
    "tools": [WEATHER_TOOL],
}
SIMPLE = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


@pytest.fixture
def args(tmp_path, fixture_tokenizer_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(TOOL_CONVERSATION) + "\n" + json.dumps(SIMPLE) + "\n")
    return [
        f"policy.tokenizer.name={fixture_tokenizer_path('qwen3')}",
        "policy.tokenizer.chat_template=default",
        "data.dataset_name=openai_format",
        f"data.train_data_path={path}",
        f"data.val_data_path={path}",
        "data.use_preserving_dataset=true",
        "data.add_generation_prompt=true",
    ]


def test_jsonl_output(args, fixture_tokenizer_path):
    out = subprocess.run(
        [sys.executable, "-m", "jax_sft.inspect_data", *args, "--num", "2", "--format", "jsonl"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2 and set(records[0]) == {"input_ids", "loss_mask", "text"}
    tok = AutoTokenizer.from_pretrained(fixture_tokenizer_path("qwen3"))
    rendered = tok.apply_chat_template(TOOL_CONVERSATION["messages"], tools=TOOL_CONVERSATION["tools"], tokenize=False)
    first = records[0]
    assert first["text"] == rendered
    assert first["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    ids, mask = first["input_ids"], first["loss_mask"]
    runs, run = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(t)
        elif run:
            runs.append(tok.decode(run))
            run = []
    assert runs == [  # after the last user turn, Qwen3 keeps the reasoning of the tool-calling turn
        "<think>\nI need the tool.\n</think>\n\nLet me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\n\n</think>\n\nIt is 22C and sunny in Paris.<|im_end|>",
    ]


def test_text_output_marks_loss_tokens(args, capsys):
    main([*args, "--num", "1", "--color", "never"])
    out = capsys.readouterr().out
    assert out.startswith("=== train example 0: ")
    assert "<|im_start|>assistant\n[[<think>\nI need the tool.\n</think>\n\nLet me check.\n<tool_call>" in out
    assert "[[<think>\n\n</think>\n\nIt is 22C and sunny in Paris.<|im_end|>]]\n" in out
    assert "\x1b[" not in out
    main([*args, "--num", "1", "--color", "always"])
    assert (
        "\x1b[1;42;30m<think>\n\n</think>\n\nIt is 22C and sunny in Paris.<|im_end|>\x1b[0m" in capsys.readouterr().out
    )


def test_bad_options(args):
    with pytest.raises(SystemExit, match="unknown option"):
        main([*args, "--bogus", "1"])
    with pytest.raises(SystemExit, match="--format='xml'"):
        main([*args, "--format", "xml"])


def test_train_split_alone_needs_no_validation_path(tmp_path, fixture_tokenizer_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(SIMPLE) + "\n")
    main(
        [
            f"policy.tokenizer.name={fixture_tokenizer_path('qwen3')}",
            "policy.tokenizer.chat_template=default",
            "data.dataset_name=openai_format",
            f"data.train_data_path={path}",
            "data.val_data_path=null",
            "sft.val_period=0",
            "--num",
            "1",
            "--color",
            "never",
        ]
    )
    out = capsys.readouterr().out
    assert out.startswith("=== train example 0:") and "Hello!<|im_end|>]]" in out
