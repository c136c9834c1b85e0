"""`evaluation_metrics`: one row per saved checkpoint (training and validation loss, CLIP similarities of its
grid cells, the tagger's concept tag score), the checkpoint to keep copied to `best/`, and the seeds' rules as
asset checks."""

import json
import re
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

from assets.concept_scores import ConceptScores, checkpoint_concept_scores, concept_metadata
from assets.dataset_settings import DatasetSettings, EvaluationSettings
from assets.evaluation_grid import CELLS_TABLE, STAGE as GRID_STAGE, evaluation_grid, saved_checkpoints
from assets.metadata import image_md, require_file, settings_for, table_md
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.training_examples import training_examples
from assets.trained_methods import METHOD_ASSETS, TRAINED_METHODS, trained_runs
from common.atomic import atomic_path, write_parquet, write_text
from common.hashing import file_sha256
from resources import ProjectPaths, TaggerResource, TorchDevice
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
    """Per method and step: mean CLIP similarity of its cells to the training images, and of each cell to its
    prompt without [name] (does the result still obey the rest of the prompt?). Empty when no model is set."""
    if not settings.clip_model:
        return pd.DataFrame(columns=["method", "step", "clip_image_similarity", "clip_text_similarity"])
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
    image = with_name.groupby(["method", "step"])["clip_image_similarity"].mean()
    text = scored.groupby(["method", "step"])["clip_text_similarity"].mean()
    return pd.DataFrame({"clip_image_similarity": image, "clip_text_similarity": text}).reset_index()


def metrics_table(run: dict, clip: pd.DataFrame, method: str, concept: pd.DataFrame | None = None) -> pd.DataFrame:
    """One method's checkpoints with their losses, CLIP scores and (when measured) concept tag score; the best
    one flagged."""
    checkpoints = saved_checkpoints(run, method)
    steps = [step for _, step in checkpoints]
    frame = pd.DataFrame({
        "method": method, "step": steps, "checkpoint": [str(c.path) for c in checkpoints.values()],
        "final": [c.final for c in checkpoints.values()],
        "training_loss": interval_means(Path(run["files"]["loss_csv"]), steps),
        "validation_loss": _validation_losses(run, steps),
    })  # fmt: skip
    frame = frame.merge(clip, on=["method", "step"], how="left") if not clip.empty else frame.assign(
        clip_image_similarity=np.nan, clip_text_similarity=np.nan
    )
    if concept is not None:
        frame = frame.merge(concept, on=["method", "step"], how="left")
    best = best_row(frame)
    frame["best"] = [index == best for index in range(len(frame))]
    return frame


def keep_best(paths: ProjectPaths, dataset: str, method: str, run: dict, best: pd.Series) -> dict[str, Path]:
    """The best checkpoint's files under `<method>/best/`, named as the final ones (the webui names an
    embedding after its file, so `best/<name>.pt` keeps the trigger word), and `best/best.json`."""
    out = paths.output_dir(dataset, method) / BEST_DIR
    step, final, evaluated = int(best["step"]), bool(best["final"]), TRAINED_METHODS[method].evaluated_file
    kinds = {match.group(1) for key in run["files"] if (match := re.fullmatch(r"checkpoint_\d+_(.+)", key))}
    kinds = sorted((kinds | {evaluated}) & set(run["files"]) if final else kinds | {evaluated})
    files = {}
    for kind in kinds:
        source = Path(run["files"][kind] if final else run["files"].get(f"checkpoint_{step}_{kind}", ""))
        if not source.is_file():
            raise Failure(description=f"{source}: the best {method} checkpoint (step {step}) no longer exists")
        files[kind] = out / Path(run["files"][kind]).name
        with atomic_path(files[kind]) as partial:
            shutil.copyfile(source, partial)
    files["choice"] = write_text(out / "best.json", json.dumps({"step": step, "source": str(best["checkpoint"])}))
    return files


def _trends(frame: pd.DataFrame) -> tuple[int, int, str]:
    """One method's checkpoints: (evaluations without improvement, evaluations of rising validation loss while the
    training loss fell, the loss watched)."""
    has_validation = frame["validation_loss"].notna().any()
    watched = frame["validation_loss"] if has_validation else frame["training_loss"]
    stalled = rounds_without_improvement(watched.dropna().tolist(), 1)  # a round = one checkpoint
    rising = overfitting_run(frame["training_loss"].tolist(), frame["validation_loss"].tolist()) if has_validation else 0
    return stalled, rising, str(watched.name)


def metric_checks(frame: pd.DataFrame, settings: EvaluationSettings) -> list[AssetCheckResult]:
    """Over every trained method: the worst method decides (a warning names the step to keep of the first)."""
    numbers = frame[["training_loss", "validation_loss"]]
    finite = not np.isinf(numbers.to_numpy(dtype=float)).any() and not numbers["training_loss"].isna().any()
    trends = {method: _trends(rows) for method, rows in frame.groupby("method", sort=False)}
    stalled_method = max(trends, key=lambda method: trends[method][0])
    rising_method = max(trends, key=lambda method: trends[method][1])
    stalled, _, watched = trends[stalled_method]
    rising = trends[rising_method][1]
    best = frame.loc[frame["best"] & (frame["method"] == rising_method)].iloc[0]
    return [
        AssetCheckResult(check_name="metrics_are_finite", passed=bool(finite),
                         description="a NaN or infinite loss means the run diverged"),
        AssetCheckResult(
            check_name="validation_still_improving",
            passed=stalled < settings.patience_evaluations,
            severity=AssetCheckSeverity.WARN,
            metadata={"evaluations_without_improvement": stalled, "watched": watched, "method": stalled_method,
                      "patience_evaluations": settings.patience_evaluations},
        ),  # fmt: skip
        AssetCheckResult(
            check_name="not_overfitting",
            passed=rising < settings.overfitting_evaluations,
            severity=AssetCheckSeverity.WARN,
            metadata={"evaluations_rising": rising, "method": rising_method, "keep_checkpoint_step": int(best["step"]),
                      "keep_checkpoint": MetadataValue.path(str(best["checkpoint"]))},
            description=f"validation loss rising while training loss falls: keep step {int(best['step'])}"
            if rising >= settings.overfitting_evaluations else "no sustained rise of the validation loss",
        ),  # fmt: skip
    ]


def _concept_scores(context: AssetExecutionContext, paths: ProjectPaths, dataset: str, settings: DatasetSettings,
                    cells: pd.DataFrame, references: list[Path], tagger: TaggerResource) -> ConceptScores | None:
    """The concept tag scores when evaluation.tagger_scores is on (None otherwise), with what a user should hear."""
    if not settings.evaluation.tagger_scores:
        return None
    concept = checkpoint_concept_scores(paths, dataset, settings, cells, references, tagger)
    context.log.info(f"concept tags of {dataset!r}: {', '.join(concept.tags) or '(none)'}; "
                     f"scored by {concept.tagger_dir}")
    if not concept.tags:
        context.log.warning(f"no tag reaches the caption thresholds in {settings.evaluation.concept_tag_fraction:.0%} "
                            f"of {dataset!r}'s training images: concept_tag_score is empty")  # fmt: skip
    if concept.mismatched_model:
        context.log.warning(f"{dataset!r}'s tag scores come from another tagger model than {concept.tagger_dir}: "
                            "materialize tag_scores again for concept tags of this model")  # fmt: skip
    return concept


@asset(
    partitions_def=datasets_partitions,
    deps=[evaluation_grid, *METHOD_ASSETS, settings_assets["evaluation"]],
    group_name="evaluation",
    code_version="2",
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
    "set), the tagger's concept tag score (when evaluation.tagger_scores is on); the best checkpoint copied to "
    "best/ beside the final files; metrics.parquet and metrics.png.",
)
def evaluation_metrics(context: AssetExecutionContext, paths: ProjectPaths, device: TorchDevice,
                       tagger: TaggerResource) -> MaterializeResult:
    dataset = context.partition_key
    all_settings = settings_for(paths, dataset)
    settings = all_settings.evaluation
    runs = trained_runs(paths, dataset, all_settings)
    cells = pd.read_parquet(require_file(paths.output_dir(dataset, GRID_STAGE) / CELLS_TABLE, GRID_STAGE))
    references = [example.image_path for example in training_examples(paths, dataset)]
    try:
        clip = clip_scores(settings, cells, references, device)
    except (OSError, ValueError) as error:
        raise Failure(description=f"evaluation.clip_model for {dataset!r}: {error}", allow_retries=False) from error
    concept = _concept_scores(context, paths, dataset, all_settings, cells, references, tagger)
    per_checkpoint = concept.per_checkpoint if concept else None
    frame = pd.concat([metrics_table(run, clip, method, per_checkpoint) for method, run in runs.items()],
                      ignore_index=True)
    out_dir = paths.output_dir(dataset, STAGE)
    table_path = write_parquet(out_dir / METRICS_TABLE, frame)
    first_method, first_run = next(iter(runs.items()))
    kept, bests = {}, {}
    for method, run in runs.items():
        best = frame.loc[frame["best"] & (frame["method"] == method)].iloc[0]
        bests[method] = best
        kept[method] = keep_best(paths, dataset, method, run, best)
        context.log.info(f"best {method} checkpoint of {run['name']!r}: step {int(best['step'])} -> "
                         f"{kept[method]['choice'].parent}")  # fmt: skip
    best = bests[first_method]
    chart = plot_metrics(frame[frame["method"] == first_method], out_dir / "metrics.png",
                         f"{first_run['name']}: {first_method} checkpoints", int(best["step"]))  # fmt: skip
    best_file = kept[first_method][TRAINED_METHODS[first_method].evaluated_file]
    return MaterializeResult(
        metadata={
            "checkpoints": len(frame),
            "best_step": int(best["step"]),
            "best_checkpoint": MetadataValue.path(str(kept[first_method].get("webui_pt", best_file))),
            "best_validation_loss": float(best["validation_loss"]),
            "best_steps": ", ".join(f"{method}: {int(row['step'])}" for method, row in bests.items()),
            "clip_model": settings.clip_model or "(none)",
            **(concept_metadata(frame, concept, list(runs)) if concept else {}),
            "metrics": table_md(frame.drop(columns=["checkpoint"]).round(5), rows=50),
            "metrics_chart": image_md(chart, caption="loss, CLIP similarity and concept tag score per checkpoint"),
            "metrics_table": MetadataValue.path(str(table_path)),
            "dagster/row_count": len(frame),
        },
        data_version=DataVersion(file_sha256(table_path)),
        check_results=metric_checks(frame, settings),
    )
