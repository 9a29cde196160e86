"""Pointwise checklist rubrics: per-row weighted items judged yes / no, aggregated explicitly.

"Rubrics as Rewards" (RaR; Gunjal et al. 2025, arXiv 2507.17746) scores a response against a
prompt-specific checklist.  Here we use its *explicit aggregation*: an LLM judge decides for every
item whether it is satisfied, and the weighted items are summed in code.  A row carries its rubric::

    {"prompt": "...", "rubric": [{"criterion": "Mentions that X", "weight": 5},
                                 {"criterion": "States a wrong date", "weight": -3, "kind": "pitfall"}]}

Positive weights reward what a good answer does; negative weights are pitfalls (mistakes), and a
pitfall is "satisfied" when the response *makes* that mistake.  With s_i in {0, 1} the judge's
verdict on item i and w_i its weight, the reward is

    P     = sum of w_i over items with w_i > 0                      (> 0, checked when parsing)
    raw   = sum_{w_i > 0} s_i * w_i  -  sum_{w_i < 0} s_i * |w_i|    (= sum_i s_i * w_i)
    score = min(1, max(0, raw / P))

so 1 means every positive item is met and no pitfall is made, and pitfalls can take the score
down to 0 but not below it (clipped).  ``checklist_score(items, satisfied)`` is that formula.

``ChecklistScorer(backend, config)`` asks the judge once per (prompt, response) for all items at
once, as ``{"items": [{"id": 1, "satisfied": true}, ...]}`` (schema-constrained when the backend
supports it).  As in ``judge.py``, output that does not parse (or misses items) is retried with a
new seed up to ``parse_attempts`` times, and a ``BackendError`` (the backend already retried) ends
the request; both are counted in ``scorer.counters`` and give ``score=None``, never an exception::

    scorer = ChecklistScorer(OpenAIHTTPBackend(base_url, model), ChecklistConfig(max_in_flight=32))
    items = parse_rubric(row["rubric"], where=f"row {i}")
    results = await scorer.score_many([(row["prompt"], response, items) for response in group])
    rewards = [r.score for r in results]  # None: a failed judgment; the caller decides what it is worth
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import numbers
import time
from typing import Any, Iterable, Sequence

import json_repair

from clipo_jax.data.indices import as_index
from clipo_jax.rubrics.protocol import JudgeParseError, extract_json_text, truncate_middle
from clipo_jax.rubrics.types import (
    DEFAULT_JUDGE_MAX_TOKENS,
    Backend,
    BackendError,
    CompletionRequest,
    forget_cached,
)

# Item kinds.  "pitfall" is the only kind with a negative weight; the others are labels (RaR's
# essential / important / optional tiers, or plain "criterion") and do not change the arithmetic.
POSITIVE_KINDS = ("criterion", "essential", "important", "optional")
PITFALL_KIND = "pitfall"
KINDS = POSITIVE_KINDS + (PITFALL_KIND,)
ITEM_FIELDS = ("criterion", "weight", "kind")


class ChecklistError(ValueError):
    """A rubric that cannot be used; the message is one line and names the row and item."""


class ChecklistParseError(JudgeParseError):
    """The judge's checklist answer does not parse or misses items (retried, then counted)."""


@dataclasses.dataclass(frozen=True)
class RubricItem:
    criterion: str
    weight: float  # > 0: a criterion to meet; < 0: a pitfall to avoid
    kind: str = "criterion"


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value, cut to ``limit`` characters (keeps error messages on one line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_rubric(items: Any, where: str = "") -> list[RubricItem]:
    """Validates one row's rubric and returns its items.

    Args:
      items: a list of ``{"criterion": str, "weight": number, "kind": str (optional)}`` (or of
        ``RubricItem``).  ``kind`` defaults to "pitfall" for a negative weight and "criterion"
        otherwise; a given kind must be one of ``KINDS`` and agree with the weight's sign.
      where: the row's location for error messages, e.g. "row 12" gives
        "row 12 rubric item 3: ..." (items are numbered from 1, as the judge sees them).
    Raises:
      ChecklistError: not a list; an item that is not an object, has unknown fields, an empty or
        non-string criterion, a missing / non-numeric / non-finite / zero weight, or a bad kind;
        no item with a positive weight.
    """
    prefix = f"{where} rubric" if where else "rubric"
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple)):
        raise ChecklistError(f"{prefix}: expected a list of items, got {type(items).__name__}")
    out: list[RubricItem] = []
    for n, item in enumerate(items, start=1):
        at = f"{prefix} item {n}"
        if isinstance(item, RubricItem):
            item = dataclasses.asdict(item)
        if not isinstance(item, dict):
            raise ChecklistError(f"{at}: expected an object with 'criterion' and 'weight', got {type(item).__name__}")
        unknown = sorted(str(k) for k in item if k not in ITEM_FIELDS)
        if unknown:
            raise ChecklistError(
                f"{at}: unknown field(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(ITEM_FIELDS)})"
            )
        criterion = item.get("criterion")
        if not isinstance(criterion, str):
            got = "missing" if criterion is None else f"got {type(criterion).__name__}"
            raise ChecklistError(f"{at}: 'criterion' must be a non-empty string ({got})")
        criterion = criterion.strip()
        if not criterion:
            raise ChecklistError(f"{at}: 'criterion' is empty")
        if "weight" not in item:
            raise ChecklistError(f"{at}: 'weight' is missing")
        weight = item["weight"]
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ChecklistError(f"{at}: 'weight' must be a number, got {_short(weight)}")
        weight = float(weight)
        if not math.isfinite(weight):
            raise ChecklistError(f"{at}: 'weight' must be finite, got {weight}")
        if weight == 0:
            raise ChecklistError(f"{at}: 'weight' is 0 (use a positive weight, or a negative one for a pitfall)")
        kind = item.get("kind")
        if kind is None:
            kind = PITFALL_KIND if weight < 0 else "criterion"
        elif not isinstance(kind, str) or kind.strip().lower() not in KINDS:
            raise ChecklistError(f"{at}: 'kind' must be one of {', '.join(KINDS)}, got {_short(kind)}")
        kind = kind.strip().lower()
        if (kind == PITFALL_KIND) != (weight < 0):
            need = "negative" if kind == PITFALL_KIND else "positive"
            raise ChecklistError(f"{at}: kind {kind!r} needs a {need} weight, got {weight:g}")
        out.append(RubricItem(criterion=criterion, weight=weight, kind=kind))
    if not out:
        raise ChecklistError(f"{prefix}: no items")
    if not any(it.weight > 0 for it in out):
        raise ChecklistError(f"{prefix}: needs at least one item with a positive weight (all {len(out)} are pitfalls)")
    return out


def checklist_score(items: Sequence[RubricItem], satisfied: Sequence[bool]) -> float:
    """The explicit aggregation of the module docstring: clip((sum of satisfied positive weights -
    sum of |w| of satisfied pitfalls) / (sum of positive weights), 0, 1)."""
    if len(items) != len(satisfied):
        raise ValueError(f"checklist_score: {len(items)} items but {len(satisfied)} verdicts")
    total = sum(it.weight for it in items if it.weight > 0)
    if total <= 0:
        raise ValueError("checklist_score: the rubric has no positive weight")
    gained = sum(it.weight for it, s in zip(items, satisfied) if s and it.weight > 0)
    lost = sum(-it.weight for it, s in zip(items, satisfied) if s and it.weight < 0)
    return min(1.0, max(0.0, (gained - lost) / total))


# ----------------------------------------------------------------------------------------------
# Prompt, answer schema and parsing.  Our own wording.
# ----------------------------------------------------------------------------------------------

SYSTEM_PROMPT = """You are a careful, impartial grader. You check one AI response against a \
checklist, one item at a time, and go only by what the response actually says: not by its \
length, its tone or how confident it sounds."""

CHECKLIST_TEMPLATE = """Check the response below against every numbered item of the checklist.

For each item decide whether it holds for the response: "satisfied": true if it does, false if \
it does not. Items marked [pitfall] describe mistakes; for those, true means the response DOES \
make that mistake. Judge each item on its own.

# Prompt
<prompt>
{prompt}
</prompt>

# Response
<response>
{response}
</response>

# Checklist
{checklist}

# Output
Reply with one JSON object and nothing after it: {{"items": [{{"id": 1, "satisfied": true}}, ...]}} \
with exactly one entry for each of the {n} items (ids 1 to {n})."""


def render_checklist(items: Sequence[RubricItem]) -> str:
    """One numbered line per item (ids from 1); pitfalls are marked."""
    lines = []
    for n, it in enumerate(items, start=1):
        text = " ".join(it.criterion.split())  # one line per item
        lines.append(f"{n}. [pitfall] {text}" if it.weight < 0 else f"{n}. {text}")
    return "\n".join(lines)


def checklist_schema(n_items: int) -> dict[str, Any]:
    """JSON schema of the judge's answer for a rubric of ``n_items`` items."""
    entry = {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "enum": list(range(1, n_items + 1))},
            "satisfied": {"type": "boolean"},
        },
        "required": ["id", "satisfied"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"items": {"type": "array", "items": entry, "minItems": n_items, "maxItems": n_items}},
        "required": ["items"],
        "additionalProperties": False,
    }


_TRUE = {"true", "yes", "y", "1", "satisfied", "met"}
_FALSE = {"false", "no", "n", "0", "unsatisfied", "not satisfied", "not met"}


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        return True if key in _TRUE else (False if key in _FALSE else None)
    return None


def parse_checklist_answer(text: str, n_items: int) -> list[bool]:
    """The judge's verdicts in item order, from ``{"items": [{"id": k, "satisfied": b}, ...]}``
    (the last fenced JSON block or the outermost braces, repaired if needed; a bare list of
    entries is accepted too).  Raises ChecklistParseError on anything else, on an id outside
    1..n_items, on contradicting duplicates and on missing items."""
    if not text or not text.strip():
        raise ChecklistParseError("empty judge output")
    candidate = text.strip() if text.lstrip().startswith("[") else extract_json_text(text)
    try:
        obj = json.loads(candidate)
    except json.JSONDecodeError:
        obj = json_repair.loads(candidate)  # "" when nothing is salvageable
    entries = obj.get("items") if isinstance(obj, dict) else obj
    if not isinstance(entries, list):
        raise ChecklistParseError(f"judge output has no 'items' list (got {type(obj).__name__})")
    verdicts: dict[int, bool] = {}
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ChecklistParseError(f"items[{k}] is not an object")
        item_id, sat = as_index(entry.get("id")), _as_bool(entry.get("satisfied"))
        if item_id is None or not 1 <= item_id <= n_items:
            raise ChecklistParseError(f"items[{k}] has id {_short(entry.get('id'))}, expected 1..{n_items}")
        if sat is None:
            raise ChecklistParseError(f"items[{k}] has satisfied={_short(entry.get('satisfied'))}, expected true/false")
        if verdicts.setdefault(item_id, sat) != sat:
            raise ChecklistParseError(f"item {item_id} is both satisfied and not")
    missing = [i for i in range(1, n_items + 1) if i not in verdicts]
    if missing:
        raise ChecklistParseError(f"judge output misses item(s) {', '.join(map(str, missing[:10]))}")
    return [verdicts[i] for i in range(1, n_items + 1)]


# ----------------------------------------------------------------------------------------------
# The scorer.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChecklistConfig:
    max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS  # new tokens per judgment (the release's 8192)
    parse_attempts: int = 3  # judge calls per request on unparseable / incomplete output
    max_in_flight: int = 64  # requests being judged at once (the backend has its own bound too)
    seed: int = 0  # attempt k uses seed + k (temperature-0 output is otherwise identical and cached)
    temperature: float = 0.0
    use_json_schema: bool = True
    max_prompt_chars: int = 6000  # head + tail kept (protocol.truncate_middle)
    max_response_chars: int = 6000

    def __post_init__(self):
        if self.parse_attempts < 1:
            raise ValueError("ChecklistConfig.parse_attempts must be >= 1")
        if self.max_in_flight < 1:
            raise ValueError("ChecklistConfig.max_in_flight must be >= 1")


@dataclasses.dataclass
class ChecklistResult:
    score: float | None  # None: the judgment failed (see error_kind)
    satisfied: list[bool] | None  # per item, in rubric order
    error_kind: str | None = None  # None | "parse" | the BackendError kind ("http", "timeout", ...)
    error: str | None = None  # message of the last failure
    attempts: int = 0  # judge calls made for this request


@dataclasses.dataclass
class ChecklistCounters:
    requests: int = 0  # (prompt, response, items) asked for, duplicates included
    dedup_hits: int = 0  # requests answered by an identical one in the same score_many call
    calls: int = 0  # backend.complete calls (parse retries included)
    cache_hits: int = 0  # calls the backend answered from its cache
    scored: int = 0  # requests that got a score
    parse_retries: int = 0
    parse_failures: int = 0  # requests whose answer never parsed (score None)
    backend_failures: int = 0  # requests whose call failed for good (score None)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0  # summed wall time of the calls

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def build_checklist_messages(
    prompt: str, response: str, items: Sequence[RubricItem], config: ChecklistConfig = ChecklistConfig()
) -> list[dict[str, str]]:
    content = CHECKLIST_TEMPLATE.format(
        prompt=truncate_middle(prompt, config.max_prompt_chars),
        response=truncate_middle(response, config.max_response_chars),
        checklist=render_checklist(items),
        n=len(items),
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def _items(items: Any, where: str) -> tuple[RubricItem, ...]:
    """Raw rubric dicts or RubricItems, validated either way (ChecklistError names ``where``)."""
    return tuple(parse_rubric(items, where))


class ChecklistScorer:
    """Scores responses against checklist rubrics with one judge call per (prompt, response)."""

    def __init__(self, backend: Backend, config: ChecklistConfig = ChecklistConfig()):
        self.backend = backend
        self.config = config
        self.counters = ChecklistCounters()
        self._sem: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()  # one semaphore per event loop (asyncio.run makes new ones)
        if self._sem is None or self._loop is not loop:
            self._sem, self._loop = asyncio.Semaphore(self.config.max_in_flight), loop
        return self._sem

    async def score(self, prompt: str, response: str, items: Any) -> ChecklistResult:
        """One request; ``items`` are RubricItems or raw rubric dicts (validated, ChecklistError)."""
        items = _items(items, "request")
        _check_text(prompt, response, "request")
        self.counters.requests += 1
        return await self._score(prompt, response, items)

    async def score_many(self, requests: Iterable[tuple[str, str, Any]]) -> list[ChecklistResult]:
        """All requests concurrently (at most ``max_in_flight`` at once), identical ones judged once.
        Every rubric is validated before any call goes out (ChecklistError names the request)."""
        keys = []
        for i, (prompt, response, items) in enumerate(requests):
            _check_text(prompt, response, f"request {i}")
            keys.append((prompt, response, _items(items, f"request {i}")))
        unique = list(dict.fromkeys(keys))
        self.counters.requests += len(keys)
        self.counters.dedup_hits += len(keys) - len(unique)
        results = await asyncio.gather(*(self._score(*key) for key in unique))
        by_key = dict(zip(unique, results))
        out, seen = [], set()
        for key in keys:
            r = by_key[key]
            # Duplicates get their own copy (a caller may edit one result).
            out.append(r if key not in seen else dataclasses.replace(r, satisfied=_copy(r.satisfied)))
            seen.add(key)
        return out

    async def _score(self, prompt: str, response: str, items: tuple[RubricItem, ...]) -> ChecklistResult:
        cfg = self.config
        messages = build_checklist_messages(prompt, response, items, cfg)
        schema = checklist_schema(len(items)) if cfg.use_json_schema else None
        out = ChecklistResult(score=None, satisfied=None)
        async with self._semaphore():
            for attempt in range(cfg.parse_attempts):
                out.attempts = attempt + 1
                req = CompletionRequest(
                    messages=messages,
                    max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature,
                    top_p=1.0,
                    seed=cfg.seed + attempt,
                    json_schema=schema,
                    schema_name="checklist",
                )
                self.counters.calls += 1
                start = time.perf_counter()
                try:
                    resp = await self.backend.complete(req)
                except BackendError as e:
                    # The backend already retried with backoff; this request is a counted failure.
                    self.counters.latency_s += time.perf_counter() - start
                    self.counters.backend_failures += 1
                    out.error, out.error_kind = str(e), e.kind
                    return out
                self.counters.latency_s += time.perf_counter() - start
                self.counters.cache_hits += int(resp.cached)
                self.counters.prompt_tokens += resp.prompt_tokens
                self.counters.completion_tokens += resp.completion_tokens
                try:
                    satisfied = parse_checklist_answer(resp.text, len(items))
                except ChecklistParseError as e:
                    forget_cached(self.backend, req)
                    out.error, out.error_kind = str(e), "parse"
                    if attempt + 1 < cfg.parse_attempts:
                        self.counters.parse_retries += 1
                    continue
                out.satisfied, out.score = satisfied, checklist_score(items, satisfied)
                out.error = out.error_kind = None
                self.counters.scored += 1
                return out
        self.counters.parse_failures += 1
        return out


def _copy(satisfied: list[bool] | None) -> list[bool] | None:
    return None if satisfied is None else list(satisfied)


def _check_text(prompt: Any, response: Any, where: str) -> None:
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise TypeError(f"{where}: {name} must be a string, got {type(value).__name__}")
