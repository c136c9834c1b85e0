"""`tag_scores`: every tag's score above a small floor for every prepared image, from the configured tagger,
and, when the dataset names a BLIP folder, a BLIP caption per image."""


from pathlib import Path

import pandas as pd
from dagster import AssetExecutionContext, DataVersion, Failure, MaterializeResult, MetadataValue, asset

from assets.dataset_settings import TaggingSettings
from assets.metadata import require_file, settings_for, status_counts, table_md
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.prepared_images import STAGE as PREPARED
from assets.prepared_images import kept_rows, manifest_path, prepared_images
from common.atomic import write_parquet
from common.hashing import file_sha256, json_sha256
from resources import ProjectPaths, TaggerResource, TorchDevice
from tagging.blip import BLIP_COLUMNS, BlipCaptionStore, BlipSettings, CaptionRun, caption_with_cache
from tagging.score_cache import ImageToScore, ScoreStore, score_with_cache
from tagging.wd14 import TaggerModelError


def scores_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "tag_scores.parquet"


def status_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "tag_scores_images.parquet"


def blip_captions_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "blip_captions.parquet"


def cache_dir(paths: ProjectPaths, kind: str) -> Path:
    """Shared by all datasets: results are keyed by image content and model, not by dataset."""
    folder = paths.data_root() / "cache" / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def score_store_dir(paths: ProjectPaths) -> Path:
    return cache_dir(paths, "tag_scores")


def blip_settings(settings: TaggingSettings) -> BlipSettings:
    return BlipSettings(prompt=settings.blip_prompt, num_beams=settings.num_beams, min_length=settings.min_length,
                        max_length=settings.max_length)


@asset(
    partitions_def=datasets_partitions,
    deps=[prepared_images, settings_assets["tagging"]],
    group_name="tagging",
    code_version="3",
    **gpu_step(),
    kinds={"onnx", "tensorflow", "pytorch"},
    description="Tag scores above a small floor per prepared image (long table: image, tag, category, score), "
    "cached per (image hash, model fingerprint) so only new images or a new model cost inference; with "
    "tagging.blip_model, BLIP captions too (cached per image hash, model and generation settings).",
)
def tag_scores(context: AssetExecutionContext, paths: ProjectPaths, tagger: TaggerResource,
               device: TorchDevice) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset).tagging
    # The models load (and a bad folder fails) before any image is read.
    try:
        model = tagger.load(settings.tagger, settings.model)
    except TaggerModelError as error:
        raise Failure(description=str(error), allow_retries=False) from error
    try:
        captioner = tagger.load_blip(settings.blip_model, device) if settings.blip_model else None
    except TaggerModelError as error:
        model.close()
        raise Failure(description=str(error), allow_retries=False) from error
    context.log.info(f"tagger {settings.tagger} from {model.model_dir} on {model.provider}")
    manifest = kept_rows(pd.read_parquet(require_file(manifest_path(paths, dataset), PREPARED)))
    images = [
        ImageToScore(name=row.output, path=paths.output_dir(dataset, PREPARED) / row.output, sha256=row.sha256)
        for row in manifest.itertuples()
    ]
    store = ScoreStore(score_store_dir(paths), model.fingerprint, settings.score_floor)
    try:
        run = score_with_cache(model, images, store, floor=settings.score_floor, batch_size=settings.batch_size,
                               workers=settings.workers)
    finally:
        model.close()
    blip = _blip_captions(context, paths, captioner, images, settings)
    scores = run.scores.assign(backend=settings.tagger)
    target = scores_path(paths, dataset)
    write_parquet(target, scores)
    write_parquet(status_path(paths, dataset), run.status)
    # Written even when BLIP is off (empty), so tag_table never reads captions of an earlier setting.
    write_parquet(blip_captions_path(paths, dataset), blip.captions if blip else pd.DataFrame(columns=BLIP_COLUMNS))

    skipped = run.status[run.status["status"] == "skipped"]
    for row in skipped.itertuples():
        context.log.warning(f"tag_scores skipped {row.image}: {row.reason}")
    top = scores.groupby("image", sort=True, observed=True).head(3)
    return MaterializeResult(
        metadata={
            **status_counts(run.status["status"]),
            "dagster/row_count": len(scores),
            "images": len(images),
            "tags_in_model": len(model.tags),
            "score_floor": settings.score_floor,
            "images_per_second": round(run.images_per_second, 2),
            "provider": model.provider,
            "model": MetadataValue.path(str(model.model_dir)),
            "model_fingerprint": model.fingerprint[:16],
            "scores": MetadataValue.path(str(target)),
            "skipped_images": table_md(skipped[["image", "reason"]]),
            "top_tags_preview": table_md(top[["image", "tag", "score"]], rows=15),
            **(_blip_metadata(blip, captioner) if blip else {"blip": "off"}),
        },
        data_version=DataVersion(json_sha256([file_sha256(target), file_sha256(blip_captions_path(paths, dataset))])),
    )


def _blip_captions(context: AssetExecutionContext, paths: ProjectPaths, captioner: object, images: list[ImageToScore],
                   settings: TaggingSettings) -> CaptionRun | None:
    """BLIP captions for the images, cached per (image hash, model, generation settings); None when BLIP is off."""
    if captioner is None:
        return None
    context.log.info(f"BLIP captions from {captioner.model_dir} on {captioner.provider}")
    generation = blip_settings(settings)
    store = BlipCaptionStore(cache_dir(paths, "blip_captions"), captioner.fingerprint, generation)
    try:
        return caption_with_cache(captioner, images, store, generation, batch_size=settings.batch_size)
    finally:
        captioner.close()


def _blip_metadata(blip: CaptionRun, captioner: object) -> dict:
    return {
        **{f"blip_{name}": count for name, count in status_counts(blip.status["status"]).items()},
        "blip_images_per_second": round(blip.images_per_second, 2),
        "blip_provider": captioner.provider,
        "blip_model_fingerprint": captioner.fingerprint[:16],
        "blip_preview": table_md(blip.captions[["image", "blip_caption"]], rows=10),
    }
