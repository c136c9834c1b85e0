"""`textual_inversion`: an embedding trained on the prepared images and their captions."""


import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path

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

from assets.dataset_settings import TrainingSettings
from assets.metadata import image_md, require_file, settings_for, table_md
from assets.observations import settings_assets
from assets.oom_retry import run_with_oom_retry
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.prepared_images import STAGE as PREPARED, manifest_path, prepared_images
from assets.tag_table import captions_path, tag_table
from common.atomic import write_text
from common.hashing import bytes_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from tagging.splits import TRAIN, VALIDATION, rows_of_split
from training.loss_checks import final_smoothed_loss, rounds_without_improvement
from training.previews import PreviewSettings
from training.textual_inversion import (
    TextualInversionSettings,
    TrainingExample,
    TrainingResult,
    train_textual_inversion,
)

STAGE = "textual_inversion"
RUN_FILE = "training_run.json"
MAX_PREVIEWS = 20  # previews inlined in the metadata (each is a small PNG in the event log)


def training_examples(paths: ProjectPaths, dataset: str) -> list[TrainingExample]:
    """The prepared images of the training split paired with their [filewords], in the order the seeds' users
    expect: the tag table's caption, else the caption sidecar that came with the source, else the source's
    filename words."""
    return _examples(paths, dataset, TRAIN)


def validation_examples(paths: ProjectPaths, dataset: str) -> list[TrainingExample]:
    """The held-out prepared images (preprocess.validation_fraction), captioned as the training ones are."""
    return _examples(paths, dataset, VALIDATION)


def _examples(paths: ProjectPaths, dataset: str, split: str) -> list[TrainingExample]:
    manifest = rows_of_split(pd.read_parquet(require_file(manifest_path(paths, dataset), PREPARED)), split)
    captions = pd.read_parquet(require_file(captions_path(paths, dataset), "tag_table"))
    by_image = dict(zip(captions["image"], captions["caption"]))
    folder = paths.output_dir(dataset, PREPARED)
    examples = []
    for row in manifest.itertuples():
        choices = (by_image.get(row.output), row.source_caption, row.filename_words)
        filewords = next((str(text) for text in choices if isinstance(text, str) and text.strip()), "")
        examples.append(TrainingExample(image_path=folder / row.output, filewords=filewords))
    return examples


def trainer_settings(training: TrainingSettings, dataset: str, dataset_dir: Path | None = None) -> TextualInversionSettings:
    """The dataset.yaml training section in the trainer's terms; the embedding is named after the dataset by default.

    A relative initialization_embedding is read from the dataset folder, where dataset.yaml is.
    """
    initialization = training.initialization_embedding
    if initialization and dataset_dir is not None and not Path(initialization).is_absolute():
        initialization = str(dataset_dir / initialization)
    try:
        return TextualInversionSettings(
            name=training.embedding_name or dataset,
            vectors_per_token=training.vectors_per_token,
            initialization_text=training.initialization_text,
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
            initialization_embedding=initialization,
            overwrite_old_embedding=training.overwrite_old_embedding,
            optimizer=training.optimizer,
            weight_decay=training.weight_decay,
            save_image_with_stored_embedding=training.save_image_with_stored_embedding,
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
        )
    except ValueError as error:
        raise Failure(
            description=f"datasets/{dataset}/dataset.yaml, training section: {error}", allow_retries=False
        ) from error


def read_training_run(paths: ProjectPaths, dataset: str) -> dict:
    """What the last training wrote (embedding name, files, clip skip), for the stages after it."""
    return json.loads(require_file(paths.output_dir(dataset, STAGE) / RUN_FILE, STAGE).read_text(encoding="utf-8"))


@asset(
    partitions_def=datasets_partitions,
    deps=[prepared_images, tag_table, settings_assets["training"]],
    group_name="training",
    code_version="2",
    **gpu_step(),
    kinds={"pytorch"},
    check_specs=[
        AssetCheckSpec("embedding_is_finite", asset=STAGE, description="no NaN or inf in the vectors"),
        AssetCheckSpec(
            "final_loss_is_low", asset=STAGE,
            description="seeds' rule: a final smoothed loss above loss_warning_threshold (0.3) gives poor results",
        ),
        AssetCheckSpec(
            "loss_still_falling", asset=STAGE,
            description="seeds' rule: if the loss has not decreased for loss_patience_rounds (10) rounds, stop",
        ),
    ],
    description="A textual-inversion embedding: webui .pt, diffusers learned_embeds.safetensors, loss log and "
    "curve, validation loss per checkpoint on the held-out split (validation.csv), optional early stopping. "
    "Not eager: runs on demand or on the nightly retrain when its inputs changed.",
)
def textual_inversion(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    dataset = context.partition_key
    training = settings_for(paths, dataset).training
    examples = training_examples(paths, dataset)
    if not examples:
        raise Failure(description=f"dataset {dataset!r} has no prepared images to train on", allow_retries=False)
    held_out = validation_examples(paths, dataset)
    settings = trainer_settings(training, dataset, paths.dataset_dir(dataset))
    name = settings.name
    base = base_model.load(device)
    context.log.info(f"training {name!r} on {len(examples)} images ({len(held_out)} held out for the validation "
                     f"loss), {base.source} on {base.device} ({base.dtype})")
    every = max(1, settings.max_steps // 10)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == settings.max_steps:
            context.log.info(f"step {step}/{settings.max_steps} loss {loss:.5f}")

    out_dir = paths.output_dir(dataset, STAGE)
    started = time.perf_counter()

    def train(batch_size: int, accumulation: int) -> TrainingResult:
        attempt = replace(settings, batch_size=batch_size, gradient_accumulation_steps=accumulation)
        return train_textual_inversion(
            base, examples, attempt, out_dir, progress=progress, latent_cache=paths.data_root() / "cache" / "latents",
            log=context.log.info, validation_examples=held_out,
        )

    try:
        result, (batch_size, accumulation) = run_with_oom_retry(
            train, settings.batch_size, settings.gradient_accumulation_steps, context.log
        )
    except ValueError as error:  # settings that cannot train (the message names the file or key): not retried
        raise Failure(description=f"textual_inversion for {dataset!r}: {error}", allow_retries=False) from error
    elapsed = time.perf_counter() - started
    if result.resumed_from:
        context.log.info(f"resumed {name!r} from its saved state at step {result.resumed_from}")
    files = {key: str(path) for key, path in result.files.items()}
    write_text(
        out_dir / RUN_FILE,
        json.dumps({"name": name, "steps": result.steps, "clip_skip": settings.clip_skip, "files": files,
                    "base_model": str(base.source), "sd_checkpoint": base.short_hash,
                    "stopped_early_at": result.stopped_early_at}, indent=2),
    )
    vectors = result.vectors.detach().float().cpu().contiguous()
    tail = result.losses[-10:]
    metadata = {
        "embedding_name": name,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "continued_from_step": result.continued_from,
        "steps_per_second": (result.steps - max(result.resumed_from, result.continued_from)) / elapsed
        if elapsed > 0 else math.nan,
        "device": f"{base.device} ({str(base.dtype).removeprefix('torch.')})",
        "images": len(examples),
        "batch_size": batch_size,
        "gradient_accumulation_steps": accumulation,
        "oom_retried": (batch_size, accumulation) != (settings.batch_size, settings.gradient_accumulation_steps),
        "processed": result.images_encoded,
        "reused": len(examples) + len(held_out) - result.images_encoded,
        "skipped": 0,
        "final_loss_mean_10": float(sum(tail) / len(tail)) if tail else math.nan,
        "final_loss_smoothed": final_smoothed_loss(result.losses),
        "vectors": MetadataValue.text(f"{tuple(vectors.shape)}"),
        "webui_pt": MetadataValue.path(files["webui_pt"]),
        "diffusers_embedding": MetadataValue.path(files["diffusers"]),
        "loss_csv": MetadataValue.path(files["loss_csv"]),
        **evaluation_metadata(result, len(held_out)),
    }
    if "loss_png" in result.files:
        metadata["loss_curve"] = image_md(Path(files["loss_png"]), caption="training loss and learning rate")
    metadata.update(preview_metadata(result.files))
    return MaterializeResult(
        metadata=metadata,
        data_version=DataVersion(bytes_sha256(vectors.numpy().tobytes())),
        check_results=loss_check_results(result, training, settings),
    )


def evaluation_metadata(result: TrainingResult, validation_images: int) -> dict[str, object]:
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
    """The latest MAX_PREVIEWS preview images, one entry per step, so the UI shows how the embedding evolved."""
    steps = sorted(int(key.split("_")[1]) for key in files if re.fullmatch(r"preview_\d+", key))
    return {
        f"preview_step_{step}": image_md(Path(files[f"preview_{step}"]), max_side=256, caption=f"preview at step {step}")
        for step in steps[-MAX_PREVIEWS:]
    }


def loss_check_results(
    result: TrainingResult, training: TrainingSettings, settings: TextualInversionSettings
) -> list[AssetCheckResult]:
    """The seeds' rules of thumb; a NaN loss never gets here (training fails with the step and a hint)."""
    finite = bool(result.vectors.isfinite().all())
    smoothed = final_smoothed_loss(result.losses)
    round_steps = settings.save_every or max(1, result.steps // 10)
    stalled = rounds_without_improvement(result.losses, round_steps)
    return [
        AssetCheckResult(check_name="embedding_is_finite", passed=finite),
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
