"""The demo graph materialised against a real PostgreSQL server through dagster_home/postgres/dagster.yaml:
the runs and their event logs are rows in Postgres, not in a SQLite file."""

from __future__ import annotations

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, in_process_executor

from assets.partitions import datasets_partitions
from pipelines.definitions import build_definitions
from resources import BaseModelResource, ProjectPaths, TaggerResource, TorchDevice
from assets.trained_methods import TRAINED_METHODS
from tests.integration.conftest import DATASET, small_project
from tests.integration.project import instance_home

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMPUTED = {"prepared_images", "tag_scores", "tag_table", *TRAINED_METHODS, "evaluation_grid", "evaluation_metrics",
            "evaluation_report"}


def test_demo_graph_runs_and_event_logs_are_in_postgres(postgres, tmp_path, embedded_root, monkeypatch):
    db = postgres.create_database("sdp_storage")
    for key, value in postgres.env(db).items():
        monkeypatch.setenv(key, value)
    env = small_project(tmp_path, embedded_root)
    home = instance_home(tmp_path, "postgres")
    defs = build_definitions(
        {
            "paths": ProjectPaths(datasets_dir=env["SDP_DATASETS_DIR"], data_dir=env["SDP_DATA_DIR"]),
            "tagger": TaggerResource(wd14_model=env["SDP_WD14_MODEL"]),
            "base_model": BaseModelResource(path=env["SDP_BASE_MODEL"]),
            "device": TorchDevice(device="cpu", precision="fp32"),
        },
        executor=in_process_executor,
    )

    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
        run_ids = []
        for job, partition in (("observe_datasets", None), ("prepare", DATASET), ("train", DATASET)):
            result = defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=partition)
            assert result.success, job
            run_ids.append(result.run_id)
        assert all(instance.get_run_by_id(run_id).status == DagsterRunStatus.SUCCESS for run_id in run_ids)

    # Straight from the database, not through Dagster: the runs, their events and the materialisations.
    with postgres.connect(db) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_id, status FROM runs")
        assert dict(cursor.fetchall()) == {run_id: "SUCCESS" for run_id in run_ids}
        # Event types are stored under their enum values (RUN_SUCCESS is still "PIPELINE_SUCCESS").
        cursor.execute("SELECT DISTINCT run_id FROM event_logs WHERE dagster_event_type = %s",
                       (DagsterEventType.RUN_SUCCESS.value,))
        assert {row[0] for row in cursor.fetchall()} == set(run_ids)
        cursor.execute("SELECT asset_key, partition FROM event_logs WHERE dagster_event_type = %s",
                       (DagsterEventType.ASSET_MATERIALIZATION.value,))
        materialised = cursor.fetchall()
        cursor.execute("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = %s",
                       (datasets_partitions.name,))
        partitions = [row[0] for row in cursor.fetchall()]
    assert {key.strip('[]"') for key, partition in materialised if partition == DATASET} == COMPUTED
    assert partitions == [DATASET]
    assert not list(home.glob("**/*.db")), "no SQLite storage next to the Postgres instance"
