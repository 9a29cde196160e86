"""Judge-backend flags shared by the rubric CLIs that run on any backend (refine_rubrics,
review_rubric_edit), and the backend keyword arguments they map to."""

from absl import app, flags

from clipo_jax.rubrics.types import DEFAULT_JUDGE_MAX_TOKENS


def define() -> None:
    flags.DEFINE_integer("limit", 0, "Use only the first N rows (0 = all).")
    flags.DEFINE_enum("backend", "openai", ["openai", "in-process", "logit"], "Judge backend.")
    flags.DEFINE_string("base_url", None, "openai backend: server URL.")
    flags.DEFINE_string("model", None, "openai: model name; in-process / logit: checkpoint path or 'smollm2'.")
    flags.DEFINE_integer("workers", 8, "Concurrent HTTP calls / local batch size.")
    flags.DEFINE_integer("max_tokens", DEFAULT_JUDGE_MAX_TOKENS, "Max new tokens per judgment (the release's 8192).")
    flags.DEFINE_integer("parse_attempts", 3, "Attempts per direction on unparseable output.")
    flags.DEFINE_integer("compact_chars", 0, "> 0: bound free-text answer fields.")


def backend_kwargs(
    name: str, model: str | None, base_url: str | None, cache_dir: str | None, workers: int, rng_seed: int = 0
) -> dict:
    """Keyword arguments of rubrics.registry.make_backend / registry.build_judge for backend `name`."""
    if name == "openai":
        if not base_url or not model:
            raise app.UsageError("--backend=openai needs --base_url and --model")
        return dict(base_url=base_url, model=model, max_concurrency=workers, cache_dir=cache_dir, rng_seed=rng_seed)
    return dict(model=model or "smollm2", cache_dir=cache_dir, max_batch=workers)
