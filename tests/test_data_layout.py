"""NeMo RL's dataset names and both data layouts: rows formatted as NeMo RL's classes format them (local
fixture rows with each hub dataset's columns), mixing, carving, max_samples, data.default, validation
null, custom classes of both protocols, key errors and describe_data."""

import json
import warnings

import datasets as hf_datasets
import pytest

from jax_sft.config import ConfigError, load_config, validate
from jax_sft.data import RawDataset, TaskDataSpec, build_dataset, describe_data
from jax_sft.data.sections import IgnoredDatasetKeyWarning


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(**data):
    """A validated config with these data keys."""
    return validate({"data": data})


def ua(user, assistant):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def messages(rows):
    return [r["messages"] for r in rows]


def one(name, path, **keys):
    ds = build_dataset(cfg(train={"dataset_name": name, "data_path": str(path), **keys}))
    return ds.formatted_ds["train"], ds


# ----------------------------------------------------------------------------- each dataset name


def test_math_datasets_format_user_problem_assistant_answer(tmp_path):
    numina = [  # AI-MO/NuminaMath-1.5 columns; NeMo RL keeps verifiable rows marked valid
        {
            "problem": "p0",
            "solution": "s",
            "answer": "3",
            "problem_type": "Algebra",
            "question_type": "math-word-problem",
            "problem_is_valid": "Yes",
            "solution_is_valid": "Yes",
            "source": "olympiads",
            "synthetic": False,
        },
        {
            "problem": "p1",
            "solution": "s",
            "answer": "proof",
            "problem_type": "Algebra",
            "question_type": "math-word-problem",
            "problem_is_valid": "Yes",
            "solution_is_valid": "Yes",
            "source": "x",
            "synthetic": False,
        },
        {
            "problem": "p2",
            "solution": "s",
            "answer": "5",
            "problem_type": "Algebra",
            "question_type": "proof",
            "problem_is_valid": "Yes",
            "solution_is_valid": "Yes",
            "source": "x",
            "synthetic": False,
        },
        {
            "problem": "p3",
            "solution": "s",
            "answer": "7",
            "problem_type": "Algebra",
            "question_type": "MCQ",
            "problem_is_valid": "Yes",
            "solution_is_valid": "No",
            "source": "x",
            "synthetic": False,
        },
        {
            "problem": "p4",
            "solution": "s",
            "answer": " NotFound ",
            "problem_type": "Algebra",
            "question_type": "MCQ",
            "problem_is_valid": "Yes",
            "solution_is_valid": "Yes",
            "source": "x",
            "synthetic": False,
        },
    ]
    rows, _ = one("NuminaMath-1.5", write_jsonl(tmp_path / "numina.jsonl", numina))
    assert messages(rows) == [ua("p0", "3")]
    rows, _ = one("NuminaMath-1.5", tmp_path / "numina.jsonl", verifiable_only=False, require_valid=False)
    assert messages(rows) == [ua(f"p{i}", r["answer"]) for i, r in enumerate(numina)]

    r1 = [{"problem": "x+1=2", "solution": "long", "answer": "1", "problem_type": "Algebra", "uuid": "u"}]
    assert messages(one("OpenR1-Math-220k", write_jsonl(tmp_path / "r1.jsonl", r1))[0]) == [ua("x+1=2", "1")]
    ds = [{"problem": "2+2", "answer": "4", "solution": "sol"}]
    assert messages(one("DeepScaler", write_jsonl(tmp_path / "ds.jsonl", ds))[0]) == [ua("2+2", "4")]
    aime = [{"id": 60, "problem": "Find n.", "solution": "...", "answer": "204", "url": "u", "year": "2024"}]
    rows, _ = one("AIME2024", write_jsonl(tmp_path / "aime.jsonl", aime), repeat=2)
    assert messages(rows) == [ua("Find n.", "204")] * 2
    aime25 = [{"question": "Find k.", "answer": 70, "id": "0"}]  # opencompass/AIME2025: question, int answer
    assert messages(one("AIME2025", write_jsonl(tmp_path / "aime25.jsonl", aime25))[0]) == [ua("Find k.", "70")]
    dapo = [
        {
            "data_source": "math_dapo",
            "prompt": [{"content": "Solve x.", "role": "user"}],
            "ability": "MATH",
            "reward_model": {"ground_truth": "34", "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": "i"},
        }
    ]
    for name in ("DAPOMath17K", "DAPOMathAIME2024"):
        rows, ds = one(name, write_jsonl(tmp_path / "dapo.jsonl", dapo))
        assert messages(rows) == [ua("Solve x.", "34")] and ds.datasets[0].task_name == name


def test_openmathinstruct2_today_defaults_and_recipe_keys(tmp_path):
    rows = [
        {
            "problem": f"p{i}",
            "generated_solution": f"s{i}",
            "expected_answer": str(i),
            "problem_source": "augmented_math",
        }
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "omi2.jsonl", rows)
    ds = build_dataset(cfg(train={"dataset_name": "OpenMathInstruct-2", "data_path": path}))
    index = hf_datasets.Dataset.from_dict({"i": list(range(40))}).train_test_split(test_size=0.05, seed=42)
    # today's default output_key is expected_answer; 5% carved with seed 42
    assert messages(ds.formatted_ds["train"]) == [ua(f"p{i}", str(i)) for i in index["train"]["i"]]
    assert messages(ds.formatted_ds["validation"]) == [ua(f"p{i}", str(i)) for i in index["test"]["i"]]
    ds = build_dataset(
        cfg(
            train={
                "dataset_name": "OpenMathInstruct-2",
                "data_path": path,
                "seed": 3,
                "output_key": "generated_solution",
                "split_validation_size": 4,
            }
        )
    )
    index = hf_datasets.Dataset.from_dict({"i": list(range(40))}).train_test_split(test_size=4, seed=3)
    assert messages(ds.formatted_ds["validation"]) == [ua(f"p{i}", f"s{i}") for i in index["test"]["i"]]


def test_gsm8k_extracts_the_answer_after_hashes(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "How many?", "answer": "3 + 4 = 7\n#### 7 "}])
    for name in ("GSM8K", "gsm8k"):
        assert messages(one(name, path)[0]) == [ua("How many?", "7")]
    assert messages(one("gsm8k", path, extract_answer=False)[0]) == [ua("How many?", "3 + 4 = 7\n#### 7 ")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1 \(gsm8k\): the answer has no '#### <answer>' line"):
        one("gsm8k", bad)


def test_chat_datasets_keep_their_messages_and_sample_max_samples(tmp_path):
    convs = [[{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(30)]
    tulu = write_jsonl(
        tmp_path / "tulu.jsonl", [{"id": f"i{i}", "messages": c, "source": "s"} for i, c in enumerate(convs)]
    )
    rows, ds = one("tulu3_sft_mixture", tulu, split_validation_size=0)
    assert messages(rows) == convs
    # max_samples: a seeded shuffle then the first rows, before the 5% carve (NeMo RL's order of steps)
    ds = build_dataset(
        cfg(train={"dataset_name": "Nemotron-Cascade-2-SFT-Math", "data_path": tulu, "max_samples": 20, "seed": 5})
    )
    picked = hf_datasets.Dataset.from_dict({"i": list(range(30))}).shuffle(seed=5).select(range(20))["i"]
    carve = hf_datasets.Dataset.from_dict({"j": list(range(20))}).train_test_split(test_size=0.05, seed=5)
    assert messages(ds.formatted_ds["train"]) == [convs[picked[j]] for j in carve["train"]["j"]]
    assert messages(ds.formatted_ds["validation"]) == [convs[picked[j]] for j in carve["test"]["j"]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "messages": convs[0][:1], "source": "s"}])
    with pytest.raises(
        ValueError, match=r"bad.jsonl:1 \(\S+\): the last message must be the assistant's, got role 'user'"
    ):
        one("tulu3_sft_mixture", bad)


def test_general_conversations_and_arrow_text(tmp_path):
    rows = [
        {
            "id": "0",
            "conversations": [
                {"from": "human", "value": "Hi "},
                {"from": "gpt", "value": "Hello"},
                {"from": "user", "value": "More?"},
                {"from": "agent", "value": "Yes."},
            ],
        }
    ]
    out, ds = one("general-conversation-jsonl", write_jsonl(tmp_path / "conv.jsonl", rows))
    assert messages(out) == [
        [
            {"role": "user", "content": "Hi "},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "More?"},
            {"role": "assistant", "content": "Yes."},
        ]
    ]
    assert ds.datasets[0].task_name == "general-conversation-jsonl"
    media = write_jsonl(
        tmp_path / "img.jsonl",
        [{"conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "a cat"}]}],
    )
    with pytest.raises(ValueError, match="img.jsonl:1: turn 0 holds the media tag <image>; jax_sft trains text"):
        one("general-conversation-jsonl", media)

    text = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in ("abc", "", "defg", "hi", "jklmn")])
    ds = build_dataset(cfg(train={"dataset_name": "arrow_text", "data_files": text}))
    assert messages(ds.formatted_ds["train"]) == [
        [{"role": "assistant", "content": t}] for t in ("abc", "defg", "hi", "jklmn")
    ]
    ds = build_dataset(cfg(train={"dataset_name": "arrow_text", "data_files": text, "characters_per_sample": 6}))
    assert [m[0]["content"] for m in messages(ds.formatted_ds["train"])] == ["abc\ndefg", "hi\njklmn"]
    assert ds.datasets[0].task_name == "x_token"


def test_response_dataset_task_name_and_messages_rows(tmp_path):
    (tmp_path / "dir").mkdir()
    path = write_jsonl(tmp_path / "dir" / "qa.v1.jsonl", [{"q": "2+2", "a": "4"}])
    rows, ds = one("ResponseDataset", path, input_key="q", output_key="a")
    assert messages(rows) == [ua("2+2", "4")]
    assert ds.datasets[0].task_name == "dir-qa"  # NeMo RL: the last two path parts, up to the first "."
    rows, _ = one("prompt_response_dataset", path, input_key="q", output_key="a")
    assert messages(rows) == [ua("2+2", "4")]
    saved = tmp_path / "saved"
    hf_datasets.DatasetDict(
        {
            "train": hf_datasets.Dataset.from_list([{"input": "x", "output": "y"}]),
            "test": hf_datasets.Dataset.from_list([{"input": "t", "output": "u"}]),
        }
    ).save_to_disk(str(saved))
    assert messages(one("ResponseDataset", saved, split="test")[0]) == [ua("t", "u")]
    with pytest.raises(KeyError, match=r"no split 'dev'; the splits are \['test', 'train'\]"):
        one("ResponseDataset", saved, split="dev")


# ----------------------------------------------------------------------------- layouts


def _qa(tmp_path, name, n, tag):
    return write_jsonl(tmp_path / name, [{"input": f"{tag}{i}", "output": f"{tag}{i}!"} for i in range(n)])


def test_mixed_train_datasets_carved_then_config_validation_and_task_specs(tmp_path):
    a, b, v = _qa(tmp_path, "a.jsonl", 20, "a"), _qa(tmp_path, "b.jsonl", 3, "b"), _qa(tmp_path, "v.jsonl", 2, "v")
    (tmp_path / "pa.txt").write_text("A: {}")
    (tmp_path / "pv.txt").write_text("V: {}")
    (tmp_path / "sys.txt").write_text("be brief")
    c = cfg(
        train=[
            {"data_path": a, "split_validation_size": 0.1, "seed": 1, "prompt_file": str(tmp_path / "pa.txt")},
            {"data_path": b, "prompt_file": None},
        ],
        validation={"data_path": v, "prompt_file": str(tmp_path / "pv.txt")},
        default={
            "dataset_name": "ResponseDataset",
            "processor": "sft_processor",
            "system_prompt_file": str(tmp_path / "sys.txt"),
        },
    )
    ds = build_dataset(c)
    carve = hf_datasets.Dataset.from_dict({"i": list(range(20))}).train_test_split(test_size=0.1, seed=1)
    sys = {"role": "system", "content": "be brief"}

    def conv(user, answer):
        return [sys, *ua(user, answer)]

    train = [conv(f"A: a{i}", f"a{i}!") for i in carve["train"]["i"]] + [conv(f"b{i}", f"b{i}!") for i in range(3)]
    assert messages(ds.formatted_ds["train"]) == train
    # validation: what train[0] carved (with its own spec), then data.validation
    val = [conv(f"A: a{i}", f"a{i}!") for i in carve["test"]["i"]] + [conv(f"V: v{i}", f"v{i}!") for i in range(2)]
    assert messages(ds.formatted_ds["validation"]) == val
    assert [d.task_name for d in ds.datasets] == [f"{tmp_path.name}-{n}" for n in "abv"]
    sys_prompt = f"system_prompt_file {tmp_path / 'sys.txt'} (a system message; NeMo RL's SFT ignores the key)"
    assert describe_data(c) == [
        f"train[0]: ResponseDataset (local {a}, 10% carved for validation, seed 1, "
        f"prompt_file {tmp_path / 'pa.txt'}, {sys_prompt})",
        f"train[1]: ResponseDataset (local {b}, {sys_prompt})",
        f"validation: ResponseDataset (local {v}, prompt_file {tmp_path / 'pv.txt'}, {sys_prompt})",
    ]


def test_validation_null_and_nothing_carved_means_no_validation(tmp_path):
    a = _qa(tmp_path, "a.jsonl", 4, "a")
    c = validate(
        {
            "data": {"train": {"dataset_name": "ResponseDataset", "data_path": a}, "validation": None},
            "sft": {"val_period": 0},
        }
    )
    ds = build_dataset(c)
    assert len(ds.formatted_ds["train"]) == 4 and len(ds.formatted_ds["validation"]) == 0
    assert describe_data(c)[-1].startswith("validation: none (data.validation is null")
    # NeMo RL asserts sft.val_period <= 0 when there is no validation data
    with pytest.raises(ConfigError, match=r"sft.val_period=10: expected 0 when there is no validation data"):
        describe_data(cfg(train={"dataset_name": "ResponseDataset", "data_path": a}))


def test_data_default_fills_what_a_section_lacks_and_its_own_null_wins(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "1", "a": "2", "input": "in", "output": "out"}])
    c = cfg(
        train={"data_path": path, "output_key": None},
        default={"dataset_name": "ResponseDataset", "input_key": "q", "output_key": "a"},
    )
    assert messages(build_dataset(c).formatted_ds["train"]) == [ua("1", "out")]


def test_custom_classes_of_both_protocols(tmp_path, monkeypatch):
    (tmp_path / "today_data.py").write_text(
        "from jax_sft.data import RawDataset\n"
        "class Mine(RawDataset):\n"
        "    def __init__(self, greeting='hi', **kwargs):\n"
        "        self.task_name = 'mine'\n"
        "        self.kwargs = kwargs\n"
        "        self.dataset = [{'messages': [{'role': 'user', 'content': greeting},\n"
        "                                      {'role': 'assistant', 'content': str(i)}]} for i in range(10)]\n"
        "        self.split_train_validation(kwargs.get('split_validation_size', 0), 42)\n"
        "class Plain:\n"
        "    def __init__(self, data_path):\n"
        "        self.task_name = 'plain'\n"
        "        self.dataset = [{'messages': [{'role': 'user', 'content': data_path},\n"
        "                                      {'role': 'assistant', 'content': 'ok'}]}]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "p.txt").write_text("Q: {}")
    c = cfg(
        train={
            "dataset_name": "today_data.Mine",
            "greeting": "hello",
            "split_validation_size": 0.2,
            "prompt_file": str(tmp_path / "p.txt"),
        }
    )
    ds = build_dataset(c)
    mine = ds.datasets[0]
    # constructed as NeMo RL does: Class(**section), then set_task_spec(section) and set_processor()
    assert mine.kwargs == {
        "dataset_name": "today_data.Mine",
        "split_validation_size": 0.2,
        "prompt_file": str(tmp_path / "p.txt"),
    }
    assert mine.task_spec == TaskDataSpec("mine", str(tmp_path / "p.txt"))
    assert len(ds.formatted_ds["train"]) == 8 and len(ds.formatted_ds["validation"]) == 2
    assert ds.formatted_ds["train"][0]["messages"][0] == {"role": "user", "content": "Q: hello"}
    ds = build_dataset(cfg(train={"dataset_name": "today_data.Plain", "data_path": "x"}))
    assert messages(ds.formatted_ds["train"]) == [ua("x", "ok")] and ds.datasets[0].task_spec == TaskDataSpec("plain")
    with pytest.raises(ConfigError, match=r"data.train.greeting: unknown key for dataset 'today_data.Plain'"):
        cfg(train={"dataset_name": "today_data.Plain", "data_path": "x", "greeting": "hi"})
    assert issubclass(type(mine), RawDataset)


def test_bad_section_keys_names_and_processors_are_one_line_each(tmp_path):
    a = _qa(tmp_path, "a.jsonl", 2, "a")
    with pytest.raises(ConfigError) as e:
        cfg(
            train=[
                {"dataset_name": "ResponseDataset", "data_path": a},
                {"dataset_name": "ResponseDataset", "data_path": a, "outptu_key": "x"},
            ]
        )
    assert e.value.problems == [
        "data.train[1].outptu_key: unknown key for dataset 'ResponseDataset'; it takes data_path, dataset_name, "
        "input_key, output_key, processor, prompt_file, seed, split, split_validation_size, subset, "
        "system_prompt_file, weight"
    ]
    with pytest.raises(ConfigError) as e:
        cfg(
            train={"dataset_name": "clevr-cogent", "split": "train"},
            validation={"dataset_name": "clevr-cogent", "split": "valA"},
        )
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(
        "data.train.dataset_name='clevr-cogent' is a vision-language dataset; "
        "jax_sft trains text-only causal LMs (supported: squad, "
    )
    with pytest.raises(ConfigError, match=r"data.default.processor='math_hf_data_processor': expected 'sft_processor'"):
        cfg(train={"dataset_name": "squad"}, default={"processor": "math_hf_data_processor"})
    with pytest.raises(ConfigError, match=r"data.train.data_path: required by dataset 'ResponseDataset'"):
        cfg(train={"dataset_name": "ResponseDataset"})
    with pytest.raises(
        ConfigError,
        match=r"data.train_data_path='x.jsonl': a key of the flat layout; with data.train "
        r"set, give it in the dataset section \(e.g. data.train.data_path\)",
    ):
        cfg(train={"dataset_name": "squad"}, train_data_path="x.jsonl")
    with pytest.raises(ConfigError, match=r"'HelpSteer3' is a preference dataset"):
        cfg(train={"dataset_name": "HelpSteer3"})
    with pytest.warns(
        IgnoredDatasetKeyWarning,
        match=r"data.train.split='train': dataset 'tulu3_sft_mixture' does "
        "not take this key; it is ignored",
    ):
        cfg(train={"dataset_name": "tulu3_sft_mixture", "split": "train"})


def test_describe_data_checks_local_files_without_loading(tmp_path):
    with pytest.warns(IgnoredDatasetKeyWarning, match="max_samples=100000: dataset 'OpenMathInstruct-2' does not"):
        c = cfg(
            train={
                "dataset_name": "OpenMathInstruct-2",
                "output_key": "generated_solution",
                "split": "train_1M",
                "split_validation_size": 0.05,
                "seed": 42,
                "max_samples": 100000,
            },
            default={"prompt_file": "examples/prompts/math.txt"},
        )
    with pytest.warns(IgnoredDatasetKeyWarning), pytest.raises(ConfigError) as e:
        describe_data(c)
    assert e.value.problems == [
        "data.default.prompt_file='examples/prompts/math.txt': no such file or folder (expected a local file)"
    ]
    (tmp_path / "math.txt").write_text("{}")
    c = cfg(
        train={"dataset_name": "OpenMathInstruct-2", "split": "train_1M", "data_path": "missing.parquet"},
        default={"prompt_file": str(tmp_path / "math.txt")},
    )
    with pytest.raises(
        ConfigError,
        match=r"data.train.data_path='missing.parquet': no such file or folder \(expected "
        r"a local copy of the hub dataset\)",
    ):
        describe_data(c)
    c = cfg(train={"dataset_name": "ResponseDataset", "data_path": "org/name", "split_validation_size": 0.1})
    assert describe_data(c) == ["train: ResponseDataset (hub org/name, 10% carved for validation, seed 42)"]


def test_guide_era_flat_yaml_with_nulls_and_interpolation_of_data_train(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text(
        "data:\n  dataset_name: squad\n  prompt_file: null\n  split: null\n  output_key: null\n  seed: null\n"
    )
    c = load_config(str(flat))
    assert (c.data.split, c.data.output_key, c.data.seed) == (None, None, None)
    assert describe_data(c) == [
        "train: squad (hub rajpurkar/squad, split train)",
        "validation: squad (hub rajpurkar/squad, split validation)",
    ]
    today = tmp_path / "today.yaml"
    today.write_text(
        "data:\n  train:\n    dataset_name: squad\n    split: train\n  validation:\n"
        "    dataset_name: squad\n    split: validation\n  default:\n    prompt_file: null\n"
        "    processor: sft_processor\n"
        "logger:\n  wandb:\n    name: sft-${data.train.dataset_name}\n"
    )
    c = load_config(str(today))
    assert c.logger.wandb.name == "sft-squad" and c.data.train == {"dataset_name": "squad", "split": "train"}
    assert describe_data(c) == [
        "train: squad (hub rajpurkar/squad, split train)",
        "validation: squad (hub rajpurkar/squad, split validation)",
    ]
    c = load_config(str(today), ["data.train.dataset_name=OpenMathInstruct-2", "data.train.split=train_2M"])
    assert c.logger.wandb.name == "sft-OpenMathInstruct-2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            describe_data(c)[0] == "train: OpenMathInstruct-2 (hub nvidia/OpenMathInstruct-2, split train_2M, "
            "5% carved for validation, seed 42)"
        )


def test_flat_val_split_reads_the_train_source(tmp_path):
    saved = tmp_path / "saved"
    hf_datasets.DatasetDict(
        {
            "train": hf_datasets.Dataset.from_list([{"q": "x", "a": "y"}]),
            "test": hf_datasets.Dataset.from_list([{"q": "t", "a": "u"}]),
        }
    ).save_to_disk(str(saved))
    c = cfg(
        dataset_name="ResponseDataset",
        train_data_path=str(saved),
        train_split="train",
        val_split="test",
        input_key="q",
        output_key="a",
    )
    ds = build_dataset(c)
    assert messages(ds.formatted_ds["train"]) == [ua("x", "y")]
    assert messages(ds.formatted_ds["validation"]) == [ua("t", "u")]
    assert describe_data(c) == [
        f"train: ResponseDataset (local {saved}, split train, input_key q, output_key a)",
        f"validation: ResponseDataset (local {saved}, split test, input_key q, output_key a)",
    ]
    with pytest.raises(ConfigError, match=r"data.train_data_path: required by dataset 'ResponseDataset'"):
        cfg(dataset_name="ResponseDataset")
