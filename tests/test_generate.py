"""Generation with a KV cache: greedy parity with transformers' generate, sampling, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_models import FAMILIES, make_hf_model
from jax_sft.generate import Generator, Sampling, bucket, sample_next
from jax_sft.models import from_pretrained, sharding

EOS = 2
PROMPT_LENGTHS = (3, 9, 17)  # different lengths in one batch; 17 > 16 gives a second bucket


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 256, n).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(model, prompt, max_new):
    """transformers' greedy generate on one unpadded prompt: the new ids, up to and with eos."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new,
                             eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_transformers_generate(family, tmp_path):
    hf = make_hf_model(family, tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32, param_dtype=jnp.float32, attention="xla")
    max_new = 12  # with prompts of 3..17: past the 5-token windows of qwen2 / mistral
    gen = Generator(model, None, batch_size=4, stop_ids=[EOS])
    got = gen.generate(prompts(), Sampling(max_new_tokens=max_new))
    want = [hf_greedy(hf, p, max_new) for p in prompts()]
    assert got == want


def test_sharded_and_scanned_greedy_equal_transformers(tmp_path):
    """fsdp x tensor sharding and stacked (scanned) layers with caches give the same tokens."""
    hf = make_hf_model("qwen3", tmp_path)  # q/k norms, biases, GQA heads split over "tensor"
    want = [hf_greedy(hf, p, 10) for p in prompts(1)]
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    for scan in (False, True):
        model = from_pretrained(tmp_path, dtype=jnp.float32, param_dtype=jnp.float32, attention="xla",
                                mesh=mesh, scan_layers=scan)
        got = Generator(model, None, mesh=mesh, batch_size=3, stop_ids=[EOS]).generate(
            prompts(1), Sampling(max_new_tokens=10))
        assert got == want, scan


def test_stops_at_stop_id_and_fills_nothing_after(tmp_path):
    make_hf_model("llama", tmp_path)
    model = from_pretrained(tmp_path, dtype=jnp.float32, param_dtype=jnp.float32)
    free = Generator(model, None, stop_ids=[]).generate(prompts(), Sampling(max_new_tokens=8))
    stop = free[1][3]  # the 4th token of the second prompt's free run becomes a stop id
    got = Generator(model, None, stop_ids=[stop]).generate(prompts(), Sampling(max_new_tokens=8))
    for f, g in zip(free, got):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert g == f[:cut]
    assert len(got[1]) <= 4


def test_bucket_lengths():
    assert [bucket(n) for n in (1, 16, 17, 32, 33, 100)] == [16, 16, 32, 32, 64, 128]


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    key = jax.random.key(0)
    assert set(np.asarray(sample_next(logits, key, Sampling(temperature=0.0))).tolist()) == {0}
    top_k = np.asarray(sample_next(logits, key, Sampling(temperature=1.0, top_k=2)))
    assert set(top_k.tolist()) == {0, 1}
    # top_p 0.7: the smallest set with mass >= 0.7 is {0, 1}; 0.85 adds token 2.
    assert set(np.asarray(sample_next(logits, key, Sampling(temperature=1.0, top_p=0.7))).tolist()) == {0, 1}
    full = np.asarray(sample_next(logits, key, Sampling(temperature=1.0)))
    freq = np.bincount(full, minlength=4) / len(full)
    # 4000 draws: binomial standard deviation of a frequency <= 0.008; 5 sigma.
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_sampling_options_checked():
    with pytest.raises(ValueError, match="--top_p"):
        Sampling(top_p=0.0)
