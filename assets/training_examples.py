"""The examples every training method learns from: prepared images of the training split with their captions,
and the held-out ones for the validation loss."""

import pandas as pd
from dagster import Failure

from assets.metadata import require_file
from assets.prepared_images import STAGE as PREPARED, manifest_path
from assets.tag_table import captions_path
from resources import ProjectPaths
from tagging.splits import TRAIN, VALIDATION, rows_of_split
from training.training_loop import TrainingExample


def training_examples(paths: ProjectPaths, dataset: str) -> list[TrainingExample]:
    """The prepared images of the training split paired with their [filewords], in the order the seeds' users
    expect: the tag table's caption, else the caption sidecar that came with the source, else the source's
    filename words."""
    return _examples(paths, dataset, TRAIN)


def validation_examples(paths: ProjectPaths, dataset: str) -> list[TrainingExample]:
    """The held-out prepared images (preprocess.validation_fraction), captioned as the training ones are."""
    return _examples(paths, dataset, VALIDATION)


def _examples(paths: ProjectPaths, dataset: str, split: str) -> list[TrainingExample]:
    manifest = rows_of_split(pd.read_parquet(require_file(manifest_path(paths, dataset), PREPARED)), split)
    captions = pd.read_parquet(require_file(captions_path(paths, dataset), "tag_table"))
    by_image = dict(zip(captions["image"], captions["caption"]))
    folder = paths.output_dir(dataset, PREPARED)
    examples = []
    for row in manifest.itertuples():
        choices = (by_image.get(row.output), row.source_caption, row.filename_words)
        filewords = next((str(text) for text in choices if isinstance(text, str) and text.strip()), "")
        examples.append(TrainingExample(image_path=folder / row.output, filewords=filewords))
    return examples


def training_inputs(paths: ProjectPaths, dataset: str) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """The training and held-out examples; no prepared image to train on fails once, not retried."""
    examples = training_examples(paths, dataset)
    if not examples:
        raise Failure(description=f"dataset {dataset!r} has no prepared images to train on", allow_retries=False)
    return examples, validation_examples(paths, dataset)
