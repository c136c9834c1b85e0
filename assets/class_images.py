"""`class_images`: the base model's pictures of the class ("a photo of a dog") that DreamBooth's prior
preservation trains against, sampled once and cached by content key (training/class_images.py).

Its own asset because sampling 50-200 images is the slow part of a DreamBooth run and depends on neither the
training images nor the training settings: retraining reuses them. For datasets that do not list dreambooth in
training.methods or turn prior preservation off it renders nothing and records why (metadata `skipped`, a
constant data version), rather than yielding no output, which would make Dagster skip `dreambooth` too.
"""

from pathlib import Path

from dagster import AssetExecutionContext, DataVersion, Failure, MaterializeResult, MetadataValue, asset

from assets.dataset_settings import DatasetSettings
from assets.metadata import image_md, settings_for
from assets.method_selection import method_listed
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from common.hashing import json_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from training.class_images import ClassImageSpec, generate_class_images

STAGE = "class_images"
METHOD = "dreambooth"
INLINED_IMAGES = 4  # class images shown in the materialisation's metadata
NOT_NEEDED = DataVersion("not-needed")


def class_image_spec(settings: DatasetSettings, dataset: str) -> ClassImageSpec:
    """The dataset's class images: dreambooth's class options at the training resolution (preprocess.size)."""
    dreambooth = settings.dreambooth
    try:
        return ClassImageSpec(
            prompt=dreambooth.class_prompt, size=settings.preprocess.size, count=dreambooth.num_class_images,
            negative_prompt=dreambooth.class_negative_prompt, seed=dreambooth.class_seed, steps=dreambooth.class_steps,
            cfg_scale=dreambooth.class_cfg_scale, sampler=dreambooth.class_sampler, clip_skip=settings.training.clip_skip,
        )  # fmt: skip
    except ValueError as error:
        raise Failure(
            description=f"datasets/{dataset}/dataset.yaml, dreambooth.class_prompt: {error} (or set "
            "dreambooth.prior_preservation: false)",
            allow_retries=False,
        ) from error


def class_images_dir(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, STAGE)


def not_needed_reason(context: AssetExecutionContext, settings: DatasetSettings, dataset: str) -> str | None:
    """Why this dataset needs no class images (None: it does); logged."""
    if not method_listed(context, settings, dataset, METHOD):
        return f"dataset {dataset!r} does not train {METHOD}"
    if not settings.dreambooth.prior_preservation or settings.dreambooth.prior_loss_weight == 0:
        reason = f"dataset {dataset!r} turns dreambooth prior preservation off: no class images needed"
        context.log.info(reason)
        return reason
    return None


@asset(
    partitions_def=datasets_partitions,
    deps=[settings_assets["preprocess"], settings_assets["training"], settings_assets["dreambooth"]],
    group_name="training",
    code_version="1",
    **gpu_step(),
    kinds={"pytorch"},
    description="DreamBooth's class images: dreambooth.num_class_images pictures of dreambooth.class_prompt "
    "sampled by the base model at the training resolution, one seed each, cached by content key (only missing "
    "images are rendered). Only for datasets that list dreambooth with prior preservation. On demand.",
)
def class_images(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset)
    reason = not_needed_reason(context, settings, dataset)
    if reason is not None:
        return MaterializeResult(metadata={"images": 0, "skipped": reason}, data_version=NOT_NEEDED)
    spec = class_image_spec(settings, dataset)
    base = base_model.load(device)
    every = max(1, spec.count // 10)

    def progress(done: int, total: int) -> None:
        if done % every == 0 or done == total:
            context.log.info(f"class image {done}/{total} rendered")

    try:
        result = generate_class_images(base, spec, class_images_dir(paths, dataset), progress=progress)
    except ValueError as error:
        raise Failure(description=f"class_images for {dataset!r}: {error}", allow_retries=False) from error
    context.log.info(f"{len(result.paths)} class images of {spec.prompt!r}: {result.rendered} rendered, "
                     f"{result.reused} reused, {len(result.removed)} of an earlier key removed")
    metadata = {
        "images": len(result.paths),
        "processed": result.rendered,
        "reused": result.reused,
        "skipped": 0,
        "removed": len(result.removed),
        "class_prompt": spec.prompt,
        "size": spec.size,
        "key": result.key,
        "folder": MetadataValue.path(str(class_images_dir(paths, dataset))),
    }
    for index, path in enumerate(result.paths[:INLINED_IMAGES]):
        metadata[f"class_image_{index}"] = image_md(path, max_side=256, caption=path.name)
    # Names carry the content key and the seed, so they identify the images.
    return MaterializeResult(metadata=metadata, data_version=DataVersion(json_sha256([p.name for p in result.paths])))
