from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.hashing import file_sha256
from tagging.images import load_rgb
from tagging.score_cache import SCORE_COLUMNS, STATUS_COLUMNS, ImageToScore, ScoreStore, score_with_cache
from tagging.wd14 import WD14Tagger


def to_score(path: Path, name: str | None = None) -> ImageToScore:
    return ImageToScore(name=name or path.name, path=path, sha256=file_sha256(path))


def statuses(run) -> dict[str, str]:
    return dict(zip(run.status["image"], run.status["status"]))


def test_reuses_scores_by_content_hash(tiny_tagger: WD14Tagger, tmp_path: Path, solid_image) -> None:
    store = ScoreStore(tmp_path / "store", tiny_tagger.fingerprint, 0.01)
    red = to_score(solid_image(tmp_path / "red.png", (220, 30, 30)))
    blue = to_score(solid_image(tmp_path / "blue.png", (30, 60, 220)))
    first = score_with_cache(tiny_tagger, [red, blue], store, workers=1)
    assert list(first.scores.columns) == SCORE_COLUMNS and list(first.status.columns) == STATUS_COLUMNS
    assert statuses(first) == {"red.png": "processed", "blue.png": "processed"}
    assert first.images_per_second > 0
    assert (first.scores["score"] > 0.01).all() and 0 < len(first.scores) < 2 * len(tiny_tagger.tags)

    renamed = ImageToScore(name="crimson.png", path=red.path, sha256=red.sha256)
    green = to_score(solid_image(tmp_path / "green.png", (40, 180, 60)))
    second = score_with_cache(tiny_tagger, [renamed, blue, green], store, workers=1)
    assert statuses(second) == {"crimson.png": "reused", "blue.png": "reused", "green.png": "processed"}
    by_image = {str(image): rows.set_index("tag")["score"] for image, rows in second.scores.groupby("image", observed=True)}
    old = {str(image): rows.set_index("tag")["score"] for image, rows in first.scores.groupby("image", observed=True)}
    pd.testing.assert_series_equal(by_image["crimson.png"], old["red.png"], check_names=False)
    assert by_image["green.png"]["green_background"] > 0.9


def test_stored_scores_equal_the_model_above_the_floor(tiny_tagger: WD14Tagger, tmp_path: Path, solid_image) -> None:
    images = [to_score(solid_image(tmp_path / f"{i}.png", (40 * i, 200 - 30 * i, 90), size=(40, 24))) for i in range(5)]
    run = score_with_cache(tiny_tagger, images, ScoreStore(tmp_path / "s", tiny_tagger.fingerprint, 0.2),
                           floor=0.2, batch_size=2, workers=1)
    pixels = np.stack([tiny_tagger.preprocess(load_rgb(image.path)) for image in images])
    expected = tiny_tagger.predict(pixels)
    wide = run.scores.pivot(index="image", columns="tag", values="score")
    names = [tag.name for tag in tiny_tagger.tags]
    for row, image in enumerate(images):
        got = wide.loc[image.name].reindex(names).to_numpy(dtype=np.float64)
        want = np.where(expected[row] > 0.2, expected[row], np.nan)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # batch size changes float sums


def test_identical_files_are_scored_once(tiny_tagger: WD14Tagger, tmp_path: Path, solid_image) -> None:
    store = ScoreStore(tmp_path / "store", tiny_tagger.fingerprint, 0.01)
    one = to_score(solid_image(tmp_path / "one.png", (0, 0, 0)))
    two = to_score(solid_image(tmp_path / "two.png", (0, 0, 0)))
    first = score_with_cache(tiny_tagger, [one, two], store, workers=1)
    per_image = first.scores.groupby("image", observed=True).size()
    assert per_image["one.png"] == per_image["two.png"] > 0
    again = score_with_cache(tiny_tagger, [one, two], store, workers=1)
    assert set(again.status["status"]) == {"reused"}
    assert len(again.scores) == len(first.scores)


def test_switching_models_and_back_reuses(tiny_tagger: WD14Tagger, tmp_path: Path, solid_image) -> None:
    image = to_score(solid_image(tmp_path / "a.png"))
    folder = tmp_path / "store"
    score_with_cache(tiny_tagger, [image], ScoreStore(folder, tiny_tagger.fingerprint, 0.01), workers=1)
    assert ScoreStore(folder, "another-model", 0.01).load()[1] == set()
    assert ScoreStore(folder, tiny_tagger.fingerprint, 0.05).load()[1] == set()  # another floor, other scores
    back = score_with_cache(tiny_tagger, [image], ScoreStore(folder, tiny_tagger.fingerprint, 0.01), workers=1)
    assert statuses(back) == {"a.png": "reused"}


def test_undecodable_image_is_skipped_and_the_run_continues(tiny_tagger: WD14Tagger, tmp_path: Path, solid_image) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    images = [to_score(solid_image(tmp_path / f"{i}.png", (20 * i, 0, 0))) for i in range(3)]
    images.insert(1, to_score(broken))
    store = ScoreStore(tmp_path / "store", tiny_tagger.fingerprint, 0.01)
    run = score_with_cache(tiny_tagger, images, store, batch_size=2, workers=1)
    assert statuses(run) == {"0.png": "processed", "broken.png": "skipped", "1.png": "processed", "2.png": "processed"}
    assert "not an image" in run.status.set_index("image").loc["broken.png", "reason"]
    assert "broken.png" not in set(run.scores["image"].astype(str))
    again = score_with_cache(tiny_tagger, images, store, batch_size=2, workers=1)
    assert statuses(again)["broken.png"] == "skipped" and statuses(again)["0.png"] == "reused"
