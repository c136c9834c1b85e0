"""Tag scores reused per image: keyed by (prepared-image content hash, model fingerprint).

Why: tagging is the only expensive step between preparation and captions. Adding ten images to a
thousand should run the model on ten; renaming an image should run it on none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tagging.wd14 import WD14Tagger, score_images

SCORE_COLUMNS = ["image", "image_sha256", "model", "tag", "category", "score"]


@dataclass(frozen=True)
class ImageToScore:
    name: str  # the prepared image's file name, the key captions are joined on
    path: Path
    sha256: str


def score_with_cache(
    tagger: WD14Tagger,
    images: Sequence[ImageToScore],
    previous: pd.DataFrame | None,
    *,
    batch_size: int = 8,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """All tag scores for `images`, plus each image's status ("processed" or "reused")."""
    cached: dict[str, pd.DataFrame] = {}
    if previous is not None and set(SCORE_COLUMNS) <= set(previous.columns):
        same_model = previous[previous["model"] == tagger.fingerprint]
        # Identical files share one hash: keep one image's rows per hash, or duplicates would multiply rows.
        cached = {sha: rows.drop_duplicates("tag") for sha, rows in same_model.groupby("image_sha256", sort=False)}

    todo = [image for image in images if image.sha256 not in cached]
    fresh = score_images(tagger, [i.path for i in todo], batch_size=batch_size, names=[i.name for i in todo])
    fresh_by_name = {name: rows for name, rows in fresh.groupby("image", sort=False)} if len(fresh) else {}

    parts: list[pd.DataFrame] = []
    status: dict[str, str] = {}
    for image in images:
        if image.sha256 in cached:
            rows, status[image.name] = cached[image.sha256], "reused"
        else:
            rows, status[image.name] = fresh_by_name[image.name], "processed"
        parts.append(rows.assign(image=image.name, image_sha256=image.sha256, model=tagger.fingerprint)[SCORE_COLUMNS])
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SCORE_COLUMNS)
    frame = frame.sort_values(["image", "tag"], kind="stable").reset_index(drop=True)
    frame["category"] = frame["category"].astype("int32")
    frame["score"] = frame["score"].astype("float32")
    return frame, status
