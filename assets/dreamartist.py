"""`dreamartist`: a DreamArtist / APT pair (`<name>` and `<name>-neg`) trained on the prepared images and captions.

For datasets that list `dreamartist` in training.methods; for the others it records that nothing was trained
(see assets/method_selection.py). The loop, the examples, the run file, the metadata and the loss checks are
the ones every method shares.
"""

from dataclasses import fields
from pathlib import Path

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue

from assets.dataset_settings import DatasetSettings
from assets.method_training import (
    loss_check_results,
    method_asset,
    method_inputs,
    progress_logger,
    run_metadata,
    settings_or_failure,
    train_in_asset,
    write_run_file,
)
from assets.textual_inversion import trainer_settings
from common.hashing import bytes_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from training.dreamartist import DreamArtistSettings, train_dreamartist
from training.negative_embedding import negative_name

STAGE = "dreamartist"
# The dreamartist section's keys that are the trainer's own settings under the same name.
_SAME_NAMES = {"negative_vectors", "negative_initialization_text", "cfg_scale", "negative_lr_scale", "ema",
               "ema_replace_every", "reconstruction_weight", "positive_only_filewords"}  # fmt: skip


def dreamartist_settings(settings: DatasetSettings, dataset: str, dataset_dir: Path | None = None) -> DreamArtistSettings:
    """The `training:` section as textual inversion reads it (common loop settings, the positive embedding's
    initialization) with the `dreamartist:` section on top (vector counts, rate, steps, CFG, EMA, ...). The pair
    always starts from its initialization: overwrite_old_embedding does not apply."""
    common = trainer_settings(settings.training, dataset, dataset_dir)
    section = settings.dreamartist
    return settings_or_failure(lambda: DreamArtistSettings(**{
        **{field.name: getattr(common, field.name) for field in fields(common)},
        "vectors_per_token": section.positive_vectors, "learning_rate": section.learning_rate,
        "max_steps": section.max_steps or settings.training.max_steps, "overwrite_old_embedding": True,
        **section.model_dump(include=_SAME_NAMES),
    }), dataset, STAGE)  # fmt: skip


@method_asset(
    STAGE, "embedding_is_finite",
    description="A DreamArtist (APT) pair for datasets that list `dreamartist` in training.methods: <name> for the "
    "prompt and <name>-neg for the negative prompt, each as webui .pt (+ .optim), diffusers and kohya files, with "
    "checkpoints, loss curve and validation loss. Not eager: on demand or the nightly retrain.",
)
def dreamartist(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    inputs = method_inputs(context, paths, STAGE)
    if isinstance(inputs, MaterializeResult):
        return inputs
    dataset, dataset_settings = inputs.dataset, inputs.settings
    examples, held_out = inputs.examples, inputs.held_out
    settings = dreamartist_settings(dataset_settings, dataset, paths.dataset_dir(dataset))
    base = base_model.load(device)
    context.log.info(f"training the DreamArtist pair {settings.name!r} / {negative_name(settings.name)!r} on "
                     f"{len(examples)} images ({len(held_out)} held out), {base.source} on {base.device}")  # fmt: skip
    out_dir = paths.output_dir(dataset, STAGE)
    run = train_in_asset(context, dataset, settings, base, lambda attempt: train_dreamartist(
        base, examples, attempt, out_dir, progress=progress_logger(context, settings.max_steps),
        latent_cache=paths.data_root() / "cache" / "latents", log=context.log.info, validation_examples=held_out,
    ))  # fmt: skip
    result = run.result
    files = write_run_file(out_dir, STAGE, settings.name, result, settings.clip_skip, base,
                           negative_name=negative_name(settings.name))
    vectors = result.vectors
    return MaterializeResult(
        metadata={
            "embedding_name": settings.name,
            "negative_embedding_name": negative_name(settings.name),
            **run_metadata(run, base, len(examples), len(held_out)),
            "vectors": MetadataValue.text(f"{tuple(result.positive.shape)} + {tuple(result.negative.shape)} negative"),
            "cfg_scale": settings.cfg_scale,
            "ema": settings.ema,
            "reconstruction_weight": settings.reconstruction_weight,
            "webui_pt": MetadataValue.path(files["webui_pt"]),
            "negative_webui_pt": MetadataValue.path(files["negative_webui_pt"]),
            "diffusers_embedding": MetadataValue.path(files["diffusers"]),
            "negative_diffusers_embedding": MetadataValue.path(files["negative_diffusers"]),
        },
        data_version=DataVersion(bytes_sha256(vectors.numpy().tobytes())),
        check_results=loss_check_results(result, dataset_settings.training, settings.save_every,
                                         "embedding_is_finite", bool(vectors.isfinite().all())),
    )  # fmt: skip
