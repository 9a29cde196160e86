"""Meta-rubric refinement (OpenRS paper, arXiv 2602.14069: meta-rubric refinement).

General principles — automated evolutionary refinement (``refine``):
  a population of meta-rubric variants; a child is its parent with ONE edit (add / delete /
  rewrite a dimension or a sub-item) proposed by an LLM through any ``Backend``, or, when no
  proposer is given or its answer is unusable, by a deterministic programmatic mutation drawn
  from the shipped domain rubrics (so refinement runs without a capable LLM);
  fitness = judge accuracy on labelled preference pairs (ties excluded) minus
  ``length_penalty`` per 1000 characters of the rendered rubric; elitism + tournament
  selection on the training split; the returned variant is the generation champion with the
  best fitness on a held-out split, the initial rubric included (guards against overfitting
  the training pairs: the result is never worse than the start on held-out pairs).  Every
  random choice comes from ``random.Random`` seeded by (seed, generation, child) so a run is
  reproducible from its seed with a deterministic judge; each generation is one JSONL record.

Domain principles — human in the loop (``review_edit``):
  judge the same pairs with the old and the proposed file (judge calls are cached by the
  backend) and list the pairs whose verdict flips; a person accepts or rejects, and
  ``write_review_record`` appends that decision.

The judge is anything with ``async judge_pairs(list[PairInput]) -> list[PairResult]``
(``PairwiseJudge`` or ``local_backends.LogitJudge``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import random
import time
from typing import Any, Callable, Sequence

import jsonschema

from clipo_jax.rubrics.backends import Backend, BackendError, CompletionRequest
from clipo_jax.rubrics.judge import PairInput, PairResult
from clipo_jax.rubrics.meta_rubric import (
    CRITICAL_SCOPES,
    DIMENSION_TYPES,
    Dimension,
    MetaRubric,
    MetaRubricError,
    available_domains,
    builtin_meta_rubric,
    load_meta_rubric,
    parse_meta_rubric,
)
from clipo_jax.rubrics.protocol import JudgeParseError, parse_judgment, truncate_middle

log = logging.getLogger(__name__)


class RefineError(ValueError):
    """Bad refinement input (data rows, configuration, an edit that cannot be applied)."""


# ----------------------------------------------------------------------------------------------
# Labelled preference pairs.
# ----------------------------------------------------------------------------------------------


def load_preference_pairs(path: str | os.PathLike, limit: int = 0, seed: int = 0) -> list[tuple[PairInput, str]]:
    """JudgeBench-format JSONL -> [(pair, correct verdict)].

    Rows need string ``prompt``, ``chosen``, ``rejected``; optional ``question_id``,
    ``query_type``, ``ground_truth``.  The chosen response is shown first or second by a coin
    seeded per pair, so a position-biased judge cannot score well.
    """
    from clipo_jax.rubrics.pairs import RowError, read_pair_rows, to_pair

    try:
        rows = read_pair_rows(path, limit)
    except OSError as e:
        raise RefineError(f"{path}: cannot read pairs file: {e.strerror}") from None
    except RowError as e:
        raise RefineError(str(e)) from None
    out = [to_pair(row, seed) for row in rows]
    ids = [p.pair_id for p, _ in out]
    if len(set(ids)) != len(ids):
        raise RefineError(f"{path}: duplicate question_id values")
    return out


# ----------------------------------------------------------------------------------------------
# Fitness.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fitness:
    fitness: float  # accuracy - length_penalty * length_chars / 1000
    accuracy: float  # wins / (wins + losses); 0 when nothing was decided
    wins: int
    losses: int
    same: int
    length_chars: int
    correct: tuple[bool, ...] = ()  # per pair, in input order (for examples shown to the LLM)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("correct")
        return d


def rubric_length(rubric: MetaRubric) -> int:
    """Characters of the rendering the judge sees."""
    return len(rubric.render())


def compute_fitness(
    verdicts: Sequence[str], labels: Sequence[str], length_chars: int, length_penalty: float
) -> Fitness:
    wins = sum(v == l for v, l in zip(verdicts, labels))
    same = sum(v == "same" for v in verdicts)
    losses = len(verdicts) - wins - same
    acc = wins / (wins + losses) if wins + losses else 0.0
    return Fitness(
        acc - length_penalty * length_chars / 1000.0,
        acc,
        wins,
        losses,
        same,
        length_chars,
        tuple(v == l for v, l in zip(verdicts, labels)),
    )


def rubric_id(rubric: MetaRubric) -> str:
    return hashlib.sha256(rubric.to_toml().encode()).hexdigest()[:12]


def with_rubric(pair: PairInput, rubric: MetaRubric) -> PairInput:
    """The pair judged under ``rubric``: general principles override, or the domain file (and
    the routing forced to that domain) for any other name."""
    if rubric.name == "general":
        return dataclasses.replace(pair, general=rubric)
    return dataclasses.replace(pair, meta_rubric=rubric, domain=rubric.name)


async def judge_under(judge, rubric: MetaRubric, pairs: Sequence[PairInput]) -> list[PairResult]:
    return await judge.judge_pairs([with_rubric(p, rubric) for p in pairs])


# ----------------------------------------------------------------------------------------------
# Mutations.  Programmatic ones: f(rubric, rng, pool) -> (new rubric, description) or None when
# not applicable.  Add one by writing a function and a MUTATIONS entry.
# ----------------------------------------------------------------------------------------------

REWRITABLE_TYPES = ("core", "important", "highlight")


@dataclasses.dataclass(frozen=True)
class MutationPool:
    """Material for programmatic mutations: candidate dimensions and sub-items."""

    dimensions: tuple[Dimension, ...]
    items: tuple[str, ...]

    @staticmethod
    def from_domains(domains: Sequence[str] | None = None) -> "MutationPool":
        """Every dimension of the shipped domain rubrics (general excluded)."""
        names = [d for d in (domains or available_domains()) if d != "general"]
        dims, seen = [], set()
        for name in names:
            for d in builtin_meta_rubric(name).dimensions:
                if d.id not in seen:
                    seen.add(d.id)
                    dims.append(d)
        items = tuple(dict.fromkeys(i for d in dims for i in d.items))
        return MutationPool(tuple(dims), items)


def _replace_dims(rubric: MetaRubric, dims: Sequence[Dimension]) -> MetaRubric:
    return dataclasses.replace(rubric, dimensions=tuple(dims), source="<refined>")


def mutate_add_dimension(rubric, rng, pool):
    have = {d.id for d in rubric.dimensions}
    options = [d for d in pool.dimensions if d.id not in have]
    if not options:
        return None
    d = rng.choice(options)
    return _replace_dims(rubric, list(rubric.dimensions) + [d]), f"add dimension {d.id}"


def mutate_delete_dimension(rubric, rng, pool):
    if len(rubric.dimensions) < 2:
        return None
    k = rng.randrange(len(rubric.dimensions))
    dims = list(rubric.dimensions)
    gone = dims.pop(k)
    return _replace_dims(rubric, dims), f"delete dimension {gone.id}"


def mutate_rewrite_dimension(rubric, rng, pool):
    """Re-weights one non-critical dimension (changes its type)."""
    idx = [i for i, d in enumerate(rubric.dimensions) if d.type in REWRITABLE_TYPES]
    if not idx:
        return None
    k = rng.choice(idx)
    d = rubric.dimensions[k]
    new_type = rng.choice([t for t in REWRITABLE_TYPES if t != d.type])
    dims = list(rubric.dimensions)
    dims[k] = dataclasses.replace(d, type=new_type)
    return _replace_dims(rubric, dims), f"rewrite dimension {d.id}: type {d.type} -> {new_type}"


def mutate_add_item(rubric, rng, pool):
    k = rng.randrange(len(rubric.dimensions))
    d = rubric.dimensions[k]
    options = [i for i in pool.items if i not in d.items]
    if not options:
        return None
    item = rng.choice(options)
    dims = list(rubric.dimensions)
    dims[k] = dataclasses.replace(d, items=d.items + (item,))
    return _replace_dims(rubric, dims), f"add item to {d.id}"


def mutate_delete_item(rubric, rng, pool):
    idx = [i for i, d in enumerate(rubric.dimensions) if len(d.items) > 1]
    if not idx:
        return None
    k = rng.choice(idx)
    d = rubric.dimensions[k]
    j = rng.randrange(len(d.items))
    dims = list(rubric.dimensions)
    dims[k] = dataclasses.replace(d, items=d.items[:j] + d.items[j + 1 :])
    return _replace_dims(rubric, dims), f"delete item {j} of {d.id}"


MUTATIONS: dict[str, Callable[[MetaRubric, random.Random, MutationPool], tuple[MetaRubric, str] | None]] = {
    "add_dimension": mutate_add_dimension,
    "delete_dimension": mutate_delete_dimension,
    "rewrite_dimension": mutate_rewrite_dimension,
    "add_item": mutate_add_item,
    "delete_item": mutate_delete_item,
}


def programmatic_mutation(
    rubric: MetaRubric, rng: random.Random, pool: MutationPool, ops: Sequence[str] | None = None
) -> tuple[MetaRubric, str]:
    """Applies the first applicable mutation in a seeded random order."""
    order = list(ops or MUTATIONS)
    rng.shuffle(order)
    for op in order:
        out = MUTATIONS[op](rubric, rng, pool)
        if out is not None:
            return out
    raise RefineError(f"no mutation applies to meta-rubric {rubric.name!r}")


# -- LLM-proposed edits ------------------------------------------------------------------------

LLM_OPS = ("add_dimension", "delete_dimension", "rewrite_dimension", "add_item", "delete_item", "rewrite_item")

EDIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "op": {"type": "string", "enum": list(LLM_OPS)},
        "dimension_id": {"type": "string"},
        "dimension": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "title": {"type": "string"},
                "type": {"type": "string", "enum": list(DIMENSION_TYPES)},
                "critical_scope": {"type": "string", "enum": list(CRITICAL_SCOPES)},
                "items": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 6},
            },
            "required": ["id", "title", "type", "items"],
        },
        "item_index": {"type": "integer", "minimum": 0},
        "item": {"type": "string"},
        "rationale": {"type": "string"},
    },
    "required": ["op"],
}

EDIT_PROMPT = """You maintain the written principles (a meta-rubric) that an LLM judge follows when it \
compares two responses to the same query. Improve them with exactly ONE edit of kind "{op}".

Edit kinds and the JSON keys they need:
- add_dimension: "dimension" (object with "id" [a-z0-9_]+, "title", "type" one of core / important / \
highlight / critical, "items" list of sub-item strings; critical also needs "critical_scope" one of \
factuality / harmfulness / alignment)
- delete_dimension: "dimension_id"
- rewrite_dimension: "dimension_id" and the replacement "dimension"
- add_item: "dimension_id", "item"
- delete_item: "dimension_id", "item_index" (0-based)
- rewrite_item: "dimension_id", "item_index", "item"

Shorter principles are preferred when they judge as well.

# Current meta-rubric (TOML)
{toml}
{examples}
Reply with one JSON object: {{"op": "{op}", ...the keys above..., "rationale": "..."}}."""


def build_edit_messages(
    rubric: MetaRubric, op: str, examples: Sequence[tuple[PairInput, str]], max_chars: int = 600
) -> list[dict[str, str]]:
    ex = ""
    if examples:
        parts = ["\n# Pairs the judge currently gets wrong (the better response is marked)"]
        for i, (p, label) in enumerate(examples, 1):
            better, worse = (p.first, p.second) if label == "first" else (p.second, p.first)
            parts.append(
                f"## Example {i}\nQuery: {truncate_middle(p.query, max_chars)}\n"
                f"Better response: {truncate_middle(better, max_chars)}\n"
                f"Worse response: {truncate_middle(worse, max_chars)}"
            )
        ex = "\n".join(parts) + "\n"
    return [{"role": "user", "content": EDIT_PROMPT.format(op=op, toml=rubric.to_toml(), examples=ex)}]


def _dimension_from(obj: dict[str, Any]) -> Dimension:
    return Dimension(
        str(obj["id"]).strip(),
        str(obj["title"]).strip(),
        str(obj["type"]).strip(),
        tuple(str(i).strip() for i in obj["items"]),
        obj.get("critical_scope"),
    )


def apply_edit(rubric: MetaRubric, edit: dict[str, Any]) -> tuple[MetaRubric, str]:
    """Applies one edit dict (``EDIT_SCHEMA``); the result is re-validated through the file
    parser, so an edit that would make an invalid file raises ``RefineError`` / ``MetaRubricError``."""
    try:
        jsonschema.validate(edit, EDIT_SCHEMA)
    except jsonschema.ValidationError as e:
        raise RefineError(f"edit fails the schema: {e.message[:200]}") from None
    op = edit["op"]
    dims = list(rubric.dimensions)
    ids = [d.id for d in dims]

    def need(key):
        if key not in edit:
            raise RefineError(f"edit {op!r} needs field '{key}'")
        return edit[key]

    def index_of(did):
        if did not in ids:
            raise RefineError(f"edit {op!r}: no dimension {did!r} (have {ids})")
        return ids.index(did)

    def item_index(d):
        j = need("item_index")
        if not 0 <= j < len(d.items):
            raise RefineError(f"edit {op!r}: item_index {j} out of range for {d.id!r} ({len(d.items)} items)")
        return j

    if op == "add_dimension":
        d = _dimension_from(need("dimension"))
        dims.append(d)
        desc = f"add dimension {d.id}"
    elif op == "delete_dimension":
        k = index_of(need("dimension_id"))
        desc = f"delete dimension {dims.pop(k).id}"
    elif op == "rewrite_dimension":
        k = index_of(need("dimension_id"))
        dims[k] = _dimension_from(need("dimension"))
        desc = f"rewrite dimension {ids[k]}"
    else:
        k = index_of(need("dimension_id"))
        d = dims[k]
        if op == "add_item":
            dims[k] = dataclasses.replace(d, items=d.items + (str(need("item")).strip(),))
        elif op == "delete_item":
            j = item_index(d)
            dims[k] = dataclasses.replace(d, items=d.items[:j] + d.items[j + 1 :])
        else:  # rewrite_item
            j = item_index(d)
            dims[k] = dataclasses.replace(d, items=d.items[:j] + (str(need("item")).strip(),) + d.items[j + 1 :])
        desc = f"{op.replace('_', ' ')} of {d.id}"
    if not dims:
        raise RefineError("edit would leave no dimension")
    new = _replace_dims(rubric, dims)
    # Round trip through the file format: the same validation as a hand-edited file.
    parse_meta_rubric(new.to_toml(), "<edit>", expect_name=rubric.name)
    return new, desc


# ----------------------------------------------------------------------------------------------
# The evolutionary loop.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    population: int = 8
    generations: int = 6
    elite: int = 2
    tournament: int = 3
    length_penalty: float = 0.02  # fitness cost per 1000 characters of rendered rubric
    heldout_fraction: float = 0.3
    seed: int = 0
    mutation: str = "auto"  # "programmatic" | "llm" | "auto" (LLM, programmatic fallback)
    ops: tuple[str, ...] = LLM_OPS  # edit kinds the LLM is asked for (fallbacks use MUTATIONS)
    max_examples: int = 3  # wrong pairs shown to the LLM
    llm_max_tokens: int = 768
    llm_temperature: float = 0.7  # with a per-call seed: reproducible on seeded servers
    llm_json_schema: bool = True

    def __post_init__(self):
        if self.population < 2:
            raise RefineError(f"RefineConfig.population must be >= 2, got {self.population}")
        if not 1 <= self.elite < self.population:
            raise RefineError(f"RefineConfig.elite must be in [1, population), got {self.elite}")
        if self.generations < 0:
            raise RefineError(f"RefineConfig.generations must be >= 0, got {self.generations}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise RefineError(f"RefineConfig.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.mutation not in ("programmatic", "llm", "auto"):
            raise RefineError(f"RefineConfig.mutation must be programmatic / llm / auto, got {self.mutation!r}")
        bad = [op for op in self.ops if op not in LLM_OPS]
        if bad or not self.ops:
            raise RefineError(f"RefineConfig.ops: unknown edit kinds {bad} (known: {list(LLM_OPS)})")


@dataclasses.dataclass
class Variant:
    rubric: MetaRubric
    vid: str
    parent: str | None
    mutation: str
    source: str  # "initial" | "llm" | "programmatic"
    generation: int
    train: Fitness | None = None
    heldout: Fitness | None = None

    def record(self) -> dict[str, Any]:
        out = {
            "id": self.vid,
            "parent": self.parent,
            "mutation": self.mutation,
            "source": self.source,
            "born": self.generation,
            "length_chars": rubric_length(self.rubric),
            "n_dimensions": len(self.rubric.dimensions),
        }
        if self.train is not None:
            out["train"] = self.train.as_dict()
        if self.heldout is not None:
            out["heldout"] = self.heldout.as_dict()
        return out


@dataclasses.dataclass
class RefineCounters:
    evaluations: int = 0  # distinct (variant, split) judged
    memo_hits: int = 0
    llm_proposals: int = 0
    llm_accepted: int = 0
    llm_fallbacks: int = 0  # proposals unusable (backend error, junk, invalid edit)
    programmatic: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RefineResult:
    best: Variant
    initial: Variant
    champions: list[Variant]  # best on train per generation (generation 0 = initial population)
    counters: RefineCounters
    train_ids: list[str]
    heldout_ids: list[str]


def split_pairs(pairs: Sequence[tuple[PairInput, str]], heldout_fraction: float, seed: int):
    """Seeded shuffle then split -> (train, heldout); both non-empty."""
    if len(pairs) < 2:
        raise RefineError(f"need at least 2 labelled pairs to split, got {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(f"split:{seed}").shuffle(order)
    n_held = min(max(1, round(len(pairs) * heldout_fraction)), len(pairs) - 1)
    return [pairs[i] for i in order[n_held:]], [pairs[i] for i in order[:n_held]]


class Refiner:
    """Holds the judge, the proposer and the fitness memo of one refinement run."""

    def __init__(
        self,
        judge,
        config: RefineConfig = RefineConfig(),
        proposer: Backend | None = None,
        pool: MutationPool | None = None,
    ):
        if config.mutation == "llm" and proposer is None:
            raise RefineError("RefineConfig.mutation='llm' needs a proposer backend")
        self.judge = judge
        self.config = config
        self.proposer = proposer if config.mutation != "programmatic" else None
        self.pool = pool or MutationPool.from_domains()
        self.counters = RefineCounters()
        self._memo: dict[tuple[str, str], Fitness] = {}

    async def fitness(self, rubric: MetaRubric, pairs: Sequence[tuple[PairInput, str]], split: str) -> Fitness:
        key = (rubric_id(rubric), split)
        if key in self._memo:
            self.counters.memo_hits += 1
            return self._memo[key]
        results = await judge_under(self.judge, rubric, [p for p, _ in pairs])
        fit = compute_fitness(
            [r.verdict for r in results], [l for _, l in pairs], rubric_length(rubric), self.config.length_penalty
        )
        self._memo[key] = fit
        self.counters.evaluations += 1
        return fit

    async def _llm_edit(self, parent: Variant, op: str, examples, seed: int) -> tuple[MetaRubric, str] | None:
        cfg = self.config
        self.counters.llm_proposals += 1
        req = CompletionRequest(
            messages=build_edit_messages(parent.rubric, op, examples),
            max_tokens=cfg.llm_max_tokens,
            temperature=cfg.llm_temperature,
            seed=seed,
            json_schema=EDIT_SCHEMA if cfg.llm_json_schema else None,
            schema_name="edit",
        )
        try:
            resp = await self.proposer.complete(req)  # type: ignore[union-attr]
            edit = parse_judgment(resp.text, EDIT_SCHEMA)
            out = apply_edit(parent.rubric, edit)
        except (BackendError, JudgeParseError, RefineError, MetaRubricError) as e:
            self.counters.llm_fallbacks += 1
            log.info("LLM edit %s on %s unusable (%s); programmatic fallback", op, parent.vid, str(e)[:120])
            return None
        self.counters.llm_accepted += 1
        return out

    async def make_child(
        self, parent: Variant, generation: int, index: int, train: Sequence[tuple[PairInput, str]]
    ) -> Variant:
        cfg = self.config
        rng = random.Random(f"child:{cfg.seed}:{generation}:{index}")  # independent of call order
        op = rng.choice(list(cfg.ops))
        wrong = [pair for pair, ok in zip(train, parent.train.correct) if not ok] if parent.train else []
        examples = rng.sample(wrong, min(cfg.max_examples, len(wrong)))
        llm_seed = rng.randrange(2**31)
        out, source = None, "programmatic"
        if self.proposer is not None:
            out = await self._llm_edit(parent, op, examples, llm_seed)
            source = "llm"
        if out is None:
            self.counters.programmatic += 1
            out, source = programmatic_mutation(parent.rubric, rng, self.pool), "programmatic"
        rubric, desc = out
        return Variant(rubric, rubric_id(rubric), parent.vid, desc, source, generation)

    async def run(
        self, initial: MetaRubric, pairs: Sequence[tuple[PairInput, str]], log_path: str | os.PathLike | None = None
    ) -> RefineResult:
        cfg = self.config
        train, heldout = split_pairs(pairs, cfg.heldout_fraction, cfg.seed)
        rng = random.Random(f"select:{cfg.seed}")
        logf = open(log_path, "w", encoding="utf-8") if log_path else None

        def emit(rec: dict[str, Any]) -> None:
            if logf is not None:
                logf.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
                logf.flush()

        start = time.perf_counter()
        try:
            init = Variant(initial, rubric_id(initial), None, "initial", "initial", 0)
            init.train = await self.fitness(initial, train, "train")
            init.heldout = await self.fitness(initial, heldout, "heldout")
            emit(
                {
                    "event": "start",
                    "config": dataclasses.asdict(cfg),
                    "initial": init.record(),
                    "train_ids": [p.pair_id for p, _ in train],
                    "heldout_ids": [p.pair_id for p, _ in heldout],
                }
            )
            population = [init] + await asyncio.gather(
                *(self.make_child(init, 0, i, train) for i in range(cfg.population - 1))
            )
            champions: list[Variant] = []
            for gen in range(cfg.generations + 1):
                fits = await asyncio.gather(*(self.fitness(v.rubric, train, "train") for v in population))
                for v, f in zip(population, fits):
                    v.train = f
                # Best first; shorter wins a tie, then the id (a total, seed-independent order).
                population.sort(key=lambda v: (-v.train.fitness, rubric_length(v.rubric), v.vid))
                champ = population[0]
                champ.heldout = await self.fitness(champ.rubric, heldout, "heldout")
                champions.append(champ)
                emit(
                    {
                        "event": "generation",
                        "generation": gen,
                        "population": [v.record() for v in population],
                        "champion": champ.record(),
                        "counters": self.counters.as_dict(),
                    }
                )
                log.info(
                    "generation %d: champion %s train %.4f heldout %.4f (%s)",
                    gen,
                    champ.vid,
                    champ.train.fitness,
                    champ.heldout.fitness,
                    champ.mutation,
                )
                if gen == cfg.generations:
                    break
                elites = population[: cfg.elite]
                parents = []
                for _ in range(cfg.population - cfg.elite):
                    entrants = rng.sample(population, min(cfg.tournament, len(population)))
                    parents.append(min(entrants, key=lambda v: (-v.train.fitness, rubric_length(v.rubric), v.vid)))
                children = await asyncio.gather(*(self.make_child(p, gen + 1, i, train) for i, p in enumerate(parents)))
                population = elites + list(children)
            # The held-out split picks among the initial rubric and the champions (ties: earlier,
            # i.e. fewer edits), so the result is never worse than the start on held-out pairs.
            candidates = [init] + champions
            best = max(enumerate(candidates), key=lambda iv: (iv[1].heldout.fitness, -iv[0]))[1]
            emit(
                {
                    "event": "end",
                    "best": best.record(),
                    "initial": init.record(),
                    "counters": self.counters.as_dict(),
                    "wall_s": round(time.perf_counter() - start, 3),
                }
            )
        finally:
            if logf is not None:
                logf.close()
        return RefineResult(
            best, init, champions, self.counters, [p.pair_id for p, _ in train], [p.pair_id for p, _ in heldout]
        )


async def refine(
    judge,
    initial: MetaRubric,
    pairs: Sequence[tuple[PairInput, str]],
    config: RefineConfig = RefineConfig(),
    proposer: Backend | None = None,
    log_path: str | os.PathLike | None = None,
    pool: MutationPool | None = None,
) -> RefineResult:
    """Evolutionary refinement of ``initial`` (usually the general principles); see module doc."""
    return await Refiner(judge, config, proposer, pool).run(initial, pairs, log_path)


def write_meta_rubric(rubric: MetaRubric, directory: str | os.PathLike) -> pathlib.Path:
    """Writes ``<directory>/<name>.toml`` and checks it loads back as a valid meta-rubric."""
    path = pathlib.Path(directory) / f"{rubric.name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rubric.to_toml(), encoding="utf-8")
    load_meta_rubric(path)
    return path


# ----------------------------------------------------------------------------------------------
# Human-in-the-loop review of a domain edit.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flip:
    pair_id: str
    label: str
    old_verdict: str
    new_verdict: str

    @property
    def effect(self) -> str:
        was, now = self.old_verdict == self.label, self.new_verdict == self.label
        return "fixed" if now and not was else ("broken" if was and not now else "changed")


@dataclasses.dataclass
class ReviewReport:
    old_path: str
    new_path: str
    old_sha256: str
    new_sha256: str
    n_pairs: int
    old: Fitness
    new: Fitness
    flips: list[Flip]

    def as_dict(self) -> dict[str, Any]:
        return {
            "old_path": self.old_path,
            "new_path": self.new_path,
            "old_sha256": self.old_sha256,
            "new_sha256": self.new_sha256,
            "n_pairs": self.n_pairs,
            "old": self.old.as_dict(),
            "new": self.new.as_dict(),
            "flips": [dict(dataclasses.asdict(f), effect=f.effect) for f in self.flips],
        }


def _sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


async def review_edit(
    judge, old_path: str | os.PathLike, new_path: str | os.PathLike, pairs: Sequence[tuple[PairInput, str]]
) -> ReviewReport:
    """Judges ``pairs`` under the old and the proposed rubric file; lists the flipped verdicts."""
    old, new = load_meta_rubric(old_path), load_meta_rubric(new_path)
    if old.name != new.name:
        raise RefineError(f"{new_path}: the edit renames the meta-rubric ({old.name!r} -> {new.name!r})")
    plain = [p for p, _ in pairs]
    labels = [l for _, l in pairs]
    before, after = await asyncio.gather(judge_under(judge, old, plain), judge_under(judge, new, plain))
    flips = [
        Flip(p.pair_id, l, a.verdict, b.verdict)
        for p, l, a, b in zip(plain, labels, before, after)
        if a.verdict != b.verdict
    ]
    return ReviewReport(
        str(old_path),
        str(new_path),
        _sha256(old_path),
        _sha256(new_path),
        len(pairs),
        compute_fitness([r.verdict for r in before], labels, rubric_length(old), 0.0),
        compute_fitness([r.verdict for r in after], labels, rubric_length(new), 0.0),
        flips,
    )


def write_review_record(
    path: str | os.PathLike, report: ReviewReport, decision: str, reviewer: str, note: str = ""
) -> dict[str, Any]:
    """Appends one JSON line recording a person's decision on an edit."""
    if decision not in ("accept", "reject"):
        raise RefineError(f"decision must be 'accept' or 'reject', got {decision!r}")
    rec = {
        "decision": decision,
        "reviewer": reviewer,
        "note": note,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **report.as_dict(),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return rec


# ----------------------------------------------------------------------------------------------
# Judge construction shared by the refinement and review commands.
# ----------------------------------------------------------------------------------------------


def build_judge(backend_name: str, judge_config=None, **backend_kwargs):
    """(judge, backend) for a registry name: ``logit`` gives a generation-free ``LogitJudge``,
    anything else a ``PairwiseJudge`` over that backend."""
    from clipo_jax.rubrics.backends import make_backend
    from clipo_jax.rubrics.judge import JudgeConfig, PairwiseJudge

    backend = make_backend(backend_name, **backend_kwargs)
    judge_config = judge_config or JudgeConfig()
    if backend_name == "logit":
        from clipo_jax.rubrics.local_backends import LogitJudge

        return LogitJudge(backend, min_score=judge_config.min_score), backend
    return PairwiseJudge(backend, judge_config), backend
