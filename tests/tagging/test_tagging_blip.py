"""BLIP captions: equal to the model's own `generate` on the same preprocessed pixels, cached per (image content,
model, generation settings), and a clear error for an incomplete folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from common.hashing import file_sha256
from tagging.blip import BLIP_COLUMNS, BlipCaptioner, BlipCaptionStore, BlipModelError, BlipSettings, caption_with_cache
from tagging.score_cache import ImageToScore

SETTINGS = BlipSettings(prompt="a photo of", num_beams=2, min_length=3, max_length=10)


def to_caption(path: Path, name: str | None = None) -> ImageToScore:
    return ImageToScore(name=name or path.name, path=path, sha256=file_sha256(path))


def striped(path: Path, colours: list[tuple[int, int, int]], size: tuple[int, int] = (48, 40)) -> Path:
    """An image of vertical stripes, so images differ in more than their mean colour."""
    image = Image.new("RGB", size)
    width = size[0] // len(colours)
    for index, colour in enumerate(colours):
        image.paste(colour, (index * width, 0, size[0] if index == len(colours) - 1 else (index + 1) * width, size[1]))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def captioner(tiny_blip_dir: Path) -> BlipCaptioner:
    return BlipCaptioner(tiny_blip_dir, device="cpu")


@pytest.fixture
def images(tmp_path: Path) -> list[ImageToScore]:
    palettes = [[(220, 30, 30)], [(30, 60, 220), (250, 250, 250)], [(0, 0, 0), (255, 200, 0), (40, 180, 60)]]
    return [to_caption(striped(tmp_path / f"{i}.png", colours)) for i, colours in enumerate(palettes)]


def test_captions_equal_the_models_own_generate(captioner: BlipCaptioner, tiny_blip_dir: Path, images, tmp_path) -> None:
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    run = caption_with_cache(captioner, images, BlipCaptionStore(tmp_path / "store", captioner.fingerprint, SETTINGS),
                             SETTINGS, batch_size=2)
    assert list(run.captions.columns) == BLIP_COLUMNS
    ours = dict(zip(run.captions["image"], run.captions["blip_caption"]))

    processor = BlipProcessor.from_pretrained(tiny_blip_dir, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir, local_files_only=True).eval()
    decoded = [Image.open(image.path).convert("RGB") for image in images]
    inputs = processor(images=decoded, text=[SETTINGS.prompt] * len(decoded), return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], num_beams=2,
                                min_length=3, max_length=10)
    expected = [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]
    assert [ours[image.name] for image in images] == expected
    assert all(text.startswith("a photo of") for text in expected)
    assert len(set(expected)) > 1  # the captions depend on the image, so a mix-up between images would show


def test_captions_without_prompt_follow_the_settings(captioner: BlipCaptioner, images) -> None:
    pixels = captioner.pixels([Image.open(image.path).convert("RGB") for image in images])
    short = captioner.caption_pixels(pixels, BlipSettings(min_length=2, max_length=5))
    longer = captioner.caption_pixels(pixels, BlipSettings(min_length=12, max_length=14))
    assert all(0 < len(few) < len(more) for few, more in zip(short, longer))  # at most 4 tokens vs at least 11


def test_second_run_generates_nothing(captioner: BlipCaptioner, images, tmp_path, monkeypatch) -> None:
    folder = tmp_path / "store"
    first = caption_with_cache(captioner, images, BlipCaptionStore(folder, captioner.fingerprint, SETTINGS), SETTINGS)
    assert set(first.status["status"]) == {"processed"} and first.images_per_second > 0

    calls = []
    original = captioner.caption_pixels
    monkeypatch.setattr(captioner, "caption_pixels", lambda pixels, settings: calls.append(len(pixels)) or original(pixels, settings))
    renamed = [ImageToScore(name=f"renamed-{image.name}", path=image.path, sha256=image.sha256) for image in images]
    again = caption_with_cache(captioner, renamed, BlipCaptionStore(folder, captioner.fingerprint, SETTINGS), SETTINGS)
    assert calls == [] and set(again.status["status"]) == {"reused"}
    assert list(again.captions["blip_caption"]) == list(first.captions["blip_caption"])
    assert list(again.captions["image"]) == [image.name for image in renamed]

    other = BlipSettings(prompt="", num_beams=1, min_length=3, max_length=8)
    changed = caption_with_cache(captioner, images, BlipCaptionStore(folder, captioner.fingerprint, other), other)
    assert calls == [len(images)] and set(changed.status["status"]) == {"processed"}
    assert BlipCaptionStore(folder, "another-model", SETTINGS).load()[1] == set()


def test_undecodable_image_is_skipped(captioner: BlipCaptioner, images, tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run = caption_with_cache(captioner, [*images, to_caption(broken)],
                             BlipCaptionStore(tmp_path / "store", captioner.fingerprint, SETTINGS), SETTINGS)
    status = run.status.set_index("image")
    assert status.loc["broken.png", "status"] == "skipped" and status.loc["broken.png", "reason"]
    assert "broken.png" not in set(run.captions["image"]) and len(run.captions) == len(images)


def test_missing_folder_or_file_names_it(tiny_blip_dir: Path, tmp_path: Path) -> None:
    absent = tmp_path / "no-such-blip"
    with pytest.raises(BlipModelError, match="no-such-blip.*does not exist"):
        BlipCaptioner(absent)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_blip_dir, incomplete)
    (incomplete / "model.safetensors").unlink()
    with pytest.raises(BlipModelError, match=r"incomplete is missing model\.safetensors or pytorch_model\.bin"):
        BlipCaptioner(incomplete)
    (incomplete / "model.safetensors").write_bytes(b"not weights")
    (incomplete / "processor_config.json").unlink()
    with pytest.raises(BlipModelError, match="processor_config.json"):
        BlipCaptioner(incomplete)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="min_length"):
        BlipSettings(min_length=10, max_length=5)
    with pytest.raises(ValueError, match="num_beams"):
        BlipSettings(num_beams=0)
