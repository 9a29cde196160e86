"""On-disk completion cache shared by the HTTP and the in-process backends."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import random
from typing import Any

log = logging.getLogger(__name__)


class DiskCache:
    """Completion cache on disk, one JSON file per content hash (safe across processes:
    writes go to a temporary file then ``os.replace``)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> pathlib.Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable cache entry %s: %s", path, e)
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{random.getrandbits(32)}.tmp")
        tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
