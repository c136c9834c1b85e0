"""`textual_inversion`: an embedding trained on the prepared images and their captions."""


from pathlib import Path

import pandas as pd
from dagster import AssetExecutionContext, DataVersion, Failure, MaterializeResult, MetadataValue, asset

from assets.dataset_settings import TrainingSettings
from assets.metadata import require_file, settings_for
from assets.method_selection import method_listed, not_trained
from assets.method_training import (
    RUN_FILE,
    check_names,
    loop_settings_values,
    loss_check_results,
    loss_check_specs,
    progress_logger,
    read_run_file,
    run_metadata,
    settings_or_failure,
    train_in_asset,
    write_run_file,
)
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.prepared_images import STAGE as PREPARED, manifest_path, prepared_images
from assets.tag_table import captions_path, tag_table
from common.hashing import bytes_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from tagging.splits import TRAIN, VALIDATION, rows_of_split
from training.textual_inversion import TextualInversionSettings, TrainingExample, train_textual_inversion

STAGE = "textual_inversion"
CHECKS = loss_check_specs(STAGE, "embedding_is_finite")
__all__ = ["RUN_FILE", "STAGE", "read_training_run", "textual_inversion", "trainer_settings", "training_examples",
           "validation_examples"]  # fmt: skip


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
    return settings_or_failure(lambda: TextualInversionSettings(
        **loop_settings_values(training, dataset),
        vectors_per_token=training.vectors_per_token,
        initialization_text=training.initialization_text,
        initialization_embedding=initialization,
        overwrite_old_embedding=training.overwrite_old_embedding,
        save_image_with_stored_embedding=training.save_image_with_stored_embedding,
    ), dataset)  # fmt: skip


def read_training_run(paths: ProjectPaths, dataset: str) -> dict:
    """What the last training wrote (embedding name, files, clip skip), for the stages after it."""
    return read_run_file(paths, dataset, STAGE)


def training_inputs(paths: ProjectPaths, dataset: str) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """The training and held-out examples; no prepared image to train on fails once, not retried."""
    examples = training_examples(paths, dataset)
    if not examples:
        raise Failure(description=f"dataset {dataset!r} has no prepared images to train on", allow_retries=False)
    return examples, validation_examples(paths, dataset)


@asset(
    partitions_def=datasets_partitions,
    deps=[prepared_images, tag_table, settings_assets["training"]],
    group_name="training",
    code_version="2",
    **gpu_step(),
    kinds={"pytorch"},
    check_specs=CHECKS,
    description="A textual-inversion embedding: webui .pt, diffusers learned_embeds.safetensors, loss log and "
    "curve, validation loss per checkpoint on the held-out split (validation.csv), optional early stopping. "
    "Not eager: runs on demand or on the nightly retrain when its inputs changed.",
)
def textual_inversion(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    dataset = context.partition_key
    dataset_settings = settings_for(paths, dataset)
    if not method_listed(context, dataset_settings, dataset, STAGE):
        return not_trained(dataset_settings, dataset, STAGE, check_names(CHECKS))
    training = dataset_settings.training
    examples, held_out = training_inputs(paths, dataset)
    settings = trainer_settings(training, dataset, paths.dataset_dir(dataset))
    name = settings.name
    base = base_model.load(device)
    context.log.info(f"training {name!r} on {len(examples)} images ({len(held_out)} held out for the validation "
                     f"loss), {base.source} on {base.device} ({base.dtype})")
    out_dir = paths.output_dir(dataset, STAGE)
    run = train_in_asset(context, dataset, settings, base, lambda attempt: train_textual_inversion(
        base, examples, attempt, out_dir, progress=progress_logger(context, settings.max_steps),
        latent_cache=paths.data_root() / "cache" / "latents", log=context.log.info, validation_examples=held_out,
    ))  # fmt: skip
    result = run.result
    files = {key: str(path) for key, path in result.files.items()}
    write_run_file(out_dir, {"name": name, "steps": result.steps, "clip_skip": settings.clip_skip, "files": files,
                             "base_model": str(base.source), "sd_checkpoint": base.short_hash,
                             "stopped_early_at": result.stopped_early_at})  # fmt: skip
    vectors = result.vectors.detach().float().cpu().contiguous()
    metadata = {
        "embedding_name": name,
        "continued_from_step": result.continued_from,
        **run_metadata(run, base, len(examples), len(held_out), continued_from=result.continued_from),
        "vectors": MetadataValue.text(f"{tuple(vectors.shape)}"),
        "webui_pt": MetadataValue.path(files["webui_pt"]),
        "diffusers_embedding": MetadataValue.path(files["diffusers"]),
    }
    return MaterializeResult(
        metadata=metadata,
        data_version=DataVersion(bytes_sha256(vectors.numpy().tobytes())),
        check_results=loss_check_results(result, training, settings.save_every, "embedding_is_finite",
                                         bool(vectors.isfinite().all())),
    )  # fmt: skip
