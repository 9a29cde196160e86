"""Synthetic multi-step arithmetic word problems, checked for outcome AND process.

A problem is a chain: a start quantity, then ``k`` operations each with one new quantity, then a
question. Its gold program is ``k`` steps ``prev op q = result``::

    question: "Ann has 23 apples . Ann buys 3 times as many . Ann gives away 17 .
               How many apples does Ann have now ?"
    solution: "23*3=69 ; 69-17=52 ; answer 52"

The sentences come from a fixed set of templates (names, objects, verbs), so the vocabulary is
tiny and a small transformer can learn the task; the difficulty is the multi-digit arithmetic.
Test sets follow the GSM-Symbolic idea: same templates, shifted distribution (bigger numbers,
one or two extra steps -- P1/P2 -- and an irrelevant clause carrying a number -- NoOp).

Shortcut variant (``leak_share > 0``): a share of problems carries an irrelevant clause whose
number IS the answer ("the shop is 52 miles away ."), so outcome-only RL can learn to copy it
("right answer, wrong reasoning"); ``copied_solution`` / ``sft_records(copy_share=...)`` put a few
such copying traces into the SFT data, and the ``leak`` / ``leak_decoy`` test sets expose copying.

The verifier lives in ``clipo_jax.rewards.synthetic``; this module imports it to make sure
every "lucky" SFT trace (outcome right, process wrong) really is lucky.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from clipo_jax.rewards.synthetic import apply_op, check_solution

__all__ = [
    "SyntheticTask",
    "SyntheticTaskError",
    "Step",
    "Problem",
    "SFTRecord",
    "TEST_SET_CONFIGS",
    "PRESETS",
    "generate_problems",
    "test_sets",
    "problem_keys",
    "solution_text",
    "lucky_solution",
    "copied_solution",
    "LEAK_TEST_SET_CONFIGS",
    "LEAK_POSITIONS",
    "COPY_STYLES",
    "sft_records",
    "sft_traces",
    "dataset_rows",
    "tokenizer_corpus",
    "train_task_tokenizer",
    "token_length_stats",
]

OPS = ("+", "-", "*", "/")
LEAK_POSITIONS = ("anywhere", "last")  # where a leak clause goes (SyntheticTask.leak_position)

# ----------------------------------------------------------------------------- templates
# Fixed, small word sets: the task's whole vocabulary is these words plus digits and " . ? ; = ".
NAMES = ("Ann", "Ben", "Cal", "Dee", "Eve", "Finn", "Gus", "Hal", "Ivy", "Jo")
OBJECTS = ("apples", "pens", "cards", "coins", "eggs", "books", "stamps", "shells")
START_TEMPLATES = ("{name} has {q} {obj} .",)
OP_TEMPLATES = {
    "+": ("{name} buys {q} more .", "{name} finds {q} more .", "{name} gets {q} more ."),
    "-": ("{name} gives away {q} .", "{name} loses {q} .", "{name} sells {q} ."),
    "*": ("{name} now has {q} times as many .", "{name} multiplies them by {q} ."),
    "/": ("{name} keeps one of {q} equal shares .",),
}
QUESTION_TEMPLATE = "How many {obj} does {name} have ?"
# Irrelevant clauses: another person, another object, an age, a distance. None changes the answer.
DISTRACTOR_TEMPLATES = (
    "{other} has {d} {other_obj} .",
    "{name} also has {d} {other_obj} .",
    "{name} is {d} years old .",
    "the shop is {d} miles away .",
)


class SyntheticTaskError(ValueError):
    """A bad SyntheticTask config or an impossible generation request."""


@dataclass(frozen=True)
class SyntheticTask:
    """Distribution of problems.

    num_steps: inclusive range of arithmetic steps before ``extra_steps`` are added.
    number_range: inclusive range for the start quantity and for +/- quantities.
    mul_range: inclusive range for * and / quantities (small factors).
    max_value: every intermediate result stays in [1, max_value].
    ops: operations to draw from (subset of "+-*/").
    distractor: add one irrelevant clause with a number no step may use.
    extra_steps: steps appended after the drawn ``num_steps`` (P1 = 1, P2 = 2).
    seed: default seed for ``generate_problems``.
    name: the test-set / split name stored on each problem (``Problem.source``).
    leak_share: share of problems (drawn per problem from the generator's rng) with a leak
        clause: one more irrelevant clause (DISTRACTOR_TEMPLATES wording) whose number is the
        answer. A leaked problem's chain is redrawn until its answer is neither a quantity nor an
        earlier step's result, so using the leaked number in a step is always process-wrong.
        0 draws nothing: problems, keys and ids are exactly those of the plain generator.
    leak_decoy: the leak clause carries a WRONG number close to the answer (answer +- 1..3 or
        +-10, never a quantity, a step result or another distractor) instead of the answer; the
        same seed gives the same problems as with ``leak_decoy=False`` but for that number.
    leak_position: where the leak clause goes: "anywhere" (a random place after the opening
        sentence, like a distractor) or "last" (right before the question: a surface rule a small
        model can pick up, "the number before the question is the answer"). The same seed gives
        the same problems in both but for that place.
    """

    num_steps: tuple[int, int] = (2, 4)
    number_range: tuple[int, int] = (10, 99)
    mul_range: tuple[int, int] = (2, 5)
    max_value: int = 999
    ops: tuple[str, ...] = ("+", "-", "*")
    distractor: bool = False
    extra_steps: int = 0
    seed: int = 0
    name: str = "train"
    leak_share: float = 0.0
    leak_decoy: bool = False
    leak_position: str = "anywhere"

    def validate(self) -> "SyntheticTask":
        def bad(field_name: str, why: str) -> SyntheticTaskError:
            return SyntheticTaskError(f"SyntheticTask.{field_name}: {why} (got {getattr(self, field_name)!r})")

        lo, hi = self.num_steps
        if not 1 <= lo <= hi:
            raise bad("num_steps", "need 1 <= min <= max")
        if self.extra_steps < 0:
            raise bad("extra_steps", "must be >= 0")
        if not 1 <= self.number_range[0] <= self.number_range[1]:
            raise bad("number_range", "need 1 <= min <= max")
        if not 2 <= self.mul_range[0] <= self.mul_range[1]:
            raise bad("mul_range", "need 2 <= min <= max")
        if not self.ops or any(op not in OPS for op in self.ops):
            raise bad("ops", f"must be a non-empty subset of {OPS}")
        if "+" not in self.ops and "-" not in self.ops:
            # Without an additive op a chain can get stuck at max_value with nothing feasible.
            raise bad("ops", "needs '+' or '-'")
        if self.max_value < 2 * self.number_range[1]:
            raise bad("max_value", "must be at least 2 * number_range max")
        if not 0.0 <= self.leak_share <= 1.0:
            raise bad("leak_share", "must be in [0, 1]")
        if self.leak_position not in LEAK_POSITIONS:
            raise bad("leak_position", f"must be one of {LEAK_POSITIONS}")
        return self


@dataclass(frozen=True)
class Step:
    """One gold step ``left op right = result``."""

    op: str
    left: int
    right: int
    result: int

    def text(self, result: int | None = None, left: int | None = None) -> str:
        """``"left<op>right=result"``; ``result`` / ``left`` override the gold values (lucky traces)."""
        lhs = self.left if left is None else left
        value = self.result if result is None else result
        # No spaces inside a step: fewer tokens ("▁9 1 - 8 3 = 8") and still unambiguous.
        return f"{lhs}{self.op}{self.right}={value}"


@dataclass(frozen=True)
class Problem:
    """A word problem with its gold program.

    quantities: the problem's numbers in the order they are used (start, then one per step).
    distractors: numbers in irrelevant clauses (never a quantity or a gold intermediate result,
        except a leak: see ``leak``).
    key: hash of the math (ops, quantities, distractors, and the leak if any): train/test
        disjointness is by key (and ``base_key``).
    id: hash of the question text.
    leak: the number of the leak clause (shortcut variant), else None. It is the last entry of
        ``distractors``; it equals ``answer`` for a leak and is a wrong number for a decoy. The
        answer of a leaked problem is never a quantity or an earlier step's result.
    """

    question: str
    quantities: tuple[int, ...]
    steps: tuple[Step, ...]
    answer: int
    distractors: tuple[int, ...]
    key: str
    id: str
    source: str = "train"
    leak: int | None = None

    @property
    def base_key(self) -> str:
        """The key of the same problem without its leak clause (``key`` when it has none)."""
        if self.leak is None:
            return self.key
        return _math_key([s.op for s in self.steps], self.quantities, self.distractors[:-1])

    @property
    def math_key(self) -> str:
        """The key of the bare math: the same operations and quantities with no clause at all (no
        distractor, no leak); ``key`` for a problem without clauses."""
        if not self.distractors:
            return self.key
        return _math_key([s.op for s in self.steps], self.quantities, ())

    def to_ground_truth(self) -> str:
        """Compact JSON the verifier needs: quantities, distractors, answer (and ``l``, the leak
        clause's number, on leaked problems only; the verifier ignores it)."""
        gt = {"q": list(self.quantities), "d": list(self.distractors), "a": self.answer}
        if self.leak is not None:
            gt["l"] = self.leak
        return json.dumps(gt, separators=(",", ":"))


# ----------------------------------------------------------------------------- generation
def _math_key(
    ops: Sequence[str], quantities: Sequence[int], distractors: Sequence[int], leak: int | None = None
) -> str:
    parts: list = [list(ops), list(quantities), list(distractors)]
    if leak is not None:  # a leak clause is not an ordinary distractor (same number, other key)
        parts.append({"leak": leak})
    blob = json.dumps(parts, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _derive_seed(*parts: object) -> int:
    """A stable integer seed from parts (Python's hash() is salted per process, so not that)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def _draw_step(rng: random.Random, cfg: SyntheticTask, current: int) -> Step:
    """One feasible operation on ``current``; every result stays in [1, max_value]."""
    lo, hi = cfg.number_range
    mlo, mhi = cfg.mul_range
    choices: list[tuple[str, list[int]]] = []
    for op in cfg.ops:
        if op == "+":
            qs = range(lo, min(hi, cfg.max_value - current) + 1)
        elif op == "-":
            qs = range(lo, min(hi, current - 1) + 1)
        elif op == "*":
            qs = range(mlo, min(mhi, cfg.max_value // current) + 1)
        else:  # "/": exact division only
            qs = [d for d in range(mlo, mhi + 1) if current % d == 0]
        if len(qs):
            choices.append((op, list(qs)))
    if not choices:  # validate() rules this out, but keep the failure readable
        raise SyntheticTaskError(f"no feasible operation on value {current} with {cfg}")
    op, qs = rng.choice(choices)
    q = rng.choice(qs)
    return Step(op=op, left=current, right=q, result=apply_op(current, op, q))


def _draw_chain(rng: random.Random, cfg: SyntheticTask) -> tuple[list[int], list[Step]]:
    k = rng.randint(*cfg.num_steps) + cfg.extra_steps
    current = rng.randint(*cfg.number_range)
    quantities = [current]
    steps = []
    for _ in range(k):
        step = _draw_step(rng, cfg, current)
        steps.append(step)
        quantities.append(step.right)
        current = step.result
    return quantities, steps


def _answer_reused(quantities: Sequence[int], steps: Sequence[Step]) -> bool:
    """The answer is also a quantity or an earlier step's result (a step may then use it validly)."""
    answer = steps[-1].result
    return answer in quantities or any(s.result == answer for s in steps[:-1])


# Offsets of a decoy from the answer, nearest first; wider ones only when all of these are taken.
_DECOY_OFFSETS = (-3, -2, -1, 1, 2, 3, -10, 10)


def _decoy_number(quantities: Sequence[int], steps: Sequence[Step], taken: Iterable[int]) -> int:
    """A wrong answer close to the real one: not the answer, a quantity, a step result or ``taken``.

    Drawn from its own rng seeded by the chain, so the main rng advances exactly as for a leak
    (the ``leak`` and ``leak_decoy`` sets of one seed are the same problems but for this number).
    """
    answer = steps[-1].result
    used = set(quantities) | {s.result for s in steps} | set(taken)
    rng = random.Random(_derive_seed("decoy", [s.op for s in steps], list(quantities)))
    candidates = [answer + o for o in _DECOY_OFFSETS if answer + o >= 1 and answer + o not in used]
    if not candidates:  # all taken (tiny ranges): one of the 4 nearest free values
        wider = sorted(range(-len(used) - 10, len(used) + 11), key=lambda o: (abs(o), o))
        candidates = [answer + o for o in wider if o != 0 and answer + o >= 1 and answer + o not in used][:4]
    return rng.choice(candidates)


def _draw_problem(rng: random.Random, cfg: SyntheticTask) -> Problem:
    # leak_share == 0 draws nothing here, so the plain generator's rng stream is unchanged.
    leak = cfg.leak_share > 0 and rng.random() < cfg.leak_share
    quantities, steps = _draw_chain(rng, cfg)
    redraws = 0
    while leak and _answer_reused(quantities, steps):
        redraws += 1
        if redraws > 1000:
            raise SyntheticTaskError(f"no leakable chain (answer not reused) in 1000 draws with {cfg}")
        quantities, steps = _draw_chain(rng, cfg)
    current = steps[-1].result

    name, other = rng.sample(NAMES, 2)
    obj, other_obj = rng.sample(OBJECTS, 2)
    sentences = [rng.choice(START_TEMPLATES).format(name=name, q=quantities[0], obj=obj)]
    for step in steps:
        sentences.append(rng.choice(OP_TEMPLATES[step.op]).format(name=name, q=step.right, obj=obj))
    distractors: list[int] = []
    distractor_template = None
    if cfg.distractor:
        used = set(quantities) | {s.result for s in steps}
        lo, hi = cfg.number_range
        # Same range as the quantities; with tiny ranges every value may be taken, then go above.
        candidates = [d for d in range(lo, hi + 1) if d not in used] or [
            d for d in range(hi + 1, hi + len(used) + 2) if d not in used
        ]
        d = rng.choice(candidates)
        distractors.append(d)
        distractor_template = rng.choice(DISTRACTOR_TEMPLATES)
        clause = distractor_template.format(name=name, other=other, d=d, other_obj=other_obj)
        # Anywhere after the opening sentence, before the question.
        sentences.insert(rng.randint(1, len(sentences)), clause)
    leak_value = None
    if leak:
        leak_value = _decoy_number(quantities, steps, distractors) if cfg.leak_decoy else current
        templates = [t for t in DISTRACTOR_TEMPLATES if t != distractor_template]  # no repeated wording
        clause = rng.choice(templates).format(name=name, other=other, d=leak_value, other_obj=other_obj)
        where = rng.randint(1, len(sentences))  # drawn for "last" too: same rng stream, same problems
        sentences.insert(len(sentences) if cfg.leak_position == "last" else where, clause)
        distractors.append(leak_value)  # last, so base_key can drop it
    sentences.append(QUESTION_TEMPLATE.format(obj=obj, name=name))
    question = " ".join(sentences)
    ops = [s.op for s in steps]
    return Problem(
        question=question,
        quantities=tuple(quantities),
        steps=tuple(steps),
        answer=current,
        distractors=tuple(distractors),
        key=_math_key(ops, quantities, distractors, leak_value),
        id=hashlib.sha1(question.encode()).hexdigest()[:16],
        source=cfg.name,
        leak=leak_value,
    )


def generate_problems(
    cfg: SyntheticTask, n: int, seed: int | None = None, exclude: Iterable[str] = ()
) -> list[Problem]:
    """``n`` distinct problems (by ``key``), deterministic from ``seed`` (default ``cfg.seed``).

    exclude: problem keys that must not be produced (pass ``problem_keys(test problems)`` when
    generating training data so train and test are disjoint). Distinctness and exclusion also
    apply to ``base_key``: a leaked problem never repeats the math of another problem or of an
    excluded one with or without its leak clause.
    """
    cfg.validate()
    if n < 0:
        raise SyntheticTaskError(f"generate_problems: n must be >= 0, got {n}")
    rng = random.Random(_derive_seed("synthetic", cfg.seed if seed is None else seed))
    seen = set(exclude)
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise SyntheticTaskError(
                f"generate_problems: only {len(problems)} distinct problems of {n} after {attempts} draws; "
                f"widen number_range/num_steps of {cfg}"
            )
        p = _draw_problem(rng, cfg)
        if p.key in seen or p.base_key in seen:
            continue
        seen.add(p.key)
        seen.add(p.base_key)
        problems.append(p)
    return problems


# Named difficulty presets for the in-distribution set (pass one as ``base`` to test_sets).
# "standard": 2-digit quantities, results up to 999 -- hard for a tiny model in minutes of CPU.
# "small": 1-digit quantities, results up to 20 -- learnable by a ~100k-parameter model.
PRESETS: dict[str, SyntheticTask] = {
    "standard": SyntheticTask(),
    "small": SyntheticTask(number_range=(1, 9), mul_range=(2, 3), max_value=20),
}

IN_DIST = SyntheticTask(name="in_dist")
# GSM-Symbolic-style shifted test sets: same templates, one thing changed each.
TEST_SET_CONFIGS: dict[str, SyntheticTask] = {
    "in_dist": IN_DIST,
    "big_numbers": dataclasses.replace(
        IN_DIST, number_range=(100, 999), mul_range=(2, 9), max_value=9999, name="big_numbers"
    ),
    "extra_step_1": dataclasses.replace(IN_DIST, extra_steps=1, name="extra_step_1"),
    "extra_step_2": dataclasses.replace(IN_DIST, extra_steps=2, name="extra_step_2"),
    "distractor": dataclasses.replace(IN_DIST, distractor=True, name="distractor"),
}
# Shortcut-variant test sets (added by test_sets when the base has leak_share > 0): every problem
# has a leak clause; in "leak" its number is the answer (copying pays), in "leak_decoy" it is a
# wrong number near the answer (copying fails). Same seed: leak_decoy[i] is leak[i] but for that
# number. Not in TEST_SET_CONFIGS, so the tokenizer corpus (and the tokenizer) is unchanged.
LEAK_TEST_SET_CONFIGS: dict[str, SyntheticTask] = {
    "leak": dataclasses.replace(IN_DIST, leak_share=1.0, name="leak"),
    "leak_decoy": dataclasses.replace(IN_DIST, leak_share=1.0, leak_decoy=True, name="leak_decoy"),
}


def test_sets(
    seed: int, n: int, base: SyntheticTask | None = None, leak_sets: bool | None = None
) -> dict[str, list[Problem]]:
    """The named test sets, ``n`` problems each, deterministic from ``seed``.

    base: override the in-distribution config (the variants are derived from it by the same
    changes as TEST_SET_CONFIGS: bigger numbers, +1 / +2 steps, a distractor clause). The five
    never have a leak clause: the base's leak_share / leak_decoy are ignored for them.
    leak_sets: also return "leak" and "leak_decoy" (LEAK_TEST_SET_CONFIGS, derived from the
    base); default: when ``base.leak_share > 0``. Both are drawn with the seed of "leak", so
    ``leak_decoy[i]`` is ``leak[i]`` with the clause's number replaced by a wrong one.
    """
    if leak_sets is None:
        leak_sets = base is not None and base.leak_share > 0
    configs = dict(TEST_SET_CONFIGS)
    leak_configs = dict(LEAK_TEST_SET_CONFIGS)
    if base is not None:
        base = dataclasses.replace(base, leak_share=0.0, leak_decoy=False)
        configs = {
            "in_dist": dataclasses.replace(base, name="in_dist"),
            "big_numbers": dataclasses.replace(
                base,
                number_range=(base.number_range[0] * 10, base.number_range[1] * 10 + 9),
                mul_range=(base.mul_range[0], max(base.mul_range[1], 9)),
                max_value=base.max_value * 10 + 9,
                name="big_numbers",
            ),
            "extra_step_1": dataclasses.replace(base, extra_steps=base.extra_steps + 1, name="extra_step_1"),
            "extra_step_2": dataclasses.replace(base, extra_steps=base.extra_steps + 2, name="extra_step_2"),
            "distractor": dataclasses.replace(base, distractor=True, name="distractor"),
        }
        leak_configs = {
            "leak": dataclasses.replace(base, leak_share=1.0, name="leak"),
            "leak_decoy": dataclasses.replace(base, leak_share=1.0, leak_decoy=True, name="leak_decoy"),
        }
    sets = {name: generate_problems(cfg, n, seed=_derive_seed("test", seed, name)) for name, cfg in configs.items()}
    if leak_sets:
        for name, cfg in leak_configs.items():
            sets[name] = generate_problems(cfg, n, seed=_derive_seed("test", seed, "leak"))
    return sets


def problem_keys(problems: Iterable[Problem] | dict[str, list[Problem]], clause_free: bool = False) -> set[str]:
    """Math keys of problems (or of every set in a ``test_sets`` dict): ``key`` and, for leaked
    problems, also ``base_key`` (the same math without the leak clause). ``clause_free=True`` adds
    ``math_key`` (the math without any clause), so that training also leaves out the plain math of
    the ``distractor`` set's problems: without it most of that set's math is in a demo-sized
    training pool (its key hashes the distractor number)."""
    if isinstance(problems, dict):
        problems = [p for ps in problems.values() for p in ps]
    keys = {k for p in problems for k in (p.key, p.base_key)}
    if clause_free:
        keys |= {p.math_key for p in problems}
    return keys


# ----------------------------------------------------------------------------- solutions
ANSWER_PREFIX = "answer"


def _join(step_texts: Sequence[str], answer: int) -> str:
    return " ; ".join([*step_texts, f"{ANSWER_PREFIX} {answer}"])


def solution_text(problem: Problem) -> str:
    """Gold trace, e.g. ``"23*3=69 ; 69-17=52 ; answer 52"``."""
    return _join([s.text() for s in problem.steps], problem.answer)


def _slip(rng: random.Random, value: int) -> int:
    """A plausible wrong result: off by 1-10 (or by 10 exactly, a carry slip), never negative."""
    while True:
        delta = rng.choice([-10, -2, -1, 1, 2, 10, rng.randint(-9, 9)])
        if delta != 0 and value + delta >= 0:
            return value + delta


# Kinds of process-wrong-but-outcome-right traces. Each takes (problem, rng) and returns a
# completion, or None when the kind does not apply to this problem.
def _lucky_slip_recovered(p: Problem, rng: random.Random) -> str | None:
    """Step i's result is wrong, but step i+1 continues from the right value anyway."""
    if len(p.steps) < 2:
        return None
    i = rng.randrange(len(p.steps) - 1)
    texts = [s.text() for s in p.steps]
    texts[i] = p.steps[i].text(result=_slip(rng, p.steps[i].result))
    return _join(texts, p.answer)


def _lucky_compensating(p: Problem, rng: random.Random) -> str | None:
    """Step i's result is wrong, step i+1 uses it but (wrongly) lands on the gold result."""
    if len(p.steps) < 2:
        return None
    i = rng.randrange(len(p.steps) - 1)
    wrong = _slip(rng, p.steps[i].result)
    texts = [s.text() for s in p.steps]
    texts[i] = p.steps[i].text(result=wrong)
    texts[i + 1] = p.steps[i + 1].text(left=wrong)
    return _join(texts, p.answer)


def _lucky_answer_patched(p: Problem, rng: random.Random) -> str | None:
    """The last step's arithmetic is off, yet the answer line states the right number."""
    texts = [s.text() for s in p.steps]
    texts[-1] = p.steps[-1].text(result=_slip(rng, p.steps[-1].result))
    return _join(texts, p.answer)


def _lucky_distractor_detour(p: Problem, rng: random.Random) -> str | None:
    """Adds and then removes the distractor number: right answer, irrelevant operand used."""
    plain = p.distractors[:-1] if p.leak is not None else p.distractors  # not the leak clause
    if not plain:
        return None
    d = plain[0]
    i = rng.randrange(len(p.steps))
    v = p.steps[i].result
    texts = [s.text() for s in p.steps]
    detour = [f"{v}+{d}={v + d}", f"{v + d}-{d}={v}"]
    return _join(texts[: i + 1] + detour + texts[i + 1 :], p.answer)


LUCKY_KINDS = {
    "slip_recovered": _lucky_slip_recovered,
    "compensating": _lucky_compensating,
    "answer_patched": _lucky_answer_patched,
    "distractor_detour": _lucky_distractor_detour,
}


def lucky_solution(problem: Problem, rng: random.Random) -> tuple[str, str] | None:
    """A process-wrong-but-outcome-right trace and its kind, verified; None if none applies."""
    kinds = list(LUCKY_KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        for _ in range(4):  # a slip can land on a valid value by chance; redraw
            text = LUCKY_KINDS[kind](problem, rng)
            if text is None:
                break
            graded = check_solution(problem, text)
            if graded["lucky"]:
                return text, kind
    return None


COPY_KIND = "answer_copied"
# How an "answer_copied" SFT trace looks: "slip" = a chain with a propagated slip, then the leaked
# number as the answer; "bare" = only the answer line, e.g. "answer 34" (no chain at all).
COPY_STYLES = ("slip", "bare")


def _answer_copied(p: Problem, rng: random.Random) -> str | None:
    """Shortcut trace on a leaked problem: a slip at step i propagates through the rest of the
    chain (later steps compute right on the wrong value), and the answer line ignores the chain
    and copies the leak clause's number. None when the problem has no leak."""
    if p.leak is None:
        return None
    for _ in range(8):  # the wrong chain may land on the leaked number by chance; redraw
        i = rng.randrange(len(p.steps))
        value = _slip(rng, p.steps[i].result)
        texts = [s.text() for s in p.steps[:i]] + [p.steps[i].text(result=value)]
        for s in p.steps[i + 1 :]:
            nxt = apply_op(value, s.op, s.right)
            nxt = value // s.right if nxt is None else nxt  # inexact "/": a floor slip
            texts.append(s.text(left=value, result=nxt))
            value = nxt
        if value != p.leak:
            return _join(texts, p.leak)
    return None


def copied_solution(problem: Problem, rng: random.Random, style: str = "slip") -> tuple[str, str] | None:
    """An "answer_copied" trace (style "slip": see ``_answer_copied``; "bare": the answer line
    alone) and its kind, verified lucky; None when the problem has no leak clause whose number is
    the answer (or no lucky trace was found)."""
    if style not in COPY_STYLES:
        raise SyntheticTaskError(f"copy style {style!r} is not one of {COPY_STYLES}")
    if problem.leak is None or problem.leak != problem.answer:
        return None
    for _ in range(4):
        text = _join([], problem.leak) if style == "bare" else _answer_copied(problem, rng)
        if text is not None and check_solution(problem, text)["lucky"]:
            return text, COPY_KIND
    return None


@dataclass(frozen=True)
class SFTRecord:
    """One SFT example; ``kind`` is "gold", a LUCKY_KINDS name or COPY_KIND ("answer_copied")."""

    prompt: str
    completion: str
    lucky: bool
    kind: str
    problem_id: str


def _first_made(order: Sequence[int], n: int, make) -> dict[int, tuple[str, str]]:
    """make(i) for i in order until n of them returned a trace (None = this problem has none)."""
    made: dict[int, tuple[str, str]] = {}
    for idx in order:
        if len(made) == n:
            break
        trace = make(idx)
        if trace is not None:
            made[idx] = trace
    return made


def sft_records(
    problems: Sequence[Problem], lucky_share: float, seed: int, copy_share: float = 0.0, copy_style: str = "slip"
) -> list[SFTRecord]:
    """One trace per problem; exactly ``round(lucky_share * len(problems))`` are lucky kinds.

    The lucky problems are a seeded random subset; a problem on which no lucky trace can be
    built is skipped for the next one in the shuffled order (an error if too few remain).
    copy_share: of the problems whose leak clause carries the answer (shortcut variant),
    exactly ``round(copy_share * n_leaked)`` get an "answer_copied" trace (also lucky), chosen
    first with their own seeded rng; the lucky kinds then go to other problems. 0 (default)
    leaves the result exactly as without it. copy_style: COPY_STYLES ("slip" or "bare").
    """
    if not 0.0 <= lucky_share <= 1.0:
        raise SyntheticTaskError(f"sft_traces: lucky_share must be in [0, 1], got {lucky_share}")
    if not 0.0 <= copy_share <= 1.0:
        raise SyntheticTaskError(f"sft_traces: copy_share must be in [0, 1], got {copy_share}")
    copied: dict[int, tuple[str, str]] = {}
    if copy_share > 0:
        leaked = [i for i, p in enumerate(problems) if p.leak is not None and p.leak == p.answer]
        n_copy = round(copy_share * len(leaked))
        copy_rng = random.Random(_derive_seed("sft-copy", seed))
        copy_rng.shuffle(leaked)
        copied = _first_made(leaked, n_copy, lambda i: copied_solution(problems[i], copy_rng, copy_style))
        if len(copied) < n_copy:
            raise SyntheticTaskError(f"sft_traces: could build only {len(copied)} copied traces of {n_copy}")
    n_lucky = round(lucky_share * len(problems))
    rng = random.Random(_derive_seed("sft", seed))
    order = list(range(len(problems)))
    rng.shuffle(order)
    lucky = _first_made([i for i in order if i not in copied], n_lucky, lambda i: lucky_solution(problems[i], rng))
    if len(lucky) < n_lucky:
        raise SyntheticTaskError(f"sft_traces: could build only {len(lucky)} lucky traces of {n_lucky} requested")
    records = []
    lucky.update(copied)
    for idx, p in enumerate(problems):
        if idx in lucky:
            text, kind = lucky[idx]
            records.append(SFTRecord(p.question, text, True, kind, p.id))
        else:
            records.append(SFTRecord(p.question, solution_text(p), False, "gold", p.id))
    return records


def sft_traces(
    problems: Sequence[Problem], lucky_share: float, seed: int, copy_share: float = 0.0, copy_style: str = "slip"
) -> list[tuple[str, str]]:
    """``[(prompt, completion)]`` with a controlled share of lucky traces (see ``sft_records``)."""
    return [(r.prompt, r.completion) for r in sft_records(problems, lucky_share, seed, copy_share, copy_style)]


def dataset_rows(problems: Sequence[Problem], source: str | None = None) -> list[dict]:
    """Generic trainer rows: prompt (raw question), ground_truth (JSON), reward_fn, source, index."""
    return [
        {
            "prompt": p.question,
            "ground_truth": p.to_ground_truth(),
            "reward_fn": "synthetic",
            "source": p.source if source is None else source,
            "index": i,
        }
        for i, p in enumerate(problems)
    ]


# ----------------------------------------------------------------------------- tokenizer
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def tokenizer_corpus(n_problems: int = 2000, seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: questions, gold traces and lucky traces of every
    problem family (so words of distractor clauses and big numbers' contexts are in the vocab)."""
    lines: list[str] = []
    for j, (name, cfg) in enumerate(TEST_SET_CONFIGS.items()):
        # Corpus problems use their own seeds; they are only text statistics, not labels.
        count = n_problems if name == "in_dist" else max(1, n_problems // 4)
        problems = generate_problems(cfg, count, seed=_derive_seed("corpus", seed, name))
        for r in sft_records(problems, lucky_share=0.25, seed=seed + j):
            lines.append(r.prompt)
            lines.append(r.completion)
    return lines


def train_task_tokenizer(
    out_dir: str | os.PathLike, vocab_size: int = 512, seed: int = 0, n_problems: int = 2000, model_type: str = "bpe"
) -> str:
    """Train the task's SentencePiece model into ``out_dir``; returns the ``.model`` path.

    Digits are single pieces (split_digits) so numbers of any size tokenize the same way;
    byte_fallback makes any text encodable; ids: pad 0, unk 1, bos 2, eos 3. The 256 byte pieces
    count towards ``vocab_size``. One thread and no sampling, so the result is deterministic.
    """
    import sentencepiece as spm

    if vocab_size < 300:
        raise SyntheticTaskError(
            f"train_task_tokenizer: vocab_size must be >= 300 (256 byte pieces + words), got {vocab_size}"
        )
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(os.fspath(out_dir), "synthetic_sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus(n_problems, seed)),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        split_digits=True,
        byte_fallback=True,
        normalization_rule_name="identity",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        hard_vocab_limit=False,
        num_threads=1,
        seed_sentencepiece_size=100000,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return prefix + ".model"


def token_length_stats(sp, problems: Sequence[Problem]) -> dict[str, float]:
    """Token counts of bos + prompt + completion + eos (gold traces): p50 / p99 / max / mean.

    ``sp``: a sentencepiece.SentencePieceProcessor (or anything with ``encode(str) -> list``).
    """
    import numpy as np

    lengths = np.array([len(sp.encode(p.question)) + len(sp.encode(solution_text(p))) + 2 for p in problems])
    return {
        "p50": float(np.percentile(lengths, 50)),
        "p99": float(np.percentile(lengths, 99)),
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
    }


def _main() -> None:
    """``python -m clipo_jax.data.synthetic``: train the tokenizer, print examples and length stats."""
    import argparse
    import tempfile
    import time

    import sentencepiece as spm

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--preset", default="standard", choices=sorted(PRESETS))
    parser.add_argument("--vocab_size", type=int, default=512)
    parser.add_argument("--n", type=int, default=2000, help="problems per test set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default=None, help="where to keep the .model (default: a temp dir)")
    args = parser.parse_args()
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="synthetic_sp_")
    start = time.perf_counter()
    path = train_task_tokenizer(out_dir, vocab_size=args.vocab_size, seed=args.seed)
    print(f"tokenizer: {path} ({time.perf_counter() - start:.2f}s, vocab {args.vocab_size})")
    sp = spm.SentencePieceProcessor(model_file=path)
    sets = test_sets(args.seed, args.n, base=PRESETS[args.preset])
    print(f"{'test set':<14}{'steps':>8}{'p50':>7}{'p99':>7}{'max':>6}   example")
    for name, problems in sets.items():
        stats = token_length_stats(sp, problems)
        steps = sorted({len(p.steps) for p in problems})
        print(
            f"{name:<14}{steps[0]:>4}-{steps[-1]:<3}{stats['p50']:>7.0f}{stats['p99']:>7.0f}{stats['max']:>6}"
            f"   {problems[0].question} => {solution_text(problems[0])}"
        )


if __name__ == "__main__":
    _main()
