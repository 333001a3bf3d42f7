"""HF checkpoint import / export: round trips through transformers, sharded loading onto the
8 CPU devices of tests/conftest.py, the hub path (offline cache) and each bad-input error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import FAMILIES, MOE_FAMILIES, hf_logits, jax_logits, make_hf_model
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from jax_sft.models import CheckpointError, from_pretrained, save_pretrained, sharding
from jax_sft.models.hf_read import resolve_model_dir
from jax_sft.models.hf_write import EXPORT_MARKER, ExportTargetError, parse_size
from jax_sft.models.weights import HEADS, IN_HEADS, LINEAR, OUT_HEADS, SAME

VOCAB = 256


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: (make_hf_model(f, root / f), root / f) for f in FAMILIES}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_through_transformers(family, hf_models, tmp_path):
    hf, path = hf_models[family]
    model = from_pretrained(path, dtype=jnp.float32)
    out = tmp_path / "out"
    save_pretrained(model, out, max_shard_size="40KB")  # several shards + index

    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert "model.safetensors.index.json" in files and "generation_config.json" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [hf.__class__.__name__] and config["dtype"] == "float32"

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(reloaded) is type(hf)
    a, b = _state_dict(hf), _state_dict(reloaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))

    # Our own reader gets back exactly the parameters that were written.
    again = from_pretrained(out, dtype=jnp.float32)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again), nnx.state(model))


def test_single_shard_bf16_checkpoint_and_tokenizer(hf_models, tmp_path, fixture_tokenizer_path):
    hf, _ = hf_models["qwen3"]
    src = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(src)
    hf.to(torch.float32)
    model = from_pretrained(src, dtype=jnp.float32, param_dtype=jnp.float32)
    stored = load_file(str(src / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert stored.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(model.layers[0].mlp.up_proj.kernel[...], stored.astype(np.float32).T)

    tokenizer = transformers.AutoTokenizer.from_pretrained(fixture_tokenizer_path("qwen3"))
    out = tmp_path / "out"
    save_pretrained(model, out, tokenizer=tokenizer)  # dtype None: the source's bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not (out / "model.safetensors.index.json").exists()
    written = load_file(str(out / "model.safetensors"))
    assert written["model.layers.0.mlp.up_proj.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        written["model.layers.0.mlp.up_proj.weight"].astype(np.float32), stored.astype(np.float32)
    )
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again.chat_template == tokenizer.chat_template and again.chat_template
    assert again("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_save_replaces_its_own_export_atomically(hf_models, tmp_path):
    model = from_pretrained(hf_models["mistral"][1], dtype=jnp.float32)
    out = tmp_path / "out"
    save_pretrained(model, out)
    assert (out / EXPORT_MARKER).is_file()
    (out / "stale.txt").write_text("old")

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, out, tokenizer=BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert (out / "stale.txt").read_text() == "old"  # the old folder is untouched

    save_pretrained(model, out)  # an earlier export (marker): replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


def test_save_refuses_folders_it_did_not_write(hf_models, tmp_path, monkeypatch):
    model = from_pretrained(hf_models["mistral"][1], dtype=jnp.float32)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(
        ExportTargetError, match=r"mine: the folder holds files that no jax_sft export wrote.*--overwrite"
    ):
        save_pretrained(model, mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    save_pretrained(model, tmp_path / "empty")  # an empty folder is fine
    save_pretrained(model, mine, overwrite=True)  # asked for explicitly
    assert not (mine / "notes.txt").exists() and (mine / EXPORT_MARKER).is_file()

    work = tmp_path / "work"
    ckpt = work / "results" / "ckpt"
    (ckpt / "step_2").mkdir(parents=True)
    (ckpt / "step_2" / "_CHECKPOINT_METADATA").write_text("{}")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for target in (ckpt, ckpt.parent, work, Path("."), tmp_path, Path("/")):  # never, even with --overwrite
        with pytest.raises(ExportTargetError, match="export never replaces"):
            save_pretrained(model, target, overwrite=True, protected=(ckpt,))
    with pytest.raises(ExportTargetError, match="it is a training checkpoint"):
        save_pretrained(model, ckpt / "step_2", overwrite=True)
    (work / "a_file").write_text("x")
    with pytest.raises(ExportTargetError, match="it is a file"):
        save_pretrained(model, work / "a_file", overwrite=True)
    assert (ckpt / "step_2" / "_CHECKPOINT_METADATA").read_text() == "{}" and (work / "a_file").read_text() == "x"


def test_layout_blocks_match_whole_conversion():
    """Reading any block of a parameter from the HF tensor equals the block of the whole
    converted parameter (what make_array_from_callback asks for on each device)."""
    rng = np.random.default_rng(3)
    cases = [(IN_HEADS, (6, 4, 3)), (OUT_HEADS, (4, 3, 6)), (HEADS, (4, 3)), (LINEAR, (5, 8)), (SAME, (6, 4))]
    for layout, shape in cases:
        full = rng.normal(size=shape)
        hf = layout.to_hf(full)
        assert hf.shape == layout.hf_shape(shape) and hf.flags.c_contiguous
        for _ in range(20):
            index = []
            for n in shape:
                a, b = sorted(rng.choice(n + 1, 2, replace=False))
                index.append(slice(int(a), int(b)))
            index = tuple(index)
            np.testing.assert_array_equal(layout.read(hf, shape, index), full[index])


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size='five'"):
        parse_size("five")


# --- sharded loading --------------------------------------------------------------------------


# MoE: test_families.py; MQA (Mistral's one kv head) cannot split over tensor 2.
@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f not in MOE_FAMILIES and FAMILIES[f][2].get("num_key_value_heads", 2) % 2 == 0]
)
def test_sharded_load_matches_unsharded(family, hf_models):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS for 8 CPU devices)")
    _, path = hf_models[family]
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
    plain = from_pretrained(path, dtype=jnp.float32)

    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (32, 2, q.shape[2])  # [64, 4, d] / (fsdp 2, tensor 2)
    assert sharded.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.layers[1].mlp.down_proj.kernel[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.norm.weight[...].sharding.spec == P(None)
    assert len(q.sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, nnx.state(sharded), nnx.state(plain))

    ids = np.random.default_rng(1).integers(0, VOCAB, (4, 16))
    ids_sharded = jax.device_put(jnp.asarray(ids), sharding.batch_sharding(mesh))
    assert ids_sharded.sharding.spec == P(("data", "fsdp", "expert"), None)
    with jax.set_mesh(mesh):
        a = jax_logits(sharded, ids_sharded)
    b = jax_logits(plain, ids)
    diff = float(np.abs(a - b).max() / np.abs(b).max())
    assert diff < 1e-5, f"sharded vs unsharded rel err {diff:.2e}"


def test_make_mesh_and_param_shardings(hf_models):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    mesh = sharding.make_mesh(data=2, fsdp=-1, tensor=1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="data=3 x tensor=1 = 3 does not divide the 8 devices"):
        sharding.make_mesh(data=3, fsdp=-1, tensor=1)
    with pytest.raises(ValueError, match="data=2 x fsdp=2 x tensor=1 = 4 does not match the 8 devices"):
        sharding.make_mesh(data=2, fsdp=2, tensor=1)

    model = from_pretrained(hf_models["llama"][1], dtype=jnp.float32)  # tied embeddings
    specs = sharding.param_shardings(model, sharding.make_mesh(1, 4, 2))
    assert specs["layers"][0]["self_attn"]["o_proj"]["kernel"].get_value().spec == P("tensor", None, "fsdp")
    placed = jax.device_put(nnx.state(model), specs)  # the tree fits nnx.state(model)
    assert placed["embed_tokens"]["embedding"].get_value().sharding.spec == P("tensor", "fsdp")
    mistral = from_pretrained(hf_models["mistral"][1], dtype=jnp.float32)  # 1 kv head
    with pytest.raises(
        ValueError,
        match=(
            r"layers\.\*\.self_attn\.k_proj\.kernel \(64, 1, 16\): dimension 1 \('kv_heads', size 1\) "
            r"cannot be split over mesh axis tensor=2 \(nor can 3 more parameters\); "
            r"choose policy.jax_cfg.mesh.tensor dividing 1"
        ),
    ):
        sharding.param_shardings(mistral, sharding.make_mesh(1, 4, 2))


# --- hub ids ----------------------------------------------------------------------------------


def test_hub_id_resolves_from_offline_cache(hf_models, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(hf_models["llama"][1], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    assert resolve_model_dir("tiny-org/tiny-llama") == repo / "snapshots" / commit
    model = from_pretrained("tiny-org/tiny-llama", dtype=jnp.float32)
    assert model.config.architecture == "LlamaForCausalLM"
    with pytest.raises(FileNotFoundError, match="tiny-org/absent.*HF_HUB_OFFLINE"):
        from_pretrained("tiny-org/absent")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        from_pretrained(str(tmp_path / "no" / "such" / "dir"))


# --- bad input --------------------------------------------------------------------------------


def _rewrite_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_missing_safetensors(hf_models, tmp_path):
    folder = _copy(hf_models["llama"][1], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"m: neither model\.safetensors nor model\.safetensors\.index\.json"):
        from_pretrained(folder)


def test_corrupt_safetensors(hf_models, tmp_path):
    folder = _copy(hf_models["llama"][1], tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{path}: not a readable safetensors file"):
        from_pretrained(folder)


def test_shape_disagrees_with_config(hf_models, tmp_path):
    folder = _copy(hf_models["qwen2"][1], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=(
            r"m/model\.safetensors: tensor model\.layers\.0\.mlp\.down_proj\.weight has shape \(64, 128\), "
            r"but config\.json implies \(64, 96\)"
        ),
    ):
        from_pretrained(folder)


def test_unused_tensor(hf_models, tmp_path):
    folder = _copy(hf_models["mistral"][1], tmp_path / "m")
    _rewrite_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
    with pytest.raises(
        CheckpointError,
        match=r"not used by MistralForCausalLM: model\.layers\.0\.self_attn\.q_norm\.weight \(model\.safetensors\)",
    ):
        from_pretrained(folder)


def test_missing_tensor(hf_models, tmp_path):
    folder = _copy(hf_models["qwen3"][1], tmp_path / "m")
    path = _rewrite_tensors(folder, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=f"{path}: tensor model.layers.1.self_attn.k_norm.weight is missing"):
        from_pretrained(folder)


def test_index_lists_missing_shard(hf_models, tmp_path):
    model = from_pretrained(hf_models["llama"][1], dtype=jnp.float32)
    out = tmp_path / "out"
    save_pretrained(model, out, max_shard_size="40KB")
    second = sorted(out.glob("model-00002-of-*.safetensors"))[0]
    second.unlink()
    with pytest.raises(CheckpointError, match=f"index.json: lists {second.name}, which does not exist"):
        from_pretrained(out)


def test_unsupported_architecture_on_disk(hf_models, tmp_path):
    folder = _copy(hf_models["llama"][1], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match="GPTNeoXForCausalLM.*supported architectures: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
        "MistralForCausalLM",
    ):
        from_pretrained(folder)


def _theirs_and_ours(folder, ids):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    ours = from_pretrained(folder, dtype=jnp.float32)
    return hf_logits(theirs, ids), jax_logits(ours, ids), ours


def test_tied_embeddings_with_lm_head_in_checkpoint_follow_transformers(hf_models, tmp_path):
    """tie_word_embeddings=true: a stored lm_head.weight equal to the embedding is ignored, a
    different one unties the model, a lone lm_head.weight is the tied matrix: as transformers 5."""
    hf, src = hf_models["llama"]
    rng = np.random.default_rng(2)
    ids = rng.integers(0, VOCAB, (1, 10))
    embed = load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"]

    same = _copy(src, tmp_path / "same")
    _rewrite_tensors(
        same,
        lambda t: t.update(
            {
                "lm_head.weight": embed.copy(),
                "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),  # old buffer: ignored
            }
        ),
    )
    theirs, ours, model = _theirs_and_ours(same, ids)
    np.testing.assert_array_equal(theirs, hf_logits(hf, ids))
    assert model.lm_head is None and float(np.abs(ours - theirs).max() / np.abs(theirs).max()) < 1e-4

    different = _copy(src, tmp_path / "different")
    _rewrite_tensors(different, lambda t: t.update({"lm_head.weight": rng.normal(size=(VOCAB, 64)).astype(np.float32)}))
    theirs, ours, model = _theirs_and_ours(different, ids)
    assert not model.config.tie_word_embeddings and model.lm_head is not None
    assert float(np.abs(theirs - hf_logits(hf, ids)).max()) > 1e-2  # transformers untied too
    assert float(np.abs(ours - theirs).max() / np.abs(theirs).max()) < 1e-4
    save_pretrained(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(str(tmp_path / "saved" / "model.safetensors"))

    only_head = _copy(src, tmp_path / "only_head")
    _rewrite_tensors(only_head, lambda t: t.update({"lm_head.weight": t.pop("model.embed_tokens.weight")}))
    theirs, ours, model = _theirs_and_ours(only_head, ids)
    np.testing.assert_array_equal(theirs, hf_logits(hf, ids))
    assert model.lm_head is None and float(np.abs(ours - theirs).max() / np.abs(theirs).max()) < 1e-4
