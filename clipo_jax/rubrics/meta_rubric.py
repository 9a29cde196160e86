"""Meta-rubric files: format, validation, loading (as package data) and query-type routing.

File format (TOML, one file per domain, ``<name>.toml``)::

    name = "math"                      # required; must equal the file stem
    title = "Mathematics"              # required; human-readable
    description = "..."                # required; what kind of queries this domain covers
    [[dimension]]                      # one table per candidate evaluation dimension (>= 1)
    id = "final_answer"                # required; [a-z0-9_]+, unique within the file
    title = "Final answer is correct"  # required
    type = "critical"                  # required; core | important | highlight | critical
    critical_scope = "factuality"      # required iff type = critical: factuality | harmfulness
                                       #   | alignment (the only flaws allowed to veto, OpenRS paper: the rubric pieces)
    items = ["...", "..."]             # required; non-empty list of sub-item strings

``general.toml`` holds the principles that apply everywhere; ``routing.toml`` maps query types
to domains with ordered regular expressions (first match wins) and a ``fallback`` domain.
A malformed file raises ``MetaRubricError`` naming the file, the line and the field.

Files are read with ``importlib.resources`` (package data), never relative to the working
directory.  ``load_meta_rubric(path)`` loads any other file, e.g. an edited copy under review.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import logging
import pathlib
import re
import tomllib
from typing import Any

log = logging.getLogger(__name__)

DIMENSION_TYPES = ("core", "important", "highlight", "critical")
CRITICAL_SCOPES = ("factuality", "harmfulness", "alignment")
_ID_RE = re.compile(r"^[a-z0-9_]+$")
PACKAGE = "clipo_jax.rubrics"
DATA_DIR = "meta_rubrics"


class MetaRubricError(ValueError):
    """A meta-rubric or routing file is malformed; the message names file, line and field."""


@dataclasses.dataclass(frozen=True)
class Dimension:
    id: str
    title: str
    type: str
    items: tuple[str, ...]
    critical_scope: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "title": self.title, "type": self.type, "items": list(self.items)}
        if self.critical_scope:
            out["critical_scope"] = self.critical_scope
        return out


@dataclasses.dataclass(frozen=True)
class MetaRubric:
    name: str
    title: str
    description: str
    dimensions: tuple[Dimension, ...]
    source: str = "<memory>"

    def render(self) -> str:
        """Plain-text rendering used inside judge prompts."""
        lines = [f"## {self.title} ({self.name})", self.description.strip()]
        for d in self.dimensions:
            scope = f", scope: {d.critical_scope}" if d.critical_scope else ""
            lines.append(f"- [{d.type}{scope}] {d.id}: {d.title}")
            lines.extend(f"    * {item}" for item in d.items)
        return "\n".join(lines)

    def to_toml(self) -> str:
        """Serialises back to the file format (used by refinement to write variants)."""

        def q(s: str) -> str:
            # a JSON string is a TOML basic string, except that TOML also forbids a raw DEL
            return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")

        out = [f"name = {q(self.name)}", f"title = {q(self.title)}", f"description = {q(self.description)}", ""]
        for d in self.dimensions:
            out += ["[[dimension]]", f"id = {q(d.id)}", f"title = {q(d.title)}", f"type = {q(d.type)}"]
            if d.critical_scope:
                out.append(f"critical_scope = {q(d.critical_scope)}")
            out.append("items = [" + ", ".join(q(i) for i in d.items) + "]")
            out.append("")
        return "\n".join(out)


def _line_index(text: str) -> dict[tuple[int | None, str], int]:
    """Maps (dimension index or None for top level, key) -> 1-based line of that key."""
    index: dict[tuple[int | None, str], int] = {}
    table: int | None = None
    count = -1
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("[["):
            count += 1
            table = count
            index[(table, "")] = lineno
            continue
        m = re.match(r"^([A-Za-z0-9_]+)\s*=", stripped)
        if m:
            index.setdefault((table, m.group(1)), lineno)
    return index


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message already carries "(at line L, column C)".
        raise MetaRubricError(f"{source}: TOML syntax error: {e}") from None


def parse_meta_rubric(text: str, source: str = "<string>", expect_name: str | None = None) -> MetaRubric:
    """Parses and validates one meta-rubric file's text."""
    data = _parse_toml(text, source)
    lines = _line_index(text)

    def fail(dim: int | None, key: str, msg: str):
        line = lines.get((dim, key)) or lines.get((dim, "")) or 1
        field = key if dim is None else f"dimension[{dim}].{key}"
        raise MetaRubricError(f"{source}:{line}: field '{field}': {msg}")

    def need_str(table: dict, dim: int | None, key: str) -> str:
        value = table.get(key)
        if not isinstance(value, str) or not value.strip():
            fail(dim, key, "required non-empty string" + ("" if value is None else f", got {value!r}"))
        return value.strip()

    known_top = {"name", "title", "description", "dimension"}
    for key in data:
        if key not in known_top:
            fail(None, key, f"unknown field (allowed: {sorted(known_top)})")
    name = need_str(data, None, "name")
    if expect_name is not None and name != expect_name:
        fail(None, "name", f"must equal the file name stem {expect_name!r}, got {name!r}")
    title = need_str(data, None, "title")
    description = need_str(data, None, "description")
    raw_dims = data.get("dimension")
    if not isinstance(raw_dims, list) or not raw_dims:
        fail(None, "dimension", "at least one [[dimension]] table is required")
    dims, seen = [], set()
    known_dim = {"id", "title", "type", "items", "critical_scope"}
    for i, d in enumerate(raw_dims):
        for key in d:
            if key not in known_dim:
                fail(i, key, f"unknown field (allowed: {sorted(known_dim)})")
        did = need_str(d, i, "id")
        if not _ID_RE.match(did):
            fail(i, "id", f"must match [a-z0-9_]+, got {did!r}")
        if did in seen:
            fail(i, "id", f"duplicate id {did!r}")
        seen.add(did)
        dtitle = need_str(d, i, "title")
        dtype = need_str(d, i, "type")
        if dtype not in DIMENSION_TYPES:
            fail(i, "type", f"must be one of {list(DIMENSION_TYPES)}, got {dtype!r}")
        scope = d.get("critical_scope")
        if dtype == "critical":
            if scope not in CRITICAL_SCOPES:
                fail(i, "critical_scope", f"critical dimensions need one of {list(CRITICAL_SCOPES)}, got {scope!r}")
        elif scope is not None:
            fail(i, "critical_scope", "only allowed when type = 'critical'")
        items = d.get("items")
        if not isinstance(items, list) or not items or not all(isinstance(x, str) and x.strip() for x in items):
            fail(i, "items", "required non-empty list of non-empty strings")
        dims.append(Dimension(did, dtitle, dtype, tuple(x.strip() for x in items), scope))
    return MetaRubric(name, title, description, tuple(dims), source)


def load_meta_rubric(path: str | pathlib.Path) -> MetaRubric:
    """Loads a meta-rubric from an explicit file path (e.g. a proposed edit)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MetaRubricError(f"{path}: cannot read meta-rubric file: {e.strerror}") from None
    return parse_meta_rubric(text, str(path), expect_name=path.stem)


def _data_files():
    return importlib.resources.files(PACKAGE).joinpath(DATA_DIR)


def available_domains() -> list[str]:
    """Names of the shipped meta-rubrics (general included, routing.toml excluded)."""
    return sorted(p.name[:-5] for p in _data_files().iterdir() if p.name.endswith(".toml") and p.name != "routing.toml")


@functools.lru_cache(maxsize=None)
def builtin_meta_rubric(name: str) -> MetaRubric:
    """Loads a shipped meta-rubric by domain name (package data)."""
    res = _data_files().joinpath(f"{name}.toml")
    if not res.is_file():
        raise MetaRubricError(f"unknown meta-rubric domain {name!r} (available: {available_domains()})")
    return parse_meta_rubric(res.read_text(encoding="utf-8"), f"{PACKAGE}/{DATA_DIR}/{name}.toml", expect_name=name)


@dataclasses.dataclass(frozen=True)
class Router:
    """Ordered (regex -> domain) rules over query types, first match wins."""

    rules: tuple[tuple[re.Pattern, str], ...]
    fallback: str = "general"
    source: str = "<memory>"

    def route(self, query_type: str | None) -> str:
        qt = (query_type or "").strip()
        for pattern, domain in self.rules:
            if qt and pattern.search(qt):
                return domain
        _log_fallback(qt, self.fallback)
        return self.fallback


@functools.lru_cache(maxsize=1024)
def _log_fallback(query_type: str, fallback: str) -> None:
    # Cached so each unknown query type is logged once, not once per pair.
    log.warning("no domain meta-rubric matches query_type %r; falling back to %r", query_type, fallback)


def parse_routing(text: str, source: str = "<string>", known_domains: list[str] | None = None) -> Router:
    data = _parse_toml(text, source)
    lines = _line_index(text)

    def fail(idx: int | None, key: str, msg: str):
        line = lines.get((idx, key)) or lines.get((idx, "")) or 1
        field = key if idx is None else f"route[{idx}].{key}"
        raise MetaRubricError(f"{source}:{line}: field '{field}': {msg}")

    fallback = data.get("fallback", "general")
    if known_domains is not None and fallback not in known_domains:
        fail(None, "fallback", f"unknown domain {fallback!r}")
    rules = []
    for i, r in enumerate(data.get("route", [])):
        pattern, domain = r.get("pattern"), r.get("domain")
        if not isinstance(pattern, str) or not pattern:
            fail(i, "pattern", "required regular expression string")
        try:
            compiled = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            fail(i, "pattern", f"invalid regular expression: {e}")
        if not isinstance(domain, str) or (known_domains is not None and domain not in known_domains):
            fail(i, "domain", f"unknown domain {domain!r} (available: {known_domains})")
        rules.append((compiled, domain))
    return Router(tuple(rules), fallback, source)


@functools.lru_cache(maxsize=1)
def builtin_router() -> Router:
    res = _data_files().joinpath("routing.toml")
    return parse_routing(
        res.read_text(encoding="utf-8"), f"{PACKAGE}/{DATA_DIR}/routing.toml", known_domains=available_domains()
    )


def domain_for_query_type(query_type: str | None) -> str:
    """Domain name for a query type such as "livebench-math" (logged fallback to general)."""
    return builtin_router().route(query_type)


def meta_rubrics_for(query_type: str | None) -> tuple[MetaRubric, MetaRubric | None]:
    """(general principles, domain principles or None when the query falls back to general)."""
    domain = domain_for_query_type(query_type)
    general = builtin_meta_rubric("general")
    return general, (None if domain == "general" else builtin_meta_rubric(domain))
