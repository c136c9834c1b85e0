"""The focal point of an image, for the webui's "auto focal point crop": faces (OpenCV's bundled Haar
cascade), corners/edges and the most detailed window each pull the crop towards themselves, weighted.

Why these three: faces are what a person crops for; corners and entropy find the subject of pictures
without faces (objects, drawings) and cost milliseconds, so the weights, not a model, decide the mix.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image

# Work on a small copy: the focal point only needs to be right to a few percent of the image.
_ANALYSIS_SIDE = 256
Point = tuple[float, float]
Detector = Callable[[np.ndarray], list[Point]]


@lru_cache(maxsize=1)
def _face_cascade():
    import cv2  # imported lazily: only the focal crop needs OpenCV

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError("OpenCV's bundled frontal-face cascade could not be loaded (opencv-python-headless 4.x)")
    return cascade


def face_points(grey: np.ndarray) -> list[Point]:
    """Centres of the faces OpenCV's frontal-face cascade finds (at least 1/10 of the short side)."""
    side = max(min(grey.shape) // 10, 8)
    faces = _face_cascade().detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    return [(x + w / 2, y + h / 2) for x, y, w, h in faces]


def corner_points(grey: np.ndarray) -> list[Point]:
    """Strong corners (Shi-Tomasi), the webui's "edges" interest."""
    import cv2

    corners = cv2.goodFeaturesToTrack(grey, maxCorners=100, qualityLevel=0.04, minDistance=7)
    return [] if corners is None else [(float(x), float(y)) for x, y in corners.reshape(-1, 2)]


def entropy_points(grey: np.ndarray) -> list[Point]:
    """Centre of the square window (short side) with the highest grey-level entropy, slid along the long side."""
    height, width = grey.shape
    side = min(width, height)
    steps = max(width, height) - side
    best, best_entropy = (width / 2, height / 2), -1.0
    for offset in range(0, steps + 1, max(1, steps // 32) if steps else 1):
        window = grey[:, offset:offset + side] if width >= height else grey[offset:offset + side, :]
        entropy = _entropy(window)
        if entropy > best_entropy:
            centre = (offset + side / 2, height / 2) if width >= height else (width / 2, offset + side / 2)
            best, best_entropy = centre, entropy
    return [best]


def _entropy(values: np.ndarray) -> float:
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / values.size
    return float(-(p * np.log2(p)).sum())


def focal_point(
    image: Image.Image,
    *,
    face: float = 0.9,
    entropy: float = 0.15,
    edges: float = 0.5,
    detectors: dict[str, Detector] | None = None,
) -> Point:
    """Weighted mean of each interest's centroid (in source pixels); the image centre when nothing is found.

    `detectors` replaces the default detectors by name (`face`, `entropy`, `edges`), e.g. in tests.
    """
    scale = min(1.0, _ANALYSIS_SIDE / min(image.size))
    small = image.convert("L")
    if scale < 1.0:
        small = small.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    grey = np.asarray(small, dtype=np.uint8)
    found = {"face": face_points, "entropy": entropy_points, "edges": corner_points} | (detectors or {})
    weights = {"face": face, "entropy": entropy, "edges": edges}
    total, x_sum, y_sum = 0.0, 0.0, 0.0
    for name, weight in weights.items():
        if weight <= 0:
            continue
        points = found[name](grey)
        if points:
            xs, ys = zip(*points)
            total += weight
            x_sum += weight * float(np.mean(xs))
            y_sum += weight * float(np.mean(ys))
    if total == 0:
        return image.width / 2, image.height / 2
    return x_sum / total / scale, y_sum / total / scale
