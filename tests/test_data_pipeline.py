"""The Grain pipeline: fixed-shape batches, packing, sharding, epochs, over-length rules, validation,
bad input at construction and exact resume in a new process (Qwen3 tokenizer, tiny jsonl files)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jax_sft.config import default_config, load_config, make_plan
from jax_sft.data import ARRAY_KEYS, SFTData, load_tokenizer, pad_micro_batches
from jax_sft.data.batches import pack, process_dp_ranks
from jax_sft.errors import DataError


def conversation(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"question {i} " + "word " * (i % 9)},
            {"role": "assistant", "content": f"answer {i} " + "x " * (i * 3 % 17)},
        ]
    }


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    return (
        write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(30)]),
        write_jsonl(tmp_path / "val.jsonl", [conversation(100 + i) for i in range(7)]),
    )


def overrides(qwen_path, train, val, **kw):
    base = {
        "policy.tokenizer.name": str(qwen_path),
        "policy.tokenizer.chat_template": "default",
        "data.dataset_name": "openai_format",
        "data.use_preserving_dataset": True,
        "data.train_data_path": train,
        "data.val_data_path": val,
        "policy.max_total_sequence_length": 64,
        "policy.train_global_batch_size": 8,
        "policy.train_micro_batch_size": 2,
        "sft.val_global_batch_size": 4,
        "sft.val_micro_batch_size": 2,
        "data.overlength": "truncate",
        "data.tokenize": "upfront",  # the token cache (the default, lazy, has its tests below)
    }
    base.update(kw)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def build(fixture_tokenizer_path, files, dp_size=1, process_index=0, process_count=1, **kw):
    cfg = load_config(None, overrides(fixture_tokenizer_path("qwen3"), *files, **kw))
    return SFTData(
        make_plan(cfg, devices=dp_size).data,
        load_tokenizer(cfg),
        dp_ranks=process_dp_ranks(dp_size, process_index, process_count),
    )


def segments(mb: dict, r: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, token-aligned loss) of each segment of row r, rebuilt from the shifted arrays."""
    out = []
    for s in range(1, mb["segment_ids"][r].max() + 1):
        where = np.flatnonzero(mb["segment_ids"][r] == s)
        assert (np.diff(where) == 1).all(), "a segment is contiguous"
        np.testing.assert_array_equal(mb["positions"][r, where], np.arange(len(where)))
        ids = mb["input_ids"][r, where]
        np.testing.assert_array_equal(mb["targets"][r, where[:-1]], ids[1:])  # next token within the segment
        assert mb["loss_mask"][r, where[-1]] == 0
        out.append((ids, np.concatenate([[0], mb["loss_mask"][r, where[:-1]]])))
    return out


def check_padding(mb: dict, pad_id: int):
    pad = mb["segment_ids"] == 0
    assert (mb["input_ids"][pad] == pad_id).all() and (mb["loss_mask"][pad] == 0).all()
    assert (mb["positions"][pad] == 0).all()


def test_padded_batches(fixture_tokenizer_path, files):
    data = build(fixture_tokenizer_path, files)
    assert data.steps_per_epoch == 30 // 8
    step = next(data.train_iterator())
    assert (step.step, step.epoch, step.num_sequences, step.local_sequences) == (0, 0, 8, 8)
    assert step.num_micro_batches == 4  # 8 sequences / (2 per micro-batch * 1 rank)
    seen = []
    for mb in step.micro_batches:
        assert set(mb) == set(ARRAY_KEYS)
        assert all(a.shape == (2, 64) and a.dtype == np.int32 for a in mb.values())
        check_padding(mb, data.layout.pad_id)
        for r in range(2):
            ((ids, loss),) = segments(mb, r)
            seen.append((ids, loss))
    assert len(seen) == 8 and step.indices.shape == (8,)
    for (ids, loss), index in zip(seen, step.indices):
        cached = data.train_split.example(int(np.flatnonzero(data.train_split.source == index)[0]))
        np.testing.assert_array_equal(ids, cached[0])
        np.testing.assert_array_equal(loss, cached[1])
    assert step.num_loss_tokens == sum(int(mb["loss_mask"].sum()) for mb in step.micro_batches) > 0


def test_epochs_are_reshuffled_and_drop_the_partial_batch(fixture_tokenizer_path, files):
    data = build(fixture_tokenizer_path, files)
    it = data.train_iterator()
    epochs = [[next(it) for _ in range(data.steps_per_epoch)] for _ in range(2)]
    orders = [np.concatenate([s.indices for s in e]) for e in epochs]
    assert [s.epoch for s in epochs[1]] == [1, 1, 1]
    assert all(len(set(o.tolist())) == 24 for o in orders)  # 3 steps of 8 distinct examples of 30
    assert orders[0].tolist() != orders[1].tolist()
    unshuffled = build(fixture_tokenizer_path, files, **{"data.shuffle": False}).train_iterator()
    assert np.concatenate([next(unshuffled).indices for _ in range(3)]).tolist() == list(range(24))


def test_processes_read_disjoint_shards(fixture_tokenizer_path, files):
    parts = [build(fixture_tokenizer_path, files, dp_size=2, process_index=p, process_count=2) for p in range(2)]
    # 30 examples dealt into 8 shards (one per sequence of a step): shards 0-5 hold 4, 6-7 hold 3;
    # rank 0 supplies shards 0-3, rank 1 shards 4-7.
    assert [len(p.train_split) for p in parts] == [16, 14]
    assert set(parts[0].train_split.source) | set(parts[1].train_split.source) == set(range(30))
    assert not set(parts[0].train_split.source) & set(parts[1].train_split.source)
    steps = [next(p.train_iterator()) for p in parts]
    for s in steps:  # 8 sequences over 2 processes; micro-batches of 2 per rank * 2 ranks / 2 processes
        assert s.local_sequences == 4 and s.num_micro_batches == 2
        assert s.micro_batches[0]["input_ids"].shape == (2, 64)


@pytest.mark.parametrize("packing", [False, True])
def test_batches_do_not_depend_on_the_number_of_processes(fixture_tokenizer_path, files, packing):
    """dp 2: one process holding both ranks gives, row for row, the two processes' rows stacked;
    dp 1 takes the same sequences per step."""
    kw = {"policy.sequence_packing.enabled": packing, "policy.sequence_packing.train_mb_tokens": 128}
    one = build(fixture_tokenizer_path, files, dp_size=2, **kw)
    two = [build(fixture_tokenizer_path, files, dp_size=2, process_index=p, process_count=2, **kw) for p in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == two[1].steps_per_epoch
    iters = [one.train_iterator()] + [t.train_iterator() for t in two]
    for _ in range(one.steps_per_epoch + 1):  # into the second epoch
        whole, *parts = [next(it) for it in iters]
        assert whole.num_micro_batches == max(p.num_micro_batches for p in parts)
        parts = [pad_micro_batches(p, whole.num_micro_batches, one.layout.pad_id) for p in parts]
        for k, mb in enumerate(whole.micro_batches):
            for key in ARRAY_KEYS:
                np.testing.assert_array_equal(mb[key], np.concatenate([p.micro_batches[k][key] for p in parts]))
    # ... and a single data-parallel rank sees the same sequences in every step.
    single = build(fixture_tokenizer_path, files, dp_size=1, **kw).train_iterator()
    again = one.train_iterator()
    for _ in range(one.steps_per_epoch + 1):
        assert sorted(next(single).indices.tolist()) == sorted(next(again).indices.tolist())
    val_whole = list(one.val_batches())
    val_parts = [list(t.val_batches()) for t in two]
    assert len(val_whole) == len(val_parts[0]) == len(val_parts[1])
    for k, mb in enumerate(val_whole):
        for key in ARRAY_KEYS:
            np.testing.assert_array_equal(mb[key], np.concatenate([v[k][key] for v in val_parts]))


def test_packing(fixture_tokenizer_path, files):
    data = build(
        fixture_tokenizer_path,
        files,
        **{"policy.sequence_packing.enabled": True, "policy.sequence_packing.train_mb_tokens": 128},
    )
    it = data.train_iterator()
    for _ in range(data.steps_per_epoch):
        step = next(it)
        packed = []
        for mb in step.micro_batches:
            assert all(a.shape == (2, 64) for a in mb.values())  # 128 tokens = 2 rows of 64 per rank
            check_padding(mb, data.layout.pad_id)
            for r in range(2):
                packed += segments(mb, r)
        assert len(packed) == 8
        cached = {
            int(i): data.train_split.example(int(np.flatnonzero(data.train_split.source == i)[0])) for i in step.indices
        }
        assert sorted(len(p[0]) for p in packed) == sorted(len(c[0]) for c in cached.values())
        for ids, loss in packed:
            match = [c for c in cached.values() if np.array_equal(c[0], ids)]
            assert match and np.array_equal(match[0][1], loss)
        real = sum(len(p[0]) for p in packed)
        rows = sum(1 for mb in step.micro_batches for r in range(2) if mb["segment_ids"][r].any())
        assert rows == len(pack([len(p[0]) for p in packed], 64, "modified_first_fit_decreasing"))
        assert step.num_tokens == real


def test_pack_algorithms():
    lengths = [5, 9, 3, 7, 1, 6]
    assert pack(lengths, 10, "first_fit") == [[0, 2, 4], [1], [3], [5]]
    assert pack(lengths, 10, "first_fit_decreasing") == [[1, 4], [3, 2], [5], [0]]
    assert pack(lengths, 10, "best_fit") == [[1, 4], [3, 2], [5], [0]]
    assert pack([6, 5, 4], 10, "best_fit") == [[0, 2], [1]]
    for algorithm in ("first_fit", "best_fit", "modified_first_fit_decreasing"):
        bins = pack(lengths, 10, algorithm)
        assert sorted(i for b in bins for i in b) == list(range(6))
        assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    with pytest.raises(ValueError, match="does not fit a row of 10"):
        pack([11], 10, "first_fit")
    # policy.sequence_packing.max_sequences_per_bin: a row holding that many takes no more.
    assert pack([1] * 5, 10, "first_fit", 2) == [[0, 1], [2, 3], [4]]
    assert pack([5, 1, 1, 1, 1], 10, "best_fit", 3) == [[0, 1, 2], [3, 4]]
    assert pack(lengths, 10, "first_fit", 1) == [[i] for i in range(6)]


def test_max_sequences_per_bin_bounds_the_sequences_of_a_packed_row(fixture_tokenizer_path, files):
    kw = {
        "policy.sequence_packing.enabled": True,
        "policy.sequence_packing.train_mb_tokens": 256,
        "policy.max_total_sequence_length": 128,
    }
    data = build(fixture_tokenizer_path, files, **kw, **{"policy.sequence_packing.max_sequences_per_bin": 1})
    assert data.layout.batch.max_sequences_per_bin == 1
    free = build(fixture_tokenizer_path, files, **kw).train_iterator()
    it = data.train_iterator()
    for _ in range(3):
        bound, unbound = next(it), next(free)
        rows = [mb["segment_ids"][r].max() for mb in bound.micro_batches for r in range(mb["segment_ids"].shape[0])]
        assert max(rows) == 1 and bound.indices.tolist() == unbound.indices.tolist()
        assert max(mb["segment_ids"].max() for mb in unbound.micro_batches) > 1  # the bound changed the rows


def _long(tmp_path, train):
    rows = [json.loads(line) for line in open(train)]
    rows[3]["messages"][1]["content"] = "long " * 200  # far over 64 tokens
    rows[5]["messages"][0]["content"] = "long " * 200  # over-length before the assistant turn
    return write_jsonl(tmp_path / "long.jsonl", rows)


@pytest.mark.parametrize("mode", ["truncate", "drop", "mask"])
def test_overlength(fixture_tokenizer_path, files, tmp_path, mode):
    train = _long(tmp_path, files[0])
    kw = {"data.overlength": mode, "data.skip_examples_without_loss": True}
    data = build(fixture_tokenizer_path, (train, files[1]), **kw)
    stats = data.stats
    lengths = dict(zip(data.train_split.source.tolist(), data.train_split.lengths.tolist()))
    if mode == "truncate":  # example 5 loses its assistant turn: no loss left, skipped and counted
        assert (stats["data/train_truncated"], stats["data/train_skipped"], stats["data/train_kept"]) == (2, 1, 29)
        assert lengths[3] == 64 and 5 not in lengths
    elif mode == "drop":
        assert (stats["data/train_dropped"], stats["data/train_kept"]) == (2, 28)
        assert 3 not in lengths and 5 not in lengths
    else:
        assert (stats["data/train_masked"], stats["data/train_kept"], stats["data/train_skipped"]) == (2, 30, 0)
        for i in (3, 5):
            k = int(np.flatnonzero(data.train_split.source == i)[0])
            ids, loss = data.train_split.example(k)
            assert len(ids) == 64 and not loss.any()
    with pytest.raises(ValueError, match=r"long.jsonl:6 \(train\): no token to train on after truncation to 64 tokens"):
        build(fixture_tokenizer_path, (train, files[1]), **{"data.overlength": "truncate"})


def test_conversation_without_loss_is_an_error_or_skipped(fixture_tokenizer_path, files, tmp_path):
    rows = [conversation(i) for i in range(30)]
    rows[11]["messages"][1]["content"] = ""  # passthrough template, no eos: nothing to train on
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    kw = {"policy.tokenizer.chat_template": "null", "data.add_eos": False}
    with pytest.raises(ValueError, match=r"t.jsonl:12 \(train\): no token to train on .*skip_examples_without_loss"):
        build(fixture_tokenizer_path, (train, files[1]), **kw)
    data = build(fixture_tokenizer_path, (train, files[1]), **kw, **{"data.skip_examples_without_loss": True})
    assert (data.stats["data/train_skipped"], data.stats["data/train_kept"]) == (1, 29)
    assert 11 not in data.train_split.source


def test_bad_example_fails_at_construction(fixture_tokenizer_path, files, tmp_path):
    rows = [conversation(i) for i in range(30)]
    rows[27]["messages"].insert(1, {"role": "narrator", "content": "meanwhile"})
    rows[27]["messages"].append({"role": "assistant", "content": "end"})
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(ValueError, match=r"t.jsonl:28 \(train\): message 1: unknown role 'narrator'"):
        build(fixture_tokenizer_path, (train, files[1]))


def test_validation_batches(fixture_tokenizer_path, files):
    data = build(fixture_tokenizer_path, files, **{"sft.val_batches": 0})
    first, again = list(data.val_batches()), list(data.val_batches())
    assert data.num_val_batches == 2 and len(first) == 4  # 7 examples in batches of 4, micro-batches of 2
    for a, b in zip(first, again):
        for k in ARRAY_KEYS:
            np.testing.assert_array_equal(a[k], b[k])
    got = [segments(mb, r)[0][0] for mb in first for r in range(2) if mb["segment_ids"][r].any()]
    assert len(got) == 7
    for k, ids in enumerate(got):  # in order, unshuffled
        np.testing.assert_array_equal(ids, data.val_split.example(k)[0])
    assert not first[-1]["segment_ids"][1].any()  # the 8th row is padding
    assert len(list(build(fixture_tokenizer_path, files, **{"sft.val_batches": 1}).val_batches())) == 2


def test_layout_errors(fixture_tokenizer_path, files):
    with pytest.raises(
        ValueError, match="train_global_batch_size=8 is not divisible by micro batch 2 x data-parallel size 3"
    ):
        build(fixture_tokenizer_path, files, dp_size=3)
    # Rows are max_total_sequence_length rounded up to make_sequence_length_divisible_by: 64 -> 96.
    data = build(fixture_tokenizer_path, files, **{"policy.make_sequence_length_divisible_by": 48})
    assert next(data.train_iterator()).micro_batches[0]["input_ids"].shape == (2, 96)
    with pytest.raises(ValueError, match="train_mb_tokens=64 is less than one row of 96"):
        build(
            fixture_tokenizer_path,
            files,
            **{
                "policy.sequence_packing.enabled": True,
                "policy.sequence_packing.train_mb_tokens": 64,
                "policy.make_sequence_length_divisible_by": 48,
            },
        )


def test_pad_micro_batches(fixture_tokenizer_path, files):
    data = build(fixture_tokenizer_path, files)
    step = pad_micro_batches(next(data.train_iterator()), 6, data.layout.pad_id)
    assert step.num_micro_batches == 6 and not step.micro_batches[-1]["loss_mask"].any()
    check_padding(step.micro_batches[-1], data.layout.pad_id)


@pytest.mark.slow
def test_workers_give_the_same_cache_and_name_bad_examples(fixture_tokenizer_path, files, tmp_path):
    serial = build(fixture_tokenizer_path, files)
    parallel = build(fixture_tokenizer_path, files, **{"data.num_workers": 2})
    for a, b in ((serial.train_split, parallel.train_split), (serial.val_split, parallel.val_split)):
        for field in ("tokens", "loss", "starts", "source"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    rows = [conversation(i) for i in range(30)]
    rows[21]["messages"][0]["role"] = "narrator"
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(ValueError, match=r"t.jsonl:22 \(train\): message 0: unknown role 'narrator'"):
        build(fixture_tokenizer_path, (train, files[1]), **{"data.num_workers": 1, "data.use_preserving_dataset": True})


_RESUME = textwrap.dedent("""
    import json, sys
    import numpy as np
    from jax_sft.config import default_config, load_config, make_plan
    from jax_sft.data import SFTData, load_tokenizer
    overrides, state, n, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cfg = load_config(None, overrides)
    it = SFTData(make_plan(cfg, devices=1).data, load_tokenizer(cfg), dp_ranks=[0]).train_iterator()
    it.set_state(state)
    arrays = {}
    for s in range(n):
        step = next(it)
        arrays[f"{s}/epoch"] = np.asarray(step.epoch)
        for m, mb in enumerate(step.micro_batches):
            for k, v in mb.items():
                arrays[f"{s}/{m}/{k}"] = v
    np.savez(out, **arrays)
""")


@pytest.mark.parametrize("packing", [False, True])
def test_resume_in_a_new_process_across_an_epoch_boundary(fixture_tokenizer_path, files, tmp_path, packing):
    kw = {"policy.sequence_packing.enabled": packing, "policy.sequence_packing.train_mb_tokens": 128}
    data = build(fixture_tokenizer_path, files, **kw)
    it = data.train_iterator()
    k, n = 2, 4  # steps_per_epoch is 3: the resumed steps cross into epoch 1
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(n)]
    assert [s.epoch for s in expected] == [0, 1, 1, 1]
    out = tmp_path / "resumed.npz"
    cmd = [
        sys.executable,
        "-c",
        _RESUME,
        json.dumps(overrides(fixture_tokenizer_path("qwen3"), *files, **kw)),
        json.dumps(state),
        str(n),
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    got = np.load(out)
    for s, step in enumerate(expected):
        assert int(got[f"{s}/epoch"]) == step.epoch
        assert (
            len([key for key in got.files if key.startswith(f"{s}/") and key.endswith("/input_ids")])
            == step.num_micro_batches
        )
        for m, mb in enumerate(step.micro_batches):
            for key, value in mb.items():
                np.testing.assert_array_equal(got[f"{s}/{m}/{key}"], value)
    # A state from other data or settings is refused.
    other = build(fixture_tokenizer_path, files, **{**kw, "sft.seed": 7}).train_iterator()
    with pytest.raises(ValueError, match="saved for different data or settings.*'seed': \\(42, 7\\)"):
        other.set_state(state)


_NO_FLAT = {
    "data.dataset_name": "squad",
    "data.use_preserving_dataset": False,
    "data.train_data_path": None,
    "data.val_data_path": None,
}


@pytest.mark.parametrize("case", ["openai_format", "openmathinstruct2"])
def test_flat_and_today_layouts_give_identical_batches(fixture_tokenizer_path, files, tmp_path, case):
    """The guide's flat keys and today's data.train / data.validation / data.default describing the same
    data give the same rows, token ids, masks and steps (two epochs) and the same validation batches."""
    train, val = files
    if case == "openai_format":
        flat = {}
        today = {
            **_NO_FLAT,
            "data.train": {"dataset_name": "openai_format", "data_path": train},
            "data.validation": {"dataset_name": "openai_format", "data_path": val},
            "data.default": {"use_preserving_dataset": True},
        }
    else:  # a validation split carved from train, and a prompt file
        rows = [
            {
                "problem": f"problem {i} " + "w " * (i % 7),
                "generated_solution": f"solution {i}",
                "expected_answer": str(i),
            }
            for i in range(40)
        ]
        path = write_jsonl(tmp_path / "omi2.jsonl", rows)
        (tmp_path / "math.txt").write_text("Solve: {}")
        flat = {
            **_NO_FLAT,
            "data.dataset_name": "openmathinstruct2",
            "data.train_data_path": path,
            "data.test_size": 0.2,
            "data.seed": 3,
            "data.prompt_file": str(tmp_path / "math.txt"),
        }
        today = {
            **_NO_FLAT,
            "data.train": {
                "dataset_name": "OpenMathInstruct-2",
                "data_path": path,
                "output_key": "generated_solution",
                "split_validation_size": 0.2,
                "seed": 3,
            },
            "data.validation": None,
            "data.default": {"prompt_file": str(tmp_path / "math.txt"), "processor": "sft_processor"},
        }
    a = build(fixture_tokenizer_path, files, **flat)
    b = build(fixture_tokenizer_path, files, **today)
    if case != "openai_format":
        assert b.dataset.formatted_ds["train"][0]["messages"][0]["content"].startswith("Solve: problem ")
        assert (a.num_train_examples, a.num_val_examples) == (32, 8)
    assert (a.num_train_examples, a.num_val_examples) == (b.num_train_examples, b.num_val_examples)
    for x, y in ((a.train_split, b.train_split), (a.val_split, b.val_split)):
        for k in ("tokens", "loss", "starts", "source"):
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k))
    ia, ib = a.train_iterator(), b.train_iterator()
    for _ in range(2 * a.steps_per_epoch):
        sa, sb = next(ia), next(ib)
        np.testing.assert_array_equal(sa.indices, sb.indices)
        assert len(sa.micro_batches) == len(sb.micro_batches)
        for ma, mb in zip(sa.micro_batches, sb.micro_batches):
            for k in ARRAY_KEYS:
                np.testing.assert_array_equal(ma[k], mb[k])
    val_a, val_b = list(a.val_batches()), list(b.val_batches())
    assert len(val_a) == len(val_b) > 0
    for ma, mb in zip(val_a, val_b):
        for k in ARRAY_KEYS:
            np.testing.assert_array_equal(ma[k], mb[k])


def test_no_validation_data(fixture_tokenizer_path, files):
    """validation: null and nothing carved: no validation batches; NeMo RL requires sft.val_period <= 0 then."""
    today = {
        **_NO_FLAT,
        "data.train": {"dataset_name": "openai_format", "data_path": files[0]},
        "data.validation": None,
        "data.default": {"use_preserving_dataset": True},
    }
    data = build(fixture_tokenizer_path, files, **today, **{"sft.val_period": 0})
    assert (data.num_val_examples, data.num_val_batches, list(data.val_batches())) == (0, 0, [])
    assert data.steps_per_epoch == 30 // 8
    with pytest.raises(ValueError, match=r"sft.val_period=10: expected 0 when there is no validation data"):
        build(fixture_tokenizer_path, files, **today, **{"sft.val_period": 10})


# ----------------------------------------------------------------------------- lazy tokenisation


def _assert_same_steps(a, b, n):
    for _ in range(n):
        x, y = next(a), next(b)
        assert (x.step, x.epoch, x.num_tokens, x.num_loss_tokens) == (y.step, y.epoch, y.num_tokens, y.num_loss_tokens)
        assert x.indices.tolist() == y.indices.tolist() and x.num_micro_batches == y.num_micro_batches
        for p, q in zip(x.micro_batches, y.micro_batches):
            for key in ARRAY_KEYS:
                np.testing.assert_array_equal(p[key], q[key])


@pytest.mark.parametrize("packing", [False, True])
def test_the_default_lazy_gives_the_same_batches_as_upfront(fixture_tokenizer_path, files, packing):
    """The default start-up (data.tokenize=lazy) trains on today's batches for the same seed (no row
    dropped or skipped), on one process and on one of two."""
    default = default_config().data.tokenize
    assert default == "lazy"
    kw = {"policy.sequence_packing.enabled": packing, "policy.sequence_packing.train_mb_tokens": 128}
    for dp_size, process_index, process_count in ((1, 0, 1), (2, 1, 2)):
        up = build(fixture_tokenizer_path, files, dp_size, process_index, process_count, **kw)
        lazy = build(
            fixture_tokenizer_path, files, dp_size, process_index, process_count, **kw, **{"data.tokenize": default}
        )
        assert lazy.steps_per_epoch == up.steps_per_epoch == 3
        _assert_same_steps(up.train_iterator(), lazy.train_iterator(), 2 * up.steps_per_epoch + 1)
        for p, q in zip(up.val_batches(), lazy.val_batches(), strict=True):
            for key in ARRAY_KEYS:
                np.testing.assert_array_equal(p[key], q[key])


def test_lazy_state_is_global_and_resumes_with_workers(fixture_tokenizer_path, files):
    """The state is the next step: taken on 2 processes it resumes one process holding both ranks,
    with Grain workers, at the same batches."""
    lazy = {"data.tokenize": "lazy"}
    one = build(fixture_tokenizer_path, files, dp_size=2, **lazy).train_iterator()
    part = build(fixture_tokenizer_path, files, dp_size=2, process_index=1, process_count=2, **lazy).train_iterator()
    for _ in range(4):
        next(part)
    state = json.loads(json.dumps(part.get_state()))
    assert state["next_step"] == 4
    resumed = build(fixture_tokenizer_path, files, dp_size=2, **lazy, **{"data.num_workers": 1}).train_iterator()
    resumed.set_state(state)
    for _ in range(4):
        next(one)
    try:
        _assert_same_steps(one, resumed, 3)
    finally:
        resumed.close()


def test_lazy_bad_row_fails_when_reached_naming_its_line(fixture_tokenizer_path, files, tmp_path):
    rows = [conversation(i) for i in range(30)]
    rows[5]["messages"][0]["role"] = "narrator"
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    data = build(fixture_tokenizer_path, (train, files[1]), **{"data.tokenize": "lazy", "data.shuffle": False})
    it = data.train_iterator()  # built: nothing encoded yet
    with pytest.raises(DataError, match=r"t.jsonl:6 \(train\): message 0: unknown role 'narrator'"):
        next(it)  # step 0: rows 0..7, one in each of the 8 shards


# ----------------------------------------------------------------------------- weighted mixtures


def mixture(fixture_tokenizer_path, tmp_path, by="examples", dp_size=1, ranks=None, **kw) -> SFTData:
    """Two train files, weights 3 : 1: 40 short conversations and 25 longer ones."""
    a = write_jsonl(tmp_path / "a.jsonl", [conversation(3 * i) for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [conversation(1000 + i) for i in range(25)])
    for row in (b,):
        rows = [json.loads(line) for line in open(row)]
        for i, r in enumerate(rows):
            r["messages"][1]["content"] += " longer" * (10 + i % 7)
        write_jsonl(tmp_path / "b.jsonl", rows)
    sections = [
        {"dataset_name": "openai_format", "data_path": a, "weight": 3, "use_preserving_dataset": True},
        {"dataset_name": "openai_format", "data_path": b, "weight": 1, "use_preserving_dataset": True},
    ]
    base = {
        "policy.tokenizer.name": str(fixture_tokenizer_path("qwen3")),
        "policy.tokenizer.chat_template": "default",
        "data.train": json.dumps(sections),
        "data.validation": "null",
        "sft.val_period": 0,
        "data.mixture_by": by,
        "policy.max_total_sequence_length": 128,
        "policy.train_global_batch_size": 50,
        "policy.train_micro_batch_size": 25,
        **kw,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in base.items()])
    ranks = list(range(dp_size)) if ranks is None else ranks
    return SFTData(make_plan(cfg, devices=dp_size).data, load_tokenizer(cfg), dp_ranks=ranks)


@pytest.mark.parametrize("by", ["examples", "tokens"])
def test_a_mixture_draws_its_weights_over_10k_sequences(fixture_tokenizer_path, tmp_path, by):
    """3 : 1 of the sequences, or of the tokens, within 1% over 10,000 draws (200 steps of 50);
    each dataset is passed over in epochs of its own (every row drawn as often, +-1)."""
    data = mixture(fixture_tokenizer_path, tmp_path, by, **{"data.tokenize": "upfront"})
    assert data.mixture.sizes == (40, 25) and data.steps_per_epoch == 65 // 50
    lengths = dict(zip(data.train_split.source.tolist(), data.train_split.lengths.tolist()))
    it = data.train_iterator()
    drawn = np.concatenate([next(it).indices for _ in range(200)])
    assert len(drawn) == 10_000
    is_a = drawn < 40
    share = is_a.mean() if by == "examples" else sum(lengths[i] for i in drawn[is_a]) / sum(map(lengths.get, drawn))
    print(f"\nmixture by {by}: dataset a's share {share:.4%} over 10,000 draws (weight 75%)")
    assert abs(share - 0.75) < 0.01, share
    for rows, n in ((drawn[is_a], 40), (drawn[~is_a], 25)):
        counts = np.bincount(rows - rows.min(), minlength=n)
        assert counts.max() - counts.min() <= 1, counts
    shares = "75.00% of the sequences" if by == "examples" else "75.00% of the tokens"
    assert shares in data.describe_mixture()[1]  # the start-up log's line of train[0]
    if by == "tokens":  # longer conversations of b: fewer of its sequences for a quarter of the tokens
        assert is_a.mean() > 0.8 and data.mixture.mean_tokens[1] > data.mixture.mean_tokens[0]


def test_a_mixture_resumes_on_another_layout_at_the_same_batches(fixture_tokenizer_path, tmp_path):
    """Saved on 2 processes x 2 devices (data-parallel ranks 0-1 and 2-3 of 4), resumed on one
    process with 4 devices: the steps after the saved one equal the uninterrupted run's, and each
    process of the 2 x 2 run supplied its half of the 1 x 4 rows (the default, lazy)."""
    kw = {"policy.train_global_batch_size": 8, "policy.train_micro_batch_size": 1}
    whole = mixture(fixture_tokenizer_path, tmp_path, dp_size=4, **kw).train_iterator()
    halves = [
        mixture(fixture_tokenizer_path, tmp_path, dp_size=4, ranks=r, **kw).train_iterator() for r in ([0, 1], [2, 3])
    ]
    for _ in range(3):
        full, parts = next(whole), [next(h) for h in halves]
        assert np.concatenate([p.indices for p in parts]).tolist() == full.indices.tolist()
        assert parts[0].dataset_epochs == full.dataset_epochs
    state = json.loads(json.dumps(halves[1].get_state()))
    assert state["next_step"] == 3 and state["data"]["mixture"]["labels"] == ["train[0]", "train[1]"]
    resumed = mixture(fixture_tokenizer_path, tmp_path, dp_size=4, **kw).train_iterator()
    resumed.set_state(state)
    _assert_same_steps(whole, resumed, 4)
    other = mixture(fixture_tokenizer_path, tmp_path, dp_size=4, **kw, **{"data.mixture_by": "tokens"}).train_iterator()
    with pytest.raises(ValueError, match="saved for different data or settings"):
        other.set_state(state)
