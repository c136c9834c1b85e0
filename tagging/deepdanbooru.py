"""DeepDanbooru taggers: a project folder as the `deepdanbooru` package writes it (`project.json`,
`model-<type>.keras` or `.h5`, `tags.txt`, optionally `categories.json` or `tags-general.txt` /
`tags-character.txt`), run through TensorFlow, or the same folder with a converted `model.onnx`, run through
onnxruntime.

Preprocessing is the package's own evaluate path (`deepdanbooru.data.load_image_for_evaluate`: area resize
keeping the aspect ratio, edge padding, RGB 0-1), called rather than re-implemented, because the models were
trained on exactly that. TensorFlow and the package are an install extra (requirements-deepdanbooru.txt),
imported only when a DeepDanbooru tagger is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.hashing import file_sha256, json_sha256
from tagging.categories import CHARACTER_CATEGORY, GENERAL_CATEGORY, RATING_CATEGORY
from tagging.pixels import PixelRecipe
from tagging.wd14 import Tag, TaggerModelError, open_onnx_session

PROJECT_FILE = "project.json"
TAGS_FILE = "tags.txt"
ONNX_FILE = "model.onnx"


class DeepDanbooruTagger:
    """One loaded DeepDanbooru model (Keras or ONNX). Loading checks the whole folder, and that the model's
    output width matches tags.txt, before any image is touched."""

    def __init__(self, model_dir: Path, *, prefer_onnx: bool = True, threads: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise TaggerModelError(f"tagger folder {self.model_dir} does not exist (expected a DeepDanbooru project)")
        project = _read_project(self.model_dir / PROJECT_FILE)
        self.input_size = _square_side(self.model_dir / PROJECT_FILE, project)
        self.tags: list[Tag] = read_project_tags(self.model_dir)
        onnx_path = self.model_dir / ONNX_FILE
        model_path = onnx_path if prefer_onnx and onnx_path.is_file() else _keras_path(self.model_dir, project)
        self._files = [self.model_dir / PROJECT_FILE, model_path, self.model_dir / TAGS_FILE]
        if model_path == onnx_path:
            self._session = open_onnx_session(onnx_path, providers=None, threads=threads)
            self._input_name = self._session.get_inputs()[0].name
            self.provider: str = self._session.get_providers()[0]
            self._keras = None
        else:
            self._keras = _load_keras(model_path)
            self._session = None
            self.provider = _tensorflow_device()
        self._check_output_width(model_path)
        self.fingerprint: str = json_sha256([file_sha256(path) for path in self._files])

    @property
    def recipe(self) -> PixelRecipe:
        return PixelRecipe(kind="deepdanbooru", size=self.input_size)

    def predict(self, arrays: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) RGB 0-1 -> (N, len(tags)) float32 scores."""
        arrays = np.asarray(arrays, dtype=np.float32)
        if arrays.ndim != 4 or arrays.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"predict expects (N, {self.input_size}, {self.input_size}, 3), got {arrays.shape}")
        if len(arrays) == 0:
            return np.zeros((0, len(self.tags)), np.float32)
        if self._keras is not None:
            return np.asarray(self._keras.predict(arrays, verbose=0), dtype=np.float32)
        return np.asarray(self._session.run(None, {self._input_name: arrays})[0], dtype=np.float32)

    def close(self) -> None:
        self._keras = self._session = None

    def _check_output_width(self, model_path: Path) -> None:
        width = self.predict(np.ones((1, self.input_size, self.input_size, 3), np.float32)).shape[-1]
        if width != len(self.tags):
            raise TaggerModelError(
                f"tagger folder {self.model_dir}: {model_path.name} outputs {width} scores but {TAGS_FILE} lists "
                f"{len(self.tags)} tags; the two files do not belong together"
            )


def deepdanbooru_pixels(path: Path, size: int) -> np.ndarray:
    """The package's evaluate-path preprocessing of one image file: (size, size, 3) float32 RGB 0-1."""
    import deepdanbooru

    from tagging.images import ImageRejected

    try:
        pixels = deepdanbooru.data.load_image_for_evaluate(str(path), width=size, height=size)
    except Exception as exc:  # TensorFlow raises its own error types for undecodable files
        raise ImageRejected(Path(path), f"DeepDanbooru cannot decode it: {type(exc).__name__}") from exc
    return np.asarray(pixels, dtype=np.float32)


def read_project_tags(model_dir: Path) -> list[Tag]:
    """tags.txt (one tag a line) with categories from categories.json (the package's `[{"name", "start_index"}]`)
    or from tags-character.txt; `rating:*` tags are ratings, everything else general."""
    tags_path = model_dir / TAGS_FILE
    if not tags_path.is_file():
        raise TaggerModelError(f"tagger folder {model_dir} is missing {TAGS_FILE}")
    names = [line.strip() for line in tags_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise TaggerModelError(f"tagger folder {model_dir}: {TAGS_FILE} lists no tags")
    categories = [GENERAL_CATEGORY] * len(names)
    category_file, character_file = model_dir / "categories.json", model_dir / "tags-character.txt"
    if category_file.is_file():
        categories = _categories_from_json(category_file, len(names))
    elif character_file.is_file():
        characters = {line.strip() for line in character_file.read_text(encoding="utf-8").splitlines()}
        categories = [CHARACTER_CATEGORY if name in characters else GENERAL_CATEGORY for name in names]
    return [Tag(name=name, category=RATING_CATEGORY if name.startswith("rating:") else category)
            for name, category in zip(names, categories)]


def _categories_from_json(path: Path, count: int) -> list[int]:
    try:
        entries = sorted(json.loads(path.read_text(encoding="utf-8")), key=lambda entry: int(entry["start_index"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise TaggerModelError(f"tagger folder {path.parent}: {path.name} is not a list of "
                               f'{{"name", "start_index"}} entries ({exc})') from exc
    categories = [GENERAL_CATEGORY] * count
    for entry, following in zip(entries, [*entries[1:], None]):
        stop = int(following["start_index"]) if following else count
        value = CHARACTER_CATEGORY if str(entry.get("name", "")).lower() == "character" else GENERAL_CATEGORY
        categories[int(entry["start_index"]):stop] = [value] * (stop - int(entry["start_index"]))
    return categories


def _read_project(path: Path) -> dict:
    if not path.is_file():
        raise TaggerModelError(f"tagger folder {path.parent} is missing {PROJECT_FILE}")
    try:
        project = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TaggerModelError(f"tagger folder {path.parent}: {PROJECT_FILE} is not valid JSON ({exc})") from exc
    if not isinstance(project, dict) or "model" not in project:
        raise TaggerModelError(f"tagger folder {path.parent}: {PROJECT_FILE} lacks the \"model\" key")
    return project


def _square_side(path: Path, project: dict) -> int:
    width, height = project.get("image_width"), project.get("image_height")
    if not isinstance(width, int) or width != height or width < 1:
        raise TaggerModelError(f"tagger folder {path.parent}: {PROJECT_FILE} needs equal positive integer "
                               f"image_width and image_height, got {width} x {height}")
    return width


def _keras_path(model_dir: Path, project: dict) -> Path:
    """The package's own lookup order (load_model_from_project): `.keras` first, then `.h5`."""
    stem = f"model-{project['model']}"
    for suffix in (".keras", ".h5"):
        if (model_dir / f"{stem}{suffix}").is_file():
            return model_dir / f"{stem}{suffix}"
    raise TaggerModelError(f"tagger folder {model_dir} is missing {stem}.keras or {stem}.h5 (or {ONNX_FILE})")


def _load_keras(model_path: Path) -> object:  # a Keras model; TensorFlow is an optional import
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise TaggerModelError(f"tagger folder {model_path.parent}: Keras DeepDanbooru models need TensorFlow; "
                               "install requirements-deepdanbooru.txt") from exc
    try:
        return tf.keras.models.load_model(str(model_path), compile=False)
    except (OSError, ValueError, TypeError) as exc:
        raise TaggerModelError(f"tagger folder {model_path.parent}: {model_path.name} cannot be loaded by "
                               f"Keras ({exc})") from exc


def _tensorflow_device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"tensorflow {tf.__version__} {'GPU' if gpus else 'CPU'}"
