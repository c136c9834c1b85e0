"""The base Stable Diffusion model and the tagger, as local paths (nothing is ever downloaded)."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from resources.paths import resolve
from resources.torch_device import TorchDevice


class BaseModelResource(ConfigurableResource):
    """A diffusers folder or a single .safetensors/.ckpt file of an SD 1.x model."""

    path: str = Field(default="models/tiny-sd", description="diffusers folder or single-file checkpoint")

    def resolved(self) -> Path:
        return resolve(self.path)

    def load(self, device: TorchDevice) -> "training.base_model.BaseModel":  # noqa: F821
        from training.base_model import load_base_model

        return load_base_model(self.resolved(), device=device.torch_device(), dtype=device.dtype())


class TaggerResource(ConfigurableResource):
    """Local tagger model folders by backend; a dataset may name another folder in its tagging settings."""

    wd14_model: str = Field(default="models/tiny-wd14", description="folder with model.onnx + selected_tags.csv")
    deepdanbooru_model: str = Field(
        default="models/deepdanbooru",
        description="DeepDanbooru project folder (project.json, model-*.keras/.h5 or model.onnx, tags.txt)",
    )
    threads: int = Field(default=0, description="CPU inference threads; 0 = all cores")

    def model_dir(self, backend: str, override: str | None = None) -> Path:
        if override:
            return resolve(override)
        if backend == "wd14":
            return resolve(self.wd14_model)
        if backend == "deepdanbooru":
            return resolve(self.deepdanbooru_model)
        raise ValueError(f"unknown tagger backend {backend!r}; known: wd14, deepdanbooru")

    def load(self, backend: str, override: str | None = None) -> "tagging.score_cache.Tagger":  # noqa: F821
        """The loaded model; a bad folder raises TaggerModelError naming the file, before any image is read."""
        folder = self.model_dir(backend, override)
        if backend == "deepdanbooru":
            from tagging.deepdanbooru import DeepDanbooruTagger

            return DeepDanbooruTagger(folder, threads=self.threads or None)
        from tagging.wd14 import WD14Tagger

        return WD14Tagger(folder, threads=self.threads or None)

    def load_blip(self, folder: str, device: TorchDevice) -> "tagging.blip.BlipCaptioner":  # noqa: F821
        """The BLIP captioner in a local folder (relative to the project root), on the run's torch device; a bad
        folder raises BlipModelError naming the missing file, before any image is read."""
        from tagging.blip import BlipCaptioner

        return BlipCaptioner(resolve(folder), device=str(device.torch_device()), dtype=device.dtype())
