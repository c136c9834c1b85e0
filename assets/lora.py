"""`lora`: LoRA adapters trained on the prepared images and their captions through the shared training loop,
written as the kohya file the webui, ComfyUI and kohya's scripts load and as diffusers' LoRA file.

Only for datasets that list `lora` in `training.methods`; for the others it records that nothing was trained.
"""

import resource

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from assets.dataset_settings import LoraSettings, TrainingSettings
from assets.metadata import settings_for
from assets.method_selection import method_listed, not_trained
from assets.method_training import (
    check_names,
    loop_settings_values,
    loss_check_results,
    loss_check_specs,
    progress_logger,
    run_metadata,
    settings_or_failure,
    train_in_asset,
    write_run_file,
)
from assets.observations import settings_assets
from assets.partitions import datasets_partitions
from assets.placement import gpu_step
from assets.prepared_images import prepared_images
from assets.tag_table import tag_table
from assets.textual_inversion import training_inputs
from resources import BaseModelResource, ProjectPaths, TorchDevice
from training.lora import LoraResult, LoraShape, LoraTraining, train_lora
from training.training_loop import LoopSettings

STAGE = "lora"
FINITE_CHECK = "lora_is_finite"
CHECKS = loss_check_specs(STAGE, FINITE_CHECK)


def lora_loop_settings(training: TrainingSettings, lora: LoraSettings, dataset: str) -> LoopSettings:
    """`training:` for the loop, with the `lora:` section's own rate (and step count, when it sets one)."""
    values = loop_settings_values(training, dataset)
    values["learning_rate"] = lora.learning_rate
    if lora.max_steps is not None:
        values["max_steps"] = lora.max_steps
    return LoopSettings(**values)


def lora_training(lora: LoraSettings) -> LoraTraining:
    return LoraTraining(
        LoraShape(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout),
        unet_lr=lora.unet_lr,
        text_encoder_lr=lora.text_encoder_lr,
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@asset(
    partitions_def=datasets_partitions,
    deps=[prepared_images, tag_table, settings_assets["training"], settings_assets["lora"]],
    group_name="training",
    code_version="1",
    **gpu_step(),
    kinds={"pytorch"},
    check_specs=CHECKS,
    description="LoRA adapters (lora: section; UNet attention, optionally the text encoder) trained with the "
    "training: settings: <name>.safetensors (kohya: webui, ComfyUI, sd-scripts), "
    "diffusers/pytorch_lora_weights.safetensors, checkpoints/<name>-<step>.safetensors, loss log and curve, "
    "validation loss. Only for datasets listing lora in training.methods; not eager.",
)
def lora(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    dataset = context.partition_key
    settings = settings_for(paths, dataset)
    if not method_listed(context, settings, dataset, STAGE):
        return not_trained(settings, dataset, STAGE, check_names(CHECKS))
    examples, held_out = training_inputs(paths, dataset)
    loop = settings_or_failure(lambda: lora_loop_settings(settings.training, settings.lora, dataset), dataset,
                               "training/lora")
    method = settings_or_failure(lambda: lora_training(settings.lora), dataset, "lora")
    base = base_model.load(device)
    out_dir = paths.output_dir(dataset, STAGE)
    context.log.info(
        f"training LoRA {loop.name!r} (rank {method.shape.rank}, alpha {method.shape.alpha:g}, text encoder "
        f"{'trained' if method.trains_text_encoder else 'frozen'}) on {len(examples)} images ({len(held_out)} held "
        f"out), {base.source} on {base.device} ({base.dtype})"
    )  # fmt: skip

    def train(attempt: LoopSettings) -> LoraResult:
        return train_lora(
            base, examples, attempt, method, out_dir, progress=progress_logger(context, attempt.max_steps),
            latent_cache=paths.data_root() / "cache" / "latents", log=context.log.info, validation_examples=held_out,
        )  # fmt: skip

    run = train_in_asset(context, dataset, loop, base, train)
    result: LoraResult = run.result
    files = {key: str(path) for key, path in result.files.items()}
    write_run_file(out_dir, {
        "name": loop.name, "method": STAGE, "steps": result.steps, "clip_skip": loop.clip_skip, "files": files,
        "base_model": str(base.source), "sd_checkpoint": base.short_hash, "stopped_early_at": result.stopped_early_at,
    })  # fmt: skip
    tensors = result.weights.tensors()
    metadata = {
        "trained": True,
        **run_metadata(run, base, len(examples), len(held_out)),
        "rank": method.shape.rank,
        "alpha": method.shape.alpha,
        "text_encoder_trained": method.trains_text_encoder,
        "adapted_modules": len(result.weights.unet) + len(result.weights.text_encoder),
        "adapter_parameters": sum(t.numel() for name, t in tensors.items() if not name.endswith(".alpha")),
        "peak_rss_mb": peak_rss_mb(),
        "kohya": MetadataValue.path(files["kohya"]),
        "diffusers": MetadataValue.path(files["diffusers"]),
    }
    finite = all(bool(t.isfinite().all()) for t in tensors.values())
    return MaterializeResult(
        metadata=metadata,
        data_version=DataVersion(result.weights.digest()),
        check_results=loss_check_results(result, settings.training, loop.save_every, FINITE_CHECK, finite),
    )
