"""`dreambooth`: a full UNet fine-tune (text encoder optional) on the prepared images and their captions, with
prior preservation against the `class_images` asset, written as a diffusers folder and a webui single file.

Skipped (not failed) for datasets that do not list dreambooth in training.methods.
"""

import json
import math
import re
import resource
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
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

from assets.class_images import class_images, class_images_dir
from assets.dataset_settings import DatasetSettings
from assets.metadata import image_md, settings_for
from assets.method_selection import method_listed
from assets.observations import settings_assets
from assets.oom_retry import run_with_oom_retry
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.prepared_images import prepared_images
from assets.tag_table import tag_table
from assets.textual_inversion import RUN_FILE, training_examples, validation_examples
from common.atomic import write_text
from common.hashing import file_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from training.class_images import read_class_images
from training.dreambooth import DreamBoothOptions, train_dreambooth
from training.loss_checks import final_smoothed_loss, rounds_without_improvement
from training.lr_schedule import parse_schedule
from training.optimizers import available_adamw
from training.training_loop import LoopResult, LoopSettings

STAGE = "dreambooth"


def checkpoint_steps(files: dict[str, Path]) -> dict[int, Path]:
    """step -> single file of every checkpoint the run wrote (the final file not included)."""
    found = {}
    for key, path in files.items():
        match = re.fullmatch(r"checkpoint_(\d+)_single_file", key)
        if match:
            found[int(match.group(1))] = Path(path)
    return dict(sorted(found.items()))


def dreambooth_options(settings: DatasetSettings, loop: LoopSettings, dataset: str) -> DreamBoothOptions:
    """The dreambooth section in the method's terms; text_encoder_lr becomes a scale of the UNet's schedule."""
    section = settings.dreambooth
    first_rate = parse_schedule(loop.learning_rate, loop.max_steps).rate_at(1)
    scale = section.text_encoder_lr / first_rate if section.text_encoder_lr is not None and first_rate > 0 else 1.0
    try:
        return DreamBoothOptions(
            class_prompt=section.class_prompt, prior_preservation=section.prior_preservation,
            prior_loss_weight=section.prior_loss_weight, train_text_encoder=section.train_text_encoder,
            text_encoder_lr_scale=scale,
        )  # fmt: skip
    except ValueError as error:
        raise Failure(description=f"datasets/{dataset}/dataset.yaml, dreambooth section: {error}",
                      allow_retries=False) from error


def dreambooth_loop_settings(settings: DatasetSettings, dataset: str, optimizer: str) -> LoopSettings:
    """The training section's loop settings with DreamBooth's own rate, step count, optimizer and [name]."""
    training, section = settings.training, settings.dreambooth
    try:
        return LoopSettings(
            name=section.instance_token or training.embedding_name or dataset,
            learning_rate=section.learning_rate, max_steps=section.max_steps, optimizer=optimizer,
            batch_size=training.batch_size, gradient_accumulation_steps=training.gradient_accumulation_steps,
            template=training.template, seed=training.seed, clip_skip=training.clip_skip,
            save_every=training.save_embedding_every, shuffle_tags=training.shuffle_tags,
            tag_dropout=training.tag_drop_out, keep_tokens=training.keep_tokens,
            clip_grad_mode=training.clip_grad_mode, clip_grad_value=training.clip_grad_value,
            latent_sampling_method=training.latent_sampling_method, resume=training.resume,
            weight_decay=training.weight_decay, gradient_checkpointing=training.gradient_checkpointing,
            attention=training.attention, compile=training.compile, mixed_precision=training.mixed_precision,
            early_stopping_patience=training.early_stopping_patience,
        )  # fmt: skip
    except ValueError as error:
        raise Failure(description=f"datasets/{dataset}/dataset.yaml, training/dreambooth sections: {error}",
                      allow_retries=False) from error


def loss_check_results(result: LoopResult, finite: bool, settings: DatasetSettings, round_steps: int) -> list[AssetCheckResult]:
    """The seeds' rules of thumb on the loss, as for textual inversion."""
    smoothed = final_smoothed_loss(result.losses)
    stalled = rounds_without_improvement(result.losses, round_steps)
    threshold, patience = settings.training.loss_warning_threshold, settings.training.loss_patience_rounds
    return [
        AssetCheckResult(check_name="weights_are_finite", passed=finite),
        AssetCheckResult(check_name="final_loss_is_low", passed=smoothed <= threshold, severity=AssetCheckSeverity.WARN,
                         metadata={"final_loss_smoothed": smoothed, "threshold": threshold}),
        AssetCheckResult(check_name="loss_still_falling", passed=stalled < patience, severity=AssetCheckSeverity.WARN,
                         metadata={"rounds_without_improvement": stalled, "round_steps": round_steps}),
    ]  # fmt: skip


@asset(
    partitions_def=datasets_partitions,
    deps=[prepared_images, tag_table, class_images, settings_assets["training"], settings_assets["dreambooth"]],
    group_name="training",
    code_version="1",
    **gpu_step(),
    kinds={"pytorch"},
    output_required=False,
    check_specs=[
        AssetCheckSpec("weights_are_finite", asset=STAGE, description="no NaN or inf in the fine-tuned weights"),
        AssetCheckSpec("final_loss_is_low", asset=STAGE,
                       description="seeds' rule: a final smoothed loss above loss_warning_threshold gives poor results"),
        AssetCheckSpec("loss_still_falling", asset=STAGE,
                       description="seeds' rule: if the loss has not decreased for loss_patience_rounds rounds, stop"),
    ],  # fmt: skip
    description="DreamBooth: the UNet (and optionally the text encoder) fine-tuned on the prepared images with "
    "prior preservation against class_images; <name>/ (diffusers) and <name>.safetensors (webui single file), "
    "single-file checkpoints, loss log and curve. Only for datasets that list dreambooth. On demand.",
)
def dreambooth(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> Iterator[MaterializeResult]:
    dataset = context.partition_key
    if not method_listed(context, paths, dataset, STAGE):
        return
    settings = settings_for(paths, dataset)
    examples = training_examples(paths, dataset)
    if not examples:
        raise Failure(description=f"dataset {dataset!r} has no prepared images to train on", allow_retries=False)
    held_out = validation_examples(paths, dataset)
    base = base_model.load(device)
    optimizer = settings.dreambooth.optimizer
    if optimizer == "auto":
        optimizer, why_not = available_adamw(base.device)
        context.log.info(f"optimizer {optimizer}" + (f" (8-bit AdamW unavailable: {why_not})" if why_not else ""))
    loop = dreambooth_loop_settings(settings, dataset, optimizer)
    options = dreambooth_options(settings, loop, dataset)
    try:
        class_paths = read_class_images(class_images_dir(paths, dataset)) if options.uses_class_images else []
    except ValueError as error:
        raise Failure(description=f"{error} (materialize class_images for {dataset!r})", allow_retries=False) from error
    context.log.info(f"DreamBooth {loop.name!r} on {len(examples)} images, {len(class_paths)} class images, "
                     f"{base.source} on {base.device} ({base.dtype})")
    every = max(1, loop.max_steps // 10)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == loop.max_steps:
            context.log.info(f"step {step}/{loop.max_steps} loss {loss:.5f}")

    out_dir = paths.output_dir(dataset, STAGE)
    started, rss_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def train(batch_size: int, accumulation: int):
        attempt = replace(loop, batch_size=batch_size, gradient_accumulation_steps=accumulation)
        return train_dreambooth(
            base, examples, attempt, options, out_dir, class_images=class_paths, progress=progress,
            latent_cache=paths.data_root() / "cache" / "latents", log=context.log.info, validation_examples=held_out,
        )  # fmt: skip

    try:
        (result, method), (batch_size, accumulation) = run_with_oom_retry(
            train, loop.batch_size, loop.gradient_accumulation_steps, context.log
        )
    except ValueError as error:
        raise Failure(description=f"dreambooth for {dataset!r}: {error}", allow_retries=False) from error
    elapsed = time.perf_counter() - started
    peak_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    files = result.files
    metadata = {
        "instance_token": loop.name,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "steps_per_second": (result.steps - result.resumed_from) / elapsed if elapsed > 0 else math.nan,
        "device": f"{base.device} ({str(base.dtype).removeprefix('torch.')})",
        "images": len(examples),
        "validation_images": len(held_out),
        "class_images": len(class_paths),
        "optimizer": optimizer,
        "batch_size": batch_size,
        "gradient_accumulation_steps": accumulation,
        "oom_retried": (batch_size, accumulation) != (loop.batch_size, loop.gradient_accumulation_steps),
        "processed": result.images_encoded,
        "reused": len(examples) + len(held_out) + len(class_paths) - result.images_encoded,
        "skipped": 0,
        "final_loss_smoothed": final_smoothed_loss(result.losses),
        "peak_rss_growth_mib": peak_growth,
        "diffusers_folder": MetadataValue.path(str(files["diffusers"])),
        "single_file": MetadataValue.path(str(files["single_file"])),
        "loss_csv": MetadataValue.path(str(files["loss_csv"])),
        "checkpoints": MetadataValue.json({str(step): str(path) for step, path in checkpoint_steps(files).items()}),
        "loss_curve": image_md(files["loss_png"], caption="training loss and learning rate"),
    }
    if result.validations and held_out:
        metadata["validation_loss"] = result.validations[-1].validation_loss
    if base.device.type == "cuda":
        metadata["peak_cuda_memory_mib"] = torch.cuda.max_memory_allocated(base.device) / 2**20
    # What the evaluation reads (as textual_inversion's training_run.json): every checkpoint is a single file.
    checkpoints = {str(step): str(path) for step, path in checkpoint_steps(files).items()}
    checkpoints[str(result.steps)] = str(files["single_file"])
    write_text(out_dir / RUN_FILE, json.dumps({
        "name": loop.name, "steps": result.steps, "clip_skip": loop.clip_skip, "checkpoints": checkpoints,
        "files": {key: str(path) for key, path in files.items()}, "base_model": str(base.source),
        "sd_checkpoint": base.short_hash, "stopped_early_at": result.stopped_early_at,
    }, indent=2))  # fmt: skip
    round_steps = loop.save_every or max(1, result.steps // 10)
    yield MaterializeResult(
        metadata=metadata,
        data_version=DataVersion(file_sha256(files["single_file"])),  # the trained weights, in one file
        check_results=loss_check_results(result, method.is_finite(), settings, round_steps),
    )
