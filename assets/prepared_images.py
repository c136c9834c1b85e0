"""`prepared_images`: the raw images decoded safely, cropped and resized into the training set."""

import dataclasses
import re
from pathlib import Path

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.dataset_settings import PreprocessSettings
from assets.metadata import image_md, settings_for, status_counts, table_md
from assets.observations import raw_images, settings_assets
from assets.partitions import datasets_partitions
from common.atomic import atomic_path, write_parquet, write_text
from common.hashing import json_sha256
from resources import ProjectPaths
from tagging.prepare import PrepareOptions, SelectOptions, prepare_images
from tagging.prepare_cache import THUMB_FILE, entry_dir
from tagging.sheets import contact_sheet, crop_sheet
from tagging.splits import VALIDATION

STAGE = "prepared_images"
CROP_COLUMNS = ["crop_left", "crop_top", "crop_right", "crop_bottom"]
CHECKS = {
    "has_training_images": "at least one image was prepared",
    "enough_images": "at least `preprocess.min_images` prepared images (the seeds recommend 30+); warns",
    "few_skipped": "at most `preprocess.max_skipped_fraction` of the sources skipped (duplicates not counted)",
}


def manifest_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "prepared_manifest.parquet"


def cache_dir(paths: ProjectPaths, dataset: str) -> Path:
    """Per dataset, so pruning the entries of deleted images never touches another dataset's."""
    return paths.data_root() / "cache" / STAGE / dataset


def kept_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The images training can use: everything that was not skipped."""
    return manifest[manifest["status"] != "skipped"].reset_index(drop=True)


def options_from(settings: PreprocessSettings) -> tuple[PrepareOptions, SelectOptions]:
    """Split the section into the options that change pixels (cache key) and those that only select."""
    values = settings.model_dump()
    pick = lambda cls: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})  # noqa: E731
    return pick(PrepareOptions), pick(SelectOptions)


def skip_reasons(manifest: pd.DataFrame) -> dict[str, int]:
    """Skipped sources counted by the kind of reason (the text before any file-specific detail)."""
    skipped = manifest[manifest["status"] == "skipped"].drop_duplicates("source")
    kinds = skipped["reason"].map(lambda reason: re.split(r"[:(]| of ", reason, maxsplit=1)[0].strip())
    return {str(kind): int(count) for kind, count in kinds.value_counts().sort_index().items()}


@asset(
    partitions_def=datasets_partitions,
    deps=[raw_images, settings_assets["preprocess"]],
    group_name="prepare",
    code_version="3",
    kinds={"pillow", "opencv"},
    check_specs=[AssetCheckSpec(name, asset=STAGE, description=text) for name, text in CHECKS.items()],
    description="Cropped, resized (optionally flipped/greyscale) PNGs under data/<dataset>/prepared_images/, built "
    "through a content-addressed cache in worker processes, and a manifest with source, content hash, output, "
    "crop box, status, the train/validation split and the reason for anything skipped.",
)
def prepared_images(context: AssetExecutionContext, paths: ProjectPaths) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset).preprocess
    options, select = options_from(settings)
    table = manifest_path(paths, dataset)
    previous = pd.read_parquet(table) if table.exists() else None
    out_dir = paths.output_dir(dataset, STAGE)

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            context.log.info(f"decoded and resized {done}/{total} new or changed images")

    manifest = prepare_images(paths.dataset_dir(dataset), out_dir, options, previous=previous,
                              cache_dir=cache_dir(paths, dataset), select=select, workers=settings.workers,
                              progress=progress)
    write_parquet(table, manifest)
    kept = kept_rows(manifest)
    skipped = manifest[manifest["status"] == "skipped"][["source", "reason"]]
    for row in skipped.itertuples():
        context.log.warning(f"skipped {row.source}: {row.reason}")
    sources = manifest.drop_duplicates("source")
    exact = int(sources["reason"].str.startswith("exact duplicate").sum())
    near = int(sources["duplicate_of"].notna().sum()) - exact

    metadata = {
        **status_counts(manifest["status"]),
        "dagster/row_count": len(kept),
        "sources": len(sources),
        "validation_images": int((kept["split"] == VALIDATION).sum()),
        "validation_sources": int(kept.loc[kept["split"] == VALIDATION, "source"].nunique()),
        "exact_duplicates": exact,
        "near_duplicates": near,
        "skipped_by_reason": MetadataValue.json(skip_reasons(manifest)),
        "crop": options.crop,
        "size": options.size,
        "output_dir": MetadataValue.path(str(out_dir)),
        "manifest": MetadataValue.path(str(table)),
        "skipped_files": table_md(skipped),
    }
    if len(kept):
        metadata.update(_sheets(paths, dataset, out_dir, kept, options.fingerprint()))
    # The version depends on what was produced, not on whether it was computed or reused.
    version = json_sha256(sorted(zip(kept["output"], kept["sha256"], kept["split"])))
    return MaterializeResult(metadata=metadata, data_version=DataVersion(version),
                             check_results=_checks(sources, kept, settings, exact))


def _sheets(paths: ProjectPaths, dataset: str, out_dir: Path, kept: pd.DataFrame, fingerprint: str) -> dict:
    """The prepared images, and the sources (their cached thumbnails) with crop boxes; redrawn only when the
    prepared set or its crops changed."""
    folder = paths.output_dir(dataset, "previews")
    prepared, crops, key_file = folder / "contact_sheet.png", folder / "crop_boxes.png", folder / "contact_sheet.key"
    boxes = kept[["source", *CROP_COLUMNS]].astype(str).values.tolist()
    key = json_sha256([sorted(zip(kept["output"], kept["sha256"])), boxes])
    if not (prepared.exists() and crops.exists() and key_file.exists() and key_file.read_text() == key):
        with atomic_path(prepared) as tmp:
            contact_sheet([out_dir / name for name in kept["output"]]).save(tmp)
        entries = [(entry_dir(cache_dir(paths, dataset), fingerprint, rows["source_sha256"].iloc[0]) / THUMB_FILE,
                    (int(rows["source_width"].iloc[0]), int(rows["source_height"].iloc[0])),
                    [tuple(int(v) for v in box) for box in rows[CROP_COLUMNS].drop_duplicates().values])
                   for _, rows in kept.groupby("source", sort=True)]
        with atomic_path(crops) as tmp:
            crop_sheet(entries).save(tmp)
        write_text(key_file, key)
    return {"contact_sheet": image_md(prepared, max_side=768, caption="prepared images"),
            "crop_boxes": image_md(crops, max_side=768, caption="sources with their crop boxes")}


def _checks(
    sources: pd.DataFrame, kept: pd.DataFrame, settings: PreprocessSettings, exact: int
) -> list[AssetCheckResult]:
    considered = len(sources) - exact
    bad = int((sources["status"] == "skipped").sum()) - exact - int(
        sources["reason"].str.startswith("near duplicate").sum())
    fraction = bad / considered if considered else 0.0
    prepared_sources = kept["source"].nunique()
    return [
        AssetCheckResult(check_name="has_training_images", passed=bool(len(kept)), severity=AssetCheckSeverity.ERROR,
                         metadata={"prepared": len(kept), "skipped": bad}),
        AssetCheckResult(check_name="enough_images", passed=prepared_sources >= settings.min_images,
                         severity=AssetCheckSeverity.WARN,
                         metadata={"prepared_sources": prepared_sources, "recommended_minimum": settings.min_images}),
        AssetCheckResult(check_name="few_skipped", passed=fraction <= settings.max_skipped_fraction,
                         severity=AssetCheckSeverity.ERROR,
                         metadata={"skipped_fraction": round(fraction, 4), "limit": settings.max_skipped_fraction}),
    ]
