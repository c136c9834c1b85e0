"""The one `Definitions` of the project, loaded by workspace.yaml, the UI, the daemon and the tests.

Resource settings come from environment variables so the same code serves the embedded default (tiny
models under models/, data under data/) and a user's real models: set SDP_BASE_MODEL to an SD 1.5 folder
or .safetensors file and SDP_WD14_MODEL to a WD14 tagger folder, and nothing else changes.
"""

from __future__ import annotations

import os

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    map_asset_specs,
)

from assets import TRAINED_METHODS, computed_assets, observed_assets
from pipelines.automation import NIGHTLY_CRON, nightly_when_unsynced, on_change
from pipelines.executors import executor_from_env
from pipelines.jobs import all_jobs
from pipelines.run_tags import run_tags_sensor
from pipelines.sensors import dataset_sensor, sensor_interval
from resources import BaseModelResource, ProjectPaths, TaggerResource, TorchDevice

EAGER = ("prepared_images", "tag_scores", "tag_table")
NIGHTLY = (*TRAINED_METHODS, "evaluation_grid", "evaluation_metrics", "evaluation_report")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def resources_from_env() -> dict[str, object]:
    return {
        "paths": ProjectPaths(
            datasets_dir=_env("SDP_DATASETS_DIR", "datasets"), data_dir=_env("SDP_DATA_DIR", "data")
        ),
        "tagger": TaggerResource(wd14_model=_env("SDP_WD14_MODEL", "models/tiny-wd14")),
        "base_model": BaseModelResource(path=_env("SDP_BASE_MODEL", "models/tiny-sd")),
        "device": TorchDevice(device=_env("SDP_DEVICE", "auto"), precision=_env("SDP_PRECISION", "auto")),
    }


def _with_automation(spec):
    name = spec.key.to_user_string()
    if name in EAGER:
        return spec.replace_attributes(automation_condition=on_change())
    if name in NIGHTLY:
        cron = _env("SDP_NIGHTLY_CRON", NIGHTLY_CRON)
        return spec.replace_attributes(automation_condition=nightly_when_unsynced(cron, _env("SDP_TIMEZONE", "UTC")))
    return spec


automation_sensor = AutomationConditionSensorDefinition(
    "automation",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=sensor_interval(),
    description="Runs the eager stages when their inputs change and training/evaluation nightly when unsynced.",
    run_tags={"trigger": "automation"},
)


def build_definitions(resources: dict[str, object] | None = None, executor=None) -> Definitions:
    """The project's definitions; tests pass their own resources (temporary folders, tiny models).

    The executor comes from SDP_EXECUTOR (pipelines/executors.py) unless one is passed.
    """
    return Definitions(
        assets=[*observed_assets, *map_asset_specs(_with_automation, computed_assets)],
        jobs=all_jobs,
        sensors=[dataset_sensor, automation_sensor, run_tags_sensor],
        resources=resources if resources is not None else resources_from_env(),
        executor=executor if executor is not None else executor_from_env(),
    )


defs = build_definitions()
