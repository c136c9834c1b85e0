"""`tag_table`: thresholds and formatting applied to the cached scores; captions table and .txt sidecars.

This is the step users iterate on (threshold, blacklist, ordering), so it never runs a model.
"""


from pathlib import Path

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.dataset_settings import CaptionSettings
from assets.metadata import require_file, settings_for, table_md
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.prepared_images import STAGE as PREPARED, kept_rows, manifest_path
from assets.tag_scores import scores_path, tag_scores
from common.atomic import write_parquet, write_text
from common.hashing import file_sha256
from resources import ProjectPaths
from tagging.captions import DEFAULT_THRESHOLDS, CaptionOptions, build_captions

STAGE = "tag_table"


def captions_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "captions.parquet"


def caption_options(settings: CaptionSettings, backend: str) -> CaptionOptions:
    """The dataset's caption settings, with unset thresholds taken from the tagger backend's defaults."""
    defaults = DEFAULT_THRESHOLDS[backend]
    values = settings.model_dump()
    values["general_threshold"] = values["general_threshold"] if values["general_threshold"] is not None else defaults["general"]
    values["character_threshold"] = (
        values["character_threshold"] if values["character_threshold"] is not None else defaults["character"]
    )
    return CaptionOptions(**values)


def write_sidecars(folder: Path, captions: pd.DataFrame) -> int:
    """`<image stem>.txt` beside each prepared image, the caption file the webui and kohya read."""
    written = 0
    for row in captions.itertuples():
        sidecar = folder / f"{Path(row.image).stem}.txt"
        if not sidecar.exists() or sidecar.read_text(encoding="utf-8") != row.caption:
            write_text(sidecar, row.caption)
            written += 1
    return written


@asset(
    partitions_def=datasets_partitions,
    deps=[tag_scores, settings_assets["captions"]],
    group_name="tagging",
    code_version="1",
    check_specs=[AssetCheckSpec("every_image_captioned", asset=STAGE, description="one caption row per prepared image")],
    description="Captions from the tag scores with the dataset's thresholds (per category), spaces for "
    "underscores, escaped brackets, confidence order; a Parquet table and .txt sidecars.",
)
def tag_table(context: AssetExecutionContext, paths: ProjectPaths) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset).captions
    scores = pd.read_parquet(require_file(scores_path(paths, dataset), "tag_scores"))
    backend = str(scores["backend"].iloc[0]) if len(scores) else "wd14"
    options = caption_options(settings, backend)

    captions = build_captions(scores, options)
    target = captions_path(paths, dataset)
    write_parquet(target, captions)
    rewritten = write_sidecars(paths.output_dir(dataset, PREPARED), captions)

    prepared = set(kept_rows(pd.read_parquet(require_file(manifest_path(paths, dataset), PREPARED)))["output"])
    missing = sorted(prepared - set(captions["image"]))
    frequency = captions.explode("tags")["tags"].dropna().value_counts().head(20)
    return MaterializeResult(
        metadata={
            "dagster/row_count": len(captions),
            "processed": len(captions),
            "reused": 0,
            "skipped": 0,
            "sidecars_rewritten": rewritten,
            "general_threshold": options.general_threshold,
            "character_threshold": options.character_threshold,
            "empty_captions": int((captions["tag_count"] == 0).sum()),
            "captions": MetadataValue.path(str(target)),
            "preview": table_md(captions[["image", "caption"]]),
            "tag_frequency": table_md(frequency.rename_axis("tag").reset_index(name="images")),
        },
        data_version=DataVersion(file_sha256(target)),
        check_results=[
            AssetCheckResult(
                check_name="every_image_captioned",
                passed=not missing,
                metadata={"missing": MetadataValue.text(", ".join(missing[:20]) or "none")},
            )
        ],
    )
