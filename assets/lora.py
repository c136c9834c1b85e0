"""`lora`: LoRA adapters trained on the prepared images and their captions through the shared training loop,
written as the kohya file the webui, ComfyUI and kohya's scripts load and as diffusers' LoRA file.

Only for datasets that list `lora` in `training.methods`; for the others it records that nothing was trained.
"""

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue

from assets.dataset_settings import LoraSettings, TrainingSettings
from assets.method_training import (
    loop_settings_values,
    loss_check_results,
    method_asset,
    method_inputs,
    progress_logger,
    run_metadata,
    settings_or_failure,
    train_in_asset,
    write_run_file,
)
from resources import BaseModelResource, ProjectPaths, TorchDevice
from training.lora import LoraResult, LoraShape, LoraTraining, train_lora
from training.training_loop import LoopSettings

STAGE = "lora"
FINITE_CHECK = "lora_is_finite"


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


@method_asset(
    STAGE, FINITE_CHECK,
    description="LoRA adapters (lora: section; UNet attention, optionally the text encoder) trained with the "
    "training: settings: <name>.safetensors (kohya: webui, ComfyUI, sd-scripts), "
    "diffusers/pytorch_lora_weights.safetensors, checkpoints/<name>-<step>.safetensors, loss log and curve, "
    "validation loss. Only for datasets listing lora in training.methods; not eager.",
)
def lora(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    inputs = method_inputs(context, paths, STAGE)
    if isinstance(inputs, MaterializeResult):
        return inputs
    dataset, settings = inputs.dataset, inputs.settings
    examples, held_out = inputs.examples, inputs.held_out
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
    files = write_run_file(out_dir, STAGE, loop.name, result, loop.clip_skip, base)
    tensors = result.weights.tensors()
    metadata = {
        "trained": True,
        **run_metadata(run, base, len(examples), len(held_out)),
        "rank": method.shape.rank,
        "alpha": method.shape.alpha,
        "text_encoder_trained": method.trains_text_encoder,
        "adapted_modules": len(result.weights.unet) + len(result.weights.text_encoder),
        "adapter_parameters": sum(t.numel() for name, t in tensors.items() if not name.endswith(".alpha")),
        "kohya": MetadataValue.path(files["kohya"]),
        "diffusers": MetadataValue.path(files["diffusers"]),
    }
    finite = all(bool(t.isfinite().all()) for t in tensors.values())
    return MaterializeResult(
        metadata=metadata,
        data_version=DataVersion(result.weights.digest()),
        check_results=loss_check_results(result, settings.training, loop.save_every, FINITE_CHECK, finite),
    )
