"""Explicit run configuration: dataclasses loaded from YAML with strict keys.

Every key is checked: a misspelt key is an error naming it and the closest
valid key, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from proco_ray.errors import ProcoError

DATA_CPUS = 1

# The allowed values of the settings that name a choice; the loader (and any direct construction) checks them.
AUTO = "auto"  # the default of method.sampling, method.proto_form and data.augmentation: the method's own choice
CLASS_BALANCED, INSTANCE_BALANCED = "class_balanced", "instance_balanced"
MethodName = Literal[
    "proco", "proco_paper", "ce", "ce_resample", "focal", "ldam_drw", "ohem", "danil", "mtl", "cl", "cl_resample"
]
ProCoLoss = Literal["proto", "ce", "infonce"]
ProtoForm = Literal["eq7", "mean", "split", "circle"]
Sampling = Literal["class_balanced", "instance_balanced"]
Augmentation = Literal["supervised", "moco_v2", "none"]
Architecture = Literal["resnet18", "resnet34", "resnet50", "resnet101"]
BatchNormMode = Literal["shuffle", "sync", "plain"]
NormLayer = Literal["batch", "group"]


class ConfigError(ProcoError, ValueError):
    """A configuration that cannot be used as written."""


@dataclass(frozen=True)
class PerStage:
    """Marks a setting given once for every stage or per stage (`pretrain:x,linear:y`), each value one of
    `choices` or auto (the method's own)."""

    choices: Any


def per_stage_entries(value: str) -> list[tuple[str | None, str]]:
    """`x` -> [(None, 'x')]; `pretrain:x,linear:y` -> [('pretrain', 'x'), ('linear', 'y')] (an entry without a
    stage gives None)."""
    if ":" not in value:
        return [(None, value)]
    pairs = [entry.split(":", 1) if ":" in entry else [None, entry] for entry in value.split(",")]
    return [(stage.lstrip() if stage is not None else None, entry.strip()) for stage, entry in pairs]


def stage_value(value: str, stage: str, key: str) -> str | None:
    """A per-stage setting: None for auto, `x` for every stage, or this stage's entry of `pretrain:x,linear:y`."""
    if value == AUTO:
        return None
    if ":" not in value:
        return value
    entries = {name: entry for name, entry in per_stage_entries(value) if name is not None}
    if stage not in entries:
        raise ConfigError(
            f"{key}='{value}' names no value for stage '{stage}' (write {stage}:VALUE, or one value for all stages)"
        )
    return entries[stage].strip()


def per_stage(values: dict[str, str]) -> str:
    """The explicit form of per-stage values: one value when every stage has it, else `stage:value,...`."""
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else ",".join(f"{stage}:{value}" for stage, value in values.items())


def check_choice(value: Any, choices: Any, key: str) -> None:
    """`value` must be one of the Literal `choices`; the error names the setting, the choices and the closest one."""
    allowed = typing.get_args(choices)
    if value not in allowed:
        hint = closest_match(value, allowed) if isinstance(value, str) else ""
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}{hint}")


def check_per_stage(value: str, choices: Any, key: str) -> None:
    """Every value of a per-stage setting (`x` or `stage:x,...`) must be auto or one of `choices`."""
    allowed = typing.get_args(choices)
    for _, entry in per_stage_entries(value):
        if entry != AUTO and entry not in allowed:
            raise ConfigError(f"{key} must be 'auto' or one of {list(allowed)} (per stage: stage:VALUE,...), got '{entry}'")


def _check_choices(section: Any, name: str) -> None:
    """The Literal and per-stage fields of a config section hold allowed values."""
    for key, annotation in typing.get_type_hints(type(section), include_extras=True).items():
        value = getattr(section, key)
        if typing.get_origin(annotation) is Literal:
            check_choice(value, annotation, f"{name}.{key}")
        elif typing.get_origin(annotation) is Annotated:
            marks = [m for m in annotation.__metadata__ if isinstance(m, PerStage)]
            if marks and isinstance(value, str):
                check_per_stage(value, marks[0].choices, f"{name}.{key}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class DataConfig:
    """Where the prepared dataset lives and how it is fed to the model."""

    uri: str = ""
    num_classes: int | None = None
    image_size: int = 64
    batch_size: int = 128
    eval_batch_size: int = 256
    augmentation: Annotated[str, PerStage(Augmentation)] = "auto"  # the method's (per stage for CL: pretrain:...,linear:...)
    prefetch_batches: int = 2  # batches a Ray Train worker has copied to its device ahead of the step
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"

    def __post_init__(self) -> None:
        _check_choices(self, "data")


@dataclass
class ModelConfig:
    """The ProCo network: backbone, heads and the momentum key encoder."""

    arch: Architecture = "resnet50"
    small_input: bool = False
    feat_dim: int = 128
    hidden_dim: int = 2048
    pretrained: str | None = None
    key_momentum: float = 0.999
    batch_norm: BatchNormMode = "shuffle"
    norm: NormLayer = "batch"

    def __post_init__(self) -> None:
        _check_choices(self, "model")
        _require(0.0 <= self.key_momentum <= 1.0, f"model.key_momentum must lie in [0, 1], got {self.key_momentum}")


@dataclass
class MethodConfig:
    """The training method and its hyperparameters (paper defaults)."""

    name: MethodName = "proco"
    loss: ProCoLoss = "proto"
    proto_instances: bool = True
    recalibration: bool = True
    gamma: int = 20
    eps_max: float = 0.4
    beta: float = 0.95
    w_init: float = 0.01
    tau: float = 1.0
    proto_form: Literal["auto", ProtoForm] = "auto"  # the method's: split for proco, eq7 for proco_paper
    sampling: Annotated[str, PerStage(Sampling)] = "auto"  # the method's (per stage for CL: pretrain:...,linear:...)
    circle_margin: float = 0.25
    infonce_temperature: float = 0.07
    queue_size: int = 4096
    focal_gamma: float = 2.0
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    drw_start_fraction: float = 0.8
    drw_beta: float = 0.9999
    ohem_keep_ratio: float = 0.5
    danil_weight: float = 0.1
    danil_eps: float = 1.0
    mtl_weight: float = 1.0
    supcon_temperature: float = 0.1
    pretrain_fraction: float = 0.5
    linear_probe_norm: bool = False
    logit_adjustment: float = 0.0

    def __post_init__(self) -> None:
        _check_choices(self, "method")
        gamma = self.gamma
        _require(
            not isinstance(gamma, bool) and isinstance(gamma, int) and gamma >= 0,
            f"method.gamma must be a non-negative integer, got {gamma!r}",
        )
        _require(0.0 <= self.eps_max < 1.0, f"method.eps_max (E) must lie in [0, 1), got {self.eps_max}")
        _require(
            self.tau > 0 and self.infonce_temperature > 0,
            f"method.tau and method.infonce_temperature must be > 0, got {self.tau}, {self.infonce_temperature}",
        )
        _require(self.queue_size >= 0, f"method.queue_size must be >= 0, got {self.queue_size}")
        _require(self.logit_adjustment >= 0, f"method.logit_adjustment must be >= 0, got {self.logit_adjustment}")
        _require(
            0.0 <= self.drw_start_fraction <= 1.0, f"method.drw_start_fraction must lie in [0, 1], got {self.drw_start_fraction}"
        )
        _require(0.0 < self.ohem_keep_ratio <= 1.0, f"method.ohem_keep_ratio must lie in (0, 1], got {self.ohem_keep_ratio}")
        _require(
            self.danil_weight >= 0 and self.danil_eps > 0,
            f"method.danil_weight must be >= 0 and method.danil_eps > 0, got {self.danil_weight}, {self.danil_eps}",
        )
        _require(self.mtl_weight >= 0, f"method.mtl_weight must be >= 0, got {self.mtl_weight}")
        _require(0.0 < self.pretrain_fraction < 1.0, f"method.pretrain_fraction must lie in (0, 1), got {self.pretrain_fraction}")


@dataclass
class OptimConfig:
    """SGD with momentum and a cosine schedule with linear warm-up."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 1000
    warmup_epochs: int = 10
    amp: bool = True


@dataclass
class TrainConfig:
    """Where and how the run executes."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float = 1.0  # under 1, workers share a GPU (with dist_backend=gloo: NCCL refuses that)
    dist_backend: str = "auto"  # auto: gloo on CPU workers, cpu:gloo,cuda:nccl on GPU workers
    seed: int = 0
    storage_path: str = "./runs"
    name: str = "proco"
    keep_checkpoints: int = 2
    max_failures: int = 0
    wait_for_autoscaler: bool = False
    shared_filesystem: bool = False  # local data/storage paths are mounted at the same path on every node (NFS)
    log_every_steps: int = 50  # an in-epoch progress line every N steps (0: only per epoch)
    max_steps_per_epoch: int | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_resources(self, streams_data: bool = True) -> dict[str, float]:
        """What one training run holds on a Ray cluster: its workers (+ gpus_per_worker each), and one CPU beside
        them for Ray Data to pick and decode the images (with none left, the workers wait forever)."""
        cpus = self.train.num_workers * self.train.cpus_per_worker + (DATA_CPUS if streams_data else 0)
        need = {"CPU": float(cpus)}
        if self.train.use_gpu:
            need["GPU"] = self.train.num_workers * self.train.gpus_per_worker
        return need


def closest_match(key: str, valid: typing.Iterable[str]) -> str:
    """'; did you mean X?' for the valid name closest to `key` ('' when there is none)."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    args = typing.get_args(annotation)
    if args and type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str or typing.get_origin(annotation) is Literal:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


# Keys that configs and checkpoints of earlier versions hold: (the value they never changed anything at, why).
RETIRED_KEYS: dict[str, tuple[Any, str]] = {
    "data.resample": (False, "class-balanced sampling is chosen by the method: ce_resample, cl_resample, proco"),
}

# Method names of earlier versions: the settings they stood for, so their configs and checkpoints still load.
RENAMED_METHODS: dict[str, dict[str, Any]] = {
    # ProCo on class-balanced batches, with the defaults of its time (Eq. 7, MoCo v2's views)
    "proco_resample": {
        "method": {"name": "proco", "sampling": "class_balanced", "proto_form": "eq7"},
        "data": {"augmentation": "moco_v2"},
    },
}


def _renamed(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """`values` with a renamed method spelt in today's names; what the old config set explicitly stays."""
    method = values.get("method")
    name = method.get("name") if isinstance(method, Mapping) else None
    if not isinstance(name, str) or name not in RENAMED_METHODS:
        return values
    spelt = RENAMED_METHODS[name]
    out = dict(values)
    for section, settings in spelt.items():
        given = dict(out.get(section) or {})
        for key, value in settings.items():
            if key == "name" or given.get(key, "auto") == "auto":
                given[key] = value
        out[section] = given
    return out


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if path in RETIRED_KEYS:
            inert, reason = RETIRED_KEYS[path]
            if value == inert:
                continue
            raise ConfigError(f"config key '{path}' was removed: {reason}")
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'{closest_match(key, fields)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, path)
        else:
            kwargs[key] = _coerce(value, annotation, path)
    return cls(**kwargs)


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Build a Config, refusing unknown keys and values of the wrong type."""
    return _build(Config, _renamed(values) if isinstance(values, Mapping) else values, "")


def nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{'method.gamma': 4} -> {'method': {'gamma': 4}}: the one dotted-key reader (CLI overrides, experiment files)."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        node = tree
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{section}' is not a section")
        node[leaf] = value
    return tree


def flatten(
    tree: Mapping[str, Any], prefix: str = "", is_leaf: typing.Callable[[Any], bool] = lambda value: False
) -> dict[str, Any]:
    """{'method': {'gamma': 4}} -> {'method.gamma': 4}, the inverse of `nest`; dotted keys pass through, and a
    mapping for which `is_leaf` holds is a value, not a section."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and not is_leaf(value):
            out.update(flatten(value, f"{dotted}.", is_leaf))
        else:
            out[dotted] = value
    return out


def config_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every settable dotted key of the Config schema (method.gamma, optim.lr, ...)."""
    keys = []
    hints = typing.get_type_hints(cls or Config)
    for f in dataclasses.fields(cls or Config):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Turn ['method.gamma=10', 'train.num_workers=2'] into a nested dict (YAML-typed values)."""
    dotted: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return nest(dotted)


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values of `update` win."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped as package data (pyproject.toml)


def find_named_file(name: str | Path, folder: Path, what: str) -> Path:
    """A file by path, or by name (`isic2018`, `isic2018.yaml`) from one of the project's folders.

    The name form lets job scripts shipped alone to a cluster (`ray submit`) find
    the files of the installed project.
    """
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (folder / path.name, folder / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    raise ConfigError(f"{what} not found: {name} (nor in {folder}, which has {known})")


def resolve_config_path(name: str | Path) -> Path:
    return find_named_file(name, CONFIG_DIR, "config file")


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then `section.key=value` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        values = loaded
    values = merge(values, parse_overrides(overrides))
    return config_from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
