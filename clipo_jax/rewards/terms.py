"""The built-in reward terms (registered by name in ``clipo_jax.rewards.stage.REWARD_TERMS``).

* ``verifiable``: the row's verifier (``row["reward_fn"]`` against ``row["ground_truth"]``), one
  value per response; math rows go through the verifier pool in one batch (hard deadlines).
* ``pvr``: OpenRS pointwise verifiable rubrics: ground truth (+1 / 0 / -1) where a row has one,
  guardrail penalties (empty, repetition loop, wrong language), and the row's hard constraints
  as a gate (a response that breaks one gets ``config.reward.gate_reward``).
* ``pairwise_rubric`` / ``checklist_rubric``: LLM-judge terms, in ``clipo_jax.rewards.judge_terms``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from clipo_jax.rewards.stage import RewardBatch, RewardError, RewardTerm, TermOutput, register_reward_term


@register_reward_term("verifiable")
class VerifiableTerm(RewardTerm):
    """The task's own per-response verifier. Settings: ``num_workers`` (math verifier pool
    processes, default 2, at least 1), ``timeout_s`` (per math check)."""

    required_fields = ("reward_fn", "ground_truth")
    settings_keys = ("num_workers", "timeout_s")

    def __init__(self, settings=None, context=None):
        super().__init__(settings, context)
        if int(self.settings.get("num_workers", 2)) < 1:  # the term runs off the main thread
            raise RewardError("verifiable.num_workers must be >= 1 (math checks run in worker processes)")

    def check_row(self, row: dict, where: str) -> None:
        super().check_row(row, where)
        from clipo_jax.rewards import get_reward

        try:
            get_reward(row["reward_fn"])
        except KeyError as e:
            raise RewardError(f"{where}: {e}") from None

    def score_sync(self, batch: RewardBatch) -> np.ndarray:
        from clipo_jax.rewards import batch_math_reward

        task = self.context.task if self.context is not None else None
        values = np.zeros(len(batch), np.float32)
        math_idx = [i for i in range(len(batch)) if batch.row(i)["reward_fn"] == "math"]
        if math_idx:
            kw = dict(num_workers=int(self.settings.get("num_workers", 2)))
            if "timeout_s" in self.settings:
                kw["timeout"] = float(self.settings["timeout_s"])
            got = batch_math_reward(
                [batch.responses[i] for i in math_idx], [batch.row(i)["ground_truth"] for i in math_idx], **kw
            )
            values[math_idx] = got
        math_set = set(math_idx)
        for i, text in enumerate(batch.responses):
            if i in math_set:
                continue
            row = batch.row(i)
            if task is not None:
                values[i] = task.reward(row, text)
            else:
                from clipo_jax.rewards import get_reward

                values[i] = float(get_reward(row["reward_fn"])(text, row["ground_truth"]))
        return values

    async def score(self, batch: RewardBatch) -> TermOutput:
        return TermOutput(values=await asyncio.to_thread(self.score_sync, batch))


def constraint_ok(response: str, constraint: dict[str, Any], sandbox_limits=None) -> bool:
    """One hard constraint: OpenRS's programmatic types (``{"type": ...}``) or an
    instruction-following checker (``{"id": ..., "kwargs": ...}``)."""
    if "type" in constraint:
        from clipo_jax.rubrics import pvr

        return bool(pvr.check_constraint(response, constraint, sandbox_limits))
    from clipo_jax.data import instruct

    return bool(instruct.check_constraint(response, constraint))


@register_reward_term("pvr")
class PVRTerm(RewardTerm):
    """Pointwise verifiable rubrics. Settings: ``ground_truth_weight`` (1.0), ``ground_truth_kind``
    ("auto"), ``guardrail_weight`` (1.0, per flag raised), ``expected_language`` (None),
    ``gate_constraints`` (True: a broken hard constraint gates the response), ``sandbox`` (limits
    of the checker sandbox for ``code`` constraints: ``SandboxLimits`` fields; rows cannot set them)."""

    settings_keys = (
        "ground_truth_weight",
        "ground_truth_kind",
        "guardrail_weight",
        "expected_language",
        "gate_constraints",
        "sandbox",
    )

    def __init__(self, settings=None, context=None):
        super().__init__(settings, context)
        from clipo_jax.rubrics.sandbox import SandboxLimits

        try:
            self.sandbox_limits = SandboxLimits(**dict(self.settings.get("sandbox") or {}))
        except (TypeError, ValueError) as e:
            raise RewardError(f"config.reward.pvr.sandbox: {e}") from None

    def check_row(self, row: dict, where: str) -> None:
        cons = row.get("constraints")
        if cons is None:
            return
        if not isinstance(cons, list) or not all(isinstance(c, dict) and ("type" in c or "id" in c) for c in cons):
            raise RewardError(f"{where}: 'constraints' must be a list of {{'type': ...}} or {{'id': ...}} objects")
        from clipo_jax.rubrics.pairs import validate_constraint

        for i, c in enumerate(cons):
            if "type" in c:  # OpenRS programmatic: parameters checked by type, then a dry run
                reason = validate_constraint(c)
                if reason is not None:
                    raise RewardError(f"{where}: constraint {i} {c!r:.200}: {reason}")
                continue
            from clipo_jax.data import instruct  # IF-style {"id", "kwargs"}: build its checker

            try:
                instruct._build_checker(c, f"{where} constraint {i}", row.get("prompt"))
            except (ValueError, ImportError) as e:  # unknown id, bad kwargs, instruct extra missing
                raise RewardError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    async def score(self, batch: RewardBatch) -> TermOutput:
        return await asyncio.to_thread(self._score, batch)

    def _score(self, batch: RewardBatch) -> TermOutput:
        from clipo_jax.rubrics import pvr

        s = self.settings
        gt_w, guard_w = float(s.get("ground_truth_weight", 1.0)), float(s.get("guardrail_weight", 1.0))
        kind, lang = s.get("ground_truth_kind", "auto"), s.get("expected_language") or None
        gate_on = bool(s.get("gate_constraints", True))
        B = len(batch)
        values = np.zeros(B, np.float32)
        gate = np.zeros(B, bool)
        failed = np.zeros(B, bool)
        n_flags = np.zeros(B, np.float32)
        for i, text in enumerate(batch.responses):
            row = batch.row(i)
            gt = row.get("ground_truth")
            if gt_w and gt not in (None, "") and row.get("reward_fn") != "ifeval":
                try:
                    score = pvr.ground_truth_score(text, gt, kind)
                except Exception:  # a checker fault is a counted failure, never a crash
                    score, failed[i] = None, True
                values[i] += gt_w * (score if score is not None else -1)
            if guard_w:
                n_flags[i] = sum(pvr.guardrail_flags(text, lang).values())
                values[i] -= guard_w * n_flags[i]
            cons = row.get("constraints")
            if gate_on and cons:
                try:
                    gate[i] = not all(constraint_ok(text, c, self.sandbox_limits) for c in cons)
                except Exception:
                    gate[i], failed[i] = True, True
        metrics = {"guardrail_flags_mean": float(n_flags.mean())}
        return TermOutput(values=values, failed=failed, gate_failed=gate, metrics=metrics)


# The judge terms register themselves on import.
from clipo_jax.rewards import judge_terms as _judge_terms  # noqa: E402,F401
