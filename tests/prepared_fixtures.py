"""Helpers for the asset-level `prepared_images` tests: small distinct pictures, a project, one-asset runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, instance_for_test
from PIL import Image

from assets.partitions import datasets_partitions
from assets.prepared_images import manifest_path
from tests.conftest import make_project
from tests.helpers import edit_settings

SECTION = {"size": 16, "workers": 1, "min_images": 1}


def noise_images(folder: Path, names: list[str], seed: int = 0) -> None:
    """Distinct random pictures (identical ones would be dropped as exact duplicates)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        pixels = np.random.default_rng([seed, index]).integers(0, 256, (20, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


@pytest.fixture(name="counted")
def counted_fixture(monkeypatch) -> list[str]:
    """Every source actually decoded and resized in this process (workers: 1 keeps the work here)."""
    import tagging.prepare as prepare

    built: list[str] = []
    real = prepare.build_entry

    def counting(path: str, *args, **kwargs):
        built.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(prepare, "build_entry", counting)
    return built


@pytest.fixture(name="setup")
def setup_fixture(tmp_path: Path, embedded_root: Path):
    """A fresh project (datasets/, data/, Definitions) and a temporary Dagster instance."""
    defs, paths = make_project(tmp_path, embedded_root)
    with instance_for_test() as instance:
        yield defs, paths, instance


def dataset(paths, name: str, count: int, **settings) -> Path:
    folder = paths.dataset_dir(name)
    noise_images(folder, [f"{index:02d} img.png" for index in range(count)], seed=len(name))
    edit_settings(folder, "preprocess", **{**SECTION, **settings})
    return folder


def prepare(defs, instance: DagsterInstance, name: str, *, raise_on_error: bool = True):
    if name not in instance.get_dynamic_partitions(datasets_partitions.name):
        instance.add_dynamic_partitions(datasets_partitions.name, [name])
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(instance=instance, partition_key=name, raise_on_error=raise_on_error,
                                  asset_selection=[AssetKey("prepared_images")])


def manifest(paths, name: str) -> pd.DataFrame:
    return pd.read_parquet(manifest_path(paths, name))


def statuses(paths, name: str) -> dict[str, int]:
    return manifest(paths, name)["status"].value_counts().to_dict()
