"""`dreambooth`: a full UNet fine-tune (text encoder optional) on the prepared images and their captions, with
prior preservation against the `class_images` asset, written as a diffusers folder and a webui single file.

A dataset that does not list dreambooth in training.methods gets the "not trained" record (see
assets/method_selection.py), so the evaluation downstream still runs for the methods it does train.
"""


import torch
from dagster import AssetExecutionContext, DataVersion, Failure, MaterializeResult, MetadataValue

from assets.class_images import class_images, class_images_dir
from assets.dataset_settings import DatasetSettings
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
from common.hashing import file_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from training.class_images import read_class_images
from training.dreambooth import DreamBoothOptions, train_dreambooth
from training.lr_schedule import parse_schedule
from training.optimizers import available_adamw
from training.training_loop import LoopSettings

STAGE = "dreambooth"
EVALUATED_FILE = "single_file"  # the run file's key the evaluation loads (checkpoints: checkpoint_<step>_single_file)


def dreambooth_settings(
    settings: DatasetSettings, dataset: str, optimizer: str
) -> tuple[LoopSettings, DreamBoothOptions]:
    """The training section with DreamBooth's rate, step count, optimizer and [name] (the instance token);
    text_encoder_lr becomes a scale of the UNet's schedule (its first rate)."""
    section = settings.dreambooth
    loop = settings_or_failure(lambda: LoopSettings(**{
        **loop_settings_values(settings.training, dataset), "learning_rate": section.learning_rate,
        "max_steps": section.max_steps, "optimizer": optimizer,
        "name": section.instance_token or settings.training.embedding_name or dataset,
    }), dataset, "dreambooth")  # fmt: skip
    first_rate = parse_schedule(loop.learning_rate, loop.max_steps).rate_at(1)
    scale = section.text_encoder_lr / first_rate if section.text_encoder_lr is not None and first_rate > 0 else 1.0
    options = settings_or_failure(lambda: DreamBoothOptions(
        class_prompt=section.class_prompt, prior_preservation=section.prior_preservation,
        prior_loss_weight=section.prior_loss_weight, train_text_encoder=section.train_text_encoder,
        text_encoder_lr_scale=scale,
    ), dataset, "dreambooth")  # fmt: skip
    return loop, options


def chosen_optimizer(context: AssetExecutionContext, settings: DatasetSettings, device: torch.device) -> str:
    """dreambooth.optimizer; `auto` is 8-bit AdamW where bitsandbytes can update a tensor on the device."""
    optimizer = settings.dreambooth.optimizer
    if optimizer != "auto":
        return optimizer
    optimizer, why_not = available_adamw(device)
    context.log.info(f"optimizer {optimizer}" + (f" (8-bit AdamW is unavailable: {why_not})" if why_not else ""))
    return optimizer


@method_asset(
    STAGE, "weights_are_finite",
    description="DreamBooth: the UNet (and optionally the text encoder) fine-tuned on the prepared images with "
    "prior preservation against class_images; <name>/ (diffusers folder), <name>.safetensors (webui single file), "
    "single-file checkpoints, loss curve, validation loss. For datasets that list `dreambooth` in "
    "training.methods. Not eager: on demand or the nightly retrain.",
    extra_deps=[class_images],
)
def dreambooth(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    inputs = method_inputs(context, paths, STAGE)
    if isinstance(inputs, MaterializeResult):
        return inputs
    dataset, settings = inputs.dataset, inputs.settings
    examples, held_out = inputs.examples, inputs.held_out
    base = base_model.load(device)
    loop, options = dreambooth_settings(settings, dataset, chosen_optimizer(context, settings, base.device))
    try:
        class_paths = read_class_images(class_images_dir(paths, dataset)) if options.uses_class_images else []
    except ValueError as error:
        raise Failure(description=f"{error} (materialize class_images for {dataset!r})", allow_retries=False) from error
    out_dir = paths.output_dir(dataset, STAGE)
    run = train_in_asset(context, dataset, loop, base, lambda attempt: train_dreambooth(
        base, examples, attempt, options, out_dir, class_images=class_paths,
        progress=progress_logger(context, loop.max_steps), latent_cache=paths.data_root() / "cache" / "latents",
        log=context.log.info, validation_examples=held_out,
    ))  # fmt: skip
    result = run.result
    files = write_run_file(out_dir, STAGE, loop.name, result, loop.clip_skip, base)
    return MaterializeResult(
        metadata={
            "instance_token": loop.name,
            **run_metadata(run, base, len(examples) + len(class_paths), len(held_out)),
            "class_images": len(class_paths),
            "optimizer": loop.optimizer,
            "train_text_encoder": options.train_text_encoder,
            "diffusers_folder": MetadataValue.path(files["diffusers"]),
            "single_file": MetadataValue.path(files[EVALUATED_FILE]),
        },
        data_version=DataVersion(file_sha256(result.files[EVALUATED_FILE])),  # the trained weights, in one file
        check_results=loss_check_results(result, settings.training, loop.save_every, "weights_are_finite",
                                         result.finite),
    )  # fmt: skip
