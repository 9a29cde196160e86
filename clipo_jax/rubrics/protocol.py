"""The Pairwise Adaptive Meta-Rubric (PAMR) protocol: prompts, answer schema and parsing.

One judged direction asks the model for one JSON object (OpenRS paper, arXiv 2602.14069: the rubric pieces to per-criterion judge output):

1. ``intent`` — an analysis of the query written *before* looking at the answers (the prompt
   orders it first and, in the two-stage protocol, it is produced by a separate call that never
   sees the answers, then reused for both orders);
2. ``differences`` + ``criteria`` — a rubric instantiated from the meta-rubric for where the two
   responses differ, 5-15 criteria typed core / important / highlight / critical;
3. per criterion: evidence, reason, label (A / B / S) and score (-2..2).

Parsing (``parse_judgment``) takes the first schema-valid candidate among the whole answer as
strict JSON, the fenced blocks and every strictly decoding object (last first), then repairs the
last fenced block (or the text from the first brace) with ``json_repair``; labels and types are
normalised (``LABEL_SYNONYMS``; an unknown type counts as important) before validation against
``JUDGMENT_SCHEMA``; ``JudgeParseError`` otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Any

import json_repair
import jsonschema

from clipo_jax.rubrics.meta_rubric import MetaRubric

CRITERION_TYPES = ["core", "important", "highlight", "critical"]

INTENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "task": {"type": "string"},
        "explicit_requirements": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "implicit_requirements": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
    },
    "required": ["task", "explicit_requirements", "implicit_requirements"],
}

CRITERION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "title": {"type": "string"},
        "type": {"type": "string", "enum": CRITERION_TYPES},
        "evidence": {"type": "string"},
        "reason": {"type": "string"},
        "label": {"type": "string", "enum": ["A", "B", "S"]},
        "score": {"type": "integer", "enum": [-2, -1, 0, 1, 2]},
    },
    "required": ["id", "title", "type", "evidence", "reason", "label", "score"],
}


def _bounded(schema: Any, max_chars: int, max_items: int) -> Any:
    """Copy of ``schema`` with maxLength on strings and a tighter maxItems on lists, so that
    constrained decoding cannot spend the token budget before reaching the criteria."""
    if isinstance(schema, dict):
        out = {k: _bounded(v, max_chars, max_items) for k, v in schema.items()}
        if out.get("type") == "string" and "enum" not in out:
            out["maxLength"] = max_chars
        if out.get("type") == "array" and "minItems" not in out:
            out["maxItems"] = min(out.get("maxItems", max_items), max_items)
        return out
    return schema


def judgment_schema(
    min_criteria: int = 1, max_criteria: int = 15, with_intent: bool = True, compact_chars: int = 0
) -> dict[str, Any]:
    """JSON schema of one judged direction (sent as ``response_format`` when supported).

    ``compact_chars`` > 0 bounds every free-text field to that many characters and the analysis
    lists to 3 items (cheap RL rewards, small judges, tests)."""
    props: dict[str, Any] = {}
    required = []
    if with_intent:
        props["intent"] = INTENT_SCHEMA
        required.append("intent")
    props["differences"] = {"type": "array", "items": {"type": "string"}, "maxItems": 8}
    props["criteria"] = {"type": "array", "items": CRITERION_SCHEMA, "minItems": min_criteria, "maxItems": max_criteria}
    required += ["differences", "criteria"]
    schema = {"type": "object", "properties": props, "required": required}
    return _bounded(schema, compact_chars, 3) if compact_chars > 0 else schema


JUDGMENT_SCHEMA = judgment_schema()


class JudgeParseError(ValueError):
    """The judge's output is not a schema-valid judgment (counted as a tie by the caller)."""


# An opening fence ends its line (```json + newline); a closing fence starts one.  A ``` inside a
# JSON string can do neither (a raw newline is not allowed in a JSON string), so evidence that
# quotes a fenced code block does not end the block early.
_OPEN_FENCE = r"```[ \t]*(?:json|JSON)?[ \t]*\n"
_FENCE_RE = re.compile(_OPEN_FENCE + r"(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
_OPEN_FENCE_RE = re.compile(_OPEN_FENCE)
# Where a JSON object may start: '{' then a key or '}' (skips most braces of code and prose).
_OBJECT_START_RE = re.compile(r"\{\s*[\"}]")


def extract_json_text(text: str) -> str:
    """The last fenced code block if any (an unterminated last fence counts), else from the
    first '{' on.  Models often think aloud before the final JSON, so the last block wins.
    Fences count only where a fence can be: an opening one ends its line, a closing one starts
    its line (a ``` inside a JSON string is neither)."""
    blocks = list(_FENCE_RE.finditer(text))
    rest = text[blocks[-1].end() :] if blocks else text
    # An opening fence after the last closed block was never closed (truncated output).
    unterminated = _OPEN_FENCE_RE.search(rest)
    if unterminated:
        return rest[unterminated.end() :]
    if blocks:
        return blocks[-1].group(1)
    start = text.find("{")
    return text[start:] if start >= 0 else text


def _json_objects(text: str) -> list[Any]:
    """Every top-level JSON value that strictly decodes from a plausible object start in
    ``text``, in order (an object followed by prose, braces included, still decodes)."""
    decoder = json.JSONDecoder()
    out, pos = [], 0
    while (m := _OBJECT_START_RE.search(text, pos)) is not None:
        try:
            obj, end = decoder.raw_decode(text, m.start())
        except (json.JSONDecodeError, RecursionError):
            pos = m.start() + 1
            continue
        out.append(obj)
        pos = end
    return out


# Criterion labels: exactly A / B / S, or one of these spellings; anything else ("A/B", "Both
# equal", ...) fails the schema, a parse failure of that judgment (retried, then counted).
LABEL_SYNONYMS = {
    "A": "A",
    "B": "B",
    "S": "S",
    "SAME": "S",
    "TIE": "S",
    "EQUAL": "S",
    "BOTH": "S",
    "NEITHER": "S",
    "RESPONSE A": "A",
    "RESPONSE B": "B",
}


def normalise_label(label: str) -> str:
    """``label`` mapped to A / B / S when it is one of ``LABEL_SYNONYMS`` (case, surrounding
    blanks and a final full stop ignored); otherwise returned unchanged, so that the schema
    rejects it."""
    key = " ".join(label.strip().upper().rstrip(".").split())
    return LABEL_SYNONYMS.get(key, label)


def _normalise_criteria(obj: dict[str, Any]) -> None:
    """Light normalisation of harmless variants before strict validation: label spellings,
    type case, numeric strings as scores, and an unknown type counted as ``important`` (as
    the aggregation counts it, spec section 3) with the judge's own word kept in
    ``given_type``."""
    criteria = obj.get("criteria")
    for c in criteria if isinstance(criteria, list) else []:
        if not isinstance(c, dict):
            continue
        if isinstance(c.get("label"), str):
            c["label"] = normalise_label(c["label"])
        if isinstance(c.get("type"), str):
            t = c["type"].strip().lower()
            if t not in CRITERION_TYPES:
                c.setdefault("given_type", c["type"])
                t = "important"
            c["type"] = t
        if isinstance(c.get("score"), str) and re.fullmatch(r"[+-]?\d", c["score"].strip()):
            c["score"] = int(c["score"])


def _schema_error(obj: Any, schema: dict[str, Any]) -> JudgeParseError | None:
    """None when ``obj`` (normalised in place) satisfies ``schema``, else the error to raise."""
    if not isinstance(obj, dict):
        return JudgeParseError(f"judge output is not a JSON object (got {type(obj).__name__})")
    _normalise_criteria(obj)
    e = jsonschema.exceptions.best_match(_validator(json.dumps(schema, sort_keys=True)).iter_errors(obj))
    if e is None:
        return None
    path = "/".join(str(p) for p in e.absolute_path) or "<root>"
    return JudgeParseError(f"judge output fails the schema at {path}: {e.message[:200]}")


def parse_judgment(text: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parses one judge answer into a dict that satisfies ``schema`` (JUDGMENT_SCHEMA).

    Candidates, first valid one wins: the whole answer as strict JSON; the fenced blocks,
    last first; every object that strictly decodes in the text, last first; then the old
    repair path (the last fenced block or from the first '{', through ``json_repair``).
    ``JudgeParseError`` when none satisfies the schema."""
    schema = schema or JUDGMENT_SCHEMA
    if not text or not text.strip():
        raise JudgeParseError("empty judge output")

    def strict():
        try:
            yield json.loads(text.strip())
        except (json.JSONDecodeError, RecursionError):
            pass
        for m in reversed(list(_FENCE_RE.finditer(text))):
            try:
                yield json.loads(m.group(1))
            except (json.JSONDecodeError, RecursionError):
                pass
        yield from reversed(_json_objects(text))

    first_error = None
    for obj in strict():
        if isinstance(obj, dict):
            if (err := _schema_error(obj, schema)) is None:
                return obj
            first_error = first_error or err
    candidate = extract_json_text(text)
    try:
        obj = json.loads(candidate)
    except json.JSONDecodeError:
        obj = json_repair.loads(candidate)  # returns "" when nothing is salvageable
    if (err := _schema_error(obj, schema)) is None:
        return obj
    raise err if isinstance(obj, dict) or first_error is None else first_error


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str):
    """A checked, compiled validator per schema: ``jsonschema.validate`` re-checks the schema
    against its meta-schema on every call (about 0.3 s each), which serialised the judge."""
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


# ----------------------------------------------------------------------------------------------
# Prompts.  Our own English wording.
# ----------------------------------------------------------------------------------------------

SYSTEM_PROMPT = """You are a meticulous, impartial evaluator. You compare two AI responses to the same \
user query by following written evaluation principles (a meta-rubric). You never favour a response \
because of its position, its length or its confidence; only the content counts."""

PAIRWISE_TEMPLATE = """# Evaluation principles
{principles}

# Procedure
1. Intent analysis{intent_note}: state what the user is asking for, the explicit requirements and \
the implicit requirements. Do this from the query alone, as if you had not seen the responses.
2. Differences: list the concrete ways in which Response A and Response B differ.
3. Rubric: from the principles above, choose {min_criteria}-{max_criteria} criteria that matter for \
this query and separate the two responses. Give each an id, a short title and a type:
   - core: essential to a good answer (weight 5);
   - important: clearly matters (weight 2);
   - highlight: a welcome extra (weight 1);
   - critical: a decisive flaw, ONLY for factual errors, harmful content, or failing to answer \
what was asked (topic drift, missed instructions, padding, over-inference). A critical criterion \
overrides all others, so use it only when one response has such a flaw.
4. Compare the two responses on each criterion: quote or cite the evidence, give the reason, \
then label = "A" if Response A is better, "B" if Response B is better, "S" if they are equally \
good, and score = how much better (1 slightly, 2 clearly; 0 when equal).

# Output
Reply with a single JSON object with the keys {keys}. Nothing after the JSON.

# User query
<query>
{query}
</query>
{reference}
# Response A
<response_a>
{response_a}
</response_a>

# Response B
<response_b>
{response_b}
</response_b>
"""

INTENT_TEMPLATE = """Analyse the following user query before any answer is seen. State the task, the \
explicit requirements (things the user literally asks for) and the implicit requirements (what a \
competent answer needs even if unstated). Reply with one JSON object with the keys "task", \
"explicit_requirements", "implicit_requirements".

<query>
{query}
</query>
"""


def truncate_middle(text: str, max_chars: int) -> str:
    """Keeps the head and the tail (where final answers live) of an over-long response."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    head = max_chars * 2 // 3
    tail = max_chars - head
    return f"{text[:head]}\n[... {len(text) - max_chars} characters omitted ...]\n{text[-tail:]}"


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    min_criteria: int = 5
    max_criteria: int = 15
    max_response_chars: int = 6000  # per response; head + tail kept
    max_query_chars: int = 6000
    include_reference: bool = False  # show the ground truth to the judge when known
    compact_chars: int = 0  # > 0: bound free-text fields in the answer schema (see judgment_schema)


def build_pairwise_messages(
    query: str,
    response_a: str,
    response_b: str,
    general: MetaRubric,
    domain: MetaRubric | None,
    config: PromptConfig = PromptConfig(),
    intent: dict[str, Any] | None = None,
    reference: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages for one judged direction (A is shown first)."""
    principles = general.render() + ("\n\n" + domain.render() if domain is not None else "")
    if intent is not None:
        intent_note = " (already done, given below; copy it into the 'intent' key)"
        query_block = (
            truncate_middle(query, config.max_query_chars)
            + "\n</query>\n\n# Intent analysis (made from the query alone)\n<intent>\n"
            + json.dumps(intent, ensure_ascii=False)
        )
        query_block = query_block + "\n</intent>"
        # Close tags are already inside; strip the template's own closing tag by formatting below.
        body = PAIRWISE_TEMPLATE.replace("<query>\n{query}\n</query>", "<query>\n{query}")
    else:
        intent_note = ""
        query_block = truncate_middle(query, config.max_query_chars)
        body = PAIRWISE_TEMPLATE
    ref = ""
    if reference and config.include_reference:
        ref = f"\n# Reference answer (known to be correct)\n<reference>\n{reference}\n</reference>\n"
    content = body.format(
        principles=principles,
        intent_note=intent_note,
        min_criteria=config.min_criteria,
        max_criteria=config.max_criteria,
        keys='"intent", "differences", "criteria"',
        query=query_block,
        reference=ref,
        response_a=truncate_middle(response_a, config.max_response_chars),
        response_b=truncate_middle(response_b, config.max_response_chars),
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def build_intent_messages(query: str, config: PromptConfig = PromptConfig()) -> list[dict[str, str]]:
    """Chat messages for the answer-blind intent analysis (two-stage protocol)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": INTENT_TEMPLATE.format(query=truncate_middle(query, config.max_query_chars))},
    ]


# ----------------------------------------------------------------------------------------------
# Pointwise checks: a response against a ground truth, a constraint written in words.
# ----------------------------------------------------------------------------------------------

ANSWER_CHECK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["correct", "partial", "wrong"]}},
    "required": ["verdict"],
}

ANSWER_CHECK_TEMPLATE = """You check one response against a reference answer that is known to be correct.
{query_block}
# Reference answer
<reference>
{reference}
</reference>

# Candidate response
<response>
{response}
</response>

Compare what the candidate concludes with the reference. For a final answer (a number, a letter, \
a name), only that answer matters, not the wording or the working. For code or another artefact, \
judge whether it does what the reference does (same behaviour on the inputs the task allows), not \
whether it looks the same. "partial" means part of the reference is matched and part is missing \
or wrong. Reply with JSON: {{"verdict": "correct" | "partial" | "wrong"}}."""


def build_answer_check_messages(
    response: str, reference: str, query: str | None = None, config: PromptConfig = PromptConfig()
) -> list[dict[str, str]]:
    """Chat messages asking whether ``response`` matches the ground truth ``reference``."""
    query_block = ""
    if query:
        query_block = f"\n# Task\n<query>\n{truncate_middle(query, config.max_query_chars)}\n</query>\n"
    content = ANSWER_CHECK_TEMPLATE.format(
        query_block=query_block,
        reference=truncate_middle(str(reference), config.max_response_chars),
        response=truncate_middle(response, config.max_response_chars),
    )
    return [{"role": "user", "content": content}]


CONSTRAINT_CHECK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
}

CONSTRAINT_CHECK_TEMPLATE = """You check whether a response obeys one instruction. Judge this \
instruction only, strictly and literally; the quality of the response otherwise does not matter.
{query_block}
# Instruction to check
<constraint>
{rule}
</constraint>

# Response
<response>
{response}
</response>

Does the response obey the instruction? Reply with JSON: {{"answer": "yes" | "no"}}."""

CHECKER_CODE_TEMPLATE = """Write a Python function that decides whether a text obeys this instruction:

<constraint>
{rule}
</constraint>

Requirements:
- define `def check(response: str) -> bool`, returning True when `response` obeys the \
instruction and False otherwise;
- use only the Python standard library (re, string, json, collections, unicodedata, math ...); \
no files, network, processes or randomness;
- be strict and literal about what can be counted or matched; do not judge style.

Reply with the function in one ```python code block and nothing else."""


def strip_rule(query: str, rule: str) -> str:
    """The query without the constraint appended to its end (as benchmark rows write it)."""
    q = query.rstrip()
    return q[: -len(rule)].rstrip() if rule and q.endswith(rule.strip()) and len(q) > len(rule.strip()) else query


def build_constraint_check_messages(
    response: str, rule: str, query: str | None = None, config: PromptConfig = PromptConfig()
) -> list[dict[str, str]]:
    """Chat messages asking for a yes/no answer: does ``response`` obey the constraint ``rule``."""
    query_block = ""
    if query:
        q = truncate_middle(strip_rule(query, rule), config.max_query_chars)
        query_block = f"\n# The user's request (context only)\n<query>\n{q}\n</query>\n"
    content = CONSTRAINT_CHECK_TEMPLATE.format(
        query_block=query_block, rule=rule, response=truncate_middle(response, config.max_response_chars)
    )
    return [{"role": "user", "content": content}]


def build_checker_code_messages(rule: str) -> list[dict[str, str]]:
    """Chat messages asking for checker code ``check(response) -> bool`` for the constraint ``rule``
    (the rule alone: the code is written once per constraint and reused for every response)."""
    return [{"role": "user", "content": CHECKER_CODE_TEMPLATE.format(rule=rule)}]


_YES_NO_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool:
    """True for yes, False for no: the ``answer`` of a JSON object, else the last bare yes / no
    word; ``JudgeParseError`` when there is neither."""
    try:
        return parse_judgment(text, CONSTRAINT_CHECK_SCHEMA)["answer"] == "yes"
    except JudgeParseError:
        pass
    words = _YES_NO_RE.findall(text or "")
    if not words:
        raise JudgeParseError("no yes / no answer in the constraint check")
    return words[-1].lower() == "yes"


_CODE_FENCE_RE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_checker_code(text: str) -> str | None:
    """The checker source in a code-writing answer: the last fenced block that defines
    ``check``, else the whole answer when it does; None when there is no ``def check``."""
    blocks = [b for b in _CODE_FENCE_RE.findall(text or "") if re.search(r"^\s*def check\s*\(", b, re.MULTILINE)]
    if blocks:
        return blocks[-1].strip() + "\n"
    if text and re.search(r"^def check\s*\(", text, re.MULTILINE) and "```" not in text:
        return text.strip() + "\n"
    return None
