"""The dataset sensor: new folders become partitions, and edits to images or settings are observed.

The cursor keeps, per dataset, the data versions last recorded and a stat signature of the folder
(file counts, newest mtime, total size per sub-folder): a tick on an unchanged 10,000-image dataset
costs one directory walk and no content hashing.
"""


import json
import os

from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, sensor

from assets.dataset_settings import SettingsError
from assets.observations import (
    dataset_folders,
    dataset_versions,
    observation_events,
    refused_folders,
    stat_signature,
)
from assets.partitions import datasets_partitions
from resources import ProjectPaths


def sensor_interval() -> int:
    """Seconds between sensor ticks (SDP_SENSOR_INTERVAL_SECONDS, default 30); tests use a few seconds."""
    return max(1, int(os.environ.get("SDP_SENSOR_INTERVAL_SECONDS") or 30))


def _read_cursor(cursor: str | None) -> dict:
    state = json.loads(cursor) if cursor else {}
    if state and "versions" not in state:  # the cursor of earlier versions: {dataset: versions}
        state = {"versions": state}
    return {"versions": {}, "signatures": {}, "refused": [], "gone": [], **state}


@sensor(
    name="dataset_folders",
    minimum_interval_seconds=sensor_interval(),
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition for each new folder under datasets/ and records new data versions of "
    "its images and settings sections, so the stages that read them become unsynced.",
)
def dataset_sensor(context: SensorEvaluationContext, paths: ProjectPaths) -> SensorResult:
    known = set(context.instance.get_dynamic_partitions(datasets_partitions.name))
    folders = dataset_folders(paths)
    state = _read_cursor(context.cursor)
    seen: dict[str, dict[str, str]] = state["versions"]
    signatures: dict[str, str] = state["signatures"]

    events = []
    for dataset in folders:
        if dataset not in known:
            continue  # observed on the next tick, once the partition exists
        signature = stat_signature(paths.dataset_dir(dataset))
        if dataset in seen and signatures.get(dataset) == signature:
            continue  # nothing added, removed or rewritten since the last tick: no hashing
        try:
            versions = dataset_versions(paths.dataset_dir(dataset))
        except SettingsError as error:
            context.log.error(str(error))
            signatures.pop(dataset, None)  # re-read on every tick until it is fixed
            continue
        previous = seen.get(dataset, {})
        changed = {name: version for name, version in versions.items() if previous.get(name) != version}
        events.extend(observation_events(dataset, changed))
        seen[dataset] = versions
        signatures[dataset] = signature

    refused = refused_folders(paths)
    for name, problem in refused.items():
        if name not in state["refused"]:
            context.log.error(f"dataset folder {name!r} under {paths.datasets_root()} is not used: its name {problem}")
    gone = sorted(known - set(folders))
    for dataset in gone:
        if dataset not in state["gone"]:
            context.log.warning(
                f"dataset folder {paths.dataset_dir(dataset)} was removed; its partition and outputs are kept"
            )
        seen.pop(dataset, None)
        signatures.pop(dataset, None)

    new = [dataset for dataset in folders if dataset not in known]
    if new:
        context.log.info(f"new datasets: {', '.join(new)}")
    cursor = {"versions": seen, "signatures": signatures, "refused": sorted(refused), "gone": gone}
    return SensorResult(
        dynamic_partitions_requests=[datasets_partitions.build_add_request(new)] if new else [],
        asset_events=events,
        cursor=json.dumps(cursor, sort_keys=True),
    )
