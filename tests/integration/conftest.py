"""One `dagster dev` per integration module, with the nightly cron every minute so its tick can be seen."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.server import DagsterDev

DATASET = "demo"


@pytest.fixture(scope="package")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory, embedded_root: Path):
    server = DagsterDev(
        base=tmp_path_factory.mktemp("dagster-dev"),
        embedded_root=embedded_root,
        env_overrides={"SDP_NIGHTLY_CRON": "* * * * *"},
    )
    server.add_tiny_dataset(DATASET)
    try:
        server.start()
        yield server
    finally:
        server.stop()
