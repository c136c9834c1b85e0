from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from training.embedding_formats import EmbeddingFileError, read_embedding, webui_embedding_dict
from training.png_embedding import TEXT_KEY, embed_in_image, lcg_stream, read_png_embedding, save_png_embedding

# The first values of the webui's data-block stream, as its own self-test lists them.
WEBUI_LCG_START = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215]


@pytest.fixture
def vectors() -> torch.Tensor:
    return torch.randn(2, 32, generator=torch.Generator().manual_seed(0))


def picture() -> Image.Image:
    pixels = np.random.default_rng(0).integers(30, 255, size=(48, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_the_lcg_stream_is_the_webuis() -> None:
    assert lcg_stream(20).tolist() == WEBUI_LCG_START


def test_png_card_round_trips_through_the_text_chunk_and_the_pixels(tmp_path: Path, vectors: torch.Tensor) -> None:
    data = webui_embedding_dict("mycat", vectors, 40, "0123456789", "tiny-sd")
    path = save_png_embedding(tmp_path / "mycat.png", picture(), data)
    with Image.open(path) as image:
        payload = json.loads(base64.b64decode(image.text[TEXT_KEY]))
        assert payload["name"] == "mycat" and payload["string_to_param"]["*"]["TORCHTENSOR"][0][0] == pytest.approx(float(vectors[0, 0]))
        assert image.width > 40 + 2 and image.height == 48  # data blocks on both sides of the picture
        stripped = tmp_path / "stripped.png"
        image.convert("RGB").save(stripped)  # a tool that drops text chunks keeps only the pixels
    for source in (path, stripped):
        embedding = read_embedding(source)
        assert (embedding.name, embedding.step, embedding.sd_checkpoint) == ("mycat", 40, "0123456789")
        assert torch.equal(embedding.vectors, vectors), source


def test_the_picture_sits_between_black_separators(vectors: torch.Tensor) -> None:
    card = np.asarray(embed_in_image(picture(), webui_embedding_dict("mycat", vectors, 1, None, None)))
    black = np.flatnonzero((card & 0x0F).sum(axis=(0, 2)) == 0)
    assert len(black) == 2
    inner = card[:, black[0] + 1 : black[1]]
    assert np.array_equal(inner, np.asarray(picture()))


def test_pngs_without_an_embedding_are_clear_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    picture().save(plain)
    with pytest.raises(EmbeddingFileError, match="plain.png: no 'sd-ti-embedding' text chunk and no embedding data"):
        read_embedding(plain)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, "not base64 !!")
    bad = tmp_path / "bad.png"
    picture().save(bad, pnginfo=info)
    with pytest.raises(ValueError, match="bad.png: the 'sd-ti-embedding' text chunk is not base64"):
        read_png_embedding(bad)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(EmbeddingFileError, match="broken.png: cannot read the image"):
        read_embedding(broken)
