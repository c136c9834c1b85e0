"""The concept a dataset teaches, as tags, and how strongly a tagger sees it in other images (generated ones).

Why: a personalisation (a textual-inversion embedding, a LoRA, ...) is meant to make the base model draw the
dataset's concept. The tagger that captioned the training images names that concept as the tags it finds in
most of them (a character tag, its hat, its colours), so the same tagger's scores for those tags on the images
a checkpoint generates measure, in numbers, whether the concept appears: they should rise from the first
checkpoint to the best one. The scoring goes through the tagger's own preprocessing and batching
(`tagging.inference_pipeline.score_batches`, as the tag_scores stage does), so WD14 and DeepDanbooru
models work alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tagging.categories import CHARACTER_CATEGORY, RATING_CATEGORY
from tagging.inference_pipeline import score_batches
from tagging.score_cache import Tagger

DEFAULT_CONCEPT_FRACTION = 0.5


def concept_tags(
    scores: pd.DataFrame,
    images: Sequence[str],
    *,
    general_threshold: float,
    character_threshold: float,
    fraction: float = DEFAULT_CONCEPT_FRACTION,
) -> list[str]:
    """The tags that score at or above their category's threshold (character tags: `character_threshold`,
    every other non-rating tag: `general_threshold`) in at least `fraction` of `images`, most frequent first.

    `scores` is the long table tag_scores writes (image, tag, category, score; rows of other images are
    ignored, so the held-out validation images can stay in it). Rating tags never count: every image has one,
    they say nothing about the concept. The caption settings' exclusions do not apply on purpose: a dataset
    usually excludes its own character tag from the captions (the concept is learned as [name], not as a
    caption word), and that tag is exactly the concept here. MCut thresholds are per image and not used.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the concept tag fraction must be in (0, 1], got {fraction}")
    wanted = {str(image) for image in images}
    if not wanted or scores.empty:
        return []
    rows = scores[scores["image"].astype(str).isin(wanted)]
    category = rows["category"].to_numpy()
    threshold = np.where(category == CHARACTER_CATEGORY, character_threshold, general_threshold)
    kept = rows[(category != RATING_CATEGORY) & (rows["score"].to_numpy() >= threshold)]
    kept = kept.assign(image=kept["image"].astype(str), tag=kept["tag"].astype(str))
    counts = kept.groupby("tag", sort=False).agg(images=("image", "nunique"), mean_score=("score", "mean"))
    # A small tolerance so that "half of 7 images" means 4 and "half of 8" means 4, whatever the float rounding.
    chosen = counts[counts["images"] >= fraction * len(wanted) - 1e-9].reset_index()
    chosen = chosen.sort_values(["images", "mean_score", "tag"], ascending=[False, False, True], kind="stable")
    return chosen["tag"].tolist()


def tag_probabilities(
    tagger: Tagger, image_paths: Sequence[Path], *, batch_size: int = 8, workers: int = 0
) -> np.ndarray:
    """(len(image_paths), len(tagger.tags)) float32 scores of every tag for every image, prepared and batched as
    the tag_scores stage does; the row of an image that cannot be decoded is NaN (it then counts in no mean)."""
    scores = np.full((len(image_paths), len(tagger.tags)), np.nan, dtype=np.float32)
    for batch in score_batches(tagger.predict, tagger.recipe, [Path(path) for path in image_paths],
                               batch_size=batch_size, workers=workers):  # fmt: skip
        if batch.indices:
            scores[batch.indices] = batch.scores
    return scores


def concept_scores(
    tagger: Tagger,
    image_paths: Sequence[Path],
    tags: Sequence[str],
    *,
    batch_size: int = 8,
    workers: int = 0,
) -> np.ndarray:
    """Per image, the mean of the tagger's probabilities of `tags` (the concept tags): 1 when the tagger is sure
    every concept tag is in the image, near 0 when it sees none. NaN for an image that cannot be decoded, and for
    every image when `tags` is empty (nothing to measure). A tag the tagger does not know is an error: the
    concept tags were chosen by another model, so the number would mean nothing."""
    if not tags:
        return np.full(len(image_paths), np.nan, dtype=np.float32)
    columns: dict[str, int] = {}
    for position, tag in enumerate(tagger.tags):
        columns.setdefault(tag.name, position)
    unknown = [tag for tag in tags if tag not in columns]
    if unknown:
        raise ValueError(f"the tagger does not know the concept tags {', '.join(unknown)}; the dataset's tag scores "
                         "come from another tagger model (materialize tag_scores again)")  # fmt: skip
    if not image_paths:
        return np.zeros(0, dtype=np.float32)
    probabilities = tag_probabilities(tagger, image_paths, batch_size=batch_size, workers=workers)
    return probabilities[:, [columns[tag] for tag in tags]].mean(axis=1)
