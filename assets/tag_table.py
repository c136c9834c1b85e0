"""`tag_table`: thresholds and formatting applied to the cached scores; captions table and .txt sidecars.

This is the step users iterate on (threshold, blacklist, ordering), so it never runs a model.
"""


import io
import time
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
from PIL import Image

from assets.dataset_settings import CaptionSettings
from assets.metadata import image_md, require_file, settings_for, table_md
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.prepared_images import STAGE as PREPARED
from assets.prepared_images import kept_rows, manifest_path
from assets.tag_scores import blip_captions_path, scores_path, tag_scores
from common.atomic import write_parquet, write_text
from common.hashing import file_sha256
from resources import ProjectPaths
from tagging.captions import DEFAULT_THRESHOLDS, CaptionOptions, build_captions

STAGE = "tag_table"


def captions_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "captions.parquet"


def frequency_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "tag_frequency.parquet"


def caption_options(settings: CaptionSettings, backend: str) -> CaptionOptions:
    """The dataset's caption settings, with unset thresholds taken from the tagger backend's defaults."""
    defaults = DEFAULT_THRESHOLDS[backend]
    values = settings.model_dump()
    values["general_threshold"] = values["general_threshold"] if values["general_threshold"] is not None else defaults["general"]
    values["character_threshold"] = (
        values["character_threshold"] if values["character_threshold"] is not None else defaults["character"]
    )
    return CaptionOptions(**values)


def existing_captions(manifest: pd.DataFrame) -> dict[str, str]:
    """The `<source>.txt` caption that came with each prepared image's source, as prepared_images recorded it
    (so a caption edit reaches here through raw_images and prepared_images). Flipped copies share it."""
    present = manifest[manifest["source_caption"].notna()]
    return dict(zip(present["output"], present["source_caption"].astype(str)))


def blip_captions(paths: ProjectPaths, dataset: str) -> dict[str, str]:
    """The BLIP caption of each prepared image that has one (none when BLIP is off, or tag_scores predates it)."""
    path = blip_captions_path(paths, dataset)
    if not path.is_file():
        return {}
    table = pd.read_parquet(path, columns=["image", "blip_caption"])
    return dict(zip(table["image"].astype(str), table["blip_caption"].astype(str)))


def frequency_chart(frequency: pd.DataFrame, *, top: int = 25) -> Image.Image:
    """A horizontal bar chart of the most frequent tags (dropped subject features in grey), for the UI."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = frequency.head(top).iloc[::-1]
    figure, axes = plt.subplots(figsize=(6, 0.25 * max(len(shown), 4) + 0.8), dpi=80)
    axes.barh(shown["tag"], shown["fraction"], color=["#999999" if d else "#3a7bd5" for d in shown["dropped"]])
    axes.set_xlim(0, 1)
    axes.set_xlabel("fraction of images (grey: dropped as subject feature)")
    axes.tick_params(axis="y", labelsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


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
    code_version="3",
    check_specs=[AssetCheckSpec("every_image_captioned", asset=STAGE, description="one caption row per prepared image")],
    description="Captions from the tag scores with the dataset's caption settings (thresholds per category or "
    "MCut, undesired tags, replacements, ordering, subject-feature removal, sidecar captions, BLIP captions "
    "alone or before the tags); a Parquet "
    "table, a per-tag frequency table and .txt sidecars.",
)
def tag_table(context: AssetExecutionContext, paths: ProjectPaths) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset).captions
    scores = pd.read_parquet(require_file(scores_path(paths, dataset), "tag_scores"),
                             columns=["image", "tag", "category", "score", "backend"])
    manifest = kept_rows(pd.read_parquet(require_file(manifest_path(paths, dataset), PREPARED)))
    backend = str(scores["backend"].iloc[0]) if len(scores) else "wd14"
    options = caption_options(settings, backend)
    existing = existing_captions(manifest) if options.existing_caption != "ignore" else {}
    blip = blip_captions(paths, dataset)
    if options.filewords_source != "tags" and not blip:
        context.log.warning(f"captions.filewords_source is {options.filewords_source} but there are no BLIP captions "
                            "(set tagging.blip_model); the captions use the tags")

    started = time.perf_counter()
    result = build_captions(scores, options, images=list(manifest["output"]), existing=existing, blip=blip)
    seconds = time.perf_counter() - started
    captions, frequency = result.captions, result.frequency
    target = captions_path(paths, dataset)
    write_parquet(target, captions)
    write_parquet(frequency_path(paths, dataset), frequency)
    rewritten = write_sidecars(paths.output_dir(dataset, PREPARED), captions)

    missing = sorted(set(manifest["output"]) - set(captions["image"]))
    return MaterializeResult(
        metadata={
            "dagster/row_count": len(captions),
            "processed": len(captions),
            "reused": 0,
            "skipped": 0,
            "caption_seconds": round(seconds, 4),
            "sidecars_rewritten": rewritten,
            "existing_captions": len(existing),
            "blip_captions": len(blip),
            "filewords_source": options.filewords_source,
            "general_threshold": options.general_threshold,
            "character_threshold": options.character_threshold,
            "empty_captions": int((captions["tag_count"] == 0).sum()),
            "subject_features_dropped": MetadataValue.text(
                ", ".join(frequency.loc[frequency["dropped"], "tag"]) or "none"),
            "captions": MetadataValue.path(str(target)),
            "preview": table_md(captions[["image", "caption"]]),
            "tag_frequency": table_md(frequency, rows=30),
            "tag_frequency_chart": image_md(frequency_chart(frequency), max_side=800, caption="tag frequency"),
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
