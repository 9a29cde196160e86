"""The evolutionary refinement loop: population, fitness memo, elitism + tournament selection on
the training split, choice of the result on the held-out split (see the package docstring)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import random
import time
from typing import Any, Sequence

from clipo_jax.rubrics.meta_rubric import MetaRubric, MetaRubricError, load_meta_rubric
from clipo_jax.rubrics.protocol import JudgeParseError, parse_judgment
from clipo_jax.rubrics.refine.fitness import (
    Fitness,
    RefineError,
    compute_fitness,
    judge_under,
    rubric_id,
    rubric_length,
)
from clipo_jax.rubrics.refine.mutations import (
    EDIT_SCHEMA,
    LLM_OPS,
    MutationPool,
    apply_edit,
    build_edit_messages,
    programmatic_mutation,
)
from clipo_jax.rubrics.types import Backend, BackendError, CompletionRequest, PairInput

log = logging.getLogger(__name__)


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
