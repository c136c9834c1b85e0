"""`textual_inversion`: an embedding trained on the prepared images and their captions."""


from pathlib import Path

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue

from assets.dataset_settings import TrainingSettings
from assets.method_training import (
    RUN_FILE,
    loop_settings_values,
    loss_check_results,
    method_asset,
    method_inputs,
    progress_logger,
    read_run_file,
    run_metadata,
    settings_or_failure,
    train_in_asset,
    write_run_file,
)
from common.hashing import bytes_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from training.textual_inversion import TextualInversionSettings, train_textual_inversion

STAGE = "textual_inversion"
__all__ = ["RUN_FILE", "STAGE", "read_training_run", "textual_inversion", "trainer_settings"]


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


@method_asset(
    STAGE, "embedding_is_finite",
    description="A textual-inversion embedding: webui .pt, diffusers learned_embeds.safetensors, loss log and "
    "curve, validation loss per checkpoint on the held-out split (validation.csv), optional early stopping. "
    "Not eager: runs on demand or on the nightly retrain when its inputs changed.",
    code_version="2",
)
def textual_inversion(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    inputs = method_inputs(context, paths, STAGE)
    if isinstance(inputs, MaterializeResult):
        return inputs
    dataset, training = inputs.dataset, inputs.settings.training
    examples, held_out = inputs.examples, inputs.held_out
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
    files = write_run_file(out_dir, STAGE, name, result, settings.clip_skip, base)
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
