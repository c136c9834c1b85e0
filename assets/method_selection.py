"""Which personalisation methods a dataset trains: `training.methods` in its dataset.yaml.

Why an unlisted method still records a materialization instead of yielding none: in Dagster a step whose
upstream output was skipped is itself skipped, so the evaluation grid, which depends on every method asset,
would never run for a dataset that trains only some methods. The method asset therefore records, without
training or writing anything, that this dataset does not train it (metadata `skipped` with the reason, a
constant data version so nothing downstream turns stale, its checks marked as not applicable), and the
evaluation compares the methods that were trained.
"""

from dagster import AssetCheckResult, AssetExecutionContext, DataVersion, MaterializeResult

from assets.dataset_settings import DatasetSettings

NOT_TRAINED = DataVersion("not-trained")


def method_listed(context: AssetExecutionContext, settings: DatasetSettings, dataset: str, method: str) -> bool:
    """True when the dataset trains `method`; otherwise logs why its asset is skipped for this dataset."""
    if method in settings.training.methods:
        return True
    context.log.info(skip_reason(settings, dataset, method))
    return False


def skip_reason(settings: DatasetSettings, dataset: str, method: str) -> str:
    return (f"skipped: dataset {dataset!r} does not list {method!r} in training.methods "
            f"({', '.join(settings.training.methods) or 'none'}) in datasets/{dataset}/dataset.yaml")  # fmt: skip


def not_trained(settings: DatasetSettings, dataset: str, method: str, check_names: tuple[str, ...] = ()) -> MaterializeResult:
    """The record an unlisted method's asset returns: nothing trained, nothing written, nothing failed."""
    reason = skip_reason(settings, dataset, method)
    return MaterializeResult(
        metadata={"trained": False, "skipped": reason},
        data_version=NOT_TRAINED,
        check_results=[AssetCheckResult(check_name=name, passed=True, metadata={"not_applicable": reason})
                       for name in check_names],
    )  # fmt: skip
