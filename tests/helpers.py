"""Small helpers for the graph-level tests."""

from __future__ import annotations

from pathlib import Path

import yaml


def edit_settings(dataset_dir: Path, section: str, **values) -> None:
    """Change some keys of one dataset.yaml section, keeping the rest, as a user editing the file would."""
    path = dataset_dir / "dataset.yaml"
    settings = yaml.safe_load(path.read_text()) if path.exists() else {}
    settings = settings or {}
    settings.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def copy_with_settings(paths, source: str, name: str, settings_text: str) -> Path:
    """A copy of dataset `source` named `name` whose dataset.yaml is `settings_text` (e.g. a broken one)."""
    import shutil

    folder = paths.dataset_dir(name)
    shutil.copytree(paths.dataset_dir(source), folder)
    (folder / "dataset.yaml").write_text(settings_text, encoding="utf-8")
    return folder


def point_models_at(settings_path: Path, models_dir: Path) -> None:
    """The demo's model paths are relative to the project root; in tests the models are the session's build."""
    settings_path.write_text(settings_path.read_text().replace(": models/", f": {models_dir}/"))
