from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import TensorProto, helper
from PIL import Image

from tagging.images import load_rgb
from tagging.wd14 import TaggerModelError, WD14Tagger, score_images

TINY_SIDE = 64  # the side conftest builds the tiny tagger with


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_contract_attributes(tiny_tagger: WD14Tagger) -> None:
    assert tiny_tagger.input_size == TINY_SIDE
    assert tiny_tagger.fixed_batch is None
    assert tiny_tagger.provider == "CPUExecutionProvider"
    assert [tag.category for tag in tiny_tagger.tags[:4]] == [9, 9, 9, 9]
    assert len(tiny_tagger.fingerprint) == 64


def test_fingerprint_follows_file_contents(tiny_tagger_dir: Path, tiny_tagger: WD14Tagger, tmp_path: Path) -> None:
    copy = copy_model(tiny_tagger_dir, tmp_path / "copy")
    assert WD14Tagger(copy, threads=1).fingerprint == tiny_tagger.fingerprint
    csv = copy / "selected_tags.csv"
    csv.write_text(csv.read_text().replace("solo", "alone"))
    assert WD14Tagger(copy, threads=1).fingerprint != tiny_tagger.fingerprint


def test_preprocess_pads_white_and_reverses_channels(tiny_tagger: WD14Tagger) -> None:
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    array = tiny_tagger.preprocess(wide)
    assert array.shape == (TINY_SIDE, TINY_SIDE, 3) and array.dtype == np.float32
    assert array[2, TINY_SIDE // 2].tolist() == [255.0, 255.0, 255.0]  # white padding above
    assert array[TINY_SIDE // 2, TINY_SIDE // 2].tolist() == [0.0, 0.0, 255.0]  # red, as BGR
    with pytest.raises(ValueError, match="RGB"):
        tiny_tagger.preprocess(Image.new("RGBA", (8, 8)))


def test_scores_equal_onnxruntime_on_the_same_pixels(tiny_tagger: WD14Tagger, tiny_tagger_dir: Path, tmp_path: Path, solid_image) -> None:
    paths = [solid_image(tmp_path / f"{i}.png", colour, size=(48, 30)) for i, colour in enumerate([(250, 10, 10), (10, 10, 250), (0, 0, 0)])]
    pixels = np.stack([tiny_tagger.preprocess(load_rgb(path)) for path in paths])
    session = ort.InferenceSession(str(tiny_tagger_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    np.testing.assert_allclose(tiny_tagger.predict(pixels), reference, rtol=0, atol=1e-6)

    long = score_images(tiny_tagger, paths, batch_size=2, names=["r", "b", "k"])
    assert list(long.columns) == ["image", "tag", "category", "score"]
    assert len(long) == 3 * len(tiny_tagger.tags)
    assert long["score"].dtype == np.float32 and pd.api.types.is_integer_dtype(long["category"])
    assert long["image"].unique().tolist() == ["r", "b", "k"]
    wide = long.pivot(index="image", columns="tag", values="score").loc[["r", "b", "k"], [t.name for t in tiny_tagger.tags]]
    np.testing.assert_allclose(wide.to_numpy(), reference, rtol=0, atol=1e-6)
    assert score_images(tiny_tagger, paths[:1])["image"].iloc[0] == "0.png"


def test_fixed_batch_model_runs_one_image_at_a_time(fixed_batch_tagger_dir: Path, tiny_tagger: WD14Tagger) -> None:
    fixed = WD14Tagger(fixed_batch_tagger_dir, threads=1)
    assert fixed.fixed_batch == 1
    pixels = np.random.default_rng(0).uniform(0, 255, size=(3, TINY_SIDE, TINY_SIDE, 3)).astype(np.float32)
    np.testing.assert_allclose(fixed.predict(pixels), tiny_tagger.predict(pixels), rtol=0, atol=1e-5)
    assert fixed.predict(pixels[:0]).shape == (0, len(fixed.tags))


def test_predict_checks_the_input_shape(tiny_tagger: WD14Tagger) -> None:
    with pytest.raises(ValueError, match="shape"):
        tiny_tagger.predict(np.zeros((1, 32, 32, 3), np.float32))


def test_missing_folder_and_files_are_named(tiny_tagger_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TaggerModelError, match="does not exist"):
        WD14Tagger(tmp_path / "nowhere")
    copy = copy_model(tiny_tagger_dir, tmp_path / "no_csv")
    (copy / "selected_tags.csv").unlink()
    with pytest.raises(TaggerModelError) as caught:
        WD14Tagger(copy)
    assert str(copy) in str(caught.value) and "selected_tags.csv" in str(caught.value)


def test_malformed_csv_and_mismatched_model(tiny_tagger_dir: Path, tmp_path: Path) -> None:
    copy = copy_model(tiny_tagger_dir, tmp_path / "bad")
    csv = copy / "selected_tags.csv"
    original = csv.read_text()
    csv.write_text("id,label\n1,solo\n")
    with pytest.raises(TaggerModelError, match=r"lacks the columns \['tag_id', 'name', 'category', 'count'\]"):
        WD14Tagger(copy)
    csv.write_text("".join(original.splitlines(keepends=True)[:-1]))
    with pytest.raises(TaggerModelError, match="outputs 24 scores but selected_tags.csv lists 23 tags"):
        WD14Tagger(copy)
    csv.write_text(original)
    (copy / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(TaggerModelError, match="cannot be loaded by onnxruntime"):
        WD14Tagger(copy)


def mean_brightness_model(folder: Path, *, batch: int, side: int) -> Path:
    """A one-tag WD14-layout model with a fixed batch of `batch` and an output width onnxruntime cannot know
    before running it (declared symbolically)."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1:0", "axes"], ["mean"], keepdims=0),
            helper.make_node("Unsqueeze", ["mean", "last"], ["scores"]),
        ],
        "brightness",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [batch, side, side, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, "tags"])],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
            helper.make_tensor("last", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    folder.mkdir()
    onnx.save(model, folder / "model.onnx")
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,brightness,0,1\n")
    return folder


def test_fixed_batch_larger_than_one_pads_the_last_chunk(tmp_path: Path) -> None:
    tagger = WD14Tagger(mean_brightness_model(tmp_path / "fixed2", batch=2, side=8), threads=1)
    assert tagger.fixed_batch == 2 and tagger.input_size == 8 and len(tagger.tags) == 1
    pixels = np.stack([np.full((8, 8, 3), value, np.float32) for value in (10.0, 20.0, 30.0)])
    np.testing.assert_allclose(tagger.predict(pixels)[:, 0], [10.0, 20.0, 30.0])
