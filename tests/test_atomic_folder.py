"""common.atomic.atomic_folder: a folder output appears whole or not at all, and replaces the old one."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.atomic import atomic_folder


def test_a_folder_replaces_the_old_one_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError), atomic_folder(target) as staging:
        (staging / "b.txt").write_text("half")
        raise RuntimeError("killed half way")
    assert sorted(path.name for path in target.iterdir()) == ["a.txt"]  # the old folder is untouched

    with atomic_folder(target) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(path.name for path in target.iterdir()) == ["b.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # no staging or old copies left
