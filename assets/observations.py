"""The observed inputs of the graph: the raw images of each dataset and each section of its settings.

Their data versions drive staleness: a stage is unsynced exactly when one of the observed inputs it
depends on (or an upstream output) has a new data version.
"""


import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from dagster import (
    AssetKey,
    BetaWarning,
    AssetObservation,
    DataVersion,
    DataVersionsByPartition,
    SourceAsset,
    observable_source_asset,
)

from assets.dataset_settings import SECTIONS, SettingsError, load_dataset_settings, section_version
from assets.partitions import dataset_name_problem, datasets_partitions, is_valid_dataset_name
from common.hashing import json_sha256, tree_sha256
from resources import ProjectPaths
from tagging.images import list_images

# Partitioned observable source assets are the documented way to version external inputs; accepted as beta.
warnings.filterwarnings("ignore", category=BetaWarning, message=".*observable_source_asset.*")

DATA_VERSION_TAG = "dagster/data_version"  # the tag Dagster reads an observation's data version from
SETTINGS_ASSETS = {section: f"{section}_settings" for section in SECTIONS}


def raw_images_version(dataset_dir: Path) -> str:
    """Hash of (relative path, content hash) of every image and its `<name>.txt` caption sidecar, so renames,
    edits, additions and deletions of either count."""
    images = list_images(dataset_dir)
    sidecars = [path.with_suffix(".txt") for path in images if path.with_suffix(".txt").is_file()]
    return tree_sha256(images + sidecars, dataset_dir)


def dataset_versions(dataset_dir: Path) -> dict[str, str]:
    """Data versions of every observed asset of one dataset; raises SettingsError for a bad dataset.yaml."""
    settings = load_dataset_settings(dataset_dir)
    versions = {name: section_version(settings, section) for section, name in SETTINGS_ASSETS.items()}
    versions["raw_images"] = raw_images_version(dataset_dir)
    return versions


def dataset_folders(paths: ProjectPaths) -> list[str]:
    root = paths.datasets_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_valid_dataset_name(p.name))


def refused_folders(paths: ProjectPaths) -> dict[str, str]:
    """Folders under datasets/ whose names are not safe partition keys, with the reason."""
    root = paths.datasets_root()
    if not root.is_dir():
        return {}
    problems = {p.name: dataset_name_problem(p.name) for p in root.iterdir() if p.is_dir()}
    return {name: problem for name, problem in sorted(problems.items()) if problem}


def stat_signature(dataset_dir: Path) -> str:
    """A cheap fingerprint of a dataset folder from `stat` alone: per sub-folder the file count, newest
    mtime_ns, total size and the folder's own mtime (renames and deletions touch it).

    Why: hashing 10,000 images on every sensor tick would read gigabytes; an unchanged signature means
    nothing was added, removed, renamed or rewritten, so the content hashes are not recomputed.
    """
    folders: dict[str, tuple[int, int, int, int]] = {}
    pending = [dataset_dir]
    while pending:
        folder = pending.pop()
        count = newest = total = 0
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(Path(entry.path))
                            continue
                        info = entry.stat()
                    except OSError:
                        continue  # a dangling symlink: list_images ignores it too
                    count += 1
                    newest = max(newest, info.st_mtime_ns, info.st_ctime_ns)
                    total += info.st_size
            own = folder.stat().st_mtime_ns
        except OSError:
            continue
        folders[folder.relative_to(dataset_dir).as_posix()] = (count, newest, total, own)
    return json_sha256(sorted(folders.items()))


def observation_events(dataset: str, versions: dict[str, str]) -> Iterator[AssetObservation]:
    for asset_name, version in versions.items():
        yield AssetObservation(asset_key=AssetKey(asset_name), partition=dataset, tags={DATA_VERSION_TAG: version})


def _observe_all(context, paths: ProjectPaths, asset_name: str) -> DataVersionsByPartition:
    known = set(context.instance.get_dynamic_partitions(datasets_partitions.name))
    versions: dict[str, DataVersion] = {}
    for dataset in dataset_folders(paths):
        if dataset not in known:
            continue
        dataset_dir = paths.dataset_dir(dataset)
        try:
            if asset_name == "raw_images":
                versions[dataset] = DataVersion(raw_images_version(dataset_dir))
            else:
                section = asset_name.removesuffix("_settings")
                versions[dataset] = DataVersion(section_version(load_dataset_settings(dataset_dir), section))
        except SettingsError as error:
            # One broken dataset.yaml must not stop every other dataset from being observed.
            context.log.error(f"not observing {asset_name} of dataset {dataset!r}: {error}")
    return DataVersionsByPartition(versions)


@observable_source_asset(
    partitions_def=datasets_partitions,
    group_name="inputs",
    description="The images under datasets/<name>/ (never modified); data version = hash of paths and contents.",
)
def raw_images(context, paths: ProjectPaths) -> DataVersionsByPartition:
    return _observe_all(context, paths, "raw_images")


def _settings_asset(section: str) -> SourceAsset:
    asset_name = SETTINGS_ASSETS[section]

    @observable_source_asset(
        name=asset_name,
        partitions_def=datasets_partitions,
        group_name="inputs",
        description=f"The `{section}` section of datasets/<name>/dataset.yaml, defaults applied; "
        "data version = hash of that section.",
    )
    def _observe(context, paths: ProjectPaths) -> DataVersionsByPartition:
        return _observe_all(context, paths, asset_name)

    return _observe


settings_assets = {section: _settings_asset(section) for section in SECTIONS}
observed_assets = [raw_images, *settings_assets.values()]
