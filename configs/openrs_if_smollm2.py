r"""OpenRS as RL reward supervision: SmolLM2-135M-Instruct on instruction following with
verifiable constraints, rewarded by the constraint checkers, OpenRS pointwise verifiable rubrics
and the OpenRS pairwise rubric judge.

  # a judge server (any OpenAI-compatible one: llama.cpp's server here, vLLM / SGLang on a cluster)
  python -m llama_cpp.server --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8080 --model_alias smollm2 &
  python -m experiments.train --config=configs/openrs_if_smollm2.py --workdir=runs/openrs_if \
      --config.reward.pairwise_rubric.judge.base_url=http://127.0.0.1:8080 \
      --config.reward.pairwise_rubric.judge.model=smollm2
  # or the in-process judge: our own sampler with its own SmolLM2 weights on the run's mesh
  python -m experiments.train --config=configs/openrs_if_smollm2.py:judge=in-process --workdir=runs/openrs_if

Reward per response: 1.0 x the fraction of the prompt's constraints followed (``verifiable``,
IFEval/IFBench checkers) + 1.0 x PVR (guardrail penalties: empty, repetition loop) + 0.5 x the
pairwise rubric reward (each sample judged against the prompt's greedy decode: +1 / 0 / -1).
Evaluation: IFBench test prompts and a held-out IFEval-style set, greedy, prompt-level and
instruction-level strict accuracy.

Args (after the colon): size=cpu|tiny (tiny: the integration test), judge=openai|in-process|logit,
method=anchor|round_robin|bradley_terry, pairwise=W (weight of the pairwise term, 0 = off),
gate (hard constraints as gates), steps=N, seed=N. (The rows carry constraints, not rubric items:
the checklist_rubric term needs a task whose rows have a 'rubric' field.)
"""

import ml_collections

from clipo_jax.configlib import parse_arg
from configs import common


def get_config(arg=None):
    a = parse_arg(
        arg,
        size="cpu",
        judge="openai",
        method="anchor",
        pairwise=0.5,
        gate=False,
        steps=30,
        seed=0,
    )
    c = ml_collections.ConfigDict()
    c.task = ml_collections.ConfigDict(
        dict(name="instruct", tokenizer="smollm2", train_size=2000, seed=0, test_limit=64)
    )
    c.model = ml_collections.ConfigDict(dict(source="smollm2", dtype="float32"))
    c.sft = common.sft_block()
    c.rl = common.rl_block(
        steps=a.steps,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=96,
        max_prompt_len=192,
        temperature=1.0,
        lr=2e-6,
        warmup_steps=0,
        weight_decay=0.0,
        kl_coef=0.0,
        mini_batches=1,
        micro_batches=2,
        remat=True,
    )
    c.clipo = common.clipo_block(False)
    judge = dict(
        backend=a.judge,
        base_url="",
        model="smollm2" if a.judge != "openai" else "",
        max_concurrency=16,
        timeout_s=600.0,
        max_retries=2,
        max_tokens=256,
        parse_attempts=1,
        min_criteria=1,
        max_criteria=1 if a.judge == "logit" else 3,  # logit: one forward pass per criterion and order
        compact_chars=120,
    )
    c.reward = ml_collections.ConfigDict(
        dict(
            terms=dict(verifiable=1.0, pvr=1.0, pairwise_rubric=a.pairwise),
            label_term="verifiable",
            gate_reward=0.0,
            correct_threshold=0.999,  # "correct" = every constraint followed
            pvr=dict(ground_truth_weight=0.0, guardrail_weight=1.0, gate_constraints=a.gate),
            pairwise_rubric=dict(method=a.method, anchor="greedy", query_type="instruction_following", judge=judge),
        )
    )
    c.eval = ml_collections.ConfigDict(dict(every=0, max_new_tokens=192))
    c.ckpt = ml_collections.ConfigDict(dict(every=5, keep=2))
    if a.size == "tiny":  # the integration test: two steps against the real llama.cpp server
        c.task.update(train_size=64, test_limit=4)
        c.rl.update(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=16, micro_batches=1, remat=False)
        c.reward.pairwise_rubric.judge.update(max_tokens=96, compact_chars=40, min_criteria=1, max_criteria=1)
        c.eval.update(max_new_tokens=16)
        c.ckpt.every = 1
    elif a.size != "cpu":
        raise ValueError(f"unknown size {a.size!r}; valid: cpu, tiny")
    return common.finish(c, a.seed)
