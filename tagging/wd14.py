"""The WD14 (SmilingWolf) ONNX tagger contract: a folder with `model.onnx` + `selected_tags.csv`, NHWC
BGR 0-255 input padded white to a square, one sigmoid score per CSV row. Real models and the project's tiny
one load through this same code."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from PIL import Image

from common.hashing import file_sha256, json_sha256
from tagging.images import load_rgb
from tagging.pixels import PixelRecipe, wd14_pixels

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
TAG_COLUMNS = ("tag_id", "name", "category", "count")
_log = logging.getLogger(__name__)
_ORT_LOAD_ERRORS = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NoSuchFile,
    ort_errors.NotImplemented,
    ort_errors.RuntimeException,
)


class TaggerModelError(Exception):
    """The tagger folder is missing or does not hold a usable WD14 model; the message names the folder."""


@dataclass(frozen=True)
class Tag:
    name: str
    category: int  # 9 rating, 0 general, 4 character (see tagging.categories)


class WD14Tagger:
    """One loaded WD14 model. Loading checks the whole contract up front so a bad folder fails at start-up with
    a message about the folder, not later inside onnxruntime with a shape error."""

    def __init__(
        self,
        model_dir: Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        model_path, tags_path = self.model_dir / MODEL_FILE, self.model_dir / TAGS_FILE
        _require_files(self.model_dir, [model_path, tags_path])
        self.tags: list[Tag] = _read_tags(tags_path)
        self._session = open_onnx_session(model_path, providers=providers, threads=threads)
        self.provider: str = self._session.get_providers()[0]
        model_input = self._session.get_inputs()[0]
        self._input_name: str = model_input.name
        self.input_size: int = _input_size(model_path, model_input.shape)
        self.fixed_batch: int | None = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
        self._check_output_width(model_path, tags_path)
        self.fingerprint: str = json_sha256([file_sha256(model_path), file_sha256(tags_path)])

    @property
    def recipe(self) -> PixelRecipe:
        """This model's preprocessing in a form worker processes can run."""
        return PixelRecipe(kind="wd14", size=self.input_size)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(H, W, 3) float32 BGR 0-255, prepared exactly as SmilingWolf's reference code does (see wd14_pixels),
        because the models were trained on that."""
        return wd14_pixels(image, self.input_size).astype(np.float32)

    def close(self) -> None:
        """Release the inference session (and its GPU memory) as soon as the run is done with it."""
        self._session = None

    def predict(self, arrays: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) -> (N, len(tags)) float32 scores. Fixed-batch (v2-style) models get exactly their batch
        size per call; the last chunk is padded and the padding's scores dropped."""
        arrays = np.asarray(arrays, dtype=np.float32)
        expected = (self.input_size, self.input_size, 3)
        if arrays.ndim != 4 or arrays.shape[1:] != expected:
            raise ValueError(f"predict expects an array of shape (N, {', '.join(map(str, expected))}), "
                             f"got {arrays.shape}")
        if len(arrays) == 0:
            return np.zeros((0, len(self.tags)), dtype=np.float32)
        step = self.fixed_batch or len(arrays)
        outputs = []
        for start in range(0, len(arrays), step):
            chunk = arrays[start : start + step]
            if len(chunk) < step:
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *expected), np.float32)])
            outputs.append(self._session.run(None, {self._input_name: chunk})[0][: min(step, len(arrays) - start)])
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def _check_output_width(self, model_path: Path, tags_path: Path) -> None:
        width = self._session.get_outputs()[0].shape[-1]
        if not isinstance(width, int):  # symbolic width: only a run can tell
            probe = np.full((self.fixed_batch or 1, self.input_size, self.input_size, 3), 255.0, np.float32)
            width = self._session.run(None, {self._input_name: probe})[0].shape[-1]
        if width != len(self.tags):
            raise TaggerModelError(
                f"tagger folder {self.model_dir}: {model_path.name} outputs {width} scores but "
                f"{tags_path.name} lists {len(self.tags)} tags; the two files do not belong together"
            )


def _require_files(model_dir: Path, files: list[Path]) -> None:
    if not model_dir.is_dir():
        raise TaggerModelError(f"tagger folder {model_dir} does not exist (expected {MODEL_FILE} and {TAGS_FILE})")
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise TaggerModelError(f"tagger folder {model_dir} is missing {', '.join(missing)}")


def _read_tags(tags_path: Path) -> list[Tag]:
    try:
        # keep_default_na=False: tags such as "na" or "null" are real tag names, not missing values.
        table = pd.read_csv(tags_path, dtype={"name": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TaggerModelError(
            f"tagger folder {tags_path.parent}: {tags_path.name} is not a readable CSV ({exc})"
        ) from exc
    missing = [column for column in TAG_COLUMNS if column not in table.columns]
    if missing:
        raise TaggerModelError(
            f"tagger folder {tags_path.parent}: {tags_path.name} lacks the columns {missing} "
            f"(expected header {','.join(TAG_COLUMNS)})"
        )
    categories = pd.to_numeric(table["category"], errors="coerce")
    bad = table.index[categories.isna() | (table["name"].str.strip() == "")]
    if len(bad):
        raise TaggerModelError(
            f"tagger folder {tags_path.parent}: {tags_path.name} has an empty name or non-numeric category "
            f"on data row {int(bad[0]) + 1}"
        )
    return [Tag(name=name, category=int(category)) for name, category in zip(table["name"], categories)]


def open_onnx_session(model_path: Path, *, providers: Sequence[str] | None, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    # Idle inference threads must sleep, not spin: decoding workers need those cores between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if providers is None:
        available = ort.get_available_providers()
        cuda = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
        providers = [*cuda, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=list(providers))
    except _ORT_LOAD_ERRORS as exc:
        raise TaggerModelError(
            f"tagger folder {model_path.parent}: {model_path.name} cannot be loaded by onnxruntime ({exc})"
        ) from exc
    used = session.get_providers()[0]
    if providers[0] != used:  # onnxruntime falls back silently; users should hear about it
        _log.warning("tagger %s asked for %s but runs on %s", model_path, providers[0], used)
    return session


def _input_size(model_path: Path, shape: Sequence[int | str | None]) -> int:
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise TaggerModelError(
            f"tagger folder {model_path.parent}: {model_path.name} input shape {list(shape)} is not the WD14 "
            "layout [batch, size, size, 3] (NHWC)"
        )
    return shape[1]


def score_images(
    tagger: WD14Tagger,
    image_paths: Sequence[Path],
    *,
    batch_size: int = 8,
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Every tag's score for every image, in long format (image, tag, category, score).

    No threshold is applied here: thresholds belong to the caption stage, so changing one re-captions in
    milliseconds without running the model again.
    """
    paths = [Path(path) for path in image_paths]
    labels = [path.name for path in paths] if names is None else list(names)
    if len(labels) != len(paths):
        raise ValueError(f"score_images got {len(paths)} image paths but {len(labels)} names")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batches = [
        tagger.predict(np.stack([tagger.preprocess(load_rgb(path)) for path in paths[start : start + batch_size]]))
        for start in range(0, len(paths), batch_size)
    ]
    scores = np.concatenate(batches) if batches else np.zeros((0, len(tagger.tags)), np.float32)
    tag_names = np.array([tag.name for tag in tagger.tags], dtype=object)
    categories = np.array([tag.category for tag in tagger.tags], dtype=np.int64)
    return pd.DataFrame(
        {
            "image": np.repeat(np.array(labels, dtype=object), len(tag_names)),
            "tag": np.tile(tag_names, len(labels)),
            "category": np.tile(categories, len(labels)),
            "score": scores.reshape(-1).astype(np.float32),
        }
    )
