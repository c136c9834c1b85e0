"""`hypernetwork`: a webui hypernetwork trained on the prepared images and their captions."""

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue

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
from common.hashing import bytes_sha256
from resources import BaseModelResource, ProjectPaths, TorchDevice
from training.hypernetwork_training import HypernetworkOptions, train_hypernetwork
from training.torch_files import torch_bytes
from training.training_loop import LoopSettings

STAGE = "hypernetwork"


def hypernetwork_settings(settings: DatasetSettings, dataset: str) -> tuple[LoopSettings, HypernetworkOptions]:
    """The training section with the hypernetwork section's learning rate (and template, when it sets one)."""
    section = settings.hypernetwork
    loop = settings_or_failure(lambda: LoopSettings(**{
        **loop_settings_values(settings.training, dataset), "learning_rate": section.learning_rate,
        **({"template": section.template} if section.template else {}),
    }), dataset, "hypernetwork")  # fmt: skip
    options = settings_or_failure(lambda: HypernetworkOptions(
        **section.model_dump(exclude={"learning_rate", "template"})), dataset, "hypernetwork")  # fmt: skip
    return loop, options


@method_asset(
    STAGE, "weights_are_finite",
    description="A webui hypernetwork (.pt with .optim, checkpoints, loss curve, validation loss) for datasets "
    "that list `hypernetwork` in training.methods. Not eager: on demand or the nightly retrain.",
)
def hypernetwork(
    context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource, device: TorchDevice
) -> MaterializeResult:
    inputs = method_inputs(context, paths, STAGE)
    if isinstance(inputs, MaterializeResult):
        return inputs
    dataset, settings = inputs.dataset, inputs.settings
    examples, held_out = inputs.examples, inputs.held_out
    loop, options = hypernetwork_settings(settings, dataset)
    base = base_model.load(device)
    context.log.info(f"training hypernetwork {loop.name!r} ({options.layer_structure}, {options.activation_func}) "
                     f"on {len(examples)} images, {base.source} on {base.device}")  # fmt: skip
    out_dir = paths.output_dir(dataset, STAGE)
    run = train_in_asset(context, dataset, loop, base, lambda attempt: train_hypernetwork(
        base, examples, attempt, options, out_dir, progress=progress_logger(context, loop.max_steps),
        latent_cache=paths.data_root() / "cache" / "latents", log=context.log.info, validation_examples=held_out,
    ))  # fmt: skip
    result = run.result
    files = write_run_file(out_dir, STAGE, loop.name, result, loop.clip_skip, base)
    weights = torch_bytes(result.weights)
    return MaterializeResult(
        metadata={
            "hypernetwork_name": loop.name,
            **run_metadata(run, base, len(examples), len(held_out)),
            "layer_structure": MetadataValue.text(", ".join(f"{value:g}" for value in options.layer_structure)),
            "webui_pt": MetadataValue.path(files["webui_pt"]),
        },
        data_version=DataVersion(bytes_sha256(weights)),
        check_results=loss_check_results(result, settings.training, loop.save_every, "weights_are_finite",
                                         result.finite),
    )  # fmt: skip

