"""`evaluation_grid`: images generated with the trained embedding, prompts x seeds, in one labelled grid."""


from pathlib import Path

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from assets.metadata import image_md, settings_for
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.textual_inversion import read_training_run, textual_inversion
from common.hashing import file_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from training.evaluation import build_pipeline, render_grid

STAGE = "evaluation_grid"


@asset(
    partitions_def=datasets_partitions,
    deps=[textual_inversion, settings_assets["evaluation"]],
    group_name="evaluation",
    code_version="1",
    **gpu_step(),
    kinds={"pytorch"},
    description="A grid PNG of the evaluation prompts ([name] = the embedding) x fixed seeds, and each cell.",
)
def evaluation_grid(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset).evaluation
    run = read_training_run(paths, dataset)
    base = base_model.load(device)
    pipeline = build_pipeline(base, settings.sampler)
    out_path = paths.output_dir(dataset, STAGE) / f"{run['name']}_grid.png"
    render_grid(
        pipeline,
        Path(run["files"]["diffusers"]),
        settings.prompts,
        settings.seeds,
        out_path,
        name=run["name"],
        steps=settings.steps,
        cfg_scale=settings.cfg_scale,
        negative_prompt=settings.negative_prompt,
        clip_skip=run["clip_skip"],
    )
    cells = len(settings.prompts) * len(settings.seeds)
    context.log.info(f"rendered {cells} images into {out_path}")
    return MaterializeResult(
        metadata={
            "processed": cells,
            "reused": 0,
            "skipped": 0,
            "grid": image_md(out_path, max_side=768, caption="evaluation grid"),
            "grid_path": MetadataValue.path(str(out_path)),
            "sampler": settings.sampler,
            "steps": settings.steps,
            "cfg_scale": settings.cfg_scale,
        },
        data_version=DataVersion(file_sha256(out_path)),
    )
