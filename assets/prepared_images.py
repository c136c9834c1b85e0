"""`prepared_images`: the raw images decoded safely, cropped and resized into the training set."""


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

from assets.metadata import image_md, settings_for, status_counts, table_md
from assets.observations import raw_images, settings_assets
from assets.partitions import datasets_partitions
from common.atomic import atomic_path, write_parquet
from common.hashing import json_sha256
from resources import ProjectPaths
from tagging.prepare import PrepareOptions, contact_sheet, prepare_images

STAGE = "prepared_images"


def manifest_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "prepared_manifest.parquet"


def kept_rows(manifest: pd.DataFrame) -> pd.DataFrame:
    """The images training can use: everything that was not skipped."""
    return manifest[manifest["status"] != "skipped"].reset_index(drop=True)


@asset(
    partitions_def=datasets_partitions,
    deps=[raw_images, settings_assets["preprocess"]],
    group_name="prepare",
    code_version="1",
    kinds={"pillow"},
    check_specs=[AssetCheckSpec("has_training_images", asset=STAGE, description="at least one image was prepared")],
    description="Square, resized (optionally flipped) PNGs under data/<dataset>/prepared_images/, and a manifest "
    "with source, content hash, output, status and the reason for anything skipped.",
)
def prepared_images(context: AssetExecutionContext, paths: ProjectPaths) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset).preprocess
    options = PrepareOptions(**settings.model_dump())
    table = manifest_path(paths, dataset)
    previous = pd.read_parquet(table) if table.exists() else None
    out_dir = paths.output_dir(dataset, STAGE)

    manifest = prepare_images(paths.dataset_dir(dataset), out_dir, options, previous=previous)
    write_parquet(table, manifest)
    kept = kept_rows(manifest)
    skipped = manifest[manifest["status"] == "skipped"][["source", "reason"]]
    for row in skipped.itertuples():
        context.log.warning(f"skipped {row.source}: {row.reason}")

    metadata = {
        **status_counts(manifest["status"]),
        "dagster/row_count": len(kept),
        "size": options.size,
        "output_dir": MetadataValue.path(str(out_dir)),
        "manifest": MetadataValue.path(str(table)),
        "skipped_files": table_md(skipped),
    }
    if len(kept):
        sheet_path = paths.output_dir(dataset, "previews") / "contact_sheet.png"
        with atomic_path(sheet_path) as tmp:
            contact_sheet([out_dir / name for name in kept["output"]]).save(tmp)
        metadata["contact_sheet"] = image_md(sheet_path, max_side=768, caption="prepared images")
    # The version depends on what was produced, not on whether it was computed or reused.
    version = json_sha256(sorted(zip(kept["output"], kept["sha256"])))
    check = AssetCheckResult(
        check_name="has_training_images",
        passed=bool(len(kept)),
        severity=AssetCheckSeverity.ERROR,
        metadata={"prepared": len(kept), "skipped": len(skipped)},
    )
    return MaterializeResult(metadata=metadata, data_version=DataVersion(version), check_results=[check])
