"""Where to cut and what size to make: the crop geometry of every mode, as boxes in source pixels.

Why boxes and not images: cropping the source first and resizing only the box keeps pixels outside the
crop from bleeding into its edges through the filter, and the boxes are what the contact sheet draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from tagging.focal import focal_point
from tagging.prepare_options import PrepareOptions


class CropRefused(ValueError):
    """No crop of this mode fits the image (e.g. no auto-sized crop within the error threshold)."""


@dataclass(frozen=True)
class Region:
    box: tuple[int, int, int, int]  # left, top, right, bottom in source pixels
    size: tuple[int, int]  # output width, height


def plan_regions(image: Image.Image, options: PrepareOptions) -> list[Region]:
    """The regions one source becomes under `options.crop`, in a stable order."""
    width, height = image.size
    side = options.size
    if options.crop == "centre":
        return [Region(centre_box(width, height, 1.0), (side, side))]
    if options.crop == "focal":
        x, y = focal_point(image, face=options.focal_crop_face_weight, entropy=options.focal_crop_entropy_weight,
                           edges=options.focal_crop_edges_weight)
        return [Region(box_around(width, height, 1.0, (x, y)), (side, side))]
    if options.crop == "split":
        return [Region(box, (side, side)) for box in split_boxes(width, height, options)]
    if options.crop == "auto":
        out = auto_size(width, height, options)
        return [Region(centre_box(width, height, out[0] / out[1]), out)]
    out, box = bucket_for(width, height, options)
    return [Region(box, out)]


def centre_box(width: int, height: int, aspect: float) -> tuple[int, int, int, int]:
    """The largest box of `aspect` (width / height) centred in the image."""
    return box_around(width, height, aspect, (width / 2, height / 2))


def box_around(width: int, height: int, aspect: float, centre: tuple[float, float]) -> tuple[int, int, int, int]:
    """The largest box of `aspect` centred as close to `centre` as the image edges allow (webui autocrop)."""
    crop_w = min(width, round(height * aspect))
    crop_h = min(height, round(crop_w / aspect))
    left = int(min(max(centre[0] - crop_w / 2, 0), width - crop_w))
    top = int(min(max(centre[1] - crop_h / 2, 0), height - crop_h))
    return left, top, left + crop_w, top + crop_h


def split_boxes(width: int, height: int, options: PrepareOptions) -> list[tuple[int, int, int, int]]:
    """webui "split oversized images": an image longer than (1 + threshold) squares becomes overlapping
    square tiles along its long side; others get the centre square."""
    short, long = sorted((width, height))
    if long / short <= 1.0 + options.split_threshold:
        return [centre_box(width, height, 1.0)]
    count = math.ceil((long - short * options.overlap_ratio) / (short * (1.0 - options.overlap_ratio)))
    step = (long - short) / max(count - 1, 1)
    offsets = [int(step * index) for index in range(count)]
    if width >= height:
        return [(x, 0, x + short, short) for x in offsets]
    return [(0, y, short, y + short) for y in offsets]


def auto_size(width: int, height: int, options: PrepareOptions) -> tuple[int, int]:
    """webui "auto-sized crop": the output size (multiples of 64 in [min, max] side and area) that maximises
    area (or minimises the aspect error) among those within the error threshold of the image's aspect."""
    ratio = width / height

    def error(w: int, h: int) -> float:
        x = ratio / (w / h)
        return 1 - (x if x < 1 else 1 / x)

    sides = range(options.multicrop_mindim, options.multicrop_maxdim + 1, 64)
    candidates = [(w, h) for w in sides for h in sides
                  if options.multicrop_minarea <= w * h <= options.multicrop_maxarea and error(w, h) <= options.multicrop_threshold]
    if not candidates:
        raise CropRefused(f"no auto-sized crop within {options.multicrop_threshold} aspect error of {width} x {height}")
    if options.multicrop_objective == "area":
        return max(candidates, key=lambda wh: (wh[0] * wh[1], -error(*wh)))
    return max(candidates, key=lambda wh: (-error(*wh), wh[0] * wh[1]))


def bucket_resolutions(options: PrepareOptions) -> list[tuple[int, int]]:
    """kohya's `make_bucket_resolutions`: every (w, h) in steps that fits the max area (size x size)."""
    step, max_area = options.bucket_reso_steps, options.size * options.size
    found = {(int(math.sqrt(max_area) // step) * step,) * 2}
    for width in range(options.min_bucket_reso, options.max_bucket_reso + 1, step):
        height = min(options.max_bucket_reso, int((max_area // width) // step) * step)
        if height >= options.min_bucket_reso:
            found |= {(width, height), (height, width)}
    return sorted(found)


def bucket_for(width: int, height: int, options: PrepareOptions) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """kohya bucketing: the output size and the centred source box that is resized to it. With no upscale the
    bucket follows the image (scaled down to the max area only), else the nearest predefined aspect."""
    aspect = width / height
    step = options.bucket_reso_steps
    if options.bucket_no_upscale:
        max_area = options.size * options.size
        if width * height > max_area:
            # kohya: scale to the max area, then round whichever side keeps the aspect better to the step.
            scaled_w = math.sqrt(max_area * aspect)
            by_w = _steps(scaled_w, step)
            by_h = _steps(scaled_w / aspect, step)
            error_w = abs(by_w / _steps(by_w / aspect, step) - aspect)
            error_h = abs(_steps(by_h * aspect, step) / by_h - aspect)
            resized = (by_w, int(by_w / aspect + 0.5)) if error_w < error_h else (int(by_h * aspect + 0.5), by_h)
        else:
            resized = (width, height)
        out = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        if min(out) < step:
            raise CropRefused(f"{width} x {height} is too small for a {step}-pixel bucket step without upscaling")
    else:
        out = min(bucket_resolutions(options), key=lambda wh: abs(wh[0] / wh[1] - aspect))
    return out, centre_box(width, height, out[0] / out[1])


def _steps(value: float, step: int) -> int:
    """kohya's round_to_steps (half up), never below one step."""
    return max(step, int(value / step + 0.5) * step)
