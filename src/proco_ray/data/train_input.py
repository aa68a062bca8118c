"""What a training stage reads: class-balanced rows or not, which augmentation, one view or two.

The one description of a stage's input shared by the method (which plans its
stages), the feeds (which draw its rows) and the worker (which makes its views).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainInput:
    """A stage's input: `resample` draws class-balanced rows, `augmentation` names the views' recipe."""

    resample: bool = False
    augmentation: str = "moco_v2"
    views: int = 2

    @property
    def dataset(self) -> str:
        """The Ray Dataset that feeds it: the rows are the same for every augmentation and number of views
        (the worker makes the views), so only the sampling tells datasets apart."""
        return "train_resampled" if self.resample else "train_shuffled"
