"""`evaluation_report`: the dataset's evidence in one self-contained HTML page, linked from the UI.

It loads no model (so it is not in pool `gpu`): it reads what the other stages wrote, and a missing piece
becomes a "not available" line in the page rather than a failed run.
"""

import json
from pathlib import Path

from dagster import AssetExecutionContext, DataVersion, MaterializeResult, MetadataValue, asset

from assets.dataset_settings import SettingsError, load_dataset_settings
from assets.evaluation_grid import STAGE as GRID_STAGE
from assets.evaluation_grid import evaluation_grid
from assets.evaluation_metrics import METRICS_TABLE, evaluation_metrics
from assets.evaluation_metrics import STAGE as METRICS_STAGE
from assets.partitions import datasets_partitions
from assets.prepared_images import manifest_path, prepared_images
from assets.tag_table import frequency_path, tag_table
from assets.textual_inversion import RUN_FILE
from common.atomic import write_text
from common.hashing import file_sha256
from resources import BaseModelResource, ProjectPaths
from training.report import ReportInputs, render_report

STAGE = "evaluation_report"
REPORT_FILE = "report.html"


def report_path(paths: ProjectPaths, dataset: str) -> Path:
    return paths.output_dir(dataset, STAGE) / REPORT_FILE


def metrics_path(paths: ProjectPaths, dataset: str) -> Path:
    """The per-checkpoint metrics table the `evaluation_metrics` stage writes."""
    return paths.output_dir(dataset, METRICS_STAGE) / METRICS_TABLE


def training_dirs(paths: ProjectPaths, dataset: str) -> dict[str, Path]:
    """Each training method's output folder that holds a run (its run file, loss curve or validation table),
    by method name: whatever methods the pipeline trains, the report finds their curves the same way."""
    root = paths.data_root() / dataset
    if not root.is_dir():
        return {}
    markers = (RUN_FILE, "loss.png", "loss.csv", "validation.csv")
    return {folder.name: folder for folder in sorted(root.iterdir())
            if folder.is_dir() and any((folder / marker).is_file() for marker in markers)}


def validation_table(folder: Path) -> Path:
    """Where the run file says the validation table is, else `validation.csv` beside the loss curve."""
    run_file = folder / RUN_FILE
    if run_file.is_file():
        try:
            named = json.loads(run_file.read_text(encoding="utf-8")).get("files", {}).get("validation_csv")
        except (ValueError, OSError, AttributeError):
            named = None
        if named:
            return Path(named)
    return folder / "validation.csv"


def report_inputs(paths: ProjectPaths, dataset: str, base_model: str) -> ReportInputs:
    """Everything the report shows, from the files the stages wrote; absent ones say which stage writes them."""
    missing = {
        "grid": "materialize evaluation_grid",
        "loss": "materialize textual_inversion",
        "validation": "no validation split: preprocess.validation_fraction is 0, or the training predates it",
        "metrics": "written by the evaluation_metrics stage",
        "tags": "materialize tag_table",
        "skipped": "materialize prepared_images",
    }
    try:
        settings = load_dataset_settings(paths.dataset_dir(dataset)).model_dump(mode="json")
    except SettingsError as error:
        settings, missing["settings"] = None, str(error)
    if not paths.dataset_dir(dataset).is_dir():
        settings, missing["settings"] = None, f"dataset folder {paths.dataset_dir(dataset)} does not exist"
    grid_dir = paths.data_root() / dataset / GRID_STAGE
    grids = {path.stem: path for path in sorted(grid_dir.glob("*_grid.png"))} if grid_dir.is_dir() else {}
    runs = training_dirs(paths, dataset)
    return ReportInputs(
        dataset=dataset,
        base_model=base_model,
        methods=tuple(runs),
        grids=grids,
        loss_curves={method: folder / "loss.png" for method, folder in runs.items()},
        validation={method: validation_table(folder) for method, folder in runs.items()},
        metrics=metrics_path(paths, dataset),
        metrics_chart=metrics_path(paths, dataset).with_name("metrics.png"),
        settings=settings,
        tag_frequency=frequency_path(paths, dataset),
        manifest=manifest_path(paths, dataset),
        missing=missing,
    )


@asset(
    partitions_def=datasets_partitions,
    deps=[evaluation_grid, evaluation_metrics, tag_table, prepared_images],
    group_name="evaluation",
    code_version="1",
    kinds={"html"},
    description="One self-contained HTML page per dataset (images inlined): evaluation grid, loss and validation "
    "curves, metrics per checkpoint with the best one marked, settings, tag frequency and skipped images.",
)
def evaluation_report(context: AssetExecutionContext, paths: ProjectPaths, base_model: BaseModelResource) -> MaterializeResult:
    dataset = context.partition_key
    out_path = report_path(paths, dataset)
    report = render_report(report_inputs(paths, dataset, base_model.path), out_path.parent)
    write_text(out_path, report.html)
    absent = [name for name, shown in report.available.items() if not shown]
    if absent:
        context.log.info(f"report sections not available: {', '.join(absent)} (see the page for why)")
    metadata = {
        "report_path": MetadataValue.path(str(out_path)),
        "report_url": MetadataValue.url(out_path.resolve().as_uri()),
        "sections": MetadataValue.json(report.available),
        "size_bytes": out_path.stat().st_size,
        "best_checkpoint": MetadataValue.text(report.best or "not named (no metrics table with a best row)"),
    }
    return MaterializeResult(metadata=metadata, data_version=DataVersion(file_sha256(out_path)))

