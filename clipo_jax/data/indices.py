"""Integral indices read from loosely typed data: a dataset row's ``extra_info.index``, an MMLU
answer index, a judge's checklist item id (JSON that may say ``2``, ``2.0`` or ``"2"``).

Imports nothing (the rubric judge uses it without loading the dataset readers and sympy)."""

from __future__ import annotations

import re
from typing import Any


def as_index(value: Any) -> int | None:
    """An integral index (int, integral float, decimal string with an optional minus), else None.

    ``bool`` is not an index, nor are NaN / inf / ``3.7``, ``"3.0"``, ``"+3"`` or ``"1e3"``. Range
    checks (``0 <= i < n``, ``1..n_items``) are the caller's."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None  # NaN / inf / 3.7 are not indices
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return None


__all__ = ["as_index"]
