"""`make demo`: materialise every asset of the demo world's dataset (`zuzu`) into the project's Dagster
instance, with the demo world's models as defaults (models/demo-base, models/demo-tagger; SDP_BASE_MODEL and
SDP_WD14_MODEL still override them), and print how far the embedding brought the concept.

`python -m pipelines.demo demo` (`make demo-tiny`) runs the tiny random models' `demo` dataset instead: seconds
per stage, for checking that the pipeline runs. The runs are recorded in DAGSTER_HOME (dagster_home/), so
`make ui` shows them in the run history.
"""

from __future__ import annotations

import json
import os
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
from embedded import DEMO_BASE, DEMO_TAGGER, build_missing
from resources import PROJECT_ROOT

WORLD = "zuzu"  # the demo world's dataset (embedded/world_dataset.py): what `make demo` trains
# Step-level DEBUG events stay in the instance (and the UI); the terminal gets the progress lines.
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def main(argv: list[str]) -> int:
    dataset = argv[0] if argv else WORLD
    if dataset == WORLD:
        os.environ.setdefault("SDP_BASE_MODEL", DEMO_BASE)
        os.environ.setdefault("SDP_WD14_MODEL", DEMO_TAGGER)
        if not (PROJECT_ROOT / os.environ["SDP_BASE_MODEL"]).exists():
            print(f"{os.environ['SDP_BASE_MODEL']} is missing: it is shipped in git (git checkout -- {DEMO_BASE}); "
                  f"`PYTHONPATH=. .venv/bin/python -m embedded.demo_base {DEMO_BASE}` rebuilds it (about an hour)")
            return 2
    from pipelines.definitions import defs  # after the defaults above: the resources read them at import

    for relative in build_missing(PROJECT_ROOT):
        print(f"built {relative}")
    instance = DagsterInstance.get()
    if not instance.has_dynamic_partition(datasets_partitions.name, dataset):
        instance.add_dynamic_partitions(datasets_partitions.name, [dataset])

    defs.resolve_job_def("observe_datasets").execute_in_process(instance=instance, run_config=QUIET)
    for job in ("prepare", "train"):
        result = defs.resolve_job_def(job).execute_in_process(
            instance=instance, partition_key=dataset, run_config=QUIET, tags={"dataset": dataset}
        )
        print(f"job {job} for dataset {dataset!r}: {'succeeded' if result.success else 'FAILED'}")

    paths = defs.resources["paths"]
    run = json.loads((paths.output_dir(dataset, "textual_inversion") / "training_run.json").read_text())
    grid = grid_file(paths.output_dir(dataset, GRID_STAGE), run["name"], "textual_inversion")
    print("\nembedding files:")
    for kind in ("webui_pt", "diffusers"):
        print(f"  {kind:10s} {run['files'][kind]}")
    print(f"evaluation grid:\n  {grid if grid.is_file() else '(missing)'}")
    metrics_file = paths.output_dir(dataset, "evaluation_metrics") / METRICS_TABLE
    if metrics_file.is_file():
        print_metrics(pd.read_parquet(metrics_file), _tagger_label(defs, dataset))
    report = report_path(paths, dataset)
    print(f"evaluation report (open in a browser):\n  {report.as_uri() if report.is_file() else '(missing)'}")
    print("\nsee them in the UI: make ui, then open http://127.0.0.1:3000")
    return 0


def print_metrics(metrics: pd.DataFrame, tagger: str) -> None:
    """One line per checkpoint with the scores the dataset measured (CLIP and the concept tag score only when
    set up), then the figure issue 9 asks for: how far the tagger's concept tags rose from the first checkpoint
    to the best."""
    columns = {"training_loss": "training loss", "validation_loss": "validation loss",
               "clip_image_similarity": "CLIP image similarity", CONCEPT_COLUMN: "concept tag score"}
    shown = {column: label for column, label in columns.items()
             if column in metrics.columns and metrics[column].notna().any()}
    print(f"checkpoints ({', '.join(shown.values())}):")
    for row in metrics.itertuples():
        mark = f"  <- best, copied to {row.method}/best/" if row.best else ""
        values = "  ".join(f"{getattr(row, column):.4f}" for column in shown)
        print(f"  {row.method} step {row.step:5d}  {values}{mark}")
    if CONCEPT_COLUMN in shown:
        method = str(metrics["method"].iloc[0])
        first, best = first_and_best(metrics, method)
        label = f"{method}, " if metrics["method"].nunique() > 1 else ""
        print(f"concept tag score ({label}{tagger}): first checkpoint {first:.4f} -> best checkpoint {best:.4f} "
              f"({best - first:+.4f})")


def _tagger_label(defs, dataset: str) -> str:
    """'demo tagger' when the demo dataset is tagged by models/demo-tagger, else the tagger folder's name."""
    try:
        tagging = settings_for(defs.resources["paths"], dataset).tagging
        folder = defs.resources["tagger"].model_dir(tagging.tagger, tagging.model)
    except Exception:  # noqa: BLE001 - only a label; the run itself reported any settings error
        return "tagger"
    return "demo tagger" if folder.resolve() == (PROJECT_ROOT / DEMO_TAGGER).resolve() else folder.name


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
