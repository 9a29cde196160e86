"""Evaluation shared by the trainer's periodic eval and experiments/evaluate.py.

For each test set: generate n samples per problem (greedy when n = 1 and temperature = 0),
grade every sample with the task's grader, and report per set
  * `<key>`: mean over problems of the mean over samples (mean@n; = accuracy for greedy),
  * `<name>` for a grader pair `<name>__num` / `<name>__den`: sum of num / sum of den over all
    problems and samples (a micro average, e.g. followed instructions / all instructions),
  * `pass@k` for k in ks (unbiased estimator of Chen et al. 2021 from n samples, c correct),
  * `n_problems`, and per-source breakdowns when a set mixes sources.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from tqdm import tqdm

from clipo_jax import sampling

RATIO_NUM, RATIO_DEN = "__num", "__den"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n - c, k) / C(n, k) (0 <= c <= n, k <= n)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, have {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def summarize(per_problem: Sequence[dict[str, float]]) -> dict[str, float]:
    """Set-level grades from per-problem grades (each the mean over that problem's samples): the
    mean over problems of every key, except that a pair `<name>__num` / `<name>__den` becomes one
    ratio `<name>` = sum(num) / sum(den) (every problem has the same number of samples, so this is
    the ratio of the sums over all samples; nan if the den sum is 0)."""
    if not per_problem:
        return {}
    res = {k: float(np.mean([p[k] for p in per_problem])) for k in per_problem[0]}
    for num_key in [k for k in res if k.endswith(RATIO_NUM)]:
        name = num_key[: -len(RATIO_NUM)]
        if name + RATIO_DEN not in res:
            continue
        num = float(sum(p[num_key] for p in per_problem))
        den = float(sum(p[name + RATIO_DEN] for p in per_problem))
        del res[num_key], res[name + RATIO_DEN]
        res[name] = num / den if den else float("nan")
    return res


def fit_test_sets(task, max_prompt_len: int):
    """-> (task with only the test prompts of at most ``max_prompt_len`` tokens, {set: number left
    out}); a set that loses none is not in the dict. The trainer bounds evaluation by the model's
    context (``model.max_seq_len - eval.max_new_tokens``); experiments/evaluate.py by its flag."""
    kept, left_out = {}, {}
    for name, rows in task.test_sets.items():
        kept[name] = [r for r in rows if len(task.encode_prompt(r)) <= max_prompt_len]
        if len(kept[name]) < len(rows):
            left_out[name] = len(rows) - len(kept[name])
    if not left_out:
        return task, {}
    return dataclasses.replace(task, test_sets=kept), left_out


def evaluate(
    task,
    sampler: sampling.Sampler,
    params,
    scfg: sampling.SamplingConfig,
    rng,
    batch_size: int = 64,
    ks: Sequence[int] = (),
    progress: bool = False,
    records: list | None = None,
) -> dict[str, dict[str, float]]:
    """-> {set name: {grade key: mean@n, 'pass@k': ..., 'n_problems': ...}}.

    If `records` is a list, one dict per problem (set, index, source, responses, grades) is appended.
    """
    n = scfg.n_samples
    results = {}
    for name, rows in task.test_sets.items():
        per_problem: list[dict[str, float]] = []
        correct_counts: list[int] = []
        by_source: dict[str, list[float]] = {}
        step = max(1, batch_size // n)
        for start in tqdm(range(0, len(rows), step), desc=f"eval {name}", disable=not progress, leave=False):
            chunk = rows[start : start + step]
            out = sampler(params, [task.encode_prompt(r) for r in chunk], jax.random.fold_in(rng, start), scfg)
            for i, row in enumerate(chunk):
                grades, texts = [], []
                for s in range(n):
                    r = i * n + s
                    text = sampling.response_text(task.tokenizer, out, r, scfg.stop_ids)
                    texts.append(text)
                    grades.append(task.grade(row, text))
                mean = {k: float(np.mean([g[k] for g in grades])) for k in grades[0]}
                per_problem.append(mean)
                correct_counts.append(int(sum(g["outcome"] >= 0.5 for g in grades)))
                by_source.setdefault(row.get("source", name), []).append(mean["outcome"])
                if records is not None:
                    records.append(
                        {
                            "set": name,
                            "index": row.get("index"),
                            "source": row.get("source"),
                            "responses": texts,
                            "grades": grades,
                        }
                    )
        res = summarize(per_problem)
        for k in ks:
            res[f"pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in correct_counts]))
        res["n_problems"] = len(per_problem)
        if len(by_source) > 1:
            res.update({f"source/{s}": float(np.mean(v)) for s, v in by_source.items()})
        results[name] = res
    return results
