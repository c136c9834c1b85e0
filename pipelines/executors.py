"""The executor of every job, chosen by the environment so one code location serves one machine and many.

SDP_EXECUTOR:
- `multiprocess` (default): each step in its own process on this machine (Dagster's default executor, so a
  run's config may still pick `in_process`);
- `in_process`: every step in the run's process (debugging, the fewest processes);
- `celery`: steps are Celery tasks on the broker SDP_CELERY_BROKER (results on SDP_CELERY_BACKEND);
  GPU steps go to the `gpu` queue and the rest to `dagster` (see assets/placement.py, deploy/);
- `k8s`: each step is a Kubernetes job (dagster-k8s), GPU steps asking for `nvidia.com/gpu`.

dagster_celery and dagster_k8s are imported only when chosen: the default path needs neither
(they come with requirements-servers.txt). The data root (SDP_DATA_DIR) must then be storage that every
worker sees: a shared filesystem mounted at the same path, since steps hand files to each other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dagster import ExecutorDefinition, in_process_executor, multi_or_in_process_executor

EXECUTOR_ENV = "SDP_EXECUTOR"
CELERY_BROKER_ENV = "SDP_CELERY_BROKER"
CELERY_BACKEND_ENV = "SDP_CELERY_BACKEND"
EXECUTORS = ("multiprocess", "in_process", "celery", "k8s")


def _celery() -> ExecutorDefinition:
    from dagster_celery import celery_executor

    # Read by the run process when it starts; workers get the same URLs from deploy/celery.yaml.
    return celery_executor.configured(
        {"broker": {"env": CELERY_BROKER_ENV}, "backend": {"env": CELERY_BACKEND_ENV}},
        name="celery",
    )


def _k8s() -> ExecutorDefinition:
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor


def executor_from_env(env: Mapping[str, str] | None = None) -> ExecutorDefinition:
    """The executor named by SDP_EXECUTOR; an unknown name is an error that lists the known ones."""
    env = os.environ if env is None else env
    name = (env.get(EXECUTOR_ENV) or "multiprocess").strip().lower()
    if name == "multiprocess":
        return multi_or_in_process_executor
    if name == "in_process":
        return in_process_executor
    if name == "celery":
        missing = [key for key in (CELERY_BROKER_ENV, CELERY_BACKEND_ENV) if not env.get(key)]
        if missing:
            raise ValueError(f"{EXECUTOR_ENV}=celery needs {' and '.join(missing)} (e.g. redis://host:6379/0)")
        return _celery()
    if name == "k8s":
        return _k8s()
    raise ValueError(f"{EXECUTOR_ENV}={name!r} is not an executor; choose one of {', '.join(EXECUTORS)}")
