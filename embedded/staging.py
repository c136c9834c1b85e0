"""Tiny models are built in a staging folder beside their target and renamed into place only when complete,
so an interrupted build never leaves half a model where the loaders look."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(out_dir: Path, what: str) -> Iterator[Path]:
    """Yield a staging folder; it becomes `out_dir` when the block succeeds. An existing `out_dir` is an error."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it to rebuild the {what}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as tmp:
        staging = Path(tmp) / "model"
        yield staging
        staging.rename(out_dir)
