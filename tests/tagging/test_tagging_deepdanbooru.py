"""DeepDanbooru project folders: a tiny Keras model saved the way the package saves one, and the same
contract as ONNX; our scores must equal the package's own evaluate path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tagging.deepdanbooru import DeepDanbooruTagger, deepdanbooru_pixels
from tagging.score_cache import ImageToScore, ScoreStore, score_with_cache
from tagging.wd14 import TaggerModelError

SIDE = 32
TAGS = ["1girl", "solo", "red_theme", "pip_(demo)", "rating:safe", "rating:questionable", "rating:explicit"]


def write_project(folder: Path, *, model: str = "tiny") -> Path:
    folder.mkdir(parents=True)
    (folder / "project.json").write_text(json.dumps({"image_width": SIDE, "image_height": SIDE, "model": model}))
    (folder / "tags.txt").write_text("\n".join(TAGS) + "\n")
    (folder / "categories.json").write_text(json.dumps(
        [{"name": "General", "start_index": 0}, {"name": "Character", "start_index": 3},
         {"name": "System", "start_index": 4}]))
    return folder


@pytest.fixture(scope="module")
def keras_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(SIDE, SIDE, 3))
    features = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    features = keras.layers.GlobalAveragePooling2D()(features)
    outputs = keras.layers.Dense(len(TAGS), activation="sigmoid")(features)
    folder = write_project(tmp_path_factory.mktemp("ddb") / "project")
    keras.Model(inputs, outputs).save(folder / "model-tiny.keras")
    return folder


def onnx_project(folder: Path, *, width: int = len(TAGS)) -> Path:
    """DeepDanbooru converted to ONNX: NHWC RGB 0-1 in, sigmoid scores out, dynamic batch."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input_1", "axes"], ["mean"], keepdims=0),
         helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
         helper.make_node("Sigmoid", ["logits"], ["scores"])],
        "ddb",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["batch", SIDE, SIDE, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", width])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
                     numpy_helper.from_array(rng.normal(0, 3, (3, width)).astype(np.float32), "weights")],
    )
    write_project(folder)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), folder / "model.onnx")
    return folder


def images(folder: Path, solid_image) -> list[Path]:
    colours = [(220, 30, 30), (30, 60, 220), (250, 250, 250)]
    return [solid_image(folder / f"{i}.png", colour, size=(48 - 10 * i, 30)) for i, colour in enumerate(colours)]


def test_keras_scores_equal_the_package_evaluate_path(keras_project: Path, tmp_path: Path, solid_image) -> None:
    import deepdanbooru

    tagger = DeepDanbooruTagger(keras_project)
    assert tagger.provider.startswith("tensorflow") and tagger.input_size == SIDE
    assert [tag.category for tag in tagger.tags] == [0, 0, 0, 4, 9, 9, 9]
    paths = images(tmp_path, solid_image)
    model = deepdanbooru.project.load_model_from_project(str(keras_project), compile_model=False)
    reference = np.array([[score for _, score in deepdanbooru.commands.evaluate_image(str(path), model, TAGS, 0.0)]
                          for path in paths])
    pixels = np.stack([deepdanbooru_pixels(path, SIDE) for path in paths])
    np.testing.assert_allclose(tagger.predict(pixels), reference, rtol=0, atol=1e-5)

    store = ScoreStore(tmp_path / "store", tagger.fingerprint, 0.0)
    run = score_with_cache(tagger, [ImageToScore(p.name, p, p.name) for p in paths], store, floor=0.0, batch_size=4)
    wide = run.scores.pivot(index="image", columns="tag", values="score").loc[[p.name for p in paths], TAGS]
    np.testing.assert_allclose(wide.to_numpy(), reference, rtol=0, atol=1e-5)


def test_onnx_project_runs_on_onnxruntime_with_the_same_preprocessing(tmp_path: Path, solid_image) -> None:
    folder = onnx_project(tmp_path / "onnx")
    tagger = DeepDanbooruTagger(folder, threads=1)
    assert tagger.provider == "CPUExecutionProvider"
    pixels = np.stack([deepdanbooru_pixels(path, SIDE) for path in images(tmp_path / "img", solid_image)])
    assert pixels.max() <= 1.0 and pixels.shape == (3, SIDE, SIDE, 3)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(tagger.predict(pixels), session.run(None, {"input_1": pixels})[0], rtol=0, atol=1e-6)


def test_bad_project_folders_are_named(keras_project: Path, tmp_path: Path) -> None:
    with pytest.raises(TaggerModelError, match="does not exist"):
        DeepDanbooruTagger(tmp_path / "nowhere")
    copy = shutil.copytree(keras_project, tmp_path / "copy")
    (copy / "model-tiny.keras").unlink()
    with pytest.raises(TaggerModelError, match="missing model-tiny.keras or model-tiny.h5"):
        DeepDanbooruTagger(copy)
    mismatched = onnx_project(tmp_path / "wide", width=len(TAGS) + 1)
    with pytest.raises(TaggerModelError, match="outputs 8 scores but tags.txt lists 7 tags"):
        DeepDanbooruTagger(mismatched, threads=1)
    (mismatched / "project.json").write_text("{}")
    with pytest.raises(TaggerModelError, match="project.json lacks"):
        DeepDanbooruTagger(mismatched)
