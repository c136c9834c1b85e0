"""The multi-machine configuration, validated offline: the executor switch, the instance variants against
Dagster's own schemas, the Celery worker config, and the GPU op tags turned into a Kubernetes Job spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dagster import Shape, in_process_executor, multi_or_in_process_executor
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config

from assets.placement import CELERY_QUEUE_TAG, GPU_QUEUE, GPU_RESOURCE
from pipelines.executors import executor_from_env

ROOT = Path(__file__).resolve().parents[1]
GPU_ASSETS = {"tag_scores", "textual_inversion", "evaluation_grid", "evaluation_metrics"}
PG_ENV = {"SDP_PG_HOST": "db.internal", "SDP_PG_PORT": "5433", "SDP_PG_USER": "dagster",
          "SDP_PG_PASSWORD": "secret", "SDP_PG_DB": "dagster"}


def test_executor_is_chosen_by_environment():
    assert executor_from_env({}) is multi_or_in_process_executor
    assert executor_from_env({"SDP_EXECUTOR": "multiprocess"}) is multi_or_in_process_executor
    assert executor_from_env({"SDP_EXECUTOR": "in_process"}) is in_process_executor
    with pytest.raises(ValueError, match="SDP_CELERY_BROKER and SDP_CELERY_BACKEND"):
        executor_from_env({"SDP_EXECUTOR": "celery"})
    with pytest.raises(ValueError, match="multiprocess, in_process, celery, k8s"):
        executor_from_env({"SDP_EXECUTOR": "dask"})
    celery = executor_from_env({"SDP_EXECUTOR": "celery", "SDP_CELERY_BROKER": "redis://b:6379/0",
                                "SDP_CELERY_BACKEND": "redis://b:6379/1"})
    assert celery.name == "celery"
    assert executor_from_env({"SDP_EXECUTOR": "k8s"}).name == "k8s"


def test_celery_executor_reads_broker_from_environment(monkeypatch):
    from pipelines.definitions import build_definitions

    monkeypatch.setenv("SDP_EXECUTOR", "celery")
    monkeypatch.setenv("SDP_CELERY_BROKER", "redis://broker:6379/0")
    monkeypatch.setenv("SDP_CELERY_BACKEND", "redis://broker:6379/1")
    job = build_definitions().resolve_job_def("prepare")
    assert job.executor_def.name == "celery"
    # The configured executor resolves {"env": ...} when a run starts: the same URLs the workers read.
    executor_config = job.executor_def.apply_config_mapping({}).value["config"]
    assert executor_config["broker"] == "redis://broker:6379/0"
    assert executor_config["backend"] == "redis://broker:6379/1"


def _resolved(schema, value) -> dict:
    """`value` validated against a configurable class's schema, environment variables resolved."""
    result = process_config(Shape(schema) if isinstance(schema, dict) else schema, value)
    assert result.success, result.errors
    return result.value


@pytest.mark.parametrize("variant", ["postgres", "k8s"])
def test_instance_variants_validate_against_dagsters_schema(variant, monkeypatch):
    for key, value in {**PG_ENV, "SDP_K8S_NAMESPACE": "sd"}.items():
        monkeypatch.setenv(key, value)
    config, _ = dagster_instance_config(str(ROOT / "dagster_home" / variant))
    db = config["storage"]["postgres"]["postgres_db"]
    assert db["hostname"] == {"env": "SDP_PG_HOST"} and db["scheme"] == "postgresql+psycopg2"

    from dagster_postgres import PostgresRunStorage
    from dagster_postgres.utils import pg_url_from_config

    storage = _resolved(PostgresRunStorage.config_type(), config["storage"]["postgres"])
    assert pg_url_from_config(storage) == "postgresql+psycopg2://dagster:secret@db.internal:5433/dagster"
    if variant == "k8s":
        from dagster_k8s import K8sRunLauncher

        launcher = config["run_launcher"]
        assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
        resolved = _resolved(K8sRunLauncher.config_type(), launcher["config"])
        assert resolved["job_namespace"] == "sd"
        assert "SDP_EXECUTOR=k8s" in resolved["env_vars"]


def test_celery_worker_config_resolves_from_environment(monkeypatch):
    from dagster_celery.cli import get_validated_config

    monkeypatch.setenv("SDP_CELERY_BROKER", "redis://broker:6379/0")
    monkeypatch.setenv("SDP_CELERY_BACKEND", "redis://broker:6379/1")
    config = get_validated_config(str(ROOT / "deploy" / "celery.yaml"))
    assert (config["broker"], config["backend"]) == ("redis://broker:6379/0", "redis://broker:6379/1")
    assert config["config_source"]["worker_prefetch_multiplier"] == 1


def test_helm_values_load_and_name_the_project_code():
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"][:2] == ["--module-name", "pipelines.definitions"]
    assert {"name": "SDP_EXECUTOR", "value": "k8s"} in deployment["env"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"


def _step_tags(defs, asset: str) -> dict[str, str]:
    job = defs.resolve_implicit_global_asset_job_def()
    return dict(job.graph.node_named(asset).tags)


def test_gpu_steps_get_gpu_queue_and_gpu_limit_in_their_k8s_job():
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    from pipelines.definitions import build_definitions

    defs = build_definitions()
    job_config = DagsterK8sJobConfig(job_image="sd-personalize:test", dagster_home="/opt/dagster/dagster_home")
    limits = {}
    for asset in [*GPU_ASSETS, "prepared_images", "tag_table"]:
        tags = _step_tags(defs, asset)
        assert (tags.get(CELERY_QUEUE_TAG) == GPU_QUEUE) == (asset in GPU_ASSETS), asset
        k8s_job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], f"step-{asset}",
                                            get_user_defined_k8s_config(tags))
        resources = k8s_job.spec.template.spec.containers[0].resources
        limits[asset] = (resources.limits or {}) if resources else {}  # quantities as strings
    assert {asset for asset, limit in limits.items() if limit.get(GPU_RESOURCE) == "1"} == GPU_ASSETS
