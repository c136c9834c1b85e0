"""Where a step runs when the executor spreads steps over machines: model-device steps go to the GPU workers.

The tags are inert for the in-process and multiprocess executors; the Celery executor reads the queue tag
(GPU steps to the `gpu` queue, every other step to the default `dagster` queue) and `k8s_job_executor` merges
the `dagster-k8s/config` tag into the step's pod, so the pod asks the scheduler for one GPU.
"""

from __future__ import annotations

from assets.oom_retry import GPU_RETRY

GPU_POOL = "gpu"  # the concurrency pool of model-device steps (limit: dagster_home/dagster.yaml, make gpu-pool)
GPU_QUEUE = "gpu"
CELERY_QUEUE_TAG = "dagster-celery/queue"  # dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG
K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"


def gpu_op_tags(gpus: int = 1) -> dict[str, object]:
    """op_tags for an asset that places work on the model device (tagger, training, evaluation)."""
    return {
        CELERY_QUEUE_TAG: GPU_QUEUE,
        K8S_CONFIG_TAG: {"container_config": {"resources": {"limits": {GPU_RESOURCE: gpus}}}},
    }


def gpu_step() -> dict[str, object]:
    """The @asset arguments of every step that uses the model device: its pool, placement tags and retries."""
    return {"pool": GPU_POOL, "op_tags": gpu_op_tags(), "retry_policy": GPU_RETRY}
