"""The full state of a training run (any method), saved with each checkpoint so a crash loses nothing.

Why everything and not just the vectors: resuming from the weights alone restarts AdamW's moments, the
batch order and every random draw, so the resumed run is a different run. With the optimizer, gradient
scaler, sampler position, generator state, step and loss log restored, a run killed at step k and
resumed ends with the same bytes as one that was never interrupted (on CPU). The evaluation rows (validation
and training loss at each checkpoint) travel with it, so a resumed run's validation.csv and early stopping
see the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_path

STATE_FILE = "training_state.pt"
_FORMAT = 3
_FORMATS_READ = (1, 2, 3)  # 1 had no evaluation rows (it resumes with none); 1 and 2 held textual inversion's
# "vectors" only, read as the weights {"vectors": ...}


@dataclass
class TrainingState:
    run_key: str  # hash of everything that defines the run (settings, examples, base model)
    step: int  # optimizer steps completed
    weights: dict[str, torch.Tensor]  # everything trained, by the method's names; float32 CPU
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    generator: torch.Tensor  # torch.Generator.get_state()
    sampler: dict[str, Any]  # EpochSampler.state_dict()
    losses: list[float]
    rates: list[float]
    evaluations: list[list[float]] = field(default_factory=list)  # [step, validation_loss, training_loss] rows
    validation_key: str = ""  # the validation set the rows were measured on ("" when there was none)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "run_key": self.run_key,
            "step": self.step,
            "weights": {name: tensor.detach().to("cpu", torch.float32).clone() for name, tensor in self.weights.items()},
            "optimizer": self.optimizer,
            "scaler": self.scaler,
            "generator": self.generator,
            "sampler": self.sampler,
            "losses": list(self.losses),
            "rates": list(self.rates),
            "evaluations": [list(row) for row in self.evaluations],
            "validation_key": self.validation_key,
        }


def save_state(path: Path, state: TrainingState) -> Path:
    with atomic_path(path) as tmp:
        torch.save(state.to_dict(), tmp)
    return Path(path)


def load_state(path: Path, run_key: str) -> TrainingState | None:
    """The saved state if it belongs to this run; None when absent or from different settings/data.

    A state from another run is not an error: changed settings mean a new run, as in the webui.
    An unreadable state file is, since silently starting over would throw away hours of training.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a damaged file
        raise ValueError(f"{path}: cannot read the training state ({error}); delete it to start over") from error
    if not isinstance(raw, dict) or raw.get("format") not in _FORMATS_READ:
        raise ValueError(f"{path}: not a training state of format {_FORMAT}; delete it to start over")
    if raw["run_key"] != run_key:
        return None
    fields = {key: raw[key] for key in TrainingState.__dataclass_fields__ if key in raw}
    if "vectors" in raw:
        fields["weights"] = {"vectors": raw["vectors"]}
    if not all(torch.isfinite(tensor).all() for tensor in fields["weights"].values()):
        raise ValueError(f"{path}: the saved weights are not finite; delete it to start over")
    return TrainingState(**fields)
