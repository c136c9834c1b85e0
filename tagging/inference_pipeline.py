"""Decoding and preprocessing in worker processes, overlapped with inference in this one.

Why: decoding a JPEG and resizing it to 448 px costs about as much CPU as a small tagger's forward pass, so
doing both in one loop leaves the model idle half the time. Workers prepare whole batches ahead (a bounded
number, so memory stays flat however many images there are) while the model runs on the previous batch.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tagging.images import ImageRejected
from tagging.pixels import PixelRecipe


@dataclass(frozen=True)
class ScoredBatch:
    indices: list[int]  # positions in the input sequence of the rows of `scores`
    scores: np.ndarray  # (len(indices), tags) float32
    skipped: dict[int, str]  # position -> reason, for inputs that could not be decoded


def default_workers() -> int:
    """One core stays with the model; the rest decode."""
    return max(1, (os.cpu_count() or 2) - 1)


def _prepare_batch(recipe: PixelRecipe, positions: list[int], paths: list[Path]) -> tuple[list[int], np.ndarray | None, dict[int, str]]:
    """Runs in a worker: the batch's pixels, and a reason for each image that failed to decode."""
    arrays, kept, skipped = [], [], {}
    for position, path in zip(positions, paths):
        try:
            arrays.append(recipe.from_path(path))
            kept.append(position)
        except ImageRejected as rejected:
            skipped[position] = rejected.reason
    return kept, (np.stack(arrays) if arrays else None), skipped


def score_batches(
    predict: Callable[[np.ndarray], np.ndarray],
    recipe: PixelRecipe,
    paths: Sequence[Path],
    *,
    batch_size: int,
    workers: int = 0,
) -> Iterator[ScoredBatch]:
    """Scores for `paths` in batches of `batch_size`, in input order. `workers` processes decode ahead
    (0: default_workers()); a single batch is decoded here, since there is nothing to overlap it with."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    chunks = [list(range(start, min(start + batch_size, len(paths)))) for start in range(0, len(paths), batch_size)]
    if len(chunks) <= 1:
        for chunk in chunks:
            yield _score(predict, *_prepare_batch(recipe, chunk, [Path(paths[i]) for i in chunk]))
        return
    workers = workers or default_workers()
    # spawn: the parent holds an inference session with its own threads, which fork would copy mid-flight.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque[Future] = deque()
        upcoming = iter(chunks)
        for chunk in upcoming:
            pending.append(pool.submit(_prepare_batch, recipe, chunk, [Path(paths[i]) for i in chunk]))
            if len(pending) >= 2 * workers:
                break
        while pending:
            prepared = pending.popleft().result()
            chunk = next(upcoming, None)
            if chunk is not None:
                pending.append(pool.submit(_prepare_batch, recipe, chunk, [Path(paths[i]) for i in chunk]))
            yield _score(predict, *prepared)


def _score(predict: Callable[[np.ndarray], np.ndarray], kept: list[int], pixels: np.ndarray | None,
           skipped: dict[int, str]) -> ScoredBatch:
    scores = predict(pixels.astype(np.float32)) if pixels is not None else np.zeros((0, 0), np.float32)
    return ScoredBatch(indices=kept, scores=scores, skipped=skipped)
