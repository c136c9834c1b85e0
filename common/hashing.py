"""Content hashes used for data versions and cache keys: stable across runs, machines and dict order."""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def json_sha256(value: Any) -> str:
    """Hash of a JSON-able value with sorted keys, so equal settings give equal hashes."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    # surrogateescape: a Linux file name that is not valid UTF-8 still hashes (stably) instead of crashing.
    return bytes_sha256(text.encode("utf-8", "surrogateescape"))


def tree_sha256(paths: list[Path], root: Path) -> str:
    """Hash of (relative path, content hash) pairs: renaming or editing any file changes it."""
    entries = sorted((p.relative_to(root).as_posix(), cached_file_sha256(p)) for p in paths)
    return json_sha256(entries)


@lru_cache(maxsize=65536)
def _sha256_at(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def cached_file_sha256(path: str | os.PathLike[str]) -> str:
    """file_sha256 memoised on (path, size, mtime): re-observing 10,000 unchanged images reads none of them."""
    stat = os.stat(path)
    return _sha256_at(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
