"""Real conversations on the real Qwen3 and Llama 3.1 tokenizers: tools kept by every loader, tool
calls with null content, OpenAI content parts, and errors that name the file and line."""

import json
import re

import pytest
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from jax_sft.config import load_config
from jax_sft.data import build_dataset
from jax_sft.data.chat import ConversationEncoder
from jax_sft.data.formats import OpenAIFormatRows as OpenAIFormatDataset
from jax_sft.data.readers import read_json_records
from jax_sft.errors import DataError, exit_on_input_error
from jax_sft.inspect_data import main as inspect_main

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
PLAIN = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "22C, sunny"},
        {"role": "assistant", "content": "It is 22C and sunny."},
    ],
    "tools": [TOOL],
}
# DeepSeek-V3's rule, in a template of our own: tool calls are rendered only when content is none.
CALLS_IF_NONE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<U>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' and m['content'] is none %}<A><calls>{% for t in m['tool_calls'] %}"
    "{{ t['function']['name'] }}({{ t['function']['arguments'] | tojson }}){% endfor %}</calls><|im_end|>"
    "{% elif m['role'] == 'assistant' %}<A>{{ m['content'] }}<|im_end|>"
    "{% elif m['role'] == 'tool' %}<T>{{ m['content'] }}{% endif %}{% endfor %}"
)
# DeepSeek-V3's shape, in a template of our own: the calls only when content is none, and the
# arguments concatenated as text (`+`), so an object would fail and "" would drop the calls.
DEEPSEEK_SHAPE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' and m['content'] is none %}<｜Assistant｜><｜tool▁calls▁begin｜>"
    "{% for t in m['tool_calls'] %}{{ '<｜tool▁call▁begin｜>' + t['type'] + '<｜tool▁sep｜>' + t['function']['name']"
    " + '\\n```json\\n' + t['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}{% endfor %}"
    "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>{% endif %}"
    "{% endfor %}"
)
PARTS_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}{{ p['text'] }}|{% endfor %}{% endfor %}"
)


def tokenizer(fixture_tokenizer_path, name, template=None):
    tok = AutoTokenizer.from_pretrained(str(fixture_tokenizer_path(name)))
    if template is not None:
        tok.chat_template = template
    return tok


def encoder(tok, **kw):
    return ConversationEncoder(
        tok, add_bos=kw.get("bos", False), add_eos=False, add_generation_prompt=False, only_unmask_final=False
    )


def write_jsonl(path, rows, raw: bytes = b""):
    path.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode() + raw)
    return str(path)


def loss_text(tok, e) -> str:
    return tok.decode(e.ids[e.loss.astype(bool)].tolist(), skip_special_tokens=False)


# ----------------------------------------------------------------------------- tools


@pytest.mark.parametrize("tools_first", [False, True])
@pytest.mark.parametrize("preserving", [False, True])
def test_tools_are_kept_by_both_loaders(tmp_path, fixture_tokenizer_path, tools_first, preserving):
    rows = [TOOL_ROW, PLAIN] if tools_first else [PLAIN, TOOL_ROW]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    ds = OpenAIFormatDataset.load(path, {"use_preserving_dataset": preserving}, "data_path")
    got = ds[0 if tools_first else 1]
    assert got["tools"] == [TOOL]
    qwen = encoder(tokenizer(fixture_tokenizer_path, "qwen3"))
    with_tools, reference = qwen.encode([got, TOOL_ROW], ["a", "b"])
    assert "# Tools" in with_tools.text and with_tools.ids.tolist() == reference.ids.tolist()
    assert with_tools.loss.tolist() == reference.loss.tolist()
    without = qwen.encode([{"messages": TOOL_ROW["messages"]}], ["c"])[0]
    assert len(with_tools.ids) > len(without.ids) + 50  # the # Tools block is there


def test_tools_after_the_first_arrow_batch_are_kept(tmp_path):
    rows = [PLAIN] * 1100 + [TOOL_ROW]  # `datasets` writes 1000 rows per batch
    ds = OpenAIFormatDataset.load(write_jsonl(tmp_path / "late.jsonl", rows), {}, "data_path")
    assert ds[1100]["tools"] == [TOOL] and ds[0]["tools"] is None


# ----------------------------------------------------------------------------- null content


def test_tool_call_with_null_content_renders_as_the_template_does(tmp_path, fixture_tokenizer_path):
    tok = tokenizer(fixture_tokenizer_path, "qwen3", CALLS_IF_NONE)
    enc = encoder(tok)
    assert enc.null_content
    row = OpenAIFormatDataset.load(write_jsonl(tmp_path / "c.jsonl", [TOOL_ROW]), {}, "data_path")[0]
    e = enc.encode([row], ["row"])[0]
    expected = render_jinja_template(
        conversations=[TOOL_ROW["messages"]], chat_template=CALLS_IF_NONE, **tok.special_tokens_map
    )[0][0]
    assert e.text == expected and '<calls>get_weather({"city": "Paris"})</calls>' in e.text
    # Headers are trained (add_generation_prompt=false); "?<" is one token that overlaps the span.
    assert loss_text(tok, e) == (
        '?<A><calls>get_weather({"city": "Paris"})</calls><|im_end|><A>It is 22C and sunny.<|im_end|>'
    )


@pytest.mark.parametrize("preserving", [False, True])
def test_tool_calls_survive_a_template_that_renders_them_only_for_null_content(
    tmp_path, fixture_tokenizer_path, preserving
):
    """The encoder renders a probe turn in each form and picks the one whose rendering holds the
    call: here content None and arguments as JSON text, from an object or a JSON string, with
    the default loader and the preserving one."""
    tok = tokenizer(fixture_tokenizer_path, "qwen3", DEEPSEEK_SHAPE)
    enc = encoder(tok)
    assert (enc.null_content, enc.string_arguments) == (True, True)
    as_text = {**CALL, "function": {**CALL["function"], "arguments": '{"city": "Paris"}'}}
    user, assistant = TOOL_ROW["messages"][:2]
    rows = [{"messages": [user, {**assistant, "tool_calls": [call]}]} for call in (CALL, as_text)]
    path = write_jsonl(tmp_path / "calls.jsonl", rows)
    loaded = OpenAIFormatDataset.load(path, {"use_preserving_dataset": preserving}, "data_path")
    expected = render_jinja_template(
        conversations=[[user, {**assistant, "tool_calls": [as_text]}]],
        chat_template=DEEPSEEK_SHAPE,
        **tok.special_tokens_map,
    )[0][0]
    call = (
        "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>'
    )
    for e in enc.encode([loaded[0], loaded[1]], ["object", "string"]):
        assert e.text == expected and e.text.endswith(call)
        assert loss_text(tok, e).endswith(call)  # trained, up to the end-of-turn token


@pytest.mark.parametrize("name", ["qwen3", "llama3_1"])
def test_templates_that_expect_a_string_get_an_empty_content(fixture_tokenizer_path, name):
    # Qwen3's template fails on None ('</think>' in content); Llama's `content | trim` would print "None".
    tok = tokenizer(fixture_tokenizer_path, name)
    enc = encoder(tok)
    assert not enc.null_content
    e = enc.encode([TOOL_ROW], ["row"])[0]
    empty = [dict(m, content=m["content"] or "") for m in TOOL_ROW["messages"]]
    assert e.text == tok.apply_chat_template(empty, tools=[TOOL], tokenize=False) and "None" not in e.text


# ----------------------------------------------------------------------------- content parts


@pytest.mark.parametrize("name", ["qwen3", "llama3_1"])
def test_text_parts_are_joined(fixture_tokenizer_path, name):
    tok = tokenizer(fixture_tokenizer_path, name)
    enc = encoder(tok)
    assert not enc.content_parts
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        ]
    }
    joined = {"messages": [{"role": "user", "content": "Hello\nworld"}, {"role": "assistant", "content": "Hi\nthere"}]}
    a, b = enc.encode([parts, joined], ["a", "b"])
    assert a.ids.tolist() == b.ids.tolist() and a.loss.tolist() == b.loss.tolist() and a.loss.any()
    bad = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "x.png"}},
                ],
            },
            {"role": "assistant", "content": "A cat."},
        ]
    }
    with pytest.raises(DataError, match=r"row 7: message 0 \(user\): content part 1 is of type 'image_url'"):
        enc.encode([bad], ["row 7"])


def test_a_template_that_iterates_over_parts_gets_them(fixture_tokenizer_path):
    enc = encoder(tokenizer(fixture_tokenizer_path, "qwen3", PARTS_TEMPLATE))
    assert enc.content_parts
    user = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    e = enc.encode(
        [
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": "c"}]},
                ]
            }
        ],
        ["r"],
    )[0]
    assert e.text == "<user>a|b|<assistant>c|"


# ----------------------------------------------------------------------------- errors with place


@pytest.mark.parametrize("preserving", [False, True])
def test_bad_bytes_and_empty_files_name_the_file_and_line(tmp_path, preserving):
    bad = write_jsonl(tmp_path / "bad.jsonl", [PLAIN], b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: bytes that are not UTF-8"):
        OpenAIFormatDataset.load(bad, {"use_preserving_dataset": preserving}, "data_path")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: no records"):
        OpenAIFormatDataset.load(str(empty), {"use_preserving_dataset": preserving}, "data_path")
    broken = write_jsonl(tmp_path / "broken.jsonl", [PLAIN, PLAIN], b'{"messages": [\n')
    with pytest.raises(DataError, match=r"broken.jsonl:3: malformed JSON line"):
        OpenAIFormatDataset.load(broken, {"use_preserving_dataset": preserving}, "data_path")


def test_json_list_file_with_bad_bytes_names_the_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_bytes(b'[\n{"a": 1},\n{"a": "\xff"}\n]\n')
    with pytest.raises(DataError, match=r"list.json:3: bytes that are not UTF-8"):
        read_json_records(path)


def _conversation(i):
    return {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}


def test_places_of_carved_rows_are_their_lines(tmp_path):
    lines = []
    for i in range(40):  # blank lines shift line numbers against row numbers
        lines.append(json.dumps(_conversation(i)))
        if i % 7 == 3:
            lines.append("")
    path = tmp_path / "conv.jsonl"
    path.write_text("\n".join(lines) + "\n")
    section = {
        "dataset_name": "general-conversation-jsonl",
        "data_path": str(path),
        "split_validation_size": 0.25,
        "seed": 3,
    }
    cfg = load_config(None, [f"data.train={json.dumps(section)}", "data.validation=null"])
    ds = build_dataset(cfg)
    text = path.read_text().split("\n")
    for split in ("train", "validation"):
        rows = ds.formatted_ds[split]
        for i in range(len(rows)):
            m = re.fullmatch(r".*conv\.jsonl:(\d+) \(train\)", ds.place(split, i))
            assert m, ds.place(split, i)
            record = json.loads(text[int(m.group(1)) - 1])
            assert rows[i]["messages"][0]["content"] == record["conversations"][0]["value"]


def test_inspect_data_prints_good_rows_and_reports_bad_ones(tmp_path, fixture_tokenizer_path, capsys):
    bad = {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [PLAIN, bad, TOOL_ROW])
    args = [
        f"policy.tokenizer.name={fixture_tokenizer_path('qwen3')}",
        "policy.tokenizer.chat_template=default",
        "data.dataset_name=openai_format",
        f"data.train_data_path={path}",
        f"data.val_data_path={path}",
        "--num",
        "3",
        "--color",
        "never",
    ]
    with pytest.raises(SystemExit) as exit_:
        inspect_main(args)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2
    assert "=== train example 0:" in out and "=== train example 2:" in out and "example 1:" not in out
    assert re.search(r"error: train example 1: .*chat.jsonl:2 \(train\): message 0: unknown role 'narrator'", err)
    assert "1 of 3 examples failed" in err


# ----------------------------------------------------------------------------- the README's "on purpose" lines


def test_a_conversation_of_exactly_the_limit_is_kept_and_trained(fixture_tokenizer_path):
    from jax_sft.data.tokens import apply_overlength

    tok = tokenizer(fixture_tokenizer_path, "qwen3")
    e = encoder(tok).encode([PLAIN], ["row"])[0]
    n = len(e.ids)
    ids, loss, status = apply_overlength(e.ids, e.loss, n, "mask")  # NeMo RL: length >= limit is masked
    assert status == "ok" and loss.tolist() == e.loss.tolist() and loss.any()
    assert apply_overlength(e.ids, e.loss, n - 1, "mask")[2] == "masked"


def test_the_newline_after_the_end_of_turn_token_is_not_trained(fixture_tokenizer_path):
    tok = tokenizer(fixture_tokenizer_path, "qwen3")
    more = [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    two = {"messages": PLAIN["messages"] + more}
    e = encoder(tok).encode([two], ["row"])[0]
    assert "<|im_end|>\n<|im_start|>user" in e.text
    trained = loss_text(tok, e)
    assert "Hello!<|im_end|>" in trained and "<|im_end|>\n" not in trained


def test_validate_data_reports_every_bad_row_with_its_line(tmp_path, fixture_tokenizer_path, capsys):
    bad = {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            {"role": "assistant", "content": "y"},
        ]
    }
    train = write_jsonl(tmp_path / "train.jsonl", [PLAIN, bad, PLAIN, parts])
    val = write_jsonl(tmp_path / "val.jsonl", [PLAIN])
    args = [
        f"policy.tokenizer.name={fixture_tokenizer_path('qwen3')}",
        "policy.tokenizer.chat_template=default",
        "data.dataset_name=openai_format",
        f"data.train_data_path={train}",
        f"data.val_data_path={val}",
        "--validate_data",
    ]
    with pytest.raises(SystemExit) as exit_:
        inspect_main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: 2 rows failed" in err
    assert re.search(r"train.jsonl:2 \(train\): message 0: unknown role 'narrator'", err)
    assert re.search(r"train.jsonl:4 \(train\): message 0 \(user\): content part 0 is of type 'input_audio'", err)
    inspect_main([*args[:4], f"data.train_data_path={val}", args[5], "--validate_data"])  # all good: returns


def test_places_in_a_saved_dataset_folder_are_its_rows(tmp_path):
    import datasets as hf_datasets

    folder = tmp_path / "saved"
    hf_datasets.Dataset.from_list([_conversation(i) for i in range(30)]).save_to_disk(str(folder))
    section = {"dataset_name": "general-conversation-jsonl", "data_path": str(folder), "split_validation_size": 0.2}
    cfg = load_config(None, [f"data.train={json.dumps(section)}", "data.validation=null"])
    ds = build_dataset(cfg)
    for split in ("train", "validation"):
        rows = ds.formatted_ds[split]
        for i in range(len(rows)):
            m = re.fullmatch(rf"train \({re.escape(str(folder))}\) row (\d+)", ds.place(split, i))
            assert m, ds.place(split, i)
            assert rows[i]["messages"][0]["content"] == f"q{m.group(1)}"


def eight_lines_with_a_bad_byte_on_line_5(tmp_path) -> str:
    rows = [
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        for i in range(8)
    ]
    rows[4] = rows[4].replace('"a4"', '"caf\\u00e9"')
    data = "\n".join(rows).encode().replace(b"caf\\u00e9", b"caf\xe9") + b"\n"
    path = tmp_path / "bad_bytes.jsonl"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("validate", [False, True])
def test_a_non_utf8_byte_in_a_message_names_the_file_and_line(tmp_path, fixture_tokenizer_path, capsys, validate):
    """Arrow reads the byte without complaint and fails only when the row is read: the load names
    the file and line instead of pyarrow's UnicodeDecodeError (inspect_data, with and without
    --validate_data; the trainer: tests/test_first_contact.py)."""
    path = eight_lines_with_a_bad_byte_on_line_5(tmp_path)
    args = [
        f"policy.tokenizer.name={fixture_tokenizer_path('qwen3')}",
        "policy.tokenizer.chat_template=default",
        "data.dataset_name=openai_format",
        f"data.train_data_path={path}",
        f"data.val_data_path={path}",
    ] + (["--validate_data"] if validate else [])
    with pytest.raises(SystemExit) as exit_:
        exit_on_input_error(lambda: inspect_main(args))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f"error: {path}:5: bytes that are not UTF-8 (b'\\xe9'" in err


def test_system_prompt_file_is_applied_and_said_at_start_up(tmp_path, caplog):
    """NeMo RL's SFT never applies system_prompt_file (at 7ea279ab); jax_sft does, and says so."""
    prompt = tmp_path / "system.txt"
    prompt.write_text("Be brief.")
    path = write_jsonl(tmp_path / "chat.jsonl", [PLAIN])
    section = {"dataset_name": "openai_format", "data_path": path, "system_prompt_file": str(prompt)}
    cfg = load_config(None, [f"data.train={json.dumps(section)}", "data.validation=null", "sft.val_period=0"])
    with caplog.at_level("WARNING"):
        ds = build_dataset(cfg)
    assert ds.formatted_ds["train"][0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert any("NeMo RL's SFT does not apply system_prompt_file" in r.message for r in caplog.records)
