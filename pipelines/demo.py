"""`make demo`: materialise every asset of the `demo` dataset into the project's Dagster instance.

The runs are recorded in DAGSTER_HOME (dagster_home/), so `make ui` shows them in the run history.
"""

from __future__ import annotations

import json
import sys

import pandas as pd
from dagster import DagsterInstance

from assets.concept_scores import COLUMN as CONCEPT_COLUMN, first_and_best
from assets.evaluation_grid import STAGE as GRID_STAGE
from assets.evaluation_metrics import METRICS_TABLE
from assets.evaluation_report import report_path
from assets.metadata import settings_for
from assets.partitions import datasets_partitions
from assets.trained_methods import grid_file
from embedded import DEMO_TAGGER, build_missing
from pipelines.definitions import defs
from resources import PROJECT_ROOT

DATASET = "demo"
# Step-level DEBUG events stay in the instance (and the UI); the terminal gets the progress lines.
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def main() -> int:
    for relative in build_missing(PROJECT_ROOT):
        print(f"built {relative}")
    instance = DagsterInstance.get()
    if not instance.has_dynamic_partition(datasets_partitions.name, DATASET):
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])

    defs.resolve_job_def("observe_datasets").execute_in_process(instance=instance, run_config=QUIET)
    for job in ("prepare", "train"):
        result = defs.resolve_job_def(job).execute_in_process(
            instance=instance, partition_key=DATASET, run_config=QUIET, tags={"dataset": DATASET}
        )
        print(f"job {job} for dataset {DATASET!r}: {'succeeded' if result.success else 'FAILED'}")

    paths = defs.resources["paths"]
    run = json.loads((paths.output_dir(DATASET, "textual_inversion") / "training_run.json").read_text())
    grid = grid_file(paths.output_dir(DATASET, GRID_STAGE), run["name"], "textual_inversion")
    print("\nembedding files:")
    for kind in ("webui_pt", "diffusers"):
        print(f"  {kind:10s} {run['files'][kind]}")
    print(f"evaluation grid:\n  {grid if grid.is_file() else '(missing)'}")
    metrics_file = paths.output_dir(DATASET, "evaluation_metrics") / METRICS_TABLE
    if metrics_file.is_file():
        print_metrics(pd.read_parquet(metrics_file), _tagger_label(paths))
    report = report_path(paths, DATASET)
    print(f"evaluation report (open in a browser):\n  {report.as_uri() if report.is_file() else '(missing)'}")
    print("\nsee them in the UI: make ui, then open http://127.0.0.1:3000")
    return 0


def print_metrics(metrics: pd.DataFrame, tagger: str) -> None:
    """One line per checkpoint, the concept tag score as a last column when the dataset measured it, then the
    figure issue 9 asks for: how far the tagger's concept tags rose from the first checkpoint to the best."""
    concept = CONCEPT_COLUMN in metrics.columns
    print("checkpoints (training loss, validation loss, CLIP image similarity"
          + (", concept tag score):" if concept else "):"))
    for row in metrics.itertuples():
        mark = f"  <- best, copied to {row.method}/best/" if row.best else ""
        score = f"  {getattr(row, CONCEPT_COLUMN):.4f}" if concept else ""
        print(f"  {row.method} step {row.step:5d}  {row.training_loss:.4f}  {row.validation_loss:.4f}  "
              f"{row.clip_image_similarity:.4f}{score}{mark}")
    if concept:
        method = str(metrics["method"].iloc[0])
        first, best = first_and_best(metrics, method)
        label = f"{method}, " if metrics["method"].nunique() > 1 else ""
        print(f"concept tag score ({label}{tagger}): first checkpoint {first:.4f} -> best checkpoint {best:.4f} "
              f"({best - first:+.4f})")


def _tagger_label(paths) -> str:
    """'demo tagger' when the demo dataset is tagged by models/demo-tagger, else the tagger folder's name."""
    try:
        tagging = settings_for(paths, DATASET).tagging
        folder = defs.resources["tagger"].model_dir(tagging.tagger, tagging.model)
    except Exception:  # noqa: BLE001 - only a label; the run itself reported any settings error
        return "tagger"
    return "demo tagger" if folder.resolve() == (PROJECT_ROOT / DEMO_TAGGER).resolve() else folder.name


if __name__ == "__main__":
    sys.exit(main())
