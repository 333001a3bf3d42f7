"""NeMo RL's gpt-oss recipes and its Qwen2.5 recipes with tensor parallelism 2, 4 and 8, as they
are, with only the model (a tiny one of the family), the data location, the sizes and the output
folders overridden: 2 steps on 8 CPU devices.

The gpt-oss model is stored with MXFP4 experts as openai/gpt-oss-20b is (the recipes set
policy.dequantize_base_checkpoint: true); the two recipes differ in the expert axis (8 and 4).
The Qwen2 model's vocabulary is odd, so that tensor 2, 4 and 8 all pad it; before any update
every run's validation loss is transformers' (unpadded) on the same batches, and the three runs'
first steps (the same batch) agree in loss and gradient norm. The recipes run in their bfloat16,
so "equal" is to bfloat16 rounding. (tests/test_vocab_padding.py checks the padding exactly, in
float32.) `data.num_workers=0` counts as a size: a worker process takes ~20 s to start here."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
from hf_models import FAMILIES, save_mxfp4

from jax_sft import train
from jax_sft.config import IgnoredKeysWarning, load_config
from jax_sft.models import CausalLM, ModelConfig, save_pretrained
from jax_sft.quickstart import make_dataset, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT.parent / "shared" / "reference" / "nemo-rl-configs" / "examples" / "configs" / "recipes" / "llm"
GPT_OSS = ("sft-gpt-oss-20b-1n8g-fsdp8ep8-automodel.yaml", "sft-gpt-oss-20b-1n4g-fsdp4ep4-automodel.yaml")
QWEN25 = {  # tensor size: recipe
    2: "sft-qwen2.5-math7b-2n4g-megatron.yaml",
    4: "sft-qwen2.5-math7b-1n8g-megatron_fused_linear_logprobs.yaml",
    8: "sft-qwen2.5-32b-4n8g-fsdp2tp8sp-actckpt.v3.yaml",
}
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not RECIPES.is_dir(), reason="../shared/reference/nemo-rl-configs is absent"),
]


def _model(out: Path, tokenizer, hf: dict) -> Path:
    import jax.numpy as jnp
    from flax import nnx

    config = ModelConfig.from_hf_dict(hf)
    save_pretrained(CausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(0)), out, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """data/{squad,squad_val,omi2}.jsonl (the recipes' datasets' columns), math.txt (their prompt
    file), qwen2/ (vocabulary odd) and gpt_oss/ (8 experts, MXFP4) with a tiny BPE tokenizer."""
    out = tmp_path_factory.mktemp("recipes")
    (out / "data").mkdir()
    make_dataset(out / "data", train=256, val=32)
    rows = {
        split: [{m["role"]: m["content"] for m in json.loads(line)["messages"]} for line in open(out / "data" / f)]
        for split, f in (("train", "train.jsonl"), ("val", "val.jsonl"))
    }
    for name, split in (("squad", "train"), ("squad_val", "val")):
        squad = [{"context": "", "question": r["user"], "answers": {"text": [r["assistant"]]}} for r in rows[split]]
        (out / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in squad))
    omi2 = [
        {"problem": r["user"], "generated_solution": r["assistant"], "expected_answer": "", "problem_source": "test"}
        for r in rows["train"]
    ]
    (out / "data" / "omi2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in omi2))
    (out / "math.txt").write_text("Solve: {}")
    tokenizer = make_tokenizer([t for r in rows["train"] for t in r.values()], vocab_size=320)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,  # one layer: these tests are about the recipes (compile time grows with depth)
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    vocab = len(tokenizer) + 1 - len(tokenizer) % 2  # odd: no tensor size of 2, 4 or 8 divides it
    qwen2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab, rope_theta=10000.0)
    _model(out / "qwen2", tokenizer, dict(common, **qwen2, num_attention_heads=8, num_key_value_heads=8))
    gpt_oss = dict(FAMILIES["gpt_oss"][2], num_local_experts=8, output_router_logits=False)
    gpt_oss["layer_types"] = ["sliding_attention"]
    gpt_oss.update(architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=len(tokenizer))
    _model(out / "gpt_oss_bf16", tokenizer, dict(common, **gpt_oss, num_attention_heads=4, num_key_value_heads=2))
    save_mxfp4(out / "gpt_oss_bf16", out / "gpt_oss")
    return out


def recipe_config(recipe: str, assets: Path, model: str, out: Path, *sizes: str):
    """The recipe's config with only the model, data location, sizes and output folders overridden."""
    data = [
        f"data.train.data_path={assets / 'data' / ('squad.jsonl' if model == 'gpt_oss' else 'omi2.jsonl')}",
        f"data.validation.data_path={assets / 'data' / 'squad_val.jsonl'}" if model == "gpt_oss" else None,
        f"data.default.prompt_file={assets / 'math.txt'}" if model == "qwen2" else None,
    ]
    overrides = [
        f"policy.model_name={assets / model}",
        f"policy.tokenizer.name={assets / model}",
        *(d for d in data if d),
        "sft.max_num_steps=2",
        "sft.val_batches=1",
        "sft.val_global_batch_size=8",
        "sft.val_micro_batch_size=1",
        "policy.train_global_batch_size=8",
        "policy.train_micro_batch_size=1",
        "policy.max_total_sequence_length=64",
        "cluster.num_nodes=1",
        "cluster.gpus_per_node=8",
        "data.num_workers=0",  # tokenising 256 rows in-process (a worker process takes ~20 s to start)
        *sizes,
        f"checkpointing.checkpoint_dir={out / 'ckpt'}",
        f"logger.log_dir={out / 'logs'}",
        "logger.wandb_enabled=false",
        "logger.tensorboard_enabled=false",
        "logger.monitor_gpus=false",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IgnoredKeysWarning)
        return load_config(RECIPES / recipe, overrides)


def run_recipe(recipe: str, assets: Path, model: str, out: Path, *sizes: str) -> train.RunResult:
    return train.run(recipe_config(recipe, assets, model, out, *sizes))


def metrics(result: train.RunResult) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, open(result.run_dir / "metrics.jsonl")) if "train/loss" in r}


def test_gpt_oss_recipes_train_two_steps(assets, tmp_path, capsys):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    results = {r: run_recipe(r, assets, "gpt_oss", tmp_path / r) for r in GPT_OSS}
    out = capsys.readouterr().out
    for expert in (8, 4):
        assert f"mesh: {{'data': 1, 'fsdp': {8 // expert}, 'expert': {expert}, 'tensor': 1}} over 8 cpu devices" in out
    assert out.count("model: MXFP4 weights, dequantized on load to float32") == 2
    print("\nrecipe                                          exit  loss step 1  loss step 2  val step 0")
    for recipe, result in results.items():
        losses = result.train_losses
        assert result.exit_code == 0 and result.final_step == 2 and np.isfinite(list(losses.values())).all()
        print(f"{recipe:<48} {result.exit_code:>4}  {losses[1]:.6f}     {losses[2]:.6f}     {result.val_losses[0]:.6f}")
    a, b = (results[r] for r in GPT_OSS)  # the same model and batches, experts over 8 or 4 devices
    np.testing.assert_allclose(a.train_losses[1], b.train_losses[1], rtol=2e-3)
    np.testing.assert_allclose(a.val_losses[0], b.val_losses[0], rtol=2e-3)


def test_qwen25_recipes_with_tensor_2_4_8_pad_the_vocabulary_and_train(assets, tmp_path, capsys):
    """Each run's validation loss before any update is transformers' (the unpadded model) on the
    same batches; their first steps (the same batch) agree, and so do their gradient norms."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py)")
    import torch
    import transformers
    from hf_models import hf_val_loss

    from jax_sft import data as data_lib
    from jax_sft.config import make_plan

    results = {t: run_recipe(QWEN25[t], assets, "qwen2", tmp_path / str(t)) for t in QWEN25}
    out = capsys.readouterr().out
    vocab = json.loads((assets / "qwen2" / "config.json").read_text())["vocab_size"]
    cfg = recipe_config(QWEN25[8], assets, "qwen2", tmp_path / "8")
    hf = transformers.AutoModelForCausalLM.from_pretrained(assets / "qwen2", dtype=torch.float32).eval()
    reference = hf_val_loss(
        hf, data_lib.SFTData(make_plan(cfg, devices=8).data, data_lib.load_tokenizer(cfg)).val_batches()
    )
    print(f"\nvocabulary {vocab}; step-0 validation loss in transformers (float32, unpadded): {reference:.6f}")
    print("recipe                                                    tensor exit  val step 0  loss step 1  loss step 2")
    for tensor, result in results.items():
        losses = result.train_losses
        assert result.exit_code == 0 and result.final_step == 2 and np.isfinite(list(losses.values())).all()
        print(
            f"{QWEN25[tensor]:<58} {tensor:>6} {result.exit_code:>4}  {result.val_losses[0]:.6f}    "
            f"{losses[1]:.6f}     {losses[2]:.6f}"
        )
        assert f"'tensor': {tensor}}} over 8 cpu devices" in out
        assert f"model: vocabulary {vocab} padded to {-(-vocab // tensor) * tensor} rows" in out
        # bfloat16 compute against float32: 2e-3 relative (the recipes' precision).
        np.testing.assert_allclose(result.val_losses[0], reference, rtol=2e-3)
        np.testing.assert_allclose(losses[1], results[2].train_losses[1], rtol=2e-3)
        grad_norm = metrics(result)[1]["train/grad_norm"]
        np.testing.assert_allclose(grad_norm, metrics(results[2])[1]["train/grad_norm"], rtol=1e-2)
