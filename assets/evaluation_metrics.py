"""`evaluation_metrics`: one row per saved checkpoint (training and validation loss, CLIP similarities of its
grid cells), the checkpoint to keep copied to `best/`, and the seeds' rules as asset checks."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.dataset_settings import EvaluationSettings
from assets.evaluation_grid import CELLS_TABLE, METHOD, STAGE as GRID_STAGE, evaluation_grid, saved_checkpoints
from assets.metadata import image_md, require_file, settings_for, table_md
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.textual_inversion import STAGE as TRAINING_STAGE, read_training_run, textual_inversion, training_examples
from common.atomic import atomic_path, write_parquet, write_text
from common.hashing import file_sha256
from resources import ProjectPaths, TorchDevice
from resources.paths import resolve
from training.checkpoint_selection import best_row, interval_means, overfitting_run
from training.loss_checks import rounds_without_improvement
from training.plots import plot_metrics
from training.templates import NAME_KEYWORD

STAGE = "evaluation_metrics"
METRICS_TABLE = "metrics.parquet"
BEST_DIR = "best"


def _validation_losses(run: dict, steps: list[int]) -> list[float]:
    """The held-out loss the training wrote at each checkpoint (`validation.csv`); NaN where there was none."""
    path = run["files"].get("validation_csv")
    if not path or not Path(path).is_file():
        return [float("nan")] * len(steps)
    by_step = dict(pd.read_csv(path)[["step", "validation_loss"]].itertuples(index=False))
    return [float(by_step.get(step, float("nan"))) for step in steps]


def clip_scores(
    settings: EvaluationSettings, cells: pd.DataFrame, references: list[Path], device: TorchDevice
) -> pd.DataFrame:
    """Per step: mean CLIP similarity of its cells to the training images, and of each cell to its prompt
    without [name] (does the embedding still obey the rest of the prompt?). Empty when no model is set."""
    if not settings.clip_model:
        return pd.DataFrame(columns=["step", "clip_image_similarity", "clip_text_similarity"])
    from training.clip_scores import ClipScorer, prompt_without_name

    scorer = ClipScorer.load(resolve(settings.clip_model), device.torch_device())
    images = [Path(path) for path in cells["image"]]
    rest = [prompt_without_name(prompt, NAME_KEYWORD) for prompt in cells["prompt"]]
    scored = cells.assign(
        clip_image_similarity=scorer.image_similarity(images, references).tolist(), rest=rest, clip_text_similarity=np.nan
    )
    with_rest = [index for index, text in enumerate(rest) if text]  # a prompt that is only [name] asks nothing else
    if with_rest:
        texts = scorer.text_similarity([images[i] for i in with_rest], [rest[i] for i in with_rest])
        scored.loc[scored.index[with_rest], "clip_text_similarity"] = texts.tolist()
    with_name = scored[scored["prompt"].str.contains(NAME_KEYWORD, regex=False)]
    image = with_name.groupby("step")["clip_image_similarity"].mean()
    text = scored.groupby("step")["clip_text_similarity"].mean()
    return pd.DataFrame({"clip_image_similarity": image, "clip_text_similarity": text}).reset_index()


def metrics_table(run: dict, clip: pd.DataFrame) -> pd.DataFrame:
    checkpoints = saved_checkpoints(run)
    steps = [step for _, step in checkpoints]
    frame = pd.DataFrame({
        "method": METHOD, "step": steps, "checkpoint": [str(c.path) for c in checkpoints.values()],
        "final": [c.final for c in checkpoints.values()],
        "training_loss": interval_means(Path(run["files"]["loss_csv"]), steps),
        "validation_loss": _validation_losses(run, steps),
    })  # fmt: skip
    frame = frame.merge(clip, on="step", how="left") if not clip.empty else frame.assign(
        clip_image_similarity=np.nan, clip_text_similarity=np.nan
    )
    best = best_row(frame)
    frame["best"] = [index == best for index in range(len(frame))]
    return frame


def keep_best(paths: ProjectPaths, dataset: str, run: dict, best: pd.Series) -> dict[str, Path]:
    """The best checkpoint's files as `best/<name>.pt` and `best/learned_embeds.safetensors` beside the final
    ones (the name is kept: the webui names an embedding after its file)."""
    out = paths.output_dir(dataset, TRAINING_STAGE) / BEST_DIR
    diffusers = Path(best["checkpoint"])
    webui = diffusers.with_suffix(".pt") if not best["final"] else Path(run["files"]["webui_pt"])
    files = {"webui_pt": out / f"{run['name']}.pt", "diffusers": out / "learned_embeds.safetensors"}
    for source, target in ((webui, files["webui_pt"]), (diffusers, files["diffusers"])):
        if not source.is_file():
            raise Failure(description=f"{source}: the best checkpoint (step {best['step']}) no longer exists")
        with atomic_path(target) as partial:
            shutil.copyfile(source, partial)
    files["choice"] = write_text(out / "best.json", json.dumps({"step": int(best["step"]), "source": str(diffusers)}))
    return files


def metric_checks(frame: pd.DataFrame, settings: EvaluationSettings) -> list[AssetCheckResult]:
    numbers = frame[["training_loss", "validation_loss"]]
    finite = not np.isinf(numbers.to_numpy(dtype=float)).any() and not numbers["training_loss"].isna().any()
    has_validation = frame["validation_loss"].notna().any()
    watched = frame["validation_loss"] if has_validation else frame["training_loss"]
    stalled = rounds_without_improvement(watched.dropna().tolist(), 1)  # a round = one checkpoint
    rising = overfitting_run(frame["training_loss"].tolist(), frame["validation_loss"].tolist()) if has_validation else 0
    best = frame.loc[frame["best"]].iloc[0]
    return [
        AssetCheckResult(check_name="metrics_are_finite", passed=bool(finite),
                         description="a NaN or infinite loss means the run diverged"),
        AssetCheckResult(
            check_name="validation_still_improving",
            passed=stalled < settings.patience_evaluations,
            severity=AssetCheckSeverity.WARN,
            metadata={"evaluations_without_improvement": stalled, "watched": watched.name,
                      "patience_evaluations": settings.patience_evaluations},
        ),  # fmt: skip
        AssetCheckResult(
            check_name="not_overfitting",
            passed=rising < settings.overfitting_evaluations,
            severity=AssetCheckSeverity.WARN,
            metadata={"evaluations_rising": rising, "keep_checkpoint_step": int(best["step"]),
                      "keep_checkpoint": MetadataValue.path(str(best["checkpoint"]))},
            description=f"validation loss rising while training loss falls: keep step {int(best['step'])}"
            if rising >= settings.overfitting_evaluations else "no sustained rise of the validation loss",
        ),  # fmt: skip
    ]


@asset(
    partitions_def=datasets_partitions,
    deps=[evaluation_grid, textual_inversion, settings_assets["evaluation"]],
    group_name="evaluation",
    code_version="1",
    **gpu_step(),
    kinds={"pytorch", "parquet"},
    check_specs=[
        AssetCheckSpec("metrics_are_finite", asset=STAGE, description="NaN/inf in a checkpoint's loss fails"),
        AssetCheckSpec("validation_still_improving", asset=STAGE,
                       description="seeds' rule: no improvement for patience_evaluations checkpoints, stop"),
        AssetCheckSpec("not_overfitting", asset=STAGE, description="validation loss rising while training loss "
                       "falls for overfitting_evaluations checkpoints: go back to the best one"),
    ],  # fmt: skip
    description="Per checkpoint: training and validation loss, CLIP similarities (when evaluation.clip_model is "
    "set); the best checkpoint copied to best/ beside the final files; metrics.parquet and metrics.png.",
)
def evaluation_metrics(context: AssetExecutionContext, paths: ProjectPaths, device: TorchDevice) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset).evaluation
    run = read_training_run(paths, dataset)
    cells = pd.read_parquet(require_file(paths.output_dir(dataset, GRID_STAGE) / CELLS_TABLE, GRID_STAGE))
    references = [example.image_path for example in training_examples(paths, dataset)]
    try:
        clip = clip_scores(settings, cells, references, device)
    except (OSError, ValueError) as error:
        raise Failure(description=f"evaluation.clip_model for {dataset!r}: {error}", allow_retries=False) from error
    frame = metrics_table(run, clip)
    out_dir = paths.output_dir(dataset, STAGE)
    table_path = write_parquet(out_dir / METRICS_TABLE, frame)
    best = frame.loc[frame["best"]].iloc[0]
    chart = plot_metrics(frame, out_dir / "metrics.png", f"{run['name']}: checkpoints", int(best["step"]))
    kept = keep_best(paths, dataset, run, best)
    context.log.info(f"best checkpoint of {run['name']!r}: step {int(best['step'])} -> {kept['webui_pt'].parent}")
    return MaterializeResult(
        metadata={
            "checkpoints": len(frame),
            "best_step": int(best["step"]),
            "best_checkpoint": MetadataValue.path(str(kept["webui_pt"])),
            "best_validation_loss": float(best["validation_loss"]),
            "clip_model": settings.clip_model or "(none)",
            "metrics": table_md(frame.drop(columns=["checkpoint", "method"]).round(5), rows=50),
            "metrics_chart": image_md(chart, caption="loss and CLIP similarity per checkpoint"),
            "metrics_table": MetadataValue.path(str(table_path)),
            "dagster/row_count": len(frame),
        },
        data_version=DataVersion(file_sha256(table_path)),
        check_results=metric_checks(frame, settings),
    )
