"""`aesthetic_embedding`: the mean CLIP image embedding of the prepared images, as the aesthetic-gradients
extension's `aesthetic_embeddings/<dataset>.pt`.

Opt-in per dataset: without `aesthetic.clip_model` in dataset.yaml the step succeeds and materialises
nothing, so a dataset that does not use the method is skipped, not failed.
"""

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from dagster import AssetExecutionContext, DataVersion, Failure, MaterializeResult, MetadataValue, asset

from assets.dataset_settings import AestheticSettings
from assets.metadata import require_file, settings_for
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.prepared_images import STAGE as PREPARED, kept_rows, manifest_path, prepared_images
from common.hashing import file_sha256
from resources import ProjectPaths, TorchDevice
from resources.paths import resolve
from training.aesthetic import EMBEDDINGS_DIR, AestheticOptions, create_aesthetic_embedding, save_aesthetic_embedding
from training.clip_scores import ClipModelError, ClipScorer

STAGE = "aesthetic_embedding"


def aesthetic_options(settings: AestheticSettings) -> AestheticOptions:
    """The dataset's generation-time options for the evaluation (the extension's names, one to one)."""
    return AestheticOptions(**settings.model_dump(include=set(AestheticOptions.__dataclass_fields__)))


def aesthetic_embedding_path(paths: ProjectPaths, dataset: str) -> Path:
    """Where the dataset's embedding is written (and where the evaluation reads it)."""
    return paths.output_dir(dataset, STAGE) / EMBEDDINGS_DIR / f"{dataset}.pt"


@asset(
    partitions_def=datasets_partitions,
    deps=[prepared_images, settings_assets["aesthetic"]],
    group_name="training",
    code_version="1",
    **gpu_step(),
    kinds={"pytorch"},
    output_required=False,
    description="The aesthetic-gradients extension's embedding of the prepared images (mean CLIP image "
    "features, a (1, projection_dim) tensor) in aesthetic_embeddings/<dataset>.pt; only for datasets that set "
    "aesthetic.clip_model. On demand, not automated.",
)
def aesthetic_embedding(
    context: AssetExecutionContext, paths: ProjectPaths, device: TorchDevice
) -> Iterator[MaterializeResult]:
    dataset = context.partition_key
    settings = settings_for(paths, dataset).aesthetic
    if not settings.clip_model:
        context.log.info(f"dataset {dataset!r} sets no aesthetic.clip_model: no aesthetic embedding to make")
        return
    try:
        scorer = ClipScorer.load(resolve(settings.clip_model), device.torch_device(), device.dtype(),
                                 batch_size=settings.batch_size)
    except ClipModelError as error:
        raise Failure(description=f"datasets/{dataset}/dataset.yaml, aesthetic.clip_model: {error}",
                      allow_retries=False) from error
    manifest = kept_rows(pd.read_parquet(require_file(manifest_path(paths, dataset), PREPARED)))
    folder = paths.output_dir(dataset, PREPARED)
    images = [folder / name for name in manifest["output"]]
    if not images:
        raise Failure(description=f"dataset {dataset!r} has no prepared images to embed", allow_retries=False)
    embedding = create_aesthetic_embedding(scorer, images)
    out_path = aesthetic_embedding_path(paths, dataset)
    save_aesthetic_embedding(out_path, embedding)
    context.log.info(f"aesthetic embedding of {len(images)} images from {scorer.folder} -> {out_path}")
    yield MaterializeResult(
        metadata={
            "images": len(images),
            "processed": len(images),
            "reused": 0,
            "skipped": 0,
            "embedding_norm": float(embedding.norm()),
            "shape": MetadataValue.text(str(tuple(embedding.shape))),
            "clip_model": MetadataValue.path(str(scorer.folder)),
            "path": MetadataValue.path(str(out_path)),
        },
        data_version=DataVersion(file_sha256(out_path)),
    )
