"""Images inlined as data URLs (asset metadata, the HTML report): scaled down so what embeds them stays light."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image


def thumbnail_data_url(image: Image.Image | Path, *, max_side: int = 512, max_png_bytes: int | None = None) -> str:
    """A `data:` URL of `image` scaled to fit `max_side`: PNG (crisp labels), or JPEG when the PNG would
    exceed `max_png_bytes` (photographic grids). The same pixels always give the same bytes."""
    if isinstance(image, Path):
        with Image.open(image) as opened:  # closed at once: a report reads many files
            picture = opened.convert("RGB")
    else:
        picture = image.convert("RGB")
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    mime = "image/png"
    if max_png_bytes is not None and buffer.tell() > max_png_bytes:
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
