"""Dagster resources: the settings that say where things are and which device/models to use.

Each resource is a thin `ConfigurableResource` that hands the plain libraries (`tagging`, `training`) what
they need, so switching from the embedded default to a user's real models is a configuration change only.
"""

from resources.models import BaseModelResource, TaggerResource
from resources.paths import PROJECT_ROOT, ProjectPaths
from resources.torch_device import TorchDevice

__all__ = ["PROJECT_ROOT", "BaseModelResource", "ProjectPaths", "TaggerResource", "TorchDevice"]
