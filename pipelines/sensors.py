"""The dataset sensor: new folders become partitions, and edits to images or settings are observed."""


import json

from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, sensor

from assets.dataset_settings import SettingsError
from assets.observations import dataset_folders, dataset_versions, observation_events
from assets.partitions import datasets_partitions
from resources import ProjectPaths


@sensor(
    name="dataset_folders",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition for each new folder under datasets/ and records new data versions of "
    "its images and settings sections, so the stages that read them become unsynced.",
)
def dataset_sensor(context: SensorEvaluationContext, paths: ProjectPaths) -> SensorResult:
    known = set(context.instance.get_dynamic_partitions(datasets_partitions.name))
    folders = dataset_folders(paths)
    seen: dict[str, dict[str, str]] = json.loads(context.cursor) if context.cursor else {}

    events = []
    for dataset in folders:
        if dataset not in known:
            continue  # observed on the next tick, once the partition exists
        try:
            versions = dataset_versions(paths.dataset_dir(dataset))
        except SettingsError as error:
            context.log.error(str(error))
            continue
        previous = seen.get(dataset, {})
        changed = {name: version for name, version in versions.items() if previous.get(name) != version}
        events.extend(observation_events(dataset, changed))
        seen[dataset] = versions

    new = [dataset for dataset in folders if dataset not in known]
    for dataset in sorted(known - set(folders)):
        context.log.warning(f"dataset folder {paths.dataset_dir(dataset)} is gone; its partition and outputs are kept")
    if new:
        context.log.info(f"new datasets: {', '.join(new)}")
    return SensorResult(
        dynamic_partitions_requests=[datasets_partitions.build_add_request(new)] if new else [],
        asset_events=events,
        cursor=json.dumps(seen, sort_keys=True),
    )
