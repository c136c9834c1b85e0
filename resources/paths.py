"""Where datasets are read from and where every output is written."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve(path: str) -> Path:
    """Relative paths are taken from the project root, so the UI, the daemon and scripts agree."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else PROJECT_ROOT / candidate


class ProjectPaths(ConfigurableResource):
    """The dataset folders users drop images into, and the data root all outputs go under.

    The data root must be storage that every process running steps can see (one machine here; a shared
    filesystem or mount when steps run on several machines).
    """

    datasets_dir: str = "datasets"
    data_dir: str = "data"

    def datasets_root(self) -> Path:
        return resolve(self.datasets_dir)

    def data_root(self) -> Path:
        return resolve(self.data_dir)

    def dataset_dir(self, dataset: str) -> Path:
        return self.datasets_root() / dataset

    def output_dir(self, dataset: str, stage: str) -> Path:
        """`data/<dataset>/<stage>/`: one folder per dataset and stage, created on demand."""
        folder = self.data_root() / dataset / stage
        folder.mkdir(parents=True, exist_ok=True)
        return folder
