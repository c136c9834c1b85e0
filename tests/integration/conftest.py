"""Fixtures for the tests against real servers: PostgreSQL and Redis per test module, one `dagster dev` per
package, and a small copy of the demo dataset (few images, a few training steps) so a whole graph run stays short."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import point_models_at
from tests.integration.project import project_env
from tests.integration.server import DagsterDev
from tests.integration.servers import Postgres, Redis, postgres_server, redis_server

DATASET = "demo"
# Four images cover the decoder paths of the demo set: PNG, RGBA PNG with transparency, JPEG.
IMAGES = ("demo_000.png", "demo_001.png", "demo_002.png", "demo_003.jpg")
SMALL_SETTINGS = {
    "preprocess": {"flip": False, "min_images": 1},
    "training": {"max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1, "save_embedding_every": 0},
    "evaluation": {"prompts": ["a photo of [name]"], "seeds": [1], "steps": 2},
}


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def redis_broker() -> Iterator[Redis]:
    with redis_server() as server:
        yield server


def small_project(root: Path, embedded_root: Path) -> dict[str, str]:
    """datasets/demo with IMAGES and SMALL_SETTINGS under `root`; returns the SDP_* environment for it."""
    source = embedded_root / "datasets" / DATASET
    target = root / "datasets" / DATASET
    target.mkdir(parents=True)
    for name in IMAGES:
        shutil.copy2(source / name, target / name)
    settings = yaml.safe_load((source / "dataset.yaml").read_text())
    for section, values in SMALL_SETTINGS.items():
        settings.setdefault(section, {}).update(values)
    (target / "dataset.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    point_models_at(target / "dataset.yaml", embedded_root / "models")
    return project_env(root, embedded_root)


@pytest.fixture(scope="package")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory, embedded_root: Path):
    """One `dagster dev` for the UI tests, with the nightly cron every minute so its tick can be seen."""
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
