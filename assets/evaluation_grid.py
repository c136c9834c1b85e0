"""`evaluation_grid`: the trained checkpoints rendered over prompts, seeds and settings in one X/Y/Z grid PNG.

Cells come from a content-addressed cache, so changing one axis value (or adding a checkpoint) renders only
the new cells; `cells.parquet` lists every cell with its coordinates for the metrics that score them.
"""


import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
from dagster import AssetExecutionContext, DataVersion, Failure, MaterializeResult, MetadataValue, asset

from assets.aesthetic_embedding import aesthetic_embedding_path, aesthetic_options
from assets.dataset_settings import DatasetSettings, EvaluationSettings
from assets.metadata import image_md, settings_for
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.trained_methods import METHOD_ASSETS, TRAINED_METHODS, grid_file, trained_runs
from common.atomic import write_parquet
from common.hashing import file_sha256, json_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from resources.paths import resolve
from training.evaluation import GridResult, RenderSettings, build_pipeline, render_xyz_grid
from training.templates import NAME_KEYWORD, evaluation_prompts, read_prompt_file, render_prompt
from training.xyz_grid import FINAL_STEP, Checkpoint, GridPlan

STAGE = "evaluation_grid"
CELLS_TABLE = "cells.parquet"


def saved_checkpoints(run: dict, method: str) -> dict[tuple[str, int], Checkpoint]:
    """Every checkpoint a training run wrote (from its run file), the final one marked; by (method, step)."""
    kind = TRAINED_METHODS[method].evaluated_file
    found = {}
    for key, path in run["files"].items():
        match = re.fullmatch(rf"checkpoint_(\d+)_{kind}", key)
        if match:
            step = int(match.group(1))
            found[(method, step)] = Checkpoint(method, step, Path(path), run["name"])
    final = int(run["steps"])
    found[(method, final)] = Checkpoint(method, final, Path(run["files"][kind]), run["name"], final=True)
    return dict(sorted(found.items()))


def evaluation_prompt_list(settings: EvaluationSettings, dataset_dir: Path, template: str) -> list[str]:
    """The dataset's prompts, then its prompt file's; neither: the defaults for the training template's kind."""
    prompts = list(settings.prompts)
    if settings.prompts_file:
        prompts += read_prompt_file(dataset_dir / settings.prompts_file)
    return list(dict.fromkeys(prompts)) or list(evaluation_prompts(template))


def checkpoint_steps(settings: EvaluationSettings, checkpoints: dict[tuple[str, int], Checkpoint], method: str) -> tuple[int, ...]:
    """The steps to evaluate; a requested step that was never saved (or was deleted) is named in the error."""
    saved = sorted(step for owner, step in checkpoints if owner == method)
    if settings.checkpoints == "all":
        return tuple(saved)
    if settings.checkpoints == "final":
        return (max(saved),)
    unknown = [step for step in settings.checkpoints if step not in saved]
    if unknown:
        raise ValueError(
            f"evaluation checkpoint step {unknown[0]} of {method} does not exist (saved: {', '.join(map(str, saved))})"
        )
    return tuple(settings.checkpoints)


def grid_plan(
    settings: EvaluationSettings, prompts: list[str], checkpoints: dict[tuple[str, int], Checkpoint], method: str
) -> GridPlan:
    """One method's grid: each trained method gets its own, since their checkpoint steps differ."""
    return GridPlan(
        x=settings.x_axis,
        y=settings.y_axis,
        z=None if settings.z_axis == "none" else settings.z_axis,
        values={
            "checkpoint": checkpoint_steps(settings, checkpoints, method), "prompt": tuple(prompts),
            "seed": settings.seeds, "cfg_scale": settings.cfg_scale, "steps": settings.steps,
            "strength": settings.strength, "method": (method,),
        },  # fmt: skip
        checkpoints=checkpoints,
    )


def comparison_plan(settings: EvaluationSettings, prompts: list[str], runs: dict[str, dict]) -> GridPlan:
    """With `method` on an axis: one grid of every trained method's final checkpoint side by side."""
    if settings.checkpoints != "final":
        raise ValueError("with method on an axis, set checkpoints: final (the methods save different steps); "
                         "per-method grids over their checkpoints come without a method axis")  # fmt: skip
    finals = {}
    for method, run in runs.items():
        final = next(checkpoint for checkpoint in saved_checkpoints(run, method).values() if checkpoint.final)
        finals[(method, FINAL_STEP)] = final
    return GridPlan(
        x=settings.x_axis, y=settings.y_axis, z=None if settings.z_axis == "none" else settings.z_axis,
        values={"checkpoint": (FINAL_STEP,), "prompt": tuple(prompts), "seed": settings.seeds,
                "cfg_scale": settings.cfg_scale, "steps": settings.steps, "strength": settings.strength,
                "method": tuple(runs)},
        checkpoints=finals,
    )  # fmt: skip


def grid_plans(settings: EvaluationSettings, prompts: list[str], runs: dict[str, dict]) -> dict[str, GridPlan]:
    """One grid per trained method over its checkpoints, or with `method` on an axis one comparison grid."""
    if "method" in (settings.x_axis, settings.y_axis, settings.z_axis):
        return {"methods": comparison_plan(settings, prompts, runs)}
    return {method: grid_plan(settings, prompts, saved_checkpoints(run, method), method) for method, run in runs.items()}


def cells_table(result: GridResult) -> pd.DataFrame:
    """One row per cell of the grid: its coordinates, its files and whether it was rendered now or reused."""
    rows = []
    for item, path in zip(result.cells, result.cell_files):
        spec = item.spec
        rows.append({
            "method": spec.method, "step": spec.checkpoint.step, "final": spec.checkpoint.final,
            "checkpoint": str(spec.checkpoint.path), "name": spec.checkpoint.name, "prompt": spec.prompt,
            "prompt_text": render_prompt(spec.prompt, spec.checkpoint.name, ""), "seed": spec.seed,
            "cfg_scale": spec.cfg_scale, "steps": spec.steps, "strength": spec.strength, "image": str(path),
            "cache_key": item.key, "rendered": item.rendered,
        })  # fmt: skip
    return pd.DataFrame(rows)


def with_aesthetic(
    render: RenderSettings, settings: DatasetSettings, paths: ProjectPaths, dataset: str, device: TorchDevice
) -> RenderSettings:
    """The render settings with the dataset's aesthetic embedding applied as the extension applies it."""
    from training.aesthetic import AestheticGradients
    from training.clip_scores import ClipScorer

    path = aesthetic_embedding_path(paths, dataset)
    if not settings.aesthetic.clip_model or not path.is_file():
        raise Failure(
            description=f"evaluation.aesthetic is on but {path} does not exist: set aesthetic.clip_model and "
            "materialize `aesthetic_embedding` for this dataset first", allow_retries=False,
        )  # fmt: skip
    options = aesthetic_options(settings.aesthetic)
    try:
        scorer = ClipScorer.load(resolve(settings.aesthetic.clip_model), device.torch_device())
    except ValueError as error:  # a missing or foreign model folder: named, and not worth a retry
        raise Failure(description=f"datasets/{dataset}/dataset.yaml, aesthetic.clip_model: {error}", allow_retries=False) from error
    key = json_sha256({"file": file_sha256(path), "options": vars(options)})
    return replace(render, aesthetic=AestheticGradients.load(scorer, path, options), aesthetic_key=key)


@asset(
    partitions_def=datasets_partitions,
    deps=[*METHOD_ASSETS, settings_assets["evaluation"]],
    group_name="evaluation",
    code_version="3",
    **gpu_step(),
    kinds={"pytorch"},
    description="Per trained method (training.methods), an X/Y/Z grid PNG (default: checkpoints x prompts x "
    "seeds, [name] = the trained name) with labelled axes and a legend of the fixed settings, each cell beside "
    "it, and cells.parquet over all methods.",
)
def evaluation_grid(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    dataset = context.partition_key
    all_settings = settings_for(paths, dataset)
    settings = all_settings.evaluation
    runs = trained_runs(paths, dataset, all_settings)
    try:
        prompts = evaluation_prompt_list(settings, paths.dataset_dir(dataset), all_settings.training.template)
        plans = grid_plans(settings, prompts, runs)
    except ValueError as error:
        raise Failure(description=f"datasets/{dataset}/dataset.yaml, evaluation section: {error}", allow_retries=False) from error
    for prompt in prompts:
        if NAME_KEYWORD not in prompt:
            context.log.warning(f"evaluation prompt {prompt!r} has no {NAME_KEYWORD}: its cells do not use the embedding")
    base = base_model.load(device)
    pipeline = build_pipeline(base, settings.sampler)
    out_dir = paths.output_dir(dataset, STAGE)
    tables, grids = [], {}
    for method, plan in plans.items():
        run = runs.get(method, next(iter(runs.values())))  # the comparison grid: every method shares the training
        render = RenderSettings(settings.sampler, settings.negative_prompt, run["clip_skip"], base.fingerprint)
        if settings.aesthetic:
            render = with_aesthetic(render, all_settings, paths, dataset, device)
        title = f"{run['name']} - {method} - {base.name} [{base.short_hash}]"
        try:
            result = render_xyz_grid(
                pipeline, plan, render, grid_file(out_dir, run["name"], method),
                paths.data_root() / "cache" / "evaluation_cells", title=title, cell_size=settings.cell_size or None,
            )  # fmt: skip
        except ValueError as error:
            raise Failure(description=f"evaluation_grid for {dataset!r}: {error}", allow_retries=False) from error
        tables.append(cells_table(result))
        grids[method] = result.path
    table = pd.concat(tables, ignore_index=True)
    write_parquet(out_dir / CELLS_TABLE, table)
    rendered = int(table["rendered"].sum())
    context.log.info(f"{rendered} cells rendered, {len(table) - rendered} reused from the cache: "
                     f"{', '.join(map(str, grids.values()))}")  # fmt: skip
    first = next(iter(plans.values()))
    captions = {method: "evaluation grid" if index == 0 else f"evaluation grid: {method}"
                for index, method in enumerate(grids)}  # fmt: skip
    grid_images = {("grid" if index == 0 else f"grid_{method}"): image_md(path, max_side=768, caption=captions[method])
                   for index, (method, path) in enumerate(grids.items())}  # fmt: skip
    return MaterializeResult(
        metadata={
            "processed": rendered,
            "reused": len(table) - rendered,
            "skipped": 0,
            "cells": len(table),
            "methods": ", ".join(grids),
            "axes": f"x={first.x}, y={first.y}, z={first.z or 'none'}",
            "checkpoints": "; ".join(f"{method}: {', '.join(str(step) for step in plan.values['checkpoint'])}"
                                     for method, plan in plans.items()),  # fmt: skip
            "prompts_without_name": sum(NAME_KEYWORD not in prompt for prompt in prompts),
            **grid_images,
            "grid_path": MetadataValue.path(str(next(iter(grids.values())))),
            "cells_table": MetadataValue.path(str(out_dir / CELLS_TABLE)),
            "sampler": settings.sampler,
        },
        data_version=DataVersion(json_sha256({method: file_sha256(path) for method, path in grids.items()})),
    )
