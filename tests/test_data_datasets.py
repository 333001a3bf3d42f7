"""Dataset classes, the registry and bad input, on tiny local files of each hub schema."""

import gzip
import json
import warnings

import datasets as hf_datasets
import pytest

from jax_sft.config import ConfigError
from jax_sft.config.defaults import get_config
from jax_sft.data import DATASETS, build_dataset
from jax_sft.data.formats import OASST_SYSTEM_PROMPT, NoneFilledToolsWarning, TaskDataSpec
from jax_sft.data.readers import PreservingDataset
from jax_sft.errors import DataError


def cfg_with(**data):
    c = get_config()
    for k, v in data.items():
        c.data[k] = v
    return c


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_squad_from_local_files(tmp_path):
    row = {
        "id": "1",
        "title": "t",
        "context": "Paris is in France.",
        "question": "Where is Paris?",
        "answers": {"text": ["France", "in France"], "answer_start": [12, 9]},
    }
    train = write_jsonl(tmp_path / "train.jsonl", [row, row])
    val = write_jsonl(tmp_path / "val.jsonl", [row])
    ds = build_dataset(cfg_with(dataset_name="squad", train_data_path=train, val_data_path=val))
    assert len(ds.formatted_ds["train"]) == 2 and len(ds.formatted_ds["validation"]) == 1
    assert ds.formatted_ds["train"][0] == {
        "messages": [
            {"role": "system", "content": "Paris is in France."},
            {"role": "user", "content": "Where is Paris?"},
            {"role": "assistant", "content": "France"},
        ]
    }
    assert [d.task_spec for d in ds.datasets] == [TaskDataSpec("squad")] * 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**row, "answers": {"text": [], "answer_start": []}}])
    with pytest.raises(DataError, match=r"bad.jsonl:1 \(squad\): 'answers.text' is empty"):
        build_dataset(cfg_with(train={"dataset_name": "squad", "data_path": bad}))


def test_a_hub_dataset_that_cannot_be_reached_names_the_local_copy_key(monkeypatch):
    """Offline (as the tests run: HF_DATASETS_OFFLINE=1) or without network, a hub dataset is one
    error naming the section's data_path, not datasets' ConnectionError traceback."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(hf_datasets.config, "HF_DATASETS_OFFLINE", True)
    cfg = cfg_with(train={"dataset_name": "OpenMathInstruct-2", "split": "train_1M"})
    with pytest.raises(
        DataError, match=r"^data.train: dataset_name='OpenMathInstruct-2' is read from the Hugging Face "
    ):
        build_dataset(cfg)
    with pytest.raises(DataError, match=r"set data.train.data_path to a local copy"):
        build_dataset(cfg)


def _oasst_rows():
    def m(mid, parent, role, text):
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "lang": "en"}

    return [
        m("r1", None, "prompter", "Hi?"),
        m("a1", "r1", "assistant", "Hello."),
        m("a2", "r1", "assistant", "Hey."),
        m("p1", "a1", "prompter", "How are you?"),
        m("a3", "p1", "assistant", "Fine."),
        m("r2", None, "prompter", "Lonely root"),  # a single message: dropped, as in NeMo RL
    ]


def test_open_assistant_threads(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _oasst_rows())
    ds = build_dataset(cfg_with(dataset_name="open_assistant", train_data_path=train, val_data_path=train))
    convs = [[(m["role"], m["content"]) for m in row["messages"]] for row in ds.formatted_ds["train"]]
    system = ("system", OASST_SYSTEM_PROMPT)
    assert convs == [
        [system, ("user", "Hi?"), ("assistant", "Hello."), ("user", "How are you?"), ("assistant", "Fine.")],
        [system, ("user", "Hi?"), ("assistant", "Hey.")],
    ]
    assert len(ds.formatted_ds["validation"]) == 2
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        _oasst_rows() + [{"message_id": "x", "parent_id": "a3", "role": "moderator", "text": "?", "lang": "en"}],
    )
    with pytest.raises(ValueError, match="message x: unknown role 'moderator'"):
        build_dataset(cfg_with(dataset_name="open_assistant", train_data_path=bad, val_data_path=train))


def _tree(text, role="prompter", replies=()):
    return {"text": text, "role": role, "replies": list(replies)}


def test_open_assistant_trees_file_and_default_carve(tmp_path):
    """NeMo RL's source: the trees file (`{"prompt": tree}` per line, gzipped); every root-to-leaf path,
    one-message paths dropped, then 5% carved with seed 42."""
    trees = [
        {
            "message_tree_id": f"t{i}",
            "prompt": _tree(
                f"q{i}",
                replies=[
                    _tree(f"a{i}", "assistant", [_tree(f"q{i}b", replies=[_tree(f"a{i}b", "assistant")])]),
                    _tree(f"c{i}", "assistant"),
                ],
            ),
        }
        for i in range(20)
    ]
    trees.append({"message_tree_id": "lonely", "prompt": _tree("alone")})
    path = tmp_path / "oasst.trees.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(t) + "\n" for t in trees)
    ds = build_dataset(cfg_with(train={"dataset_name": "open_assistant", "data_path": str(path)}))
    sys = {"role": "system", "content": OASST_SYSTEM_PROMPT}
    every = [
        [
            sys,
            {"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": f"a{i}"},
            {"role": "user", "content": f"q{i}b"},
            {"role": "assistant", "content": f"a{i}b"},
        ]
        for i in range(20)
    ]
    every = [
        c
        for i in range(20)
        for c in (every[i], [sys, {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"c{i}"}])
    ]
    index = hf_datasets.Dataset.from_dict({"i": list(range(40))}).train_test_split(test_size=0.05, seed=42)
    assert [r["messages"] for r in ds.formatted_ds["train"]] == [every[i] for i in index["train"]["i"]]
    assert [r["messages"] for r in ds.formatted_ds["validation"]] == [every[i] for i in index["test"]["i"]]
    assert len(ds.formatted_ds["validation"]) == 2


def test_openmathinstruct2_carves_a_seeded_validation_split(tmp_path):
    rows = [{"problem": f"p{i}", "generated_solution": f"s{i}", "expected_answer": str(i)} for i in range(40)]
    train = write_jsonl(tmp_path / "omi2.jsonl", rows)
    c = cfg_with(dataset_name="openmathinstruct2", train_data_path=train)
    c.data.test_size, c.data.seed = 0.25, 7
    ds = build_dataset(c)
    expected = hf_datasets.load_dataset("json", data_files=train, split="train").train_test_split(
        test_size=0.25, seed=7
    )
    assert [r["messages"][0]["content"] for r in ds.formatted_ds["validation"]] == expected["test"]["problem"]
    assert len(ds.formatted_ds["train"]) == 30
    first = ds.formatted_ds["train"][0]["messages"]
    assert first[1]["content"] == "s" + first[0]["content"][1:]  # output_key "output" -> generated_solution
    c.data.output_key = "expected_answer"
    assert build_dataset(c).formatted_ds["train"][0]["messages"][1]["content"] == first[0]["content"][1:]
    c.data.output_key = "answer"
    with pytest.raises(KeyError, match="no column 'answer'"):
        build_dataset(c)


def test_response_dataset_keys_and_parquet(tmp_path):
    rows = [{"question": "2+2", "answer": "4"}, {"question": "3+3", "answer": "6"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    hf_datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "val.parquet"))
    c = cfg_with(
        dataset_name="ResponseDataset",
        train_data_path=train,
        val_data_path=str(tmp_path / "val.parquet"),
        input_key="question",
        output_key="answer",
    )
    ds = build_dataset(c)
    for split in ("train", "validation"):
        assert ds.formatted_ds[split][1] == {
            "messages": [{"role": "user", "content": "3+3"}, {"role": "assistant", "content": "6"}]
        }
    c.data.output_key = "output"
    with pytest.raises(KeyError, match=r"train.jsonl.*no column 'output'; the columns are \['question', 'answer'\]"):
        build_dataset(c)
    c.data.output_key = "answer"
    c.data.train_data_path = write_jsonl(tmp_path / "gap.jsonl", [*rows, {"question": "4+4"}])
    with pytest.raises(DataError, match=r"gap.jsonl:3: missing key 'answer'"):
        build_dataset(c)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n\n{"input": "c", "output": \n')
    with pytest.raises(ValueError, match=r"train.jsonl:3: malformed JSON line"):
        build_dataset(cfg_with(dataset_name="ResponseDataset", train_data_path=str(path), val_data_path=str(path)))
    with pytest.raises(ValueError, match=r"train.jsonl:3: malformed JSON line"):
        build_dataset(
            cfg_with(
                dataset_name="openai_format",
                train_data_path=str(path),
                val_data_path=str(path),
                use_preserving_dataset=True,
            )
        )


def _tool_rows():
    """Two tools whose arguments have different keys."""

    def row(name, args, props):
        return {
            "messages": [
                {"role": "user", "content": f"use {name}"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}],
                },
                {"role": "tool", "content": "ok"},
                {"role": "assistant", "content": "done"},
            ],
            "tools": [
                {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": props}}}
            ],
        }

    return [
        row("search", {"query": "jax"}, {"query": {"type": "string"}}),
        row(
            "calc",
            {"expression": "2+2", "precision": 2},
            {"expression": {"type": "string"}, "precision": {"type": "integer"}},
        ),
    ]


def _arguments(ds):
    return [
        next(m for m in row["messages"] if m.get("tool_calls"))["tool_calls"][0]["function"]["arguments"] for row in ds
    ]


def test_openai_format_preserving_keeps_each_tools_own_keys(tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", _tool_rows())
    c = cfg_with(
        dataset_name="openai_format",
        train_data_path=path,
        val_data_path=path,
        use_preserving_dataset=True,
        system_prompt="You use tools.",
    )
    ds = build_dataset(c)
    train = ds.formatted_ds["train"]
    assert isinstance(train, PreservingDataset)
    assert _arguments(train) == [{"query": "jax"}, {"expression": "2+2", "precision": 2}]
    assert train[1]["tools"] == _tool_rows()[1]["tools"]
    assert train[0]["messages"][0] == {"role": "system", "content": "You use tools."}


def test_openai_format_arrow_path_vs_preserving(tmp_path):
    """use_preserving_dataset=false reads through Arrow. datasets>=5 stores heterogeneous dicts from JSON
    as Json values (intact); a table whose schema was unified (Dataset.from_list, Parquet written from it,
    datasets<5's JSON loader) None-fills every argument key seen anywhere, and the loader warns."""
    rows = _tool_rows()
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    c = cfg_with(dataset_name="openai_format", train_data_path=path, val_data_path=path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arrow_json = build_dataset(c).formatted_ds["train"]
    filled = not all(
        a == r["messages"][1]["tool_calls"][0]["function"]["arguments"] for a, r in zip(_arguments(arrow_json), rows)
    )
    assert filled == any(issubclass(w.category, NoneFilledToolsWarning) for w in caught)
    assert filled == (int(hf_datasets.__version__.split(".")[0]) < 5)

    hf_datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "tools.parquet"))
    c.data.train_data_path = c.data.val_data_path = str(tmp_path / "tools.parquet")
    with pytest.warns(NoneFilledToolsWarning, match="use_preserving_dataset=true"):
        arrow_parquet = build_dataset(c).formatted_ds["train"]
    assert _arguments(arrow_parquet) == [
        {"query": "jax", "expression": None, "precision": None},
        {"query": None, "expression": "2+2", "precision": 2},
    ]


def test_openai_format_last_message_must_be_assistant(tmp_path):
    rows = _tool_rows()
    rows[1]["messages"] = rows[1]["messages"][:3]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    for preserving in (True, False):  # both name the 1-based line
        where = "tools.jsonl:2"
        c = cfg_with(
            dataset_name="openai_format", train_data_path=path, val_data_path=path, use_preserving_dataset=preserving
        )
        with pytest.raises(ValueError, match=f"{where}: the last message must be the assistant's.*'tool'"):
            build_dataset(c)


def test_openai_format_system_key_and_missing_chat_key(tmp_path):
    rows = [{"conv": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "sys": "S"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    c = cfg_with(
        dataset_name="openai_format",
        train_data_path=path,
        val_data_path=path,
        chat_key="conv",
        system_key="sys",
        use_preserving_dataset=True,
    )
    assert build_dataset(c).formatted_ds["train"][0]["messages"][0] == {"role": "system", "content": "S"}
    c.data.chat_key = "messages"
    with pytest.raises(DataError, match=r"c.jsonl:1: missing key 'messages' \(chat_key\)"):
        build_dataset(c)


def test_unknown_dataset_name_lists_the_registered_ones():
    with pytest.raises(
        ConfigError,
        match="'nope' is neither a registered dataset nor an importable class.*"
        r"\(supported: squad, open_assistant, OpenMathInstruct-2, ",
    ):
        build_dataset(cfg_with(dataset_name="nope"))
    with pytest.raises(ConfigError, match="neither a registered dataset"):
        build_dataset(cfg_with(train={"dataset_name": "no_such_module.Data"}))
    assert set(DATASETS) >= {
        "squad",
        "open_assistant",
        "OpenMathInstruct-2",
        "NuminaMath-1.5",
        "OpenR1-Math-220k",
        "tulu3_sft_mixture",
        "Nemotron-Cascade-2-SFT-Math",
        "general-conversation-jsonl",
        "arrow_text",
        "GSM8K",
        "gsm8k",
        "DeepScaler",
        "openai_format",
        "ResponseDataset",
    }


def test_user_dataset_class_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_data.py").write_text(
        "from jax_sft.data import TaskDataSpec\n"
        "class Mine:\n"
        "    def __init__(self, data_cfg):\n"
        "        rows = [{'messages': [{'role': 'user', 'content': data_cfg.get('greeting')},\n"
        "                              {'role': 'assistant', 'content': 'hi'}]}]\n"
        "        self.formatted_ds = {'train': rows, 'validation': rows}\n"
        "        self.task_spec = TaskDataSpec('mine')\n"
        "class NoSpec:\n"
        "    def __init__(self, data_cfg):\n"
        "        self.formatted_ds = {'train': []}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    c = cfg_with(dataset_name="my_data:Mine")
    c.data.greeting = "hello"
    ds = build_dataset(c)
    assert ds.formatted_ds["train"][0]["messages"][0]["content"] == "hello"
    assert build_dataset(cfg_with(dataset_name="my_data.Mine")).task_spec.task_name == "mine"
    with pytest.raises(TypeError, match="NoSpec.formatted_ds must be a dict with 'train' and 'validation'"):
        build_dataset(cfg_with(dataset_name="my_data:NoSpec"))


def test_none_filled_arguments_change_what_the_model_is_trained_to_emit(tmp_path, fixture_tokenizer_path):
    from transformers import AutoTokenizer

    from jax_sft.data.chat import ConversationEncoder

    tok = AutoTokenizer.from_pretrained(fixture_tokenizer_path("qwen3"))
    encoder = ConversationEncoder(tok, add_bos=True, add_eos=True, add_generation_prompt=True, only_unmask_final=False)
    rows = _tool_rows()
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    hf_datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "tools.parquet"))
    preserved = build_dataset(
        cfg_with(dataset_name="openai_format", train_data_path=path, val_data_path=path, use_preserving_dataset=True)
    ).formatted_ds["train"]
    with pytest.warns(NoneFilledToolsWarning):
        filled = build_dataset(
            cfg_with(
                dataset_name="openai_format",
                train_data_path=str(tmp_path / "tools.parquet"),
                val_data_path=str(tmp_path / "tools.parquet"),
            )
        ).formatted_ds["train"]
    good, bad = (encoder.encode([ds[0]], ["row 0"])[0].text for ds in (preserved, filled))
    assert '"arguments": {"query": "jax"}}' in good
    assert '"arguments": {"query": "jax", "expression": null, "precision": null}}' in bad


@pytest.mark.parametrize("preserving", [False, True])
def test_a_row_without_messages_names_the_keys_it_has(tmp_path, preserving):
    """Arrow fills the keys other rows have with None: the message lists only the row's own keys."""
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "id": 1}
    path = write_jsonl(tmp_path / "c.jsonl", [good, {"id": 2, "text": "no conversation"}])
    c = cfg_with(
        dataset_name="openai_format", train_data_path=path, val_data_path=path, use_preserving_dataset=preserving
    )
    with pytest.raises(DataError, match=r"c.jsonl:2: missing key 'messages'") as err:
        build_dataset(c)
    print("\n" + str(err.value))
    assert str(err.value).endswith("the row's keys are ['id', 'text']")
