"""The environment every server-side process of the integration tests runs in: the project importable, its
temporary datasets/data folders and tiny models, an instance home made from one of dagster_home's variants."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]


def project_env(root: Path, embedded_root: Path) -> dict[str, str]:
    """SDP_* settings for datasets/ and data/ under `root` and the embedded tiny models, on the CPU."""
    return {
        "SDP_DATASETS_DIR": str(root / "datasets"),
        "SDP_DATA_DIR": str(root / "data"),
        "SDP_WD14_MODEL": str(embedded_root / "models" / "tiny-wd14"),
        "SDP_BASE_MODEL": str(embedded_root / "models" / "tiny-sd"),
        "SDP_DEVICE": "cpu",
        "SDP_PRECISION": "fp32",
    }


def instance_home(root: Path, variant: str = "") -> Path:
    """A temporary DAGSTER_HOME holding the project's own dagster_home/[<variant>/]dagster.yaml."""
    home = root / "dagster_home"
    home.mkdir(parents=True)
    shutil.copy2(PROJECT / "dagster_home" / variant / "dagster.yaml", home / "dagster.yaml")
    return home


def subprocess_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment plus `extra`, with the project importable and this interpreter's tools on PATH."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="1")
    return env
