"""Fixtures shared by the graph-level tests: the embedded default models, built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def embedded_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd, tiny-wd14 and the demo dataset, built exactly as `make models` builds them."""
    from embedded import build_missing

    root = tmp_path_factory.mktemp("embedded")
    build_missing(root)
    return root


def make_project(tmp_path: Path, embedded_root: Path):
    """A fresh datasets/ and data/ with a copy of the demo dataset, and Definitions that point at them."""
    from pipelines.definitions import build_definitions
    from tests.helpers import point_models_at
    from resources import BaseModelResource, ProjectPaths, TaggerResource, TorchDevice

    datasets = tmp_path / "datasets"
    shutil.copytree(embedded_root / "datasets" / "demo", datasets / "demo")
    point_models_at(datasets / "demo" / "dataset.yaml", embedded_root / "models")
    resources = {
        "paths": ProjectPaths(datasets_dir=str(datasets), data_dir=str(tmp_path / "data")),
        "tagger": TaggerResource(wd14_model=str(embedded_root / "models" / "tiny-wd14")),
        "base_model": BaseModelResource(path=str(embedded_root / "models" / "tiny-sd")),
        "device": TorchDevice(device="cpu", precision="fp32"),
    }
    return build_definitions(resources), resources["paths"]


@pytest.fixture
def project(tmp_path: Path, embedded_root: Path):
    return make_project(tmp_path, embedded_root)
