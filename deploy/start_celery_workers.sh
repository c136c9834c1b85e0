#!/usr/bin/env bash
# Start the Celery workers of one machine for SDP_EXECUTOR=celery runs, in the foreground until stopped:
#   gpu-N workers: queue `gpu` (tag_scores, textual_inversion, evaluation_grid: assets/placement.py),
#                  SDP_CELERY_GPU_WORKERS of them (default 1: one step per device); start them only on machines
#                  with the model device (SDP_CELERY_QUEUES="gpu" there, "dagster" elsewhere).
#   cpu-N workers: queue `dagster` (every other step), SDP_CELERY_CPU_WORKERS of them (default 2).
# Needs the same environment as the runs: SDP_CELERY_BROKER/BACKEND, DAGSTER_HOME (a PostgreSQL instance,
# dagster_home/postgres), SDP_DATA_DIR and SDP_DATASETS_DIR on storage every machine mounts at the same path,
# and the model paths (SDP_BASE_MODEL, SDP_WD14_MODEL).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -x .venv/bin/celery ]]; then export PATH="$PWD/.venv/bin:$PATH"; fi
: "${SDP_CELERY_BROKER:?set SDP_CELERY_BROKER, e.g. redis://localhost:6379/0}"
: "${SDP_CELERY_BACKEND:?set SDP_CELERY_BACKEND, e.g. redis://localhost:6379/1}"
: "${DAGSTER_HOME:?set DAGSTER_HOME to a persistent instance, e.g. dagster_home/postgres}"
queues="${SDP_CELERY_QUEUES:-gpu dagster}"
config="${SDP_CELERY_CONFIG:-deploy/celery.yaml}"

pids=()
stop() {
    # Warm shutdown: each worker finishes (or, with acks_late, hands back) its current step. Each worker is
    # its own process group (setsid): `dagster-celery worker start` runs `celery` as a child process.
    trap - EXIT INT TERM
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    wait || true
}
trap stop EXIT INT TERM

start_worker() {  # queue, worker name
    # --pool=solo: the step runs in the worker's main process. Celery's prefork children are daemonic and
    # may not start processes, and steps do (image decoding workers); one step per worker process.
    setsid dagster-celery worker start -A dagster_celery.app -y "$config" -q "$1" -n "$2" -- --pool=solo &
    pids+=("$!")
}
for queue in $queues; do
    case "$queue" in
        gpu) for i in $(seq "${SDP_CELERY_GPU_WORKERS:-1}"); do start_worker gpu "gpu-$i"; done ;;
        dagster) for i in $(seq "${SDP_CELERY_CPU_WORKERS:-2}"); do start_worker dagster "cpu-$i"; done ;;
        *) start_worker "$queue" "$queue" ;;
    esac
done
wait -n "${pids[@]}"   # one worker exiting stops the others (trap): a half-running pool hides failures
