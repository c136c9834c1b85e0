"""The webui's PNG-embedded textual-inversion form: an image that is also the embedding file.

The webui writes two copies of the embedding into the PNG, and reads either:
- a text chunk `sd-ti-embedding`: base64 of the JSON of its `.pt` dict, tensors as {"TORCHTENSOR": nested lists};
- a data block in the pixels, which survives tools that strip PNG text chunks: the zlib-compressed JSON is
  split into low and high nibbles, each laid out as an (H, W', 3) block, XORed with a fixed LCG stream
  (seed 0, a=1664525, c=1013904223, mod 2**32, then mod 255) in the low nibble and decorated in the high
  nibble with dots shaded by the vectors; the low block goes left of the picture and the high block right,
  each separated from it by one black column. Readers keep only low nibbles, so the decoration is free.

We implement that layout from its description (and check it against the webui's published LCG values in
the tests) so PNG embeddings from the webui load here and ours load there.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin, UnidentifiedImageError

from common.atomic import write_bytes

TEXT_KEY = "sd-ti-embedding"
_TENSOR_KEY = "TORCHTENSOR"
_CHANNELS = 3
_MAX_PAYLOAD = 256 * 1024 * 1024  # a decompression bomb stops here


def _to_json(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {_TENSOR_KEY: value.detach().cpu().numpy().tolist()}
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    return value


def _from_json(value: dict) -> Any:
    if set(value) == {_TENSOR_KEY}:
        return torch.tensor(np.asarray(value[_TENSOR_KEY], dtype=np.float32))
    return value


def _payload(data: dict) -> bytes:
    return json.dumps(_to_json(data)).encode("utf-8")


def lcg_stream(count: int) -> np.ndarray:
    """The webui's fixed pseudo-random bytes (uint8), the same for every image."""
    values = np.empty(count, dtype=np.uint8)
    seed = 0
    for index in range(count):
        seed = (1664525 * seed + 1013904223) % 2**32
        values[index] = seed % 255
    return values


def _xor_low_nibbles(block: np.ndarray) -> np.ndarray:
    return block ^ (lcg_stream(block.size).reshape(block.shape) & 0x0F)


def _decorate(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """Dots in the high nibble, shaded by the vectors: what makes the webui's data blocks recognisable."""
    canvas = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(canvas)
    index = 0
    for x in range(-6, canvas.width, 8):
        for row, y in enumerate(range(-6, canvas.height, 8)):
            offset = 4 if row % 2 == 0 else 0
            shade = int(shades[index % len(shades)])
            index += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    return block ^ (np.asarray(canvas, dtype=np.uint8) & 0xF0)


def _nibble_blocks(payload: bytes, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Low and high nibbles of the compressed payload, each cyclically padded to (height, width, 3)."""
    data = np.frombuffer(zlib.compress(payload, level=9), dtype=np.uint8)
    size = data.size + (height - data.size % height)
    size += height * _CHANNELS - size % (height * _CHANNELS)
    low = np.resize(data & 0x0F, size).reshape(height, -1, _CHANNELS)
    high = np.resize(data >> 4, size).reshape(height, -1, _CHANNELS)
    return low, high


def embed_in_image(picture: Image.Image, data: dict) -> Image.Image:
    """The picture with the embedding's data blocks on both sides (the webui's layout)."""
    picture = picture.convert("RGB")
    low, high = _nibble_blocks(_payload(data), picture.height)
    first = next(iter(data["string_to_param"].values())).detach().float().cpu().numpy().reshape(-1)[:1024]
    peak = float(np.abs(first).max()) or 1.0
    shades = (np.abs(first) / peak * 255).astype(np.uint8)
    low = _xor_low_nibbles(_decorate(low, shades))
    high = _xor_low_nibbles(_decorate(high, shades[::-1]))
    canvas = Image.new("RGB", (picture.width + low.shape[1] + high.shape[1] + 2, picture.height), (0, 0, 0))
    canvas.paste(Image.fromarray(low, mode="RGB"), (0, 0))
    canvas.paste(picture, (low.shape[1] + 1, 0))
    canvas.paste(Image.fromarray(high, mode="RGB"), (low.shape[1] + picture.width + 2, 0))
    return canvas


def save_png_embedding(path: str | os.PathLike[str], picture: Image.Image, data: dict) -> Path:
    """A webui-loadable PNG embedding: pixel data blocks plus the `sd-ti-embedding` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(_payload(data)).decode("ascii"))
    buffer = io.BytesIO()
    embed_in_image(picture, data).save(buffer, format="PNG", pnginfo=info)
    return write_bytes(path, buffer.getvalue())


def _crop_black(pixels: np.ndarray) -> np.ndarray:
    """Trim border rows and columns that have no pixel with all three channels non-zero (as the webui reads)."""
    lit = (pixels > 0).all(axis=2)
    columns, rows = np.flatnonzero(lit.any(axis=0)), np.flatnonzero(lit.any(axis=1))
    if columns.size == 0:
        return pixels[:0, :0]
    return pixels[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]


def _inflate(data: bytes, path: Path) -> bytes:
    inflater = zlib.decompressobj()
    try:
        payload = inflater.decompress(data, _MAX_PAYLOAD)
    except zlib.error as error:
        raise ValueError(f"{path}: the image's embedding data block is corrupt ({error})") from error
    if inflater.unconsumed_tail:
        raise ValueError(f"{path}: the image's embedding data is larger than {_MAX_PAYLOAD} bytes")
    return payload


def extract_from_pixels(image: Image.Image, path: Path) -> dict:
    """The webui's reader: the low nibbles left and right of the black separator columns, XORed back."""
    pixels = _crop_black(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    black = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)
    if black.size < 2:
        raise ValueError(f"{path}: no '{TEXT_KEY}' text chunk and no embedding data blocks in the pixels")
    low = _xor_low_nibbles(pixels[:, : black.min()])
    high = _xor_low_nibbles(pixels[:, black.max() + 1 :])
    if low.shape != high.shape:
        raise ValueError(f"{path}: the embedding data blocks on both sides of the image differ in size")
    return _decode_json(_inflate(((high << 4) | low).tobytes(), path), path)


def _decode_json(payload: bytes, path: Path) -> dict:
    try:
        data = json.loads(payload, object_hook=_from_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: the embedded data is not the webui's JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the embedded data is not a dict")
    return data


def read_png_embedding(path: str | os.PathLike[str]) -> dict:
    """The webui embedding dict stored in a PNG: from the text chunk if present, else from the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}).get(TEXT_KEY)
            if text is None:
                return extract_from_pixels(image, path)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: cannot read the image ({error})") from error
    try:
        payload = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{path}: the '{TEXT_KEY}' text chunk is not base64 ({error})") from error
    return _decode_json(payload, path)
