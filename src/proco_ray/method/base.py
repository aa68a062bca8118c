"""What every training method is: its stages, its loss per batch, the network it builds.

A method owns its loss and any state that must travel with a checkpoint (ProCo's
queue and recalibration weights), builds the network it trains, and says in
which stages it trains (the CL baselines train in two). The training loop calls the
hooks below (`build_model`, `trainable_parameters`, `enter_stage`, `reseed`,
`training_loss`, `predict`, `state_scalars`) and knows nothing of the maths.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from proco_ray.config import AUTO, INSTANCE_BALANCED, MethodConfig, ModelConfig
from proco_ray.data.train_input import TrainInput
from proco_ray.method.losses import logit_adjustments
from proco_ray.method.networks import Classifier

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class Choices:
    """What `auto` means for a registered method: its sampling, single-view augmentation and proto-loss form."""

    sampling: str = INSTANCE_BALANCED
    augmentation: str = "supervised"
    proto_form: str = "split"

    def proto_form_for(self, setting: str) -> str:
        """method.proto_form as set, or the registration's form for auto."""
        return self.proto_form if setting == AUTO else setting


@dataclass(frozen=True)
class Stage:
    """A phase of training with its own epochs, what it reads (sampling, augmentation, views) and trainable parameters."""

    name: str
    epochs: int
    input: TrainInput

    @property
    def sampling(self) -> str:
        return self.input.sampling


@dataclass
class LossOutput:
    loss: Tensor
    logs: dict[str, Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(model, "module", model)


class Method(nn.Module):
    """Base class: single-stage, all parameters trainable, logits from `classify`; sampling and augmentation
    are the registration's `Choices` (registry.py)."""

    views = 1
    sampling_switch = False  # whether method.sampling may change its batches (ProCo); the others name it: ce / ce_resample
    find_unused_parameters = False
    adjusts_logits = False  # honours method.logit_adjustment
    logit_offsets: Tensor

    def __init__(
        self,
        cfg: MethodConfig,
        model_cfg: ModelConfig,
        num_classes: int,
        class_counts: Sequence[int],
        choices: Choices | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if len(class_counts) != num_classes:
            raise ValueError(f"class_counts must have {num_classes} entries, got {len(class_counts)}")
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.choices = choices or Choices()
        self.num_classes = num_classes
        self.class_counts = [int(c) for c in class_counts]
        offsets = logit_adjustments(self.class_counts, cfg.logit_adjustment) if self.adjusts_logits else torch.zeros(0)
        self.register_buffer("logit_offsets", offsets, persistent=False)
        self.init_state()

    def init_state(self) -> None:
        """Hook: build the method's own modules and buffers from its settings (end of __init__)."""

    @property
    def name(self) -> str:
        return self.cfg.name

    def adjusted(self, logits: Tensor) -> Tensor:
        """The training logits of the logit-adjusted loss (`method.logit_adjustment` = tau; 0 leaves them as they are)."""
        return logits + self.logit_offsets.to(logits.dtype) if self.cfg.logit_adjustment else logits

    def build_model(self) -> nn.Module:
        return Classifier(self.num_classes, self.model_cfg)

    @classmethod
    def own_stages(cls, cfg: MethodConfig, epochs: int, choices: Choices) -> list[Stage]:
        """The stages with the method's own sampling and augmentation (registry.stages_for applies the settings)."""
        return [Stage("main", epochs, TrainInput(choices.sampling, choices.augmentation, cls.views))]

    def trainable_parameters(self, model: nn.Module, stage: Stage) -> Iterator[nn.Parameter]:
        return (p for p in unwrap(model).parameters() if p.requires_grad)

    def enter_stage(self, model: nn.Module, stage: Stage) -> None:
        """Hook for stage-specific freezing; called before the stage's first epoch."""

    def reseed(self, seed: int, device: torch.device) -> None:
        """Seed the method's own random draws; the same seed on every rank keeps ranks in step."""

    def state_scalars(self, class_names: list[str]) -> dict[str, float]:
        """Scalars of the method's own state to log each epoch (ProCo: recalibration weights, queue histogram)."""
        return {}

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        raise NotImplementedError

    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        return unwrap(model).classify(images)
