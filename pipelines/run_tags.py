"""Run tags `dataset`, `stage` and `method`, so the UI's run list can be filtered by them.

Jobs carry `stage`/`method` as static tags. The dataset is the run's partition, known only at launch, and
runs launched by declarative automation have no job of their own, so a run-status sensor adds the tags
to every run of this code location when it starts (from its partition and its asset selection).
"""

from __future__ import annotations

from collections.abc import Iterable

from dagster import DagsterRunStatus, DefaultSensorStatus, RunStatusSensorContext, run_status_sensor

PARTITION_TAG = "dagster/partition"
# Pipeline order: a run's stage is the earliest stage it contains (a `prepare` run also tags and captions).
STAGE_OF_ASSET = {
    "prepared_images": "prepare",
    "tag_scores": "tagging",
    "tag_table": "captions",
    "textual_inversion": "train",
    "dreamartist": "train",
    "hypernetwork": "train",
    "lora": "train",
    "dreambooth": "train",
    "evaluation_grid": "evaluation",
    "evaluation_metrics": "evaluation",
    "evaluation_report": "evaluation",
}
# Method assets are named after their method; the evaluation serves all of them, so it carries none.
METHOD_OF_ASSET = {name: name for name in ("textual_inversion", "dreamartist", "hypernetwork", "lora", "dreambooth")}


def run_tags_for(asset_names: Iterable[str], dataset: str | None = None) -> dict[str, str]:
    """`stage`, `method` (for training and evaluation) and `dataset` tags of a run of these assets."""
    names = set(asset_names)
    stages = [stage for asset, stage in STAGE_OF_ASSET.items() if asset in names]
    tags = {"stage": stages[0]} if stages else {}
    methods = sorted({METHOD_OF_ASSET[name] for name in names if name in METHOD_OF_ASSET})
    if methods:
        tags["method"] = ",".join(methods)
    if dataset:
        tags["dataset"] = dataset
    return tags


def missing_run_tags(tags: dict[str, str], asset_names: Iterable[str]) -> dict[str, str]:
    """The tags a run should have and does not (never overrides a tag set at launch)."""
    wanted = run_tags_for(asset_names, tags.get(PARTITION_TAG))
    return {key: value for key, value in wanted.items() if key not in tags}


@run_status_sensor(
    run_status=DagsterRunStatus.STARTED,
    name="run_tags",
    minimum_interval_seconds=5,
    default_status=DefaultSensorStatus.RUNNING,
    description="Tags every started run with its dataset, stage and method, so the run list filters by them.",
)
def run_tags_sensor(context: RunStatusSensorContext) -> None:
    run = context.dagster_run
    names = [key.to_user_string() for key in run.asset_selection or ()]
    tags = missing_run_tags(dict(run.tags), names)
    if tags:
        context.instance.add_run_tags(run.run_id, tags)
