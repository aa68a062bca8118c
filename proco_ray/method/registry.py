"""The registry of training methods: ProCo with its ablation switches, and the paper's baselines.

A method owns its loss and any state that must travel with a checkpoint (ProCo's
queue and recalibration weights), builds the network it trains, and says in
which stages it trains (the CL baselines train in two). The training loop only
calls `training_loss` and knows nothing of the maths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proco_ray.config import Config, ConfigError, MethodConfig, ModelConfig
from proco_ray.data.augment import AUGMENTATIONS
from proco_ray.data.sources import HAM10000_LOCATIONS
from proco_ray.engine import distributed
from proco_ray.engine.feeds import TrainInput
from proco_ray.method.losses import (
    PROTO_FORMS,
    LDAMLoss,
    PrototypeRecalibration,
    adversarial_negatives,
    adversarial_positives,
    contrast_terms,
    distractor_aware_loss,
    drw_class_weights,
    embedding_std,
    focal_loss,
    logit_adjustments,
    ohem_loss,
    supcon_loss,
    supervised_infonce,
    unified_proto_loss,
)
from proco_ray.method.networks import Classifier, ProCoNetwork
from proco_ray.method.queue import SampleQueue

Batch = dict[str, Tensor]
PROCO_LOSSES = ("proto", "ce", "infonce")


CLASS_BALANCED = "class_balanced"
INSTANCE_BALANCED = "instance_balanced"
SAMPLINGS = (CLASS_BALANCED, INSTANCE_BALANCED)
AUTO = "auto"  # the default of method.sampling, method.proto_form and data.augmentation: the method's own choice


@dataclass(frozen=True)
class Stage:
    """A phase of training with its own epochs, sampling, views, augmentation and trainable parameters."""

    name: str
    epochs: int
    resample: bool
    two_views: bool = False
    augmentation: str = "supervised"  # what the stage reads when data.augmentation is auto

    @property
    def sampling(self) -> str:
        return CLASS_BALANCED if self.resample else INSTANCE_BALANCED


def stage_value(value: str, stage: str, key: str) -> str | None:
    """A per-stage setting: None for auto, `x` for every stage, or this stage's entry of `pretrain:x,linear:y`."""
    if value == AUTO:
        return None
    if ":" not in value:
        return value
    entries = dict(entry.strip().split(":", 1) for entry in value.split(",") if ":" in entry)
    if stage not in entries:
        raise ValueError(f"{key}='{value}' names no value for stage '{stage}' (write {stage}:VALUE, or one value for all stages)")
    return entries[stage].strip()


def per_stage(values: dict[str, str]) -> str:
    """The explicit form of per-stage values: one value when every stage has it, else `stage:value,...`."""
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else ",".join(f"{stage}:{value}" for stage, value in values.items())


def train_input(stage: Stage, augmentation: str = AUTO) -> TrainInput:
    """What a stage reads. `augmentation` is data.augmentation: auto (the stage's own, chosen by the method),
    one augmentation for every stage, or per stage (`pretrain:moco_v2,linear:supervised`)."""
    chosen = stage_value(augmentation, stage.name, "data.augmentation") or stage.augmentation
    if chosen not in AUGMENTATIONS:
        raise ValueError(f"data.augmentation must be 'auto' or one of {sorted(AUGMENTATIONS)}, got '{chosen}'")
    return TrainInput(stage.resample, chosen, 2 if stage.two_views else 1)


@dataclass
class LossOutput:
    loss: Tensor
    logs: dict[str, Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(model, "module", model)


class Method(nn.Module):
    """Base class: single-stage, instance-balanced, all parameters trainable, logits from `classify`."""

    name = ""
    sampling = INSTANCE_BALANCED  # the method's own batches (its last stage's, for CL)
    sampling_switch = False  # whether method.sampling may change them (ProCo); the others name it: ce / ce_resample
    augmentation = "supervised"  # the method's own single-view augmentation
    proto_form = "split"  # method.proto_form when auto (only ProCo's proto-loss reads it)
    two_views = False
    find_unused_parameters = False
    adjusts_logits = False  # honours method.logit_adjustment
    logit_offsets: Tensor

    def __init__(self, cfg: MethodConfig, model_cfg: ModelConfig, num_classes: int, class_counts: Sequence[int]) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if len(class_counts) != num_classes:
            raise ValueError(f"class_counts must have {num_classes} entries, got {len(class_counts)}")
        if not cfg.logit_adjustment >= 0:
            raise ValueError(f"method.logit_adjustment must be >= 0, got {cfg.logit_adjustment}")
        if cfg.logit_adjustment and not self.adjusts_logits:
            adjusting = sorted(name for name, method in METHODS.items() if method.adjusts_logits)
            raise ValueError(f"method.logit_adjustment is not used by method '{self.name}'; it applies to {', '.join(adjusting)}")
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.num_classes = num_classes
        self.class_counts = [int(c) for c in class_counts]
        offsets = logit_adjustments(self.class_counts, cfg.logit_adjustment) if self.adjusts_logits else torch.zeros(0)
        self.register_buffer("logit_offsets", offsets, persistent=False)

    def adjusted(self, logits: Tensor) -> Tensor:
        """The training logits of the logit-adjusted loss (`method.logit_adjustment` = tau; 0 leaves them as they are)."""
        return logits + self.logit_offsets.to(logits.dtype) if self.cfg.logit_adjustment else logits

    def build_model(self) -> nn.Module:
        return Classifier(self.num_classes, self.model_cfg)

    @classmethod
    def own_stages(cls, cfg: MethodConfig, epochs: int) -> list[Stage]:
        """The stages with the method's own sampling and augmentation."""
        return [Stage("main", epochs, cls.sampling == CLASS_BALANCED, cls.two_views, cls.augmentation)]

    @classmethod
    def stages_for(cls, cfg: MethodConfig, epochs: int) -> list[Stage]:
        """The stages of a run of `epochs` epochs, known before any network is built, with method.sampling applied."""
        stages = []
        for stage in cls.own_stages(cfg, epochs):
            chosen = stage_value(cfg.sampling, stage.name, "method.sampling") or stage.sampling
            if chosen not in SAMPLINGS:
                raise ValueError(f"method.sampling must be 'auto' or one of {list(SAMPLINGS)}, got '{chosen}'")
            if chosen != stage.sampling and not cls.sampling_switch:
                switchable = sorted(name for name, method in METHODS.items() if method.sampling_switch)
                raise ValueError(
                    f"method '{cls.name}' trains on {stage.sampling} batches; method.sampling applies to "
                    f"{', '.join(switchable)} only (the others name their sampling: ce / ce_resample, cl / cl_resample)"
                )
            stages.append(dataclasses.replace(stage, resample=chosen == CLASS_BALANCED))
        return stages

    def stages(self, epochs: int) -> list[Stage]:
        return self.stages_for(self.cfg, epochs)

    def trainable_parameters(self, model: nn.Module, stage: Stage) -> Iterator[nn.Parameter]:
        return (p for p in unwrap(model).parameters() if p.requires_grad)

    def enter_stage(self, model: nn.Module, stage: Stage) -> None:
        """Hook for stage-specific freezing; called before the stage's first epoch."""

    def reseed(self, seed: int, device: torch.device) -> None:
        """Seed the method's own random draws; the same seed on every rank keeps ranks in step."""

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        raise NotImplementedError

    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        return unwrap(model).classify(images)


def _labelled_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    return model(batch["view_q"]), batch["label"]


class CrossEntropy(Method):
    """CE with instance-balanced sampling; with `method.logit_adjustment` tau > 0, Menon et al.'s logit-adjusted loss."""

    name = "ce"
    adjusts_logits = True

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        logits, labels = _labelled_logits(model, batch)
        loss = F.cross_entropy(self.adjusted(logits), labels)
        return LossOutput(loss, {"ce": loss.detach()})


class CrossEntropyResample(CrossEntropy):
    """CE with class-balanced sampling (the sampling itself lives in the data pipeline)."""

    name = "ce_resample"
    sampling = CLASS_BALANCED


class Focal(Method):
    name = "focal"

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        logits, labels = _labelled_logits(model, batch)
        loss = focal_loss(logits, labels, gamma=self.cfg.focal_gamma)
        return LossOutput(loss, {"focal": loss.detach()})


class LDAMDRW(Method):
    """LDAM margins throughout; class-balanced re-weighting deferred to the last part of training."""

    name = "ldam_drw"
    class_weights: Tensor

    def __init__(self, cfg: MethodConfig, model_cfg: ModelConfig, num_classes: int, class_counts: Sequence[int]) -> None:
        super().__init__(cfg, model_cfg, num_classes, class_counts)
        if not 0.0 <= cfg.drw_start_fraction <= 1.0:
            raise ValueError(f"method.drw_start_fraction must lie in [0, 1], got {cfg.drw_start_fraction}")
        self.ldam = LDAMLoss(self.class_counts, cfg.ldam_max_margin, cfg.ldam_scale)
        self.register_buffer("class_weights", drw_class_weights(self.class_counts, cfg.drw_beta))

    def build_model(self) -> nn.Module:
        return Classifier(self.num_classes, self.model_cfg, cosine=True)

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        logits, labels = _labelled_logits(model, batch)
        drw_start_epoch = math.floor(self.cfg.drw_start_fraction * stage.epochs)
        weight = self.class_weights if epoch >= drw_start_epoch else None
        loss = self.ldam(logits, labels, weight=weight)
        return LossOutput(loss, {"ldam": loss.detach()})


class OHEM(Method):
    name = "ohem"

    def __init__(self, cfg: MethodConfig, model_cfg: ModelConfig, num_classes: int, class_counts: Sequence[int]) -> None:
        super().__init__(cfg, model_cfg, num_classes, class_counts)
        if not 0.0 < cfg.ohem_keep_ratio <= 1.0:
            raise ValueError(f"method.ohem_keep_ratio must lie in (0, 1], got {cfg.ohem_keep_ratio}")

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        logits, labels = _labelled_logits(model, batch)
        loss = ohem_loss(logits, labels, self.cfg.ohem_keep_ratio)
        return LossOutput(loss, {"ohem": loss.detach()})


class DANIL(Method):
    """DANIL (Gong et al., MICCAI 2020): CE plus the distractor-aware loss on layer3's neurons, one stage,
    instance-balanced. Reconstructed from the paper's description (no code was published): docs/method.md."""

    name = "danil"

    def __init__(self, cfg: MethodConfig, model_cfg: ModelConfig, num_classes: int, class_counts: Sequence[int]) -> None:
        super().__init__(cfg, model_cfg, num_classes, class_counts)
        if cfg.danil_weight < 0 or not cfg.danil_eps > 0:
            raise ValueError(
                f"method.danil_weight must be >= 0 and method.danil_eps > 0, got {cfg.danil_weight}, {cfg.danil_eps}"
            )

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        logits, neurons = model(batch["view_q"], neurons=True)
        labels = batch["label"]
        ce = F.cross_entropy(logits, labels)
        distractor = distractor_aware_loss(logits, neurons, labels, self.cfg.danil_eps)
        return LossOutput(ce + self.cfg.danil_weight * distractor, {"ce": ce.detach(), "distractor": distractor.detach()})


class MTL(Method):
    """MTL (Liao and Luo, AAAI-17 workshops): a lesion-class head and a body-location head on one backbone,
    trained jointly, instance-balanced; predicts with the lesion head. Reads the shards' `location` column
    (ISIC 2018 prepared with HAM10000_metadata.csv beside the images); unknown sites (-1) are left out."""

    name = "mtl"

    def __init__(self, cfg: MethodConfig, model_cfg: ModelConfig, num_classes: int, class_counts: Sequence[int]) -> None:
        super().__init__(cfg, model_cfg, num_classes, class_counts)
        if cfg.mtl_weight < 0:
            raise ValueError(f"method.mtl_weight must be >= 0, got {cfg.mtl_weight}")

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


class SupConLinear(Method):
    """CL (Marrakchi et al. 2021): SupCon pre-training, then a linear classifier on the frozen backbone."""

    name = "cl"
    two_views = True
    find_unused_parameters = True

    def __init__(self, cfg: MethodConfig, model_cfg: ModelConfig, num_classes: int, class_counts: Sequence[int]) -> None:
        super().__init__(cfg, model_cfg, num_classes, class_counts)
        if not 0.0 < cfg.pretrain_fraction < 1.0:
            raise ValueError(f"method.pretrain_fraction must lie in (0, 1), got {cfg.pretrain_fraction}")

    def build_model(self) -> nn.Module:
        return Classifier(self.num_classes, self.model_cfg, projector=True, probe_norm=self.cfg.linear_probe_norm)

    @classmethod
    def own_stages(cls, cfg: MethodConfig, epochs: int) -> list[Stage]:
        """SupCon pre-training on instance-balanced batches of MoCo v2's views, then the linear classifier on the
        method's own sampling and the supervised augmentation."""
        if epochs < 2:
            raise ValueError(f"method '{cls.name}' trains in two stages and needs optim.epochs >= 2, got {epochs}")
        pretrain = min(max(1, round(cfg.pretrain_fraction * epochs)), epochs - 1)
        return [
            Stage("pretrain", pretrain, False, True, "moco_v2"),
            Stage("linear", epochs - pretrain, cls.sampling == CLASS_BALANCED, False, cls.augmentation),
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


class SupConLinearResample(SupConLinear):
    """CL+resample: class-balanced sampling in the linear stage."""

    name = "cl_resample"
    sampling = CLASS_BALANCED


class ProCo(Method):
    """ProCo (MICCAI 2022): proto-loss over the queue, the batch's keys, proto-instances and recalibrated logits.

    `proco` is ProCo as selected on validation (docs/results.md): class-balanced batches, the split proto-loss
    and two views of the supervised augmentation; `proco_paper` is the paper's literal form. Every part stays a
    switch: method.sampling, method.proto_form, data.augmentation and the ablation switches.
    """

    name = "proco"
    sampling = CLASS_BALANCED
    sampling_switch = True
    augmentation = "supervised"
    proto_form = "split"
    two_views = True
    adjusts_logits = True

    def __init__(self, cfg: MethodConfig, model_cfg: ModelConfig, num_classes: int, class_counts: Sequence[int]) -> None:
        super().__init__(cfg, model_cfg, num_classes, class_counts)
        if cfg.loss not in PROCO_LOSSES:
            raise ValueError(f"method.loss must be one of {PROCO_LOSSES}, got '{cfg.loss}'")
        if isinstance(cfg.gamma, bool) or not isinstance(cfg.gamma, int) or cfg.gamma < 0:
            raise ValueError(f"method.gamma must be a non-negative integer, got {cfg.gamma!r}")
        if not 0.0 <= cfg.eps_max < 1.0:
            raise ValueError(f"method.eps_max (E) must lie in [0, 1), got {cfg.eps_max}")
        if cfg.tau <= 0 or cfg.infonce_temperature <= 0:
            raise ValueError(f"method.tau and method.infonce_temperature must be > 0, got {cfg.tau}, {cfg.infonce_temperature}")
        self.form = type(self).proto_form if cfg.proto_form == AUTO else cfg.proto_form
        if self.form not in PROTO_FORMS:
            raise ValueError(f"method.proto_form must be 'auto' or one of {PROTO_FORMS}, got '{cfg.proto_form}'")
        if cfg.queue_size < 0:
            raise ValueError(f"method.queue_size must be >= 0, got {cfg.queue_size}")
        self.find_unused_parameters = cfg.loss == "ce"
        self.queue = SampleQueue(cfg.queue_size, model_cfg.feat_dim)
        self.recalibration = PrototypeRecalibration(num_classes, cfg.beta, cfg.w_init)
        self._eps_generator: torch.Generator | None = None

    def reseed(self, seed: int, device: torch.device) -> None:
        self._eps_generator = torch.Generator(device=device).manual_seed(seed)

    def _draw_eps(self, batch: int, device: torch.device) -> Tensor:
        """eps ~ U(0, E) for the global batch from a generator shared by all ranks; this rank's rows.

        Drawing for the whole global batch makes a run on W workers draw exactly
        what one worker with the same global batch draws.
        """
        world, index = distributed.world_size(), distributed.rank()
        generator = self._eps_generator
        if generator is None or generator.device.type != torch.device(device).type:
            generator = self._eps_generator = torch.Generator(device=device).manual_seed(0)
        full = torch.rand(world * batch, self.cfg.gamma, generator=generator, device=device)
        return full[index * batch : (index + 1) * batch] * self.cfg.eps_max

    @property
    def uses_proto_instances(self) -> bool:
        return self.cfg.proto_instances and self.cfg.gamma > 0 and self.cfg.loss == "proto"

    def build_model(self) -> nn.Module:
        return ProCoNetwork(self.num_classes, self.model_cfg)

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        labels = batch["label"]
        if self.cfg.loss == "ce":
            out = model(batch["view_q"])
            loss = F.cross_entropy(self.adjusted(out["logits"]), labels)
            return LossOutput(loss, {"ce": loss.detach()})
        out = model(batch["view_q"], batch["view_k"])
        keys, key_labels, key_preds = SampleQueue.gather(out["k"], labels, out["key_preds"])
        queue_feats, queue_labels, queue_preds = self.queue.contents()
        bank = torch.cat([queue_feats.to(keys.dtype), keys])
        bank_labels = torch.cat([queue_labels, key_labels])
        bank_preds = torch.cat([queue_preds, key_preds])
        q = out["q"]
        same = labels[:, None] == bank_labels[None, :]
        if self.cfg.loss == "infonce":
            nce = supervised_infonce(q @ bank.T / self.cfg.infonce_temperature, same).mean()
            ce = F.cross_entropy(self.adjusted(out["logits"]), labels)
            logs = {"infonce": nce.detach(), "ce": ce.detach()}
            loss = nce + ce
        else:
            loss, logs = self._proto_loss(q, out["logits"], out["prototypes"], labels, same, bank, bank_labels, bank_preds)
        self.queue.enqueue(keys, key_labels, key_preds)
        logs["embedding_std"] = embedding_std(q.detach())
        logs["key_accuracy"] = (out["key_preds"] == labels).float().mean()
        logs["query_key_cosine"] = (q.detach() * out["k"]).sum(dim=1).mean()
        logs["queue_fill"] = torch.tensor(len(self.queue) / max(1, self.queue.size))
        return LossOutput(loss, logs)

    def _proto_loss(
        self,
        q: Tensor,
        logits: Tensor,
        prototypes: Tensor,
        labels: Tensor,
        same: Tensor,
        bank: Tensor,
        bank_labels: Tensor,
        bank_preds: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 4-7: recalibrated logits, the contrast set and the proto-instances, into the proto-loss."""
        if self.cfg.recalibration:
            self.recalibration.update(logits.detach(), labels)
            logits = logits + self.recalibration.log_weights.to(logits.dtype)
        logits = self.adjusted(logits)
        logs: dict[str, Tensor] = {}
        proto_negatives = proto_positives = None
        if self.uses_proto_instances:
            batch, gamma = labels.shape[0], self.cfg.gamma
            eps_neg = self._draw_eps(batch, q.device)
            eps_pos = self._draw_eps(batch, q.device)
            proto_negatives = adversarial_negatives(q, bank, bank_labels, labels, prototypes, gamma, eps_neg)
            proto_positives = adversarial_positives(q, bank, bank_labels, bank_preds, labels, prototypes, gamma, eps_pos)
            logs["proto_instances_neg"] = proto_negatives[1].float().sum(1).mean()
            logs["proto_instances_pos"] = proto_positives[1].float().sum(1).mean()
        similarity, positive, negative = contrast_terms(q, bank, same, proto_negatives, proto_positives)
        per_sample = unified_proto_loss(
            similarity,
            positive,
            negative,
            logits,
            labels,
            tau=self.cfg.tau,
            form=self.form,
            margin=self.cfg.circle_margin,
        )
        loss = per_sample.mean()
        logs["proto_loss"] = loss.detach()
        return loss, logs


class ProCoPaper(ProCo):
    """The paper's literal ProCo: instance-balanced batches, Eq. 7's proto-loss and MoCo v2's two views."""

    name = "proco_paper"
    sampling = INSTANCE_BALANCED
    augmentation = "moco_v2"
    proto_form = "eq7"


METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        ProCo,
        ProCoPaper,
        CrossEntropy,
        CrossEntropyResample,
        Focal,
        LDAMDRW,
        OHEM,
        DANIL,
        MTL,
        SupConLinear,
        SupConLinearResample,
    )
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"method.name must be one of {sorted(METHODS)}, got '{name}'")
    return METHODS[name]


def build_method(cfg: MethodConfig, model_cfg: ModelConfig, num_classes: int, class_counts: Sequence[int]) -> Method:
    """The method named by `cfg.name`, ready to build its network."""
    return method_class(cfg.name)(cfg, model_cfg, num_classes, class_counts)


def resolved(config: Config) -> Config:
    """`config` with every `auto` replaced by the method's choice (method.sampling, method.proto_form,
    data.augmentation) and the workers' process-group backend (train.dist_backend), so the config a run saves
    says how it trained.

    Configs keep `auto` until a run starts: an experiment's base config may become another method in a
    variant, and the method decides what auto means.
    """
    try:
        method = method_class(config.method.name)
        stages = method.stages_for(config.method, config.optim.epochs)
        augmentations = {stage.name: train_input(stage, config.data.augmentation).augmentation for stage in stages}
    except ValueError as error:
        raise ConfigError(str(error)) from None
    proto_form = method.proto_form if config.method.proto_form == AUTO else config.method.proto_form
    return dataclasses.replace(
        config,
        method=dataclasses.replace(
            config.method, sampling=per_stage({stage.name: stage.sampling for stage in stages}), proto_form=proto_form
        ),
        data=dataclasses.replace(config.data, augmentation=per_stage(augmentations)),
        train=dataclasses.replace(
            config.train, dist_backend=distributed.process_group_backend(config.train.use_gpu, config.train.dist_backend)
        ),
    )
