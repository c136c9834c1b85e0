"""The tagger-based concept score of evaluation_metrics: the dataset's concept tags (from its own tag scores and
caption thresholds) and, per checkpoint, how strongly the dataset's tagger sees them in the [name] cells.

Why here and not in evaluation_metrics: it reads three other stages' outputs (tag scores, the caption
settings, the grid's cells) and loads a tagger; the metrics asset only merges the resulting column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import Failure, MetadataValue

from assets.dataset_settings import DatasetSettings
from assets.metadata import require_file
from assets.tag_scores import scores_path
from assets.tag_table import caption_options
from resources import ProjectPaths, TaggerResource
from tagging.concept_tags import concept_scores, concept_tags
from tagging.wd14 import TaggerModelError
from training.templates import NAME_KEYWORD

COLUMN = "concept_tag_score"


@dataclass(frozen=True)
class ConceptScores:
    tags: list[str]  # the dataset's concept tags, most frequent first
    per_checkpoint: pd.DataFrame  # method, step, concept_tag_score
    tagger_dir: Path
    mismatched_model: bool  # the tag scores came from another model than the one that scored the cells


def dataset_concept_tags(scores: pd.DataFrame, settings: DatasetSettings, images: list[str]) -> list[str]:
    """The concept tags of the training `images` (prepared file names), from the dataset's tag scores at its
    caption thresholds (the backend's defaults when unset), as the captions would see them."""
    backend = str(scores["backend"].iloc[0]) if len(scores) else settings.tagging.tagger
    options = caption_options(settings.captions, backend)
    return concept_tags(scores, images, general_threshold=options.general_threshold,
                        character_threshold=options.character_threshold,
                        fraction=settings.evaluation.concept_tag_fraction)  # fmt: skip


def checkpoint_concept_scores(
    paths: ProjectPaths,
    dataset: str,
    settings: DatasetSettings,
    cells: pd.DataFrame,
    references: list[Path],
    tagger: TaggerResource,
) -> ConceptScores:
    """Per method and step, the mean over its cells whose prompt holds [name] (the cells the CLIP image score
    uses) of the mean probability of the concept tags. A tagger folder that cannot be loaded, or that does not
    know the concept tags, fails without retries: running again would not help."""
    scores = pd.read_parquet(require_file(scores_path(paths, dataset), "tag_scores"),
                             columns=["image", "tag", "category", "score", "backend", "model"])  # fmt: skip
    tags = dataset_concept_tags(scores, settings, [path.name for path in references])
    scores_model = str(scores["model"].iloc[0]) if len(scores) else None
    tagging = settings.tagging
    try:
        model = tagger.load(tagging.tagger, tagging.model)
    except TaggerModelError as error:
        raise Failure(description=f"evaluation.tagger_scores for {dataset!r}: {error}", allow_retries=False) from error
    with_name = cells[cells["prompt"].str.contains(NAME_KEYWORD, regex=False)]
    try:
        per_image = concept_scores(model, [Path(path) for path in with_name["image"]], tags,
                                   batch_size=tagging.batch_size, workers=tagging.workers)  # fmt: skip
    except ValueError as error:
        raise Failure(description=f"evaluation.tagger_scores for {dataset!r}: {error}", allow_retries=False) from error
    finally:
        model.close()
    scored = with_name.assign(**{COLUMN: per_image.astype(np.float64)})
    per_checkpoint = scored.groupby(["method", "step"])[COLUMN].mean().reset_index()
    return ConceptScores(tags=tags, per_checkpoint=per_checkpoint, tagger_dir=Path(model.model_dir),
                         mismatched_model=scores_model not in (None, model.fingerprint))  # fmt: skip


def first_and_best(frame: pd.DataFrame, method: str) -> tuple[float, float]:
    """(score of the earliest checkpoint that has one, score of the best checkpoint) of one method; NaN where
    there is none. The earliest *scored* one: with the method on a grid axis only the final step has cells."""
    rows = frame[frame["method"] == method].sort_values("step")
    if COLUMN not in rows:
        return float("nan"), float("nan")
    scored = rows[rows[COLUMN].notna()]
    first = float(scored[COLUMN].iloc[0]) if len(scored) else float("nan")
    best = rows.loc[rows["best"], COLUMN]
    return first, float(best.iloc[0]) if len(best) else float("nan")


def describe_change(first: float, best: float) -> str:
    """'0.1234 -> 0.5678 (+0.4444)': the figure issue 9 asks the demo to print."""
    return f"{first:.4f} -> {best:.4f} ({best - first:+.4f})"


def concept_metadata(frame: pd.DataFrame, concept: ConceptScores, methods: list[str]) -> dict[str, object]:
    """evaluation_metrics' metadata in its own style: the first method's figures alone, every method's in one
    line (as best_step and best_steps)."""
    changes = {method: first_and_best(frame, method) for method in methods}
    first, best = changes[methods[0]]
    return {
        "concept_tags": MetadataValue.json(list(concept.tags)),
        "concept_tagger": MetadataValue.path(str(concept.tagger_dir)),
        "concept_tag_score_first": first,
        "concept_tag_score_best": best,
        "concept_tag_score_gain": best - first,
        "concept_tag_scores": "; ".join(f"{method}: {describe_change(*change)}" for method, change in changes.items()),
    }
