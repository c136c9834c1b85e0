"""Through the GraphQL API of a real `dagster dev`: a launched job, the eager automation and the nightly tick."""

from __future__ import annotations

import time

import pytest
import yaml

from assets.trained_methods import TRAINED_METHODS
from tests.integration.conftest import DATASET
from tests.integration.server import DagsterDev, wait_for


pytestmark = [pytest.mark.integration, pytest.mark.slow]

# What the nightly tick runs together: every method asset (unlisted ones record that they did not train).
# class_images is nightly too, but the captions it does not read leave it synced.
NIGHTLY = {*TRAINED_METHODS, "evaluation_grid", "evaluation_metrics", "evaluation_report"}


def _just_after_a_nightly_tick(server: DagsterDev) -> None:
    """The nightly cron fires every minute here: edit once the automation has evaluated a tick, so the eager
    run usually comes alone before the next one."""
    now = time.time()
    server.wait_sensor_tick_after("automation", now - now % 60 + 61)


def test_prepare_then_eager_captions_then_nightly_training(dagster_dev: DagsterDev) -> None:
    server = dagster_dev
    # The dataset_folders sensor turns the folder into a partition.
    wait_for("the demo partition", lambda: DATASET in server.partitions(), ceiling=300)

    prepare = server.wait_finished(server.launch("prepare", DATASET))
    assert prepare.status == "SUCCESS", server.log_tail()
    assert server.latest_materialization("tag_table", DATASET)["runId"] == prepare.run_id
    # Train now, so no nightly run for a missing embedding overlaps the edit below.
    assert server.wait_finished(server.launch("train", DATASET)).status == "SUCCESS", server.log_tail()
    server.wait_idle()

    # Editing the caption threshold: the automation launches tag_table, and only it.
    _just_after_a_nightly_tick(server)
    edited = time.time()
    settings_file = server.datasets / DATASET / "dataset.yaml"
    settings = yaml.safe_load(settings_file.read_text())
    settings["captions"]["general_threshold"] = 0.02
    settings_file.write_text(yaml.safe_dump(settings))

    def after_edit() -> list:
        return [run for run in server.runs() if run.created > edited]

    first = wait_for("the eager run after the edit", lambda: [r for r in after_edit() if "tag_table" in r.assets], 600)[0]
    # tag_table alone; or, when the daemon was slow enough for the nightly tick to pass before it evaluated the
    # edit, tag_table with the retrain that its new captions call for, in one run. Never the upstream stages.
    assert first.assets in ({"tag_table"}, {"tag_table", *NIGHTLY}), first
    assert server.wait_finished(first.run_id).status == "SUCCESS", server.log_tail()
    assert not [run for run in after_edit() if run.assets & {"prepared_images", "tag_scores"}]
    # The run_tags sensor tags it, so the UI's run list filters it by dataset and stage.
    tagged = wait_for("the run tags", lambda: "dataset" in (run := server.run(first.run_id)).tags and run, 300)
    assert (tagged.tags["dataset"], tagged.tags["stage"]) == (DATASET, "captions")
    assert first.run_id in {run.run_id for run in server.runs(tags=[{"key": "dataset", "value": DATASET}])}

    # The nightly tick with unsynced inputs (new captions): training and evaluation run after the captions.
    nightly = wait_for(
        "the nightly training run",
        lambda: [r for r in after_edit() if r.created >= first.created and "textual_inversion" in r.assets], 600,
    )[0]
    assert nightly.assets - {"tag_table"} == NIGHTLY, nightly
    assert server.wait_finished(nightly.run_id).status == "SUCCESS", server.log_tail()
    server.wait_idle()

    # The next nightly tick with nothing changed launches nothing.
    quiet_since = time.time()
    next_tick = quiet_since - quiet_since % 60 + 60
    server.wait_sensor_tick_after("automation", next_tick + 1)
    assert [run for run in server.runs() if run.created > quiet_since] == []
