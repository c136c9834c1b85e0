"""Materialisation metadata the UI shows: counts, images inlined (kept small), table previews."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from dagster import Failure, MetadataValue
from PIL import Image

from assets.dataset_settings import DatasetSettings, SettingsError, load_dataset_settings
from common.images import thumbnail_data_url
from resources import ProjectPaths

ITEM_STATUSES = ("processed", "reused", "skipped")


def settings_for(paths: ProjectPaths, dataset: str) -> DatasetSettings:
    """The dataset's settings, or a run failure that names the file and the field at fault."""
    dataset_dir = paths.dataset_dir(dataset)
    if not dataset_dir.is_dir():
        raise Failure(description=f"dataset folder {dataset_dir} does not exist (was it removed or renamed?)",
                      allow_retries=False)
    try:
        return load_dataset_settings(dataset_dir)
    except SettingsError as error:
        raise Failure(description=str(error), allow_retries=False) from error


def require_file(path: Path, producer: str) -> Path:
    if not path.is_file():
        raise Failure(description=f"{path} is missing: materialize `{producer}` for this dataset first")
    return path


def image_md(image: Image.Image | Path, *, max_side: int = 512, caption: str = "") -> MetadataValue:
    """An image inlined as a PNG data URL, scaled down so the event log stays light."""
    return MetadataValue.md(f"![{caption}]({thumbnail_data_url(image, max_side=max_side)})")


def status_counts(statuses: Iterable[str]) -> dict[str, int]:
    """`processed` (computed now), `reused` (from a cache) and `skipped`: what a run actually did."""
    counts = pd.Series(list(statuses), dtype="object").value_counts()
    return {status: int(counts.get(status, 0)) for status in ITEM_STATUSES}


def table_md(frame: pd.DataFrame, *, rows: int = 20) -> MetadataValue:
    if frame.empty:
        return MetadataValue.md("_(empty)_")
    return MetadataValue.md(frame.head(rows).to_markdown(index=False))
