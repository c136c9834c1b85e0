"""What every training asset does around its method: settings from `training:`, the OOM retry, progress in
the run log, the run file the evaluation reads, and the metadata and loss checks the UI shows.

Kept apart from the method assets so that textual inversion, DreamArtist, hypernetworks, LoRA and DreamBooth
report the same things the same way.
"""

from __future__ import annotations

import json
import math
import re
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pandas as pd
import torch
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.dataset_settings import DatasetSettings, TrainingSettings
from assets.metadata import image_md, require_file, settings_for, table_md
from assets.method_selection import method_listed, not_trained
from assets.observations import settings_assets
from assets.oom_retry import run_with_oom_retry
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.prepared_images import prepared_images
from assets.tag_table import tag_table
from assets.training_examples import training_inputs
from common.atomic import write_text
from resources import ProjectPaths
from training.base_model import BaseModel
from training.loss_checks import final_smoothed_loss, rounds_without_improvement
from training.previews import PreviewSettings
from training.training_loop import Evaluation, LoopSettings, TrainingExample

RUN_FILE = "training_run.json"
MAX_PREVIEWS = 20  # previews inlined in the metadata (each is a small PNG in the event log)
S = TypeVar("S", bound=LoopSettings)


class TrainingOutcome(Protocol):
    """What the metadata reads from a method's result (TrainingResult, LoopResult and their kin)."""

    steps: int
    losses: list[float]
    files: dict[str, Path]
    resumed_from: int
    images_encoded: int
    validations: list[Evaluation]
    stopped_early_at: int | None


def loop_settings_values(training: TrainingSettings, dataset: str) -> dict[str, Any]:
    """The dataset.yaml `training:` section as the shared loop's settings; named after the dataset by default."""
    return dict(
        name=training.embedding_name or dataset,
        learning_rate=training.learning_rate,
        batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_steps=training.max_steps,
        template=training.template,
        seed=training.seed,
        clip_skip=training.clip_skip,
        save_every=training.save_embedding_every,
        shuffle_tags=training.shuffle_tags,
        tag_dropout=training.tag_drop_out,
        keep_tokens=training.keep_tokens,
        clip_grad_mode=training.clip_grad_mode,
        clip_grad_value=training.clip_grad_value,
        latent_sampling_method=training.latent_sampling_method,
        resume=training.resume,
        optimizer=training.optimizer,
        weight_decay=training.weight_decay,
        gradient_checkpointing=training.gradient_checkpointing,
        attention=training.attention,
        compile=training.compile,
        mixed_precision=training.mixed_precision,
        early_stopping_patience=training.early_stopping_patience,
        previews=PreviewSettings(
            every=training.create_image_every, prompt=training.preview_prompt,
            negative_prompt=training.preview_negative_prompt, seed=training.preview_seed,
            steps=training.preview_steps, cfg_scale=training.preview_cfg_scale, sampler=training.preview_sampler,
        ),
    )  # fmt: skip


def settings_or_failure(make: Callable[[], S], dataset: str, section: str = "training") -> S:
    """Build a method's settings; an invalid value fails the run once, naming the file and section."""
    try:
        return make()
    except ValueError as error:
        raise Failure(
            description=f"datasets/{dataset}/dataset.yaml, {section} section: {error}", allow_retries=False
        ) from error


def method_asset(
    stage: str, finite_check: str, description: str, extra_deps: Sequence[Any] = (), code_version: str = "1"
) -> Callable[[Callable[..., MaterializeResult]], AssetsDefinition]:
    """The decorator of every method asset: one partition per dataset, the prepared images, captions and the
    `training:` section (plus the method's own section, when it has one) upstream, pool `gpu`, the loss checks."""
    own = [settings_assets[stage]] if stage in settings_assets else []
    return asset(
        name=stage, partitions_def=datasets_partitions,
        deps=[prepared_images, tag_table, *extra_deps, settings_assets["training"], *own], group_name="training",
        code_version=code_version, **gpu_step(), kinds={"pytorch"},
        check_specs=loss_check_specs(stage, finite_check), description=description,
    )  # fmt: skip


@dataclass(frozen=True)
class MethodInputs:
    """What a method asset trains from, once the dataset is known to list the method."""

    dataset: str
    settings: DatasetSettings
    examples: list[TrainingExample]
    held_out: list[TrainingExample]  # the validation split


def method_inputs(context: AssetExecutionContext, paths: ProjectPaths, stage: str) -> MethodInputs | MaterializeResult:
    """The dataset's settings and examples; for a dataset that does not list the method, the not-trained record
    the asset returns as it is."""
    dataset = context.partition_key
    settings = settings_for(paths, dataset)
    if not method_listed(context, settings, dataset, stage):
        return not_trained(settings, dataset, stage, tuple(spec.name for spec in context.assets_def.check_specs))
    examples, held_out = training_inputs(paths, dataset)
    return MethodInputs(dataset, settings, examples, held_out)


def loss_check_specs(asset_name: str, finite_check: str) -> list[AssetCheckSpec]:
    """The checks every training asset carries: finite weights and the seeds' two rules about the loss."""
    return [
        AssetCheckSpec(finite_check, asset=asset_name, description="no NaN or inf in the trained weights"),
        AssetCheckSpec(
            "final_loss_is_low", asset=asset_name,
            description="seeds' rule: a final smoothed loss above loss_warning_threshold (0.3) gives poor results",
        ),
        AssetCheckSpec(
            "loss_still_falling", asset=asset_name,
            description="seeds' rule: if the loss has not decreased for loss_patience_rounds (10) rounds, stop",
        ),
    ]  # fmt: skip


@dataclass(frozen=True)
class TrainedRun:
    """One finished training as the asset saw it."""

    result: Any  # the method's result (a TrainingOutcome)
    batch_size: int
    accumulation: int
    elapsed: float  # seconds
    settings: LoopSettings
    peak_rss_growth_mib: float = math.nan  # growth of the process's peak RSS during training (CPU memory)
    peak_cuda_mib: float | None = None  # torch's peak allocated CUDA memory during training, on a GPU


def train_in_asset(
    context: AssetExecutionContext, dataset: str, settings: S, base: BaseModel, train: Callable[[S], Any]
) -> TrainedRun:
    """`train(settings)` with one retry at half the batch after a CUDA OOM.

    A ValueError is a setting or input that cannot train (its message names the file or key): not retried.
    """
    def attempt(batch_size: int, accumulation: int) -> Any:
        return train(replace(settings, batch_size=batch_size, gradient_accumulation_steps=accumulation))

    started, rss_before = time.perf_counter(), _peak_rss_mib()
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
    try:
        result, (batch_size, accumulation) = run_with_oom_retry(
            attempt, settings.batch_size, settings.gradient_accumulation_steps, context.log
        )
    except ValueError as error:
        raise Failure(description=f"{context.asset_key.to_user_string()} for {dataset!r}: {error}",
                      allow_retries=False) from error  # fmt: skip
    if result.resumed_from:
        context.log.info(f"resumed {settings.name!r} from its saved state at step {result.resumed_from}")
    cuda = torch.cuda.max_memory_allocated(base.device) / 2**20 if base.device.type == "cuda" else None
    return TrainedRun(result, batch_size, accumulation, time.perf_counter() - started, settings,
                      _peak_rss_mib() - rss_before, cuda)  # fmt: skip


def _peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def progress_logger(context: AssetExecutionContext, max_steps: int) -> Callable[[int, float], None]:
    """Ten progress lines per run in the Dagster log, and the last step."""
    every = max(1, max_steps // 10)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == max_steps:
            context.log.info(f"step {step}/{max_steps} loss {loss:.5f}")

    return progress


def write_run_file(
    out_dir: Path, method: str, name: str, result: TrainingOutcome, clip_skip: int, base: BaseModel, **extra: Any
) -> dict[str, str]:
    """What the evaluation reads: the name, the files (checkpoints and final), the clip skip, the base model,
    and what a method adds (`extra`). Returns the files as text, for the metadata."""
    files = {key: str(path) for key, path in result.files.items()}
    write_text(out_dir / RUN_FILE, json.dumps({
        "method": method, "name": name, "steps": result.steps, "clip_skip": clip_skip, "files": files, "base_model": str(base.source),
        "sd_checkpoint": base.short_hash, "stopped_early_at": result.stopped_early_at, **extra,
    }, indent=2))  # fmt: skip
    return files


def read_run_file(paths: ProjectPaths, dataset: str, stage: str) -> dict:
    return json.loads(require_file(paths.output_dir(dataset, stage) / RUN_FILE, stage).read_text(encoding="utf-8"))


def run_metadata(run: TrainedRun, base: BaseModel, images: int, validation_images: int,
                 continued_from: int = 0) -> dict[str, Any]:  # fmt: skip
    """Speed, batch, cache use, the loss summary, the loss curve, validation and the latest previews."""
    result, settings = run.result, run.settings
    tail = result.losses[-10:]
    trained_steps = result.steps - max(result.resumed_from, continued_from)
    metadata: dict[str, Any] = {
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "steps_per_second": trained_steps / run.elapsed if run.elapsed > 0 else math.nan,
        "device": f"{base.device} ({str(base.dtype).removeprefix('torch.')})",
        "images": images,
        "batch_size": run.batch_size,
        "gradient_accumulation_steps": run.accumulation,
        "oom_retried": (run.batch_size, run.accumulation) != (settings.batch_size, settings.gradient_accumulation_steps),
        "processed": result.images_encoded,
        "reused": images + validation_images - result.images_encoded,
        "skipped": 0,
        "peak_rss_growth_mib": run.peak_rss_growth_mib,
        **({"peak_cuda_memory_mib": run.peak_cuda_mib} if run.peak_cuda_mib is not None else {}),
        "final_loss_mean_10": float(sum(tail) / len(tail)) if tail else math.nan,
        "final_loss_smoothed": final_smoothed_loss(result.losses),
        "loss_csv": MetadataValue.path(str(result.files["loss_csv"])),
        **evaluation_metadata(result, validation_images),
    }
    if "loss_png" in result.files:
        metadata["loss_curve"] = image_md(Path(result.files["loss_png"]), caption="training loss and learning rate")
    metadata.update(preview_metadata(result.files))
    return metadata


def evaluation_metadata(result: TrainingOutcome, validation_images: int) -> dict[str, object]:
    """The held-out set, the latest validation loss and whether early stopping ended the run."""
    metadata: dict[str, object] = {
        "validation_images": validation_images,
        "stopped_early_at": result.stopped_early_at,
    }
    if result.validations:
        last = result.validations[-1]
        metadata["last_evaluation_step"] = last.step
        metadata["last_training_loss_round"] = last.training_loss
        if validation_images:
            metadata["validation_loss"] = last.validation_loss
            metadata["validation_csv"] = MetadataValue.path(str(result.files["validation_csv"]))
            metadata["validation"] = table_md(pd.DataFrame([vars(row) for row in result.validations]).tail(20).round(5))
    return metadata


def preview_metadata(files: dict[str, Path]) -> dict[str, MetadataValue]:
    """The latest MAX_PREVIEWS preview images, one entry per step, so the UI shows how the training evolved."""
    steps = sorted(int(key.split("_")[1]) for key in files if re.fullmatch(r"preview_\d+", key))
    return {
        f"preview_step_{step}": image_md(Path(files[f"preview_{step}"]), max_side=256, caption=f"preview at step {step}")
        for step in steps[-MAX_PREVIEWS:]
    }


def loss_check_results(
    result: TrainingOutcome, training: TrainingSettings, save_every: int, finite_check: str, finite: bool
) -> list[AssetCheckResult]:
    """The seeds' rules of thumb; a NaN loss never gets here (training fails with the step and a hint)."""
    smoothed = final_smoothed_loss(result.losses)
    round_steps = save_every or max(1, result.steps // 10)
    stalled = rounds_without_improvement(result.losses, round_steps)
    return [
        AssetCheckResult(check_name=finite_check, passed=finite),
        AssetCheckResult(
            check_name="final_loss_is_low",
            passed=smoothed <= training.loss_warning_threshold,
            severity=AssetCheckSeverity.WARN,
            metadata={"final_loss_smoothed": smoothed, "threshold": training.loss_warning_threshold},
            description="for characters the seeds call anything above 0.2 a failure; below 0.15 is stable",
        ),
        AssetCheckResult(
            check_name="loss_still_falling",
            passed=stalled < training.loss_patience_rounds,
            severity=AssetCheckSeverity.WARN,
            metadata={"rounds_without_improvement": stalled, "round_steps": round_steps},
        ),
    ]
