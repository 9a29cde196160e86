"""One edit to a meta-rubric: programmatic mutations drawn from the shipped domain rubrics, and
LLM-proposed edits (prompt, schema, validation and application).

Programmatic mutations are ``f(rubric, rng, pool) -> (new rubric, description)`` or None when not
applicable; add one by writing a function and a ``MUTATIONS`` entry.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Sequence

import jsonschema

from clipo_jax.rubrics.meta_rubric import (
    CRITICAL_SCOPES,
    DIMENSION_TYPES,
    Dimension,
    MetaRubric,
    available_domains,
    builtin_meta_rubric,
    parse_meta_rubric,
)
from clipo_jax.rubrics.protocol import truncate_middle
from clipo_jax.rubrics.refine.fitness import RefineError
from clipo_jax.rubrics.types import PairInput

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
        # JSON Schema counts 1.0 as an integer (the schema rejects 0.5): slice with int(j).
        j = int(j)
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
