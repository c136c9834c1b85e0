"""The demo graph through the Celery executor: a real Redis broker, the workers started by
deploy/start_celery_workers.sh, runs launched with `dagster job execute` on the PostgreSQL instance.
Every step must run in a worker process, GPU steps in the `gpu` worker and the rest in the default one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from assets.partitions import datasets_partitions
from assets.trained_methods import TRAINED_METHODS
from tests.integration.conftest import DATASET, small_project
from tests.integration.project import PROJECT, instance_home, subprocess_env
from tests.integration.servers import READY_TIMEOUT_S

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GPU_STEPS = {"tag_scores", *TRAINED_METHODS, "evaluation_grid", "evaluation_metrics"}
CPU_STEPS = {"prepared_images", "tag_table"}
WORKERS = ("gpu-1", "cpu-1")  # names given by deploy/start_celery_workers.sh
RUN_GUARD_S = 900  # a hung run fails the test instead of hanging CI; not a timing assertion


@pytest.fixture
def celery_env(postgres, redis_broker, tmp_path, embedded_root, monkeypatch) -> dict[str, str]:
    db = postgres.create_database("sdp_celery")
    for key, value in postgres.env(db).items():
        monkeypatch.setenv(key, value)  # for the DagsterInstance this test opens
    return subprocess_env({
        **postgres.env(db),
        **small_project(tmp_path / "project", embedded_root),
        "DAGSTER_HOME": str(instance_home(tmp_path, "postgres")),
        "SDP_EXECUTOR": "celery",
        "SDP_CELERY_BROKER": redis_broker.url(0),
        "SDP_CELERY_BACKEND": redis_broker.url(1),
        "SDP_CELERY_CPU_WORKERS": "1",  # two cores: one worker per queue is enough to prove the point
    })


def _wait_for_workers(env: dict[str, str], script: subprocess.Popen, log: Path) -> None:
    app = Celery(broker=env["SDP_CELERY_BROKER"], backend=env["SDP_CELERY_BACKEND"])
    deadline = time.monotonic() + READY_TIMEOUT_S * 2
    while True:
        replies = app.control.ping(timeout=1.0)
        names = {name.split("@")[0] for reply in replies for name in reply}
        if set(WORKERS) <= names:
            return
        if script.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"celery workers did not come up (answering: {sorted(names)}):\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


@pytest.fixture
def celery_workers(celery_env, tmp_path):
    log = tmp_path / "workers.log"
    with log.open("wb") as out:
        script = subprocess.Popen(["bash", str(PROJECT / "deploy" / "start_celery_workers.sh")], env=celery_env,
                                  cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_workers(celery_env, script, log)
        yield log
    finally:
        script.send_signal(signal.SIGTERM)  # its trap stops both workers (each its own process group)
        try:
            script.wait(timeout=120)
        except subprocess.TimeoutExpired:
            Celery(broker=celery_env["SDP_CELERY_BROKER"]).control.shutdown()
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()


def _execute(env: dict[str, str], cwd: Path, job: str, partition: str | None) -> None:
    tags = json.dumps({"dagster/partition": partition} if partition else {})
    dagster = str(Path(sys.executable).parent / "dagster")
    done = subprocess.run([dagster, "job", "execute", "-m", "pipelines.definitions", "-a", "defs", "-j", job,
                           "--tags", tags], env=env, cwd=cwd, capture_output=True, text=True, timeout=RUN_GUARD_S)
    assert done.returncode == 0, f"{job}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _engine_events(instance: DagsterInstance, run_id: str, text: str) -> list:
    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT).records
    return [record.event_log_entry for record in records if text in record.event_log_entry.message]


def test_demo_graph_steps_run_in_celery_workers_by_queue(celery_env, celery_workers, tmp_path):
    home = celery_env["DAGSTER_HOME"]
    with DagsterInstance.from_config(home) as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, [DATASET])
    for job, partition in (("observe_datasets", None), ("prepare", DATASET), ("train", DATASET)):
        _execute(celery_env, tmp_path, job, partition)

    queue_of, worker_of, step_pids, run_pids, materialised = {}, {}, {}, set(), set()
    with DagsterInstance.from_config(home) as instance:
        runs = instance.get_runs()
        assert len(runs) == 3 and all(run.status == DagsterRunStatus.SUCCESS for run in runs)
        for run in runs:
            for entry in _engine_events(instance, run.run_id, "Submitting celery task"):
                queue_of[entry.step_key] = entry.dagster_event.message.split('to queue "')[1].rstrip('".')
            for entry in _engine_events(instance, run.run_id, "in celery worker"):
                metadata = entry.dagster_event.engine_event_data.metadata
                worker_of[entry.step_key] = metadata["Celery worker"].value
            starts = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.STEP_START).records
            step_pids.update({r.event_log_entry.step_key: r.event_log_entry.dagster_event.pid for r in starts})
            run_start = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.RUN_START).records
            run_pids.add(run_start[0].event_log_entry.dagster_event.pid)
            outputs = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
            materialised |= {r.event_log_entry.dagster_event.asset_key.to_user_string() for r in outputs}

    assert GPU_STEPS | CPU_STEPS <= set(step_pids), step_pids
    assert set(worker_of) == set(step_pids), "every step ran as a celery task"
    for step in GPU_STEPS:
        assert queue_of[step] == "gpu" and worker_of[step].startswith("gpu-"), (step, queue_of, worker_of)
    for step in set(step_pids) - GPU_STEPS:
        assert queue_of[step] == "dagster" and worker_of[step].startswith("cpu-"), (step, queue_of, worker_of)
    # Steps ran in the workers' processes, not in the processes that ran the runs, nor here.
    assert not set(step_pids.values()) & (run_pids | {os.getpid()})
    gpu_pids = {step_pids[step] for step in GPU_STEPS}
    assert gpu_pids.isdisjoint(step_pids[step] for step in CPU_STEPS)
    assert materialised >= GPU_STEPS | CPU_STEPS
    grid = next((Path(celery_env["SDP_DATA_DIR"]) / DATASET / "evaluation_grid").glob("*grid*.png"))
    assert grid.stat().st_size > 0
