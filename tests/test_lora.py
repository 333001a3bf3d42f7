"""LoRA against Hugging Face peft, and exporting LoRA checkpoints (CPU, tiny random models).

With the SAME adapter weights (random, non-zero B), written by `save_peft_adapter` and loaded by
`peft.PeftModel.from_pretrained` onto the HF model, the logits and the gradients of every A and B
of a masked NLL agree; the merged export (save_pretrained) and the PEFT export both reproduce the
LoRA model's loss in transformers.

Tolerances: everything runs in float32 (unit roundoff u = 6e-8). The largest sums are over the
vocabulary (256) and the MLP width (128), through 2 layers and the adapter's rank-4 path; torch
and XLA sum in different orders, so each dot product differs by up to ~n*u (1.5e-5) relative to
the sum of absolute terms, and the differences compound over the ~10 ops of the forward (and
backward) pass: 1e-4 relative to the largest entry bounds that with room. The losses are means
of log-softmaxes of those logits: the same 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

peft = pytest.importorskip("peft")

from hf_models import make_hf_model  # noqa: E402

from jax_sft.export import abstract_adapters, attach_lora  # noqa: E402
from jax_sft.models import from_pretrained, save_pretrained  # noqa: E402
from jax_sft.models.lora import LoRAParam  # noqa: E402
from jax_sft.models.options import LoraConfig, base_reference  # noqa: E402
from jax_sft.models.peft_io import (  # noqa: E402
    ADAPTER_CONFIG,
    matches,
    peft_tensors,
    save_peft_adapter,
    target_modules,
)

TOL = 1e-4
ALL_LINEAR = LoraConfig(dim=4, alpha=8.0, match_all_linear=True)
SOME = LoraConfig(dim=4, alpha=8.0, target_modules=("*_proj",), exclude_modules=("*.layers.1.*.o_proj", "down_proj"))
IDS = np.random.default_rng(0).integers(3, 256, size=(2, 12))
MASK = (np.random.default_rng(1).random((2, 12)) < 0.7) & (np.arange(12) >= 3)  # tokens in the loss


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    for family in ("llama", "qwen3", "gpt_oss"):
        make_hf_model(family, root / family)
    return {f: root / f for f in ("llama", "qwen3", "gpt_oss")}


def lora_model(base: Path, lora: LoraConfig, scan_layers: bool = False, seed: int = 0, std: float = 0.1):
    """The base with `lora` adapters set to random non-zero values of deviation `std` (B too;
    numpy draws them: jax.random would compile for seconds)."""
    model = from_pretrained(base, dtype=jnp.float32, param_dtype=jnp.float32, scan_layers=scan_layers)
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(abstract_adapters(model, lora))
    values = [(path, var.replace(jnp.asarray(std * rng.standard_normal(var.shape), jnp.float32))) for path, var in flat]
    return attach_lora(model, lora, nnx.from_flat_state(values))


def masked_nll(logits, ids, mask, xp):
    """Mean NLL of the next token over the masked-in targets (numpy/jax or torch)."""
    if xp is torch:
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -torch.gather(logp, -1, ids[:, 1:, None])[..., 0]
        m = mask[:, 1:].to(nll.dtype)
        return (nll * m).sum() / m.sum()
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, 1:].astype(nll.dtype)
    return (nll * m).sum() / m.sum()


def jax_loss_and_grads(model):
    """(logits, loss, {peft tensor name: gradient}) of the masked NLL w.r.t. the adapters."""
    graphdef, adapters, rest = nnx.split(model, LoRAParam, ...)

    @jax.jit
    def run(adapters):
        def loss_fn(adapters):
            logits = nnx.merge(graphdef, adapters, rest)(jnp.asarray(IDS))
            return masked_nll(logits, jnp.asarray(IDS), jnp.asarray(MASK), jnp), logits

        return jax.value_and_grad(loss_fn, has_aux=True)(adapters)

    (loss, logits), grads = run(adapters)
    return np.asarray(logits), float(loss), peft_tensors(grads)


def hf_loss(model, grads: bool = False):
    ids, mask = torch.as_tensor(IDS), torch.as_tensor(MASK)
    with torch.set_grad_enabled(grads):
        logits = model(input_ids=ids).logits
        loss = masked_nll(logits, ids, mask, torch)
    return logits, loss


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


# (family, adapters, scan_layers, exported through a LoRA checkpoint and the export CLI)
CASES = [
    ("llama", ALL_LINEAR, False, True),
    ("llama", SOME, False, False),
    ("qwen3", ALL_LINEAR, False, False),
    ("qwen3", SOME, False, False),
    ("qwen3", ALL_LINEAR, True, True),
    ("gpt_oss", ALL_LINEAR, False, False),  # attention projections and lm_head; the experts get none
]


@pytest.mark.parametrize(
    "family,lora,scan,cli",
    CASES,
    ids=["llama-all-cli", "llama-some", "qwen3-all", "qwen3-some", "qwen3-all-scan-cli", "gpt_oss-all"],
)
def test_parity_with_peft_and_exports(bases, tmp_path, family, lora, scan, cli):
    """Logits and adapter gradients as peft computes them; the merged and PEFT exports (written
    directly, or from a LoRA checkpoint by `python -m jax_sft.export`) reproduce the loss."""
    from jax_sft.export import main as export_main

    # gpt-oss: adapters on attention and lm_head only (none on experts), larger so that they matter.
    model = lora_model(bases[family], lora, scan_layers=scan, std=0.3 if family == "gpt_oss" else 0.1)
    logits, loss, grads = jax_loss_and_grads(model)
    if cli:
        step_dir = save_lora_checkpoint(model, tmp_path / "ckpt", 5, bases[family])
        export_main(
            ["--checkpoint", str(step_dir), "--out", str(tmp_path / "merged"), "--peft_out", str(tmp_path / "adapter")]
        )
        adapter_config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
        assert adapter_config["base_model_name_or_path"] == str(bases[family])
    else:
        save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(bases[family]))
        save_pretrained(model, tmp_path / "merged")

    # The adapter config selects exactly the adapted modules, in peft's own matching.
    pattern = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["target_modules"]
    assert isinstance(pattern, list) == (lora is ALL_LINEAR and family != "gpt_oss")  # MoE layers: a regex
    hf = load_hf(bases[family])
    module_names = [n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {n for n in module_names if matches(pattern, n)} == {
        n.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for n in grads if "lora_A" in n
    }

    base_nll = hf_loss(hf)[1].item()
    assert rel(loss, base_nll) > 100 * TOL  # the adapters matter far beyond the tolerance
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    peft_model.eval()
    hf_logits, hf_nll = hf_loss(peft_model, grads=True)
    hf_nll.backward()
    hf_grads = {n.replace(".default.", "."): p.grad.numpy() for n, p in peft_model.named_parameters() if "lora_" in n}
    assert sorted(hf_grads) == sorted(grads)
    ours = peft_tensors(nnx.state(model, LoRAParam))
    for name, p in peft_model.named_parameters():  # the adapters peft loaded are ours, exactly
        if "lora_" in name:
            np.testing.assert_array_equal(p.detach().numpy(), ours[name.replace(".default.", ".")], err_msg=name)

    assert rel(logits, hf_logits.detach().numpy()) < TOL
    grad_errors = {n: rel(grads[n], hf_grads[n]) for n in grads}
    assert max(grad_errors.values()) < TOL, sorted(grad_errors.items(), key=lambda x: -x[1])[:3]
    assert rel(loss, hf_nll.item()) < TOL

    # The merged export reproduces the loss in plain transformers.
    merged_loss = hf_loss(load_hf(tmp_path / "merged"))[1].item()
    assert rel(loss, merged_loss) < TOL
    case = f"{family} {'all' if lora is ALL_LINEAR else 'some'}{' scan' if scan else ''}{' cli' if cli else ''}"
    print(
        f"\n{case}: logits "
        f"{rel(logits, hf_logits.detach().numpy()):.1e} grads {max(grad_errors.values()):.1e} "
        f"peft loss {rel(loss, hf_nll.item()):.1e} merged loss {rel(loss, merged_loss):.1e} "
        f"(loss {loss:.6f}, peft {hf_nll.item():.6f}, merged {merged_loss:.6f}, base {base_nll:.6f})"
    )


def test_target_modules_are_exact():
    """A list when the same projections are adapted on every (dense) layer, else a regex that
    full-matches exactly the adapted modules."""
    from hf_models import COMMON

    from jax_sft.models.config import ModelConfig

    config = ModelConfig.from_hf_dict(
        {**COMMON, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 3}, source="test"
    )
    every = frozenset((i, p) for i in range(3) for p in ("q_proj", "v_proj"))
    assert target_modules(config, every) == ["q_proj", "v_proj"]
    assert target_modules(config, every | {(None, "lm_head")}) == ["q_proj", "v_proj", "lm_head"]
    some = every - {(1, "v_proj")} | {(2, "down_proj"), (None, "lm_head")}
    pattern = target_modules(config, some)
    assert isinstance(pattern, str)
    names = [
        f"model.layers.{i}.{parent}.{p}"
        for i in range(3)
        for parent, ps in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for p in ps
    ] + ["lm_head", "model.layers.10.self_attn.q_proj"]
    expected = {f"model.layers.{i}.{'mlp' if p == 'down_proj' else 'self_attn'}.{p}" for i, p in some if i is not None}
    assert {n for n in names if matches(pattern, n)} == expected | {"lm_head"}


# --- export of LoRA checkpoints ------------------------------------------------------------------


def save_lora_checkpoint(model, ckpt_dir: Path, step: int, base: Path) -> Path:
    """A LoRA checkpoint as train.py writes one: params = the adapters only (float32), extra files
    = the model config and lora.json (the base reference). Replace with a real run once train.py
    writes them."""
    from jax_sft.checkpoint import model_files

    adapters = nnx.split(model, LoRAParam, nnx.Param, ...)[1]
    reference = base_reference(model.lora, str(base), model.config.to_hf_dict())
    return _save_checkpoint(
        ckpt_dir, step, adapters, {**model_files(model.config), "lora.json": json.dumps(reference).encode()}
    )


def _save_checkpoint(ckpt_dir: Path, step: int, params, extra_files) -> Path:
    from jax_sft.checkpoint import Checkpointer

    ckpt = Checkpointer(ckpt_dir, save_optimizer=False, enable_async=False)
    ckpt.save(step, params=params, opt_state=None, train_info={"step": step}, data_state={}, extra_files=extra_files)
    ckpt.close()
    return ckpt_dir / f"step_{step}"


def test_export_refuses_another_base(bases, tmp_path, capsys):
    from jax_sft.export import main as export_main

    other = tmp_path / "other"
    shutil.copytree(bases["llama"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    step_dir = save_lora_checkpoint(lora_model(bases["llama"], SOME), tmp_path / "ckpt", 2, bases["llama"])
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--checkpoint", str(step_dir), "--out", str(tmp_path / "merged"), "--base", str(other)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"the base model {other} is not the one" in err and f"({bases['llama']})" in err, err
    assert not (tmp_path / "merged").exists()


def test_export_full_checkpoint_refuses_peft_out(bases, tmp_path, capsys):
    from jax_sft.checkpoint import model_files
    from jax_sft.export import main as export_main

    model = from_pretrained(bases["qwen3"], dtype=jnp.float32, param_dtype=jnp.float32)
    step_dir = _save_checkpoint(tmp_path / "ckpt", 1, nnx.state(model, nnx.Param), model_files(model.config))
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--checkpoint", str(step_dir), "--peft_out", str(tmp_path / "adapter")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "full fine-tune checkpoint" in err and "no LoRA adapters" in err, err
    assert not (tmp_path / "adapter").exists()
    for args, message in (
        (["--out", str(tmp_path / "hf"), "--base", str(bases["qwen3"])], "--base applies to LoRA"),
        ([], "nothing to export: pass --out"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            export_main(["--checkpoint", str(step_dir), *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
