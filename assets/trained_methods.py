"""The personalisation methods the graph trains, and which of each method's files the evaluation loads.

One table, so the evaluation assets depend on every method asset and a new method is one line here (plus
its applier in training/evaluation.py).
"""

from dataclasses import dataclass
from pathlib import Path

from dagster import AssetsDefinition, Failure

from assets.dataset_settings import DatasetSettings
from assets.dreamartist import dreamartist
from assets.dreambooth import dreambooth
from assets.hypernetwork import hypernetwork
from assets.lora import lora
from assets.method_training import RUN_FILE, read_run_file
from assets.textual_inversion import textual_inversion
from resources import ProjectPaths


@dataclass(frozen=True)
class TrainedMethod:
    name: str  # as in training.methods, the asset's name and its output folder
    asset: AssetsDefinition
    evaluated_file: str  # the run file's key of the file the grid loads; checkpoints are checkpoint_<step>_<key>


TRAINED_METHODS: dict[str, TrainedMethod] = {
    method.name: method
    for method in (
        TrainedMethod("textual_inversion", textual_inversion, "diffusers"),
        TrainedMethod("hypernetwork", hypernetwork, "webui_pt"),
        TrainedMethod("lora", lora, "kohya"),
        TrainedMethod("dreambooth", dreambooth, "single_file"),
        TrainedMethod("dreamartist", dreamartist, "diffusers"),
    )
}
METHOD_ASSETS = [method.asset for method in TRAINED_METHODS.values()]


def trained_runs(paths: ProjectPaths, dataset: str, settings: DatasetSettings) -> dict[str, dict]:
    """The run files of the methods the dataset lists, in its order; a listed method not yet trained fails."""
    runs = {}
    for name in settings.training.methods:
        if name not in TRAINED_METHODS:
            continue
        if not (paths.output_dir(dataset, name) / RUN_FILE).is_file():
            raise Failure(
                description=f"{name} is listed in datasets/{dataset}/dataset.yaml training.methods but has not been "
                f"trained for {dataset!r}: materialize `{name}` for this dataset first", allow_retries=False,
            )  # fmt: skip
        runs[name] = read_run_file(paths, dataset, name)
    if not runs:
        raise Failure(description=f"dataset {dataset!r} trains no method the evaluation knows "
                      f"({', '.join(TRAINED_METHODS)})", allow_retries=False)  # fmt: skip
    return runs


def grid_file(out_dir: Path, name: str, method: str) -> Path:
    return out_dir / f"{name}_{method}_grid.png"
