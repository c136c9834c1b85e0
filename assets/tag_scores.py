"""`tag_scores`: every tag's score above a small floor for every prepared image, from the configured tagger."""


from pathlib import Path

import pandas as pd
from dagster import AssetExecutionContext, DataVersion, Failure, MaterializeResult, MetadataValue, asset

from assets.metadata import require_file, settings_for, status_counts, table_md
from assets.observations import settings_assets
from assets.oom_retry import GPU_RETRY
from assets.partitions import datasets_partitions
from assets.prepared_images import STAGE as PREPARED
from assets.prepared_images import kept_rows, manifest_path, prepared_images
from common.atomic import write_parquet
from common.hashing import file_sha256
from resources import ProjectPaths, TaggerResource
from tagging.score_cache import ImageToScore, ScoreStore, score_with_cache
from tagging.wd14 import TaggerModelError


def scores_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "tag_scores.parquet"


def status_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "tag_scores_images.parquet"


def score_store_dir(paths: ProjectPaths) -> Path:
    """Shared by all datasets: scores are keyed by image content and model, not by dataset."""
    folder = paths.data_root() / "cache" / "tag_scores"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@asset(
    partitions_def=datasets_partitions,
    deps=[prepared_images, settings_assets["tagging"]],
    group_name="tagging",
    code_version="2",
    pool="gpu",
    retry_policy=GPU_RETRY,
    kinds={"onnx", "tensorflow"},
    description="Tag scores above a small floor per prepared image (long table: image, tag, category, score), "
    "cached per (image hash, model fingerprint) so only new images or a new model cost inference.",
)
def tag_scores(context: AssetExecutionContext, paths: ProjectPaths, tagger: TaggerResource) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset).tagging
    # The model loads (and a bad folder fails) before any image is read.
    try:
        model = tagger.load(settings.tagger, settings.model)
    except TaggerModelError as error:
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
    scores = run.scores.assign(backend=settings.tagger)
    target = scores_path(paths, dataset)
    write_parquet(target, scores)
    write_parquet(status_path(paths, dataset), run.status)

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
        },
        data_version=DataVersion(file_sha256(target)),
    )
