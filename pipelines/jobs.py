"""Named jobs, each run for one dataset partition from the UI, the CLI or the demo script."""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from assets import (
    METHOD_ASSETS,
    TRAINED_METHODS,
    evaluation_grid,
    evaluation_metrics,
    evaluation_report,
    observed_assets,
    prepared_images,
    tag_scores,
    tag_table,
)
from assets.partitions import datasets_partitions
from pipelines.run_tags import run_tags_for

observe_job = define_asset_job(
    "observe_datasets",
    selection=AssetSelection.assets(*(asset.key for asset in observed_assets)),
    description="Record the current data versions of every dataset's images and settings sections.",
)
prepare_job = define_asset_job(
    "prepare",
    selection=[prepared_images, tag_scores, tag_table],
    partitions_def=datasets_partitions,
    tags=run_tags_for(["prepared_images", "tag_scores", "tag_table"]),
    description="Prepare images, tag them and write captions.",
)
retag_job = define_asset_job(
    "retag",
    selection=[tag_scores, tag_table],
    partitions_def=datasets_partitions,
    tags=run_tags_for(["tag_scores", "tag_table"]),
    description="Re-tag the prepared images and rewrite captions (after changing tagger or caption settings).",
)
train_job = define_asset_job(
    "train",
    selection=[*METHOD_ASSETS, evaluation_grid, evaluation_metrics, evaluation_report],
    partitions_def=datasets_partitions,
    tags=run_tags_for([*TRAINED_METHODS, "evaluation_grid", "evaluation_metrics", "evaluation_report"]),
    description="Train the methods the dataset lists in training.methods (the others record that they were not "
    "trained), render their evaluation grids, score their checkpoints and write the HTML report.",
)

all_jobs = [observe_job, prepare_job, retag_job, train_job]
