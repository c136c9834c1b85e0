"""`class_images`: the base model's pictures of the class ("a photo of a dog") that DreamBooth's prior
preservation trains against, sampled once and cached by content key (training/class_images.py).

Its own asset because sampling 50-200 images is the slow part of a DreamBooth run and depends on neither the
training images nor the training settings: retraining reuses them. Skipped (not failed) for datasets that do
not list dreambooth in training.methods or turn prior preservation off.
"""

from collections.abc import Iterator
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


def prior_preservation_wanted(context: AssetExecutionContext, paths: ProjectPaths, dataset: str) -> bool:
    """Whether this dataset trains DreamBooth with prior preservation; logs why not."""
    if not method_listed(context, paths, dataset, METHOD):
        return False
    if not settings_for(paths, dataset).dreambooth.prior_preservation:
        context.log.info(f"dataset {dataset!r} turns dreambooth.prior_preservation off: no class images needed")
        return False
    return True


@asset(
    partitions_def=datasets_partitions,
    deps=[settings_assets["preprocess"], settings_assets["training"], settings_assets["dreambooth"]],
    group_name="training",
    code_version="1",
    **gpu_step(),
    kinds={"pytorch"},
    output_required=False,
    description="DreamBooth's class images: dreambooth.num_class_images pictures of dreambooth.class_prompt "
    "sampled by the base model at the training resolution, one seed each, cached by content key (only missing "
    "images are rendered). Only for datasets that list dreambooth with prior preservation. On demand.",
)
def class_images(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> Iterator[MaterializeResult]:
    dataset = context.partition_key
    if not prior_preservation_wanted(context, paths, dataset):
        return
    settings = settings_for(paths, dataset)
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
    yield MaterializeResult(metadata=metadata, data_version=DataVersion(json_sha256([p.name for p in result.paths])))
