"""Pictures of a dataset for people: a grid of prepared images, and the sources with their crop boxes drawn,
so a wrong crop mode or a bad focal point is visible in the UI at a glance."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from tagging.images import ImageRejected, load_rgb

Box = tuple[int, int, int, int]


def _grid(count: int, columns: int, cell: int) -> tuple[Image.Image, int]:
    if count < 1:
        raise ValueError("a contact sheet needs at least one image")
    if columns < 1 or cell < 1:
        raise ValueError(f"columns and cell must be positive, got columns={columns}, cell={cell}")
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    return Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255)), columns


def contact_sheet(paths: list[Path], *, columns: int = 8, cell: int = 96, max_images: int = 64) -> Image.Image:
    """A grid of thumbnails so a person can eyeball a whole dataset in the UI at a glance.

    An unreadable image becomes a grey cell instead of failing the sheet: the sheet is for looking, and the
    manifest already records why a file was skipped.
    """
    shown = list(paths)[:max_images]
    sheet, columns = _grid(len(shown), columns, cell)
    for index, path in enumerate(shown):
        origin = ((index % columns) * cell, (index // columns) * cell)
        try:
            thumb = ImageOps.contain(load_rgb(path), (cell, cell), method=Image.Resampling.LANCZOS)
        except ImageRejected:
            sheet.paste((128, 128, 128), (*origin, origin[0] + cell, origin[1] + cell))
            continue
        sheet.paste(thumb, (origin[0] + (cell - thumb.width) // 2, origin[1] + (cell - thumb.height) // 2))
    return sheet


def crop_sheet(
    sources: list[tuple[Path, tuple[int, int], list[Box]]], *, columns: int = 8, cell: int = 128,
    max_images: int = 32,
) -> Image.Image:
    """Pictures of sources (a thumbnail or the source itself, with the source's full size) with each crop box,
    in source pixels, drawn in red: what was kept of each image."""
    shown = list(sources)[:max_images]
    sheet, columns = _grid(len(shown), columns, cell)
    draw = ImageDraw.Draw(sheet)
    for index, (path, (source_width, _), boxes) in enumerate(shown):
        origin = ((index % columns) * cell, (index // columns) * cell)
        try:
            picture = load_rgb(path)
        except ImageRejected:
            draw.rectangle((*origin, origin[0] + cell - 1, origin[1] + cell - 1), fill=(128, 128, 128))
            continue
        thumb = ImageOps.contain(picture, (cell, cell), method=Image.Resampling.BILINEAR)
        x0, y0 = origin[0] + (cell - thumb.width) // 2, origin[1] + (cell - thumb.height) // 2
        sheet.paste(thumb, (x0, y0))
        scale = thumb.width / source_width
        for left, top, right, bottom in boxes:
            draw.rectangle((x0 + left * scale, y0 + top * scale, x0 + right * scale - 1, y0 + bottom * scale - 1),
                           outline=(255, 0, 0), width=2)
    return sheet
