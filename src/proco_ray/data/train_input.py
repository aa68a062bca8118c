"""What a training stage reads: its sampling (class- or instance-balanced rows), which augmentation, one view or two.

The one description of a stage's input shared by the method (which plans its
stages), the feeds (which draw its rows) and the worker (which makes its views).
"""

from __future__ import annotations

from dataclasses import dataclass

from proco_ray.config import INSTANCE_BALANCED


@dataclass(frozen=True)
class TrainInput:
    """A stage's input: `sampling` is a config `Sampling` value, `augmentation` names the views' recipe."""

    sampling: str = INSTANCE_BALANCED
    augmentation: str = "moco_v2"
    views: int = 2

    @property
    def dataset(self) -> str:
        """The Ray Dataset that feeds it: the rows are the same for every augmentation and number of views
        (the worker makes the views), so only the sampling tells datasets apart."""
        return f"train_{self.sampling}"
