"""The demo world (embedded/demo_world.py) and its tagger (embedded/demo_tagger.py): reproducible images whose
tags are true to the drawing, the captioned-dataset writer, the tagger's WD14 export contract, and the built
tagger's tags through the project's own WD14 loader."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from embedded.demo_world import (
    ALL_CHARACTERS,
    BASE_CHARACTERS,
    COLOURS,
    CHARACTERS,
    DEMO_CONCEPT,
    SHAPES,
    base_world_images,
    caption_of,
    character,
    character_layout,
    concept_images,
    vocabulary,
    world_image,
    world_images,
    write_captioned_dataset,
)
from tagging.categories import CHARACTER_CATEGORY, GENERAL_CATEGORY, RATING_CATEGORY

BUILT_TAGGER = Path(__file__).resolve().parents[1] / "models" / "demo-tagger"


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixel(image, x: float, y: float) -> np.ndarray:
    """The RGB value at fractional coordinates (x, y) of the side."""
    side = image.width
    return np.asarray(image, dtype=np.int32)[int(y * side), int(x * side)]


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.sum((np.asarray(COLOURS[name]) - rgb) ** 2)))


# ------------------------------------------------------------------------------------------------- world


def test_same_seed_gives_the_same_bytes_and_image_i_stands_alone() -> None:
    first = [png_bytes(item.image) for item in world_images(3, 6, side=64, characters=ALL_CHARACTERS)]
    again = [png_bytes(item.image) for item in world_images(3, 6, side=64, characters=ALL_CHARACTERS)]
    assert first == again
    assert png_bytes(world_image(3, 4, side=64, characters=ALL_CHARACTERS).image) == first[4]
    assert [png_bytes(i.image) for i in world_images(3, 2, start=4, side=64, characters=ALL_CHARACTERS)] == first[4:]
    other = [png_bytes(item.image) for item in world_images(4, 6, side=64, characters=ALL_CHARACTERS)]
    assert all(a != b for a, b in zip(first, other))


def test_sizes_and_mixed_sides_are_reproducible() -> None:
    sides = [item.image.size for item in world_images(0, 20, side=(64, 512))]
    assert sides == [item.image.size for item in world_images(0, 20, side=(64, 512))]
    assert all(64 <= w <= 512 and w == h for w, h in sides) and len(set(sides)) > 5
    with pytest.raises(ValueError, match="side"):
        world_image(0, 0, side=8)


def test_one_scene_has_the_same_tags_at_any_side() -> None:
    small, large = world_image(5, 11, side=64), world_image(5, 11, side=512)
    assert small.tags == large.tags
    down = np.asarray(large.image.resize((64, 64)), dtype=np.int32)
    assert np.abs(down - np.asarray(small.image, dtype=np.int32)).mean() < 12


def test_shape_tags_are_true_to_the_drawing() -> None:
    checked = 0
    for item in world_images(7, 150, side=256, characters=ALL_CHARACTERS):
        tags = set(item.tags)
        shapes = item.scene.shapes
        assert (f"{len(shapes)}_shape" in tags or f"{len(shapes)}_shapes" in tags) == bool(shapes)
        for shape in shapes:
            assert {f"{shape.colour}_{shape.name}", shape.name} <= tags
            assert shape.texture == "solid" or shape.texture in tags
            # The centre shows the shape's own colour (a ring: a point on the band, right of the centre).
            x = shape.x + (0.775 * shape.radius if shape.name == "ring" else 0.0)
            assert nearest_colour(pixel(item.image, x, shape.y)) == shape.colour, (item.index, shape)
            checked += 1
    assert checked > 200


def test_background_and_character_tags_are_true_to_the_drawing() -> None:
    simple = characters = 0
    for item in world_images(8, 200, side=128, characters=ALL_CHARACTERS):
        scene = item.scene
        assert f"{scene.background_colour}_background" in item.tags and f"{scene.background}_background" in item.tags
        if scene.background == "simple":  # the corners are never covered by an object
            assert nearest_colour(pixel(item.image, 0.0, 0.0)) == scene.background_colour
            simple += 1
        for thing in scene.objects:
            if thing.kind != "character":
                continue
            who = character(thing.name)
            assert {who.name, who.accessory, "solo"} <= set(item.tags)
            layout = character_layout(who, thing.x, thing.y, thing.radius)
            assert nearest_colour(pixel(item.image, *layout["body"][:2])) == who.body_colour
            assert nearest_colour(pixel(item.image, *layout["head"][:2])) == who.head_colour
            characters += 1
    assert simple > 20 and characters > 40


def test_objects_never_share_the_background_colour_or_overlap() -> None:
    for item in world_images(9, 300, side=64, characters=ALL_CHARACTERS):
        objects = item.scene.objects
        assert item.scene.background_colour not in {o.colour for o in objects}
        for i, a in enumerate(objects):
            assert a.radius <= a.x <= 1 - a.radius and a.radius <= a.y <= 1 - a.radius
            for b in objects[i + 1 :]:
                assert np.hypot(a.x - b.x, a.y - b.y) > a.radius + b.radius


def test_vocabulary_covers_every_tag_and_the_demo_concept_stays_out_of_base_scenes() -> None:
    names = [name for name, _ in vocabulary()]
    categories = [category for _, category in vocabulary()]
    assert len(names) == len(set(names))
    assert categories == sorted(categories, key=[RATING_CATEGORY, GENERAL_CATEGORY, CHARACTER_CATEGORY].index)
    assert {"red_circle", "striped", "blue_background", "2_shapes", DEMO_CONCEPT} <= set(names)
    base = [item.tags for item in world_images(10, 400, side=64)]
    assert all(set(tags) <= set(names) for tags in base)
    assert not any(DEMO_CONCEPT in tags for tags in base)
    assert {name for tags in base for name in tags if name in ALL_CHARACTERS} == set(BASE_CHARACTERS)
    assert {shape for tags in base for shape in tags if shape in SHAPES} == set(SHAPES)
    assert DEMO_CONCEPT not in BASE_CHARACTERS
    assert all(DEMO_CONCEPT in item.tags for item in concept_images(0, 10, side=64))


def test_base_scenes_hold_one_object_and_never_the_demo_concept() -> None:
    """The base model's training set: one shape, figure or base character per image; figures are composed of
    random parts but never with a named character's body and head, so the demo concept stays new."""
    names = {name for name, _ in vocabulary()}
    items = list(base_world_images(5, 300, side=64))
    assert [png_bytes(i.image) for i in items[:4]] == [png_bytes(i.image) for i in base_world_images(5, 4, side=64)]
    kinds = [item.scene.objects[0].kind for item in items]
    assert all(len(item.scene.objects) == 1 for item in items)
    assert {kind: kinds.count(kind) > 40 for kind in ("shape", "figure", "character")} == dict.fromkeys(
        ("shape", "figure", "character"), True)
    named = {(c.body, c.body_colour, c.head, c.head_colour) for c in CHARACTERS}
    for item in items:
        thing = item.scene.objects[0]
        assert set(item.tags) <= names and DEMO_CONCEPT not in item.tags
        assert item.scene.background_colour != thing.colour
        if thing.kind == "figure":
            who = thing.character
            assert (who.body, who.body_colour, who.head, who.head_colour) not in named
            assert item.tags[:4] == (f"{who.body_colour}_{who.body}", f"{who.head_colour}_{who.head}", who.accessory, "solo")
            # drawn as described: the body's colour below the centre, the head's above
            for part, shape, colour in (("body", who.body, who.body_colour), ("head", who.head, who.head_colour)):
                x, y, r = character_layout(who, thing.x, thing.y, thing.radius)[part]
                x += 0.77 * r if shape == "ring" else 0.0  # a ring's band, not its hole
                assert nearest_colour(pixel(item.image, x, y)) == colour
    concept = list(concept_images(0, 10, side=64))
    assert all(item.tags[0] == DEMO_CONCEPT and len(item.scene.objects) == 1 for item in concept)


# ----------------------------------------------------------------------------------------------- datasets


def test_dataset_writer_writes_images_with_true_captions(tmp_path: Path) -> None:
    images = list(concept_images(1, 5, side=80))
    folder = write_captioned_dataset(tmp_path / "zuzu", images, exclude_tags=[DEMO_CONCEPT], prefix="zuzu")
    pngs = sorted(folder.glob("*.png"))
    assert [p.stem for p in pngs] == [f"zuzu_1_{i:05d}" for i in range(5)]
    for path, item in zip(pngs, images):
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption == caption_of(item.tags, exclude=[DEMO_CONCEPT])
        assert "zuzu" not in caption and "general" not in caption.split(", ")
        assert f"{item.scene.background_colour} background" in caption
        assert path.read_bytes() == png_bytes(item.image)
    assert caption_of(["zuzu_(world)", "red_circle", "2_shapes", "general"]) == r"zuzu \(world\), red circle, 2 shapes"
    with pytest.raises(FileExistsError):
        write_captioned_dataset(folder, images)
    with pytest.raises(ValueError, match="no images"):
        write_captioned_dataset(tmp_path / "empty", [])
    assert not (tmp_path / "empty").exists()


# ------------------------------------------------------------------------------------------------ tagger


@pytest.fixture(scope="module")
def smoke_tagger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real build on a tiny world: 16 images, 2 optimiser steps, exported with the WD14 contract."""
    from embedded.demo_tagger import TaggerSettings, build_demo_tagger

    settings = TaggerSettings(images=16, epochs=1, batch_size=8, sides=(64, 80))
    return build_demo_tagger(tmp_path_factory.mktemp("smoke") / "demo-tagger", settings)


def test_training_steps_lower_the_loss() -> None:
    import torch

    from embedded.demo_tagger import TaggerSettings, tag_targets, tagger_pixels, to_network_input, train_tagger

    images = list(world_images(0, 16, side=64, characters=ALL_CHARACTERS))
    names = [name for name, _ in vocabulary()]
    pixels, targets = tagger_pixels(images), tag_targets(images, names)
    settings = TaggerSettings(epochs=3, batch_size=8, learning_rate=1e-2)  # 2 steps an epoch, 6 in all

    def loss_after(steps: int) -> float:
        model = train_tagger(pixels, targets, settings, max_steps=steps).train()  # batch statistics
        with torch.no_grad():
            logits = model.logits(to_network_input(torch.from_numpy(pixels).float()))
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(targets)))

    torch_threads = torch.get_num_threads()
    assert loss_after(6) < loss_after(1) - 0.05
    assert loss_after(2) == loss_after(2)  # seeded: the same steps give the same weights
    assert torch.get_num_threads() == torch_threads and not torch.are_deterministic_algorithms_enabled()


def test_export_follows_the_wd14_contract(smoke_tagger: Path) -> None:
    from tagging.wd14 import WD14Tagger

    assert sorted(p.name for p in smoke_tagger.iterdir()) == ["build.json", "model.onnx", "selected_tags.csv"]
    onnx_bytes = (smoke_tagger / "model.onnx").read_bytes()  # no stack traces: the bytes do not name this checkout
    assert b"stack_trace" not in onnx_bytes and str(Path(__file__).parents[1]).encode() not in onnx_bytes
    session = ort.InferenceSession(str(smoke_tagger / "model.onnx"), providers=["CPUExecutionProvider"])
    (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
    assert model_input.name == "input_1:0" and model_input.type == "tensor(float)"
    assert isinstance(model_input.shape[0], str) and model_input.shape[1:] == [64, 64, 3]
    rows = list(csv.DictReader((smoke_tagger / "selected_tags.csv").open(encoding="utf-8")))
    assert list(rows[0]) == ["tag_id", "name", "category", "count"]
    assert [(r["name"], int(r["category"])) for r in rows] == list(vocabulary())
    assert [int(r["tag_id"]) for r in rows] == list(range(len(rows)))
    assert int(rows[0]["count"]) == 16  # every training image is rated general
    tagger = WD14Tagger(smoke_tagger, threads=1)
    assert tagger.input_size == 64 and len(tagger.tags) == len(rows)
    scores = tagger.predict(np.stack([tagger.preprocess(i.image) for i in world_images(2, 3, side=(64, 200))]))
    assert scores.shape == (3, len(rows)) and np.all((scores >= 0) & (scores <= 1))
    # The ONNX graph computes what the torch module computes, from BGR input (channel order matters).
    bgr = np.stack([tagger.preprocess(i.image) for i in world_images(2, 2, side=64)])
    assert not np.allclose(tagger.predict(bgr), tagger.predict(bgr[..., ::-1].copy()))


def test_build_is_reproducible_and_knows_when_it_is_current(smoke_tagger: Path, tmp_path: Path) -> None:
    from embedded.demo_tagger import TaggerSettings, build_demo_tagger, is_current

    settings = TaggerSettings(images=16, epochs=1, batch_size=8, sides=(64, 80))
    again = build_demo_tagger(tmp_path / "again", settings)
    for name in ("model.onnx", "selected_tags.csv", "build.json"):
        assert (again / name).read_bytes() == (smoke_tagger / name).read_bytes()
    assert is_current(again, settings) and not is_current(again)  # the defaults are other settings
    assert not is_current(tmp_path / "missing", settings)


def test_built_tagger_tags_world_images_through_the_pipeline_loader(tmp_path: Path) -> None:
    """The tagger `make models` builds, loaded and run by tagging.wd14 on held-out world image files."""
    if not (BUILT_TAGGER / "model.onnx").is_file():
        pytest.skip(f"{BUILT_TAGGER} is not built (run `make models`)")
    from bench.demo_tagger import counts, micro, predictions
    from embedded.demo_tagger import tag_targets
    from tagging.wd14 import WD14Tagger, score_images

    images = list(world_images(2000, 24, side=(64, 256), characters=ALL_CHARACTERS))
    paths = []
    for item in images:
        paths.append(tmp_path / f"{item.index}.png")
        item.image.save(paths[-1])
    tagger = WD14Tagger(BUILT_TAGGER, threads=1)
    names = [tag.name for tag in tagger.tags]
    long = score_images(tagger, paths)
    scores = long.pivot(index="image", columns="tag", values="score").loc[[p.name for p in paths], names]
    truth = tag_targets(images, names)
    rows = counts(predictions(tagger, scores.to_numpy()), truth)
    general = micro([r for t, r in zip(tagger.tags, rows) if t.category == GENERAL_CATEGORY])
    assert general.precision >= 0.85 and general.recall >= 0.85, (general.precision, general.recall)
    for item, row in zip(images, scores.to_numpy()):
        for who in ALL_CHARACTERS:  # characters: named when present (0.85 threshold), never otherwise
            assert (row[names.index(who)] > 0.85) == (who in item.tags), (item.index, who)


def test_make_models_refuses_to_replace_a_stale_folder_holding_foreign_files(tmp_path: Path) -> None:
    from embedded import DEMO_TAGGER, build_missing

    folder = tmp_path / DEMO_TAGGER
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"old")
    (folder / "notes.txt").write_text("mine")
    for relative in ("models/tiny-sd", "models/tiny-wd14", "models/tiny-blip", "models/tiny-clip", "datasets/demo"):
        (tmp_path / relative).mkdir(parents=True)  # present: only the trained tagger is considered
    with pytest.raises(FileExistsError, match="notes.txt"):
        build_missing(tmp_path, trained=True)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "model.onnx").read_bytes() == b"old"


def test_world_dataset_holds_only_the_new_concept_and_valid_settings(tmp_path: Path) -> None:
    from assets.dataset_settings import load_dataset_settings
    from embedded.world_dataset import build_world_dataset

    folder = build_world_dataset(tmp_path / "zuzu", count=6)
    images = sorted(folder.glob("*.png"))
    assert len(images) == 6 and not list(folder.glob("*.txt"))  # the pipeline tags them, as a user's folder
    assert all(DEMO_CONCEPT in item.tags for item in concept_images(4000, 6))
    settings = load_dataset_settings(folder)
    assert settings.evaluation.tagger_scores and DEMO_CONCEPT in settings.captions.exclude_tags
    with pytest.raises(FileExistsError):
        build_world_dataset(folder, count=1)
