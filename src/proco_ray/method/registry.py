"""The registry of training methods: `@register` a class under a name with its own choices, `create_method`
builds the one a config names, `stages_for` plans its stages.

As in timm's model registry, a class may be registered under several names: CE and CE + resample are one
class registered twice, with class-balanced sampling as a registration argument.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proco_ray import distributed
from proco_ray.config import (
    AUTO,
    Augmentation,
    Config,
    ConfigError,
    MethodConfig,
    MethodName,
    ModelConfig,
    check_per_stage,
    per_stage,
    stage_value,
)
from proco_ray.data.train_input import TrainInput
from proco_ray.method.base import Choices, Method, Stage


@dataclass(frozen=True)
class Registration:
    name: str
    cls: type[Method]
    choices: Choices


METHODS: dict[str, Registration] = {}

M = typing.TypeVar("M", bound=type[Method])


def register(name: str, **choices: str) -> Callable[[M], M]:
    """Class decorator: register the class under `name`, with `choices` (sampling, augmentation, proto_form)
    saying what `auto` means for it."""
    if name not in typing.get_args(MethodName):
        raise ValueError(f"method '{name}' must be added to config.MethodName, the names a config may give")

    def add(cls: M) -> M:
        if name in METHODS:
            raise ValueError(f"method '{name}' is registered twice ({METHODS[name].cls.__name__}, {cls.__name__})")
        METHODS[name] = Registration(name, cls, Choices(**choices))
        return cls

    return add


def create_method(cfg: MethodConfig, model_cfg: ModelConfig, num_classes: int, class_counts: Sequence[int]) -> Method:
    """The method named by `cfg.name`, ready to build its network."""
    entry = METHODS[cfg.name]
    if cfg.logit_adjustment and not entry.cls.adjusts_logits:
        adjusting = sorted(name for name, other in METHODS.items() if other.cls.adjusts_logits)
        raise ValueError(f"method.logit_adjustment is not used by method '{cfg.name}'; it applies to {', '.join(adjusting)}")
    return entry.cls(cfg, model_cfg, num_classes, class_counts, entry.choices)


def stages_for(cfg: MethodConfig, epochs: int, augmentation: str = AUTO) -> list[Stage]:
    """The stages of a run of `epochs` epochs, known before any network is built: the method's own, with
    method.sampling and data.augmentation (`augmentation`: auto, one for every stage, or per stage) applied."""
    entry = METHODS[cfg.name]
    check_per_stage(augmentation, Augmentation, "data.augmentation")
    stages = []
    for stage in entry.cls.own_stages(cfg, epochs, entry.choices):
        sampling = stage_value(cfg.sampling, stage.name, "method.sampling") or stage.sampling
        if sampling != stage.sampling and not entry.cls.sampling_switch:
            switchable = sorted(name for name, other in METHODS.items() if other.cls.sampling_switch)
            raise ValueError(
                f"method '{cfg.name}' trains on {stage.sampling} batches; method.sampling applies to "
                f"{', '.join(switchable)} only (the others name their sampling: ce / ce_resample, cl / cl_resample)"
            )
        chosen = stage_value(augmentation, stage.name, "data.augmentation") or stage.input.augmentation
        reads = TrainInput(sampling, chosen, stage.input.views)
        stages.append(dataclasses.replace(stage, input=reads))
    return stages


def train_inputs(config: Config) -> list[TrainInput]:
    """The distinct inputs of a run's stages (a Ray Dataset per sampling: `TrainInput.dataset`)."""
    stages = stages_for(config.method, config.optim.epochs, config.data.augmentation)
    return list(dict.fromkeys(stage.input for stage in stages))


def resolved(config: Config) -> Config:
    """`config` with every `auto` replaced by the method's choice (method.sampling, method.proto_form,
    data.augmentation) and the workers' process-group backend (train.dist_backend), so the config a run saves
    says how it trained.

    Configs keep `auto` until a run starts: an experiment's base config may become another method in a
    variant, and the method decides what auto means.
    """
    try:
        stages = stages_for(config.method, config.optim.epochs, config.data.augmentation)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return dataclasses.replace(
        config,
        method=dataclasses.replace(
            config.method,
            sampling=per_stage({stage.name: stage.sampling for stage in stages}),
            proto_form=METHODS[config.method.name].choices.proto_form_for(config.method.proto_form),
        ),
        data=dataclasses.replace(config.data, augmentation=per_stage({s.name: s.input.augmentation for s in stages})),
        train=dataclasses.replace(
            config.train, dist_backend=distributed.process_group_backend(config.train.use_gpu, config.train.dist_backend)
        ),
    )
