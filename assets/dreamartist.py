"""`dreamartist`: a DreamArtist / APT pair (`<name>` and `<name>-neg`) trained on the prepared images and captions.

Only for datasets whose `training.methods` lists `dreamartist`; for the others the step succeeds and
materialises nothing. The loop, the examples, the metadata and the loss checks are textual inversion's.
"""

import json
import math
import time
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

from dagster import (
    AssetCheckSpec,
    AssetExecutionContext,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.dataset_settings import DreamArtistSettings as DreamArtistSection, TrainingSettings
from assets.metadata import image_md, settings_for
from assets.method_selection import method_listed
from assets.observations import settings_assets
from assets.oom_retry import run_with_oom_retry
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.prepared_images import prepared_images
from assets.tag_table import tag_table
from assets.textual_inversion import (
    RUN_FILE,
    evaluation_metadata,
    loss_check_results,
    preview_metadata,
    trainer_settings,
    training_examples,
    validation_examples,
)
from common.atomic import write_text
from common.hashing import bytes_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from training.dreamartist import DreamArtistResult, DreamArtistSettings, train_dreamartist
from training.loss_checks import final_smoothed_loss
from training.negative_embedding import negative_name

STAGE = "dreamartist"


def dreamartist_settings(
    training: TrainingSettings, section: DreamArtistSection, dataset: str, dataset_dir: Path | None = None
) -> DreamArtistSettings:
    """The `training:` section (the common loop settings and the positive embedding's initialization) with the
    `dreamartist:` section on top (vector counts, rate, steps, CFG, EMA, reconstruction, filewords)."""
    common = trainer_settings(training, dataset, dataset_dir)
    try:
        return DreamArtistSettings(
            **{field.name: getattr(common, field.name) for field in fields(common)},
            **{"vectors_per_token": section.positive_vectors, "learning_rate": section.learning_rate,
               "max_steps": section.max_steps or training.max_steps, "overwrite_old_embedding": True},
            **section.model_dump(include={"negative_vectors", "negative_initialization_text", "cfg_scale",
                                          "negative_lr_scale", "ema", "ema_replace_every", "reconstruction_weight",
                                          "positive_only_filewords"}),
        )  # fmt: skip
    except ValueError as error:
        raise Failure(
            description=f"datasets/{dataset}/dataset.yaml, dreamartist section: {error}", allow_retries=False
        ) from error


@asset(
    partitions_def=datasets_partitions,
    deps=[prepared_images, tag_table, settings_assets["training"], settings_assets["dreamartist"]],
    group_name="training",
    code_version="1",
    **gpu_step(),
    kinds={"pytorch"},
    output_required=False,
    check_specs=[
        AssetCheckSpec("embedding_is_finite", asset=STAGE, description="no NaN or inf in either embedding"),
        AssetCheckSpec(
            "final_loss_is_low", asset=STAGE,
            description="seeds' rule: a final smoothed loss above loss_warning_threshold (0.3) gives poor results",
        ),
        AssetCheckSpec(
            "loss_still_falling", asset=STAGE,
            description="seeds' rule: if the loss has not decreased for loss_patience_rounds (10) rounds, stop",
        ),
    ],
    description="A DreamArtist (APT) pair: <name> for the prompt and <name>-neg for the negative prompt, each as "
    "webui .pt (+ .optim), diffusers and kohya files, with checkpoints, loss log and curve and validation loss. "
    "Only for datasets listing dreamartist in training.methods; on demand or on the nightly retrain.",
)
def dreamartist(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> Iterator[MaterializeResult]:
    dataset = context.partition_key
    if not method_listed(context, paths, dataset, STAGE):
        return
    all_settings = settings_for(paths, dataset)
    training = all_settings.training
    examples = training_examples(paths, dataset)
    if not examples:
        raise Failure(description=f"dataset {dataset!r} has no prepared images to train on", allow_retries=False)
    held_out = validation_examples(paths, dataset)
    settings = dreamartist_settings(training, all_settings.dreamartist, dataset, paths.dataset_dir(dataset))
    base = base_model.load(device)
    context.log.info(f"training the DreamArtist pair {settings.name!r}/{negative_name(settings.name)!r} on "
                     f"{len(examples)} images ({len(held_out)} held out), {base.source} on {base.device}")
    every = max(1, settings.max_steps // 10)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == settings.max_steps:
            context.log.info(f"step {step}/{settings.max_steps} loss {loss:.5f}")

    out_dir = paths.output_dir(dataset, STAGE)
    started = time.perf_counter()

    def train(batch_size: int, accumulation: int) -> DreamArtistResult:
        attempt = replace(settings, batch_size=batch_size, gradient_accumulation_steps=accumulation)
        return train_dreamartist(
            base, examples, attempt, out_dir, progress=progress, latent_cache=paths.data_root() / "cache" / "latents",
            log=context.log.info, validation_examples=held_out,
        )  # fmt: skip

    try:
        result, (batch_size, accumulation) = run_with_oom_retry(
            train, settings.batch_size, settings.gradient_accumulation_steps, context.log
        )
    except ValueError as error:  # settings that cannot train (the message names the file or key): not retried
        raise Failure(description=f"dreamartist for {dataset!r}: {error}", allow_retries=False) from error
    elapsed = time.perf_counter() - started
    files = {key: str(path) for key, path in result.files.items()}
    write_text(
        out_dir / RUN_FILE,
        json.dumps({"name": settings.name, "negative_name": negative_name(settings.name), "method": STAGE,
                    "steps": result.steps, "clip_skip": settings.clip_skip, "files": files,
                    "base_model": str(base.source), "sd_checkpoint": base.short_hash,
                    "stopped_early_at": result.stopped_early_at}, indent=2),
    )  # fmt: skip
    tail = result.losses[-10:]
    metadata = {
        "embedding_name": settings.name,
        "negative_embedding_name": negative_name(settings.name),
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "steps_per_second": (result.steps - result.resumed_from) / elapsed if elapsed > 0 else math.nan,
        "device": f"{base.device} ({str(base.dtype).removeprefix('torch.')})",
        "images": len(examples),
        "batch_size": batch_size,
        "gradient_accumulation_steps": accumulation,
        "oom_retried": (batch_size, accumulation) != (settings.batch_size, settings.gradient_accumulation_steps),
        "processed": result.images_encoded,
        "reused": len(examples) + len(held_out) - result.images_encoded,
        "skipped": 0,
        "cfg_scale": settings.cfg_scale,
        "ema": settings.ema,
        "reconstruction_weight": settings.reconstruction_weight,
        "final_loss_mean_10": float(sum(tail) / len(tail)) if tail else math.nan,
        "final_loss_smoothed": final_smoothed_loss(result.losses),
        "vectors": MetadataValue.text(f"{tuple(result.positive.shape)} + {tuple(result.negative.shape)} negative"),
        "webui_pt": MetadataValue.path(files["webui_pt"]),
        "negative_webui_pt": MetadataValue.path(files["negative_webui_pt"]),
        "diffusers_embedding": MetadataValue.path(files["diffusers"]),
        "negative_diffusers_embedding": MetadataValue.path(files["negative_diffusers"]),
        "loss_csv": MetadataValue.path(files["loss_csv"]),
        **evaluation_metadata(result, len(held_out)),
    }
    if "loss_png" in result.files:
        metadata["loss_curve"] = image_md(Path(files["loss_png"]), caption="training loss and learning rate")
    metadata.update(preview_metadata(result.files))
    yield MaterializeResult(
        metadata=metadata,
        data_version=DataVersion(bytes_sha256(result.vectors.numpy().tobytes())),
        check_results=loss_check_results(result, training, settings),
    )
