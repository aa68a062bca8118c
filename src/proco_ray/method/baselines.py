"""The paper's baselines (its Table 2): CE with and without class-balanced sampling, focal loss, LDAM-DRW,
OHEM, DANIL, MTL and CL (SupCon pre-training, then a linear classifier)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proco_ray.config import CLASS_BALANCED, INSTANCE_BALANCED, MethodConfig
from proco_ray.data.sources import HAM10000_LOCATIONS
from proco_ray.data.train_input import TrainInput
from proco_ray.method.base import Batch, Choices, LossOutput, Method, Stage, unwrap
from proco_ray.method.losses import (
    LDAMLoss,
    distractor_aware_loss,
    drw_class_weights,
    embedding_std,
    focal_loss,
    ohem_loss,
    supcon_loss,
)
from proco_ray.method.networks import Classifier
from proco_ray.method.registry import register


def _labelled_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    return model(batch["view_q"]), batch["label"]


@register("ce")
@register("ce_resample", sampling=CLASS_BALANCED)
class CrossEntropy(Method):
    """CE on the registration's sampling (ce_resample: class-balanced, drawn by the data pipeline); with
    `method.logit_adjustment` tau > 0, Menon et al.'s logit-adjusted loss."""

    adjusts_logits = True

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        logits, labels = _labelled_logits(model, batch)
        loss = F.cross_entropy(self.adjusted(logits), labels)
        return LossOutput(loss, {"ce": loss.detach()})


@register("focal")
class Focal(Method):
    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        logits, labels = _labelled_logits(model, batch)
        loss = focal_loss(logits, labels, gamma=self.cfg.focal_gamma)
        return LossOutput(loss, {"focal": loss.detach()})


@register("ldam_drw")
class LDAMDRW(Method):
    """LDAM margins throughout; class-balanced re-weighting deferred to the last part of training."""

    class_weights: Tensor

    def init_state(self) -> None:
        self.ldam = LDAMLoss(self.class_counts, self.cfg.ldam_max_margin, self.cfg.ldam_scale)
        self.register_buffer("class_weights", drw_class_weights(self.class_counts, self.cfg.drw_beta))

    def build_model(self) -> nn.Module:
        return Classifier(self.num_classes, self.model_cfg, cosine=True)

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        logits, labels = _labelled_logits(model, batch)
        drw_start_epoch = math.floor(self.cfg.drw_start_fraction * stage.epochs)
        weight = self.class_weights if epoch >= drw_start_epoch else None
        loss = self.ldam(logits, labels, weight=weight)
        return LossOutput(loss, {"ldam": loss.detach()})


@register("ohem")
class OHEM(Method):
    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        logits, labels = _labelled_logits(model, batch)
        loss = ohem_loss(logits, labels, self.cfg.ohem_keep_ratio)
        return LossOutput(loss, {"ohem": loss.detach()})


@register("danil")
class DANIL(Method):
    """DANIL (Gong et al., MICCAI 2020): CE plus the distractor-aware loss on layer3's neurons, one stage,
    instance-balanced. Reconstructed from the paper's description (no code was published): docs/method.md."""

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        logits, neurons = model(batch["view_q"], neurons=True)
        labels = batch["label"]
        ce = F.cross_entropy(logits, labels)
        distractor = distractor_aware_loss(logits, neurons, labels, self.cfg.danil_eps)
        return LossOutput(ce + self.cfg.danil_weight * distractor, {"ce": ce.detach(), "distractor": distractor.detach()})


@register("mtl")
class MTL(Method):
    """MTL (Liao and Luo, AAAI-17 workshops): a lesion-class head and a body-location head on one backbone,
    trained jointly, instance-balanced; predicts with the lesion head. Reads the shards' `location` column
    (ISIC 2018 prepared with HAM10000_metadata.csv beside the images); unknown sites (-1) are left out."""

    def build_model(self) -> nn.Module:
        return Classifier(self.num_classes, self.model_cfg, locations=len(HAM10000_LOCATIONS))

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        if "location" not in batch:
            raise ValueError(
                "method mtl needs a body-location column in the training batches (prepare ISIC 2018 with HAM10000_metadata.csv)"
            )
        logits, location_logits = model(batch["view_q"], locations=True)
        ce = F.cross_entropy(logits, batch["label"])
        known = (batch["location"] >= 0).sum().clamp(min=1)
        location = F.cross_entropy(location_logits, batch["location"], ignore_index=-1, reduction="sum") / known
        return LossOutput(ce + self.cfg.mtl_weight * location, {"ce": ce.detach(), "location_ce": location.detach()})


@register("cl")
@register("cl_resample", sampling=CLASS_BALANCED)
class SupConLinear(Method):
    """CL (Marrakchi et al. 2021): SupCon pre-training, then a linear classifier on the frozen backbone
    (cl_resample: on class-balanced batches)."""

    find_unused_parameters = True

    def build_model(self) -> nn.Module:
        return Classifier(self.num_classes, self.model_cfg, projector=True, probe_norm=self.cfg.linear_probe_norm)

    @classmethod
    def own_stages(cls, cfg: MethodConfig, epochs: int, choices: Choices) -> list[Stage]:
        """SupCon pre-training on instance-balanced batches of MoCo v2's two views, then the linear classifier on
        the registration's sampling and augmentation."""
        if epochs < 2:
            raise ValueError(f"method '{cfg.name}' trains in two stages and needs optim.epochs >= 2, got {epochs}")
        pretrain = min(max(1, round(cfg.pretrain_fraction * epochs)), epochs - 1)
        return [
            Stage("pretrain", pretrain, TrainInput(INSTANCE_BALANCED, "moco_v2", 2)),
            Stage("linear", epochs - pretrain, TrainInput(choices.sampling, choices.augmentation, 1)),
        ]

    def trainable_parameters(self, model: nn.Module, stage: Stage) -> Iterator[nn.Parameter]:
        inner = unwrap(model)
        if stage.name == "linear":
            return iter(inner.fc.parameters())
        return (p for name, p in inner.named_parameters() if not name.startswith("fc."))

    def enter_stage(self, model: nn.Module, stage: Stage) -> None:
        if stage.name == "linear":
            unwrap(model).backbone.requires_grad_(False)

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        labels = batch["label"]
        if stage.name == "pretrain":
            views = torch.stack([model(batch["view_q"], project=True), model(batch["view_k"], project=True)], dim=1)
            loss = supcon_loss(views, labels, self.cfg.supcon_temperature)
            return LossOutput(loss, {"supcon": loss.detach(), "embedding_std": embedding_std(views[:, 0].detach())})
        inner = unwrap(model)
        inner.backbone.eval()
        loss = F.cross_entropy(model(batch["view_q"]), labels)
        return LossOutput(loss, {"ce": loss.detach()})
