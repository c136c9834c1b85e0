"""Tag scores reused per image: keyed by (prepared-image content hash, model fingerprint, score floor).

Why: tagging is the only expensive step between preparation and captions. Adding ten images to a
thousand should run the model on ten; renaming an image should run it on none; switching to another model
and back should not run the first model again. So scores live in a content-addressed store with one file
pair per (model, floor), shared by every dataset, and the dataset's score table is assembled from it.

Only scores above a small floor are stored: a real WD14 model has ~10,000 tags of which a few dozen score
above 0.01, so the floor makes the table a hundred times smaller and the caption step that much faster.

`ResultStore`, `images_to_run` and `status_table` are the model-independent part, shared with the BLIP
captions (tagging.blip), which are cached the same way per (image hash, model, generation settings).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from common.atomic import write_parquet
from common.hashing import json_sha256
from tagging.inference_pipeline import score_batches
from tagging.pixels import PixelRecipe

SCORE_COLUMNS = ["image", "image_sha256", "model", "tag", "category", "score"]
STATUS_COLUMNS = ["image", "image_sha256", "status", "reason"]


class Tagger(Protocol):
    tags: list  # objects with .name and .category
    fingerprint: str
    provider: str

    @property
    def recipe(self) -> PixelRecipe: ...

    def predict(self, arrays: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ImageToScore:
    name: str  # the prepared image's file name, the key captions are joined on
    path: Path
    sha256: str


@dataclass(frozen=True)
class ScoringRun:
    scores: pd.DataFrame  # SCORE_COLUMNS, rows above the floor only
    status: pd.DataFrame  # STATUS_COLUMNS, one row per image: processed / reused / skipped (with a reason)
    images_per_second: float  # over the images actually run through the model (0 when none)


class ResultStore:
    """Per-image results of one key (a model plus whatever settings change its output) for every image content
    ever processed with it: `<key>.parquet` holds the result rows (keyed by `image_sha256`), `<key>.images.parquet`
    the hashes processed (an image may have no result row, e.g. no score above the floor, and must still count
    as done). Tag scores and BLIP captions both live in one of these."""

    def __init__(self, folder: Path, key: dict, empty: pd.DataFrame) -> None:
        self.key = json_sha256(key)[:32]
        self.rows_path = Path(folder) / f"{self.key}.parquet"
        self.images_path = Path(folder) / f"{self.key}.images.parquet"
        self._empty = empty

    def load(self) -> tuple[pd.DataFrame, set[str]]:
        if not (self.rows_path.is_file() and self.images_path.is_file()):
            return self._empty.copy(), set()
        return pd.read_parquet(self.rows_path), set(pd.read_parquet(self.images_path)["image_sha256"])

    def save(self, rows: pd.DataFrame, done: set[str]) -> None:
        # Rows first: a run killed in between leaves hashes unlisted (run again), never listed without rows.
        write_parquet(self.rows_path, rows.reset_index(drop=True))
        write_parquet(self.images_path, pd.DataFrame({"image_sha256": sorted(done)}))


class ScoreStore(ResultStore):
    """Scores of one (model, floor): rows of (image_sha256, tag_index, score)."""

    def __init__(self, folder: Path, fingerprint: str, floor: float) -> None:
        empty = pd.DataFrame({"image_sha256": [], "tag_index": np.zeros(0, np.int32), "score": np.zeros(0, np.float32)})
        super().__init__(folder, {"model": fingerprint, "floor": float(floor)}, empty)


def images_to_run(images: Sequence[ImageToScore], done: set[str]) -> list[ImageToScore]:
    """The images whose content the store has not seen, one per content (identical files run once)."""
    todo: dict[str, ImageToScore] = {}
    for image in images:
        if image.sha256 not in done:
            todo.setdefault(image.sha256, image)
    return list(todo.values())


def status_table(images: Sequence[ImageToScore], pending: Sequence[ImageToScore], skipped: dict[str, str]) -> pd.DataFrame:
    """STATUS_COLUMNS for every image: skipped (with the reason), processed in this run, or reused."""
    ran = {image.sha256 for image in pending}
    return pd.DataFrame(
        [(image.name, image.sha256, *(("skipped", skipped[image.sha256]) if image.sha256 in skipped
                                      else ("processed", "") if image.sha256 in ran else ("reused", "")))
         for image in images],
        columns=STATUS_COLUMNS,
    )


def score_with_cache(
    tagger: Tagger,
    images: Sequence[ImageToScore],
    store: ScoreStore,
    *,
    floor: float = 0.01,
    batch_size: int = 8,
    workers: int = 0,
) -> ScoringRun:
    """Scores above `floor` for `images`, running the model only on contents the store has not seen."""
    cached_rows, scored = store.load()
    pending = images_to_run(images, scored)
    fresh, skipped, started = [], {}, time.perf_counter()
    for batch in score_batches(tagger.predict, tagger.recipe, [i.path for i in pending], batch_size=batch_size,
                               workers=workers):
        for position, reason in batch.skipped.items():
            skipped[pending[position].sha256] = reason
        image_row, tag_index = np.nonzero(batch.scores > floor)
        hashes = np.array([pending[i].sha256 for i in batch.indices], dtype=object)
        fresh.append(pd.DataFrame({"image_sha256": hashes[image_row], "tag_index": tag_index.astype(np.int32),
                                   "score": batch.scores[image_row, tag_index].astype(np.float32)}))
    seconds = time.perf_counter() - started
    done = len(pending) - len(skipped)
    if pending:
        cached_rows = pd.concat([cached_rows, *fresh], ignore_index=True)
        scored |= {image.sha256 for image in pending if image.sha256 not in skipped}
        store.save(cached_rows, scored)

    status = status_table(images, pending, skipped)
    scores = _score_table(tagger, cached_rows, status[status["status"] != "skipped"], tagger.fingerprint)
    return ScoringRun(scores=scores, status=status, images_per_second=done / seconds if done and seconds else 0.0)


def _score_table(tagger: Tagger, rows: pd.DataFrame, images: pd.DataFrame, fingerprint: str) -> pd.DataFrame:
    """The dataset's long table: one row per (image name, tag above the floor), names as categoricals so the
    caption step's grouping is cheap."""
    joined = images[["image", "image_sha256"]].merge(rows, on="image_sha256", how="inner", sort=False)
    names = np.array([tag.name for tag in tagger.tags], dtype=object)
    categories = np.array([tag.category for tag in tagger.tags], dtype=np.int32)
    index = joined["tag_index"].to_numpy()
    frame = pd.DataFrame(
        {
            "image": pd.Categorical(joined["image"], categories=list(images["image"])),
            "image_sha256": joined["image_sha256"].to_numpy(),
            "model": fingerprint,
            "tag": pd.Categorical.from_codes(index, categories=names) if _unique(names) else names[index],
            "category": categories[index],
            "score": joined["score"].to_numpy(dtype=np.float32),
        },
        columns=SCORE_COLUMNS,
    )
    return frame.sort_values(["image", "score"], ascending=[True, False], kind="stable").reset_index(drop=True)


def _unique(names: np.ndarray) -> bool:
    return len(set(names.tolist())) == len(names)
