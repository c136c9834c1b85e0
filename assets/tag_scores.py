"""`tag_scores`: every tag's score for every prepared image, from the configured tagger."""


from pathlib import Path

import pandas as pd
from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from assets.metadata import require_file, settings_for, status_counts, table_md
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.prepared_images import STAGE as PREPARED, kept_rows, manifest_path, prepared_images
from common.atomic import write_parquet
from common.hashing import file_sha256
from resources import ProjectPaths, TaggerResource
from tagging.score_cache import ImageToScore, score_with_cache


def scores_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, "tables") / "tag_scores.parquet"


@asset(
    partitions_def=datasets_partitions,
    deps=[prepared_images, settings_assets["tagging"]],
    group_name="tagging",
    code_version="1",
    pool="gpu",
    kinds={"onnx"},
    description="All tag scores per prepared image (long table: image, tag, category, score), cached per "
    "(image hash, model fingerprint) so only new images or a new model cost inference.",
)
def tag_scores(context: AssetExecutionContext, paths: ProjectPaths, tagger: TaggerResource) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset).tagging
    manifest = kept_rows(pd.read_parquet(require_file(manifest_path(paths, dataset), PREPARED)))
    model = tagger.load(settings.tagger, settings.model)
    context.log.info(f"tagger {settings.tagger} from {model.model_dir} on {model.provider}")

    images = [
        ImageToScore(name=row.output, path=paths.output_dir(dataset, PREPARED) / row.output, sha256=row.sha256)
        for row in manifest.itertuples()
    ]
    target = scores_path(paths, dataset)
    previous = pd.read_parquet(target) if target.exists() else None
    scores, status = score_with_cache(model, images, previous, batch_size=settings.batch_size)
    scores.insert(3, "backend", settings.tagger)
    write_parquet(target, scores)

    top = scores.sort_values("score", ascending=False).groupby("image", sort=True).head(3)
    return MaterializeResult(
        metadata={
            **status_counts(status.values()),
            "dagster/row_count": len(scores),
            "images": len(images),
            "tags_per_image": len(model.tags),
            "model": MetadataValue.path(str(model.model_dir)),
            "model_fingerprint": model.fingerprint[:16],
            "execution_provider": model.provider,
            "scores": MetadataValue.path(str(target)),
            "top_tags_preview": table_md(top[["image", "tag", "score"]], rows=15),
        },
        data_version=DataVersion(file_sha256(target)),
    )
