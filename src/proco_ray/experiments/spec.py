"""Ray Tune experiments as data: search spaces, named variants and seeds, checked before any trial starts.

Everything here is pure (no Ray): parsing the experiment YAML, validating every
key and value against the `Config` schema, building a trial's Config from its
parameters and sizing concurrency from cluster resources (`experiments.stats` aggregates the
finished trials). `proco_ray.launch.tune` adapts this to Ray Tune.

Experiment YAML schema (configs/tune/*.yaml):

    name: ablation                  # default experiment folder suffix
    description: free text
    base: isic2018                  # config the trials start from (--config wins)
    overrides: {optim.epochs: 200}  # dotted keys applied to every trial
    variants:                       # named override sets, run as a grid over `variant`
      full: {}
      ce_loss: {method.loss: ce}
    seeds: [0, 1, 2]                # grid over train.seed: every variant/config gets a spread
    search_space:                   # dotted key -> one of
      method.gamma: {grid: [10, 20]}         #   every value (Tune grid_search)
      method.beta: {choice: [0.9, 0.95]}     #   sampled value
      method.eps_max: {uniform: [0.1, 0.6]}  #   [low, high]
      optim.lr: {loguniform: [0.01, 0.1]}    #   [low, high], log-uniform
      method.queue_size: {randint: [512, 8192]}  # [low, high), integer
      data.batch_size: 64                    #   a constant
    num_samples: 8                  # samples of the space (grids repeat per sample)
    metric: val/macro_f1            # what ASHA and "best" compare (reported every epoch)
    mode: max
    asha: {grace_period: 10, reduction_factor: 2}   # null: no early stopping (FIFO)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proco_ray.config import (
    CONFIG_DIR,
    DATA_CPUS,
    Config,
    ConfigError,
    closest_match,
    config_from_dict,
    config_keys,
    find_named_file,
    flatten,
    load_config,
    merge,
    nest,
    parse_overrides,
)
from proco_ray.metric_keys import BEST_VAL_MACRO_F1, EMBEDDING_STD, EPOCH_METRICS, LAST_TEST_MACRO_F1, TEST, VAL, VAL_MACRO_F1

CONFIG_TUNE_DIR = CONFIG_DIR / "tune"
SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
VARIANT_KEY = "variant"
SEED_KEY = "train.seed"
# Shown beside the headline test metrics: the validation score the model was selected on, the collapse monitor,
# and the test macro-F1 of the last epoch (no selection on validation); column label -> metric key.
SELECTED_VAL_COLUMN = "selected val macro_f1"
LAST_EPOCH_TEST_COLUMN = "last-epoch test macro_f1"
SIDE_METRICS = {
    SELECTED_VAL_COLUMN: BEST_VAL_MACRO_F1,
    "embedding_std": EMBEDDING_STD,
    LAST_EPOCH_TEST_COLUMN: LAST_TEST_MACRO_F1,
}
DRIVER_CPUS = 1.0  # the Tune trial actor that drives a trial's TorchTrainer (its controller takes 0 CPUs)


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Domain:
    """One parameter's search domain; `values` are the grid/choice values or the (low, high) bounds."""

    kind: str
    values: tuple[Any, ...]

    def representatives(self) -> tuple[Any, ...]:
        """Values that exercise the domain's type and both bounds, to validate before sampling."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        return self.values


@dataclass(frozen=True)
class Asha:
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str = ""
    base: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    search_space: Mapping[str, Domain] = field(default_factory=dict)
    num_samples: int = 1
    metric: str = VAL_MACRO_F1
    mode: str = "max"
    asha: Asha | None = field(default_factory=Asha)

    def plan(self) -> dict[str, Domain]:
        """The full parameter space Tune expands: variant grid, seed grid, then the search space."""
        plan: dict[str, Domain] = {}
        if self.variants:
            plan[VARIANT_KEY] = Domain("grid", tuple(self.variants))
        if self.seeds:
            plan[SEED_KEY] = Domain("grid", tuple(self.seeds))
        plan.update(self.search_space)
        return plan

    def num_trials(self) -> int:
        """Trials Tune will run (grid product x num_samples)."""
        grid = math.prod(len(d.values) for d in self.plan().values() if d.kind == "grid")
        return grid * self.num_samples


EXPERIMENT_KEYS = tuple(f.name for f in dataclasses.fields(Experiment))


def check_key(key: str, where: str) -> None:
    """An unknown dotted key is an error naming it and the closest valid key."""
    valid = config_keys()
    if key not in valid:
        raise ConfigError(f"{where}: unknown parameter '{key}'{closest_match(key, valid)}")


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def yaml_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string; search spaces mean the number."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def flat_overrides(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides as dotted keys with YAML's numbers read as numbers (config.flatten)."""
    return {key: yaml_number(value) for key, value in flatten(tree).items()}


def parse_domain(key: str, spec: Any) -> Domain:
    """`{grid: [...]}`, `{choice: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}` or a constant."""
    where = f"search_space.{key}"
    if not isinstance(spec, Mapping):
        return Domain("grid", (yaml_number(spec),))
    if len(spec) != 1:
        raise ConfigError(f"{where} must have exactly one of {SEARCH_KINDS}, got {sorted(spec)}")
    kind, values = next(iter(spec.items()))
    if kind not in SEARCH_KINDS:
        raise ConfigError(f"{where}: unknown search kind '{kind}'{closest_match(kind, SEARCH_KINDS)}")
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{where}.{kind} must be a non-empty list, got {values!r}")
    values = tuple(yaml_number(v) for v in values)
    if kind in ("uniform", "loguniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{where}.{kind} must be [low, high] numbers, got {list(values)}")
        low, high = values
        if not low < high:
            raise ConfigError(f"{where}.{kind} needs low < high, got {list(values)}")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{where}.loguniform needs low > 0, got {low}")
        if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}.randint needs integer bounds, got {list(values)}")
        if kind == "randint":
            values = (int(low), int(high))
    return Domain(kind, values)


def experiment_from_dict(values: Mapping[str, Any], default_name: str = "experiment") -> Experiment:
    """Parse an experiment mapping (strict keys); values are checked against Config later by `validate`."""
    for key in values:
        if key not in EXPERIMENT_KEYS:
            raise ConfigError(f"unknown experiment key '{key}'{closest_match(key, EXPERIMENT_KEYS)}")
    variants = values.get("variants") or {}
    if not isinstance(variants, Mapping):
        raise ConfigError(f"variants must map a name to overrides, got {variants!r}")
    parsed_variants = {}
    for name, overrides in variants.items():
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigError(f"variants.{name} must be a mapping of overrides, got {overrides!r}")
        parsed_variants[str(name)] = flat_overrides(overrides or {})
    space = values.get("search_space") or {}
    if not isinstance(space, Mapping):
        raise ConfigError(f"search_space must be a mapping, got {space!r}")
    asha = values.get("asha", {})
    if asha is not None and not isinstance(asha, Mapping):
        raise ConfigError(f"asha must be a mapping (grace_period, reduction_factor) or null, got {asha!r}")
    if asha is not None:
        for key in asha:
            if key not in ("grace_period", "reduction_factor"):
                raise ConfigError(f"unknown asha key '{key}'{closest_match(key, ('grace_period', 'reduction_factor'))}")
    seeds = values.get("seeds") or ()
    if not isinstance(seeds, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds must be a list of integers, got {seeds!r}")
    experiment = Experiment(
        name=str(values.get("name") or default_name),
        description=str(values.get("description") or ""),
        base=values.get("base"),
        overrides=flat_overrides(values.get("overrides") or {}),
        variants=parsed_variants,
        seeds=tuple(seeds),
        search_space={str(k): parse_domain(str(k), v) for k, v in flatten(space, is_leaf=is_domain).items()},
        num_samples=int(values.get("num_samples", 1)),
        metric=str(values.get("metric", VAL_MACRO_F1)),
        mode=str(values.get("mode", "max")),
        asha=None if asha is None else Asha(**{k: yaml_number(v) for k, v in asha.items()}),
    )
    return experiment


def is_domain(value: Any) -> bool:
    """A search-space mapping names a search kind (a domain, malformed or not), not a config section."""
    return isinstance(value, Mapping) and any(k in SEARCH_KINDS for k in value)


def resolve_experiment_path(name: str | Path) -> Path:
    return find_named_file(name, CONFIG_TUNE_DIR, "experiment")


def load_experiment(name: str | Path) -> Experiment:
    path = resolve_experiment_path(name)
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"experiment file {path} must hold a mapping at the top level")
    return experiment_from_dict(loaded, default_name=path.stem)


# --------------------------------------------------------------------------- validation


def check_metric(metric: str, mode: str) -> None:
    """The ASHA/best metric must be one every trial reports every epoch, or Tune fails mid-sweep."""
    if mode not in ("min", "max"):
        raise ConfigError(f"mode must be 'min' or 'max', got '{mode}'")
    recall = f"{VAL}/recall/"
    if metric in EPOCH_METRICS or (metric.startswith(recall) and len(metric) > len(recall)):
        return
    if metric.startswith(f"{TEST}/"):
        raise ConfigError(
            f"metric '{metric}' is the test split's (reported only when validation improves), so neither ASHA nor "
            f"model selection may use it; "
            f"use '{metric.replace(f'{TEST}/', f'{VAL}/', 1)}'"
        )
    raise ConfigError(
        f"metric '{metric}' is never reported{closest_match(metric, EPOCH_METRICS)} "
        f"(reported every epoch: {', '.join(EPOCH_METRICS)}, val/recall/<class>)"
    )


def base_tree(base: Mapping[str, Any], experiment: Experiment, cli_overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Base config file values, then the experiment's overrides, then the command line's."""
    for key in experiment.overrides:
        check_key(key, f"experiment '{experiment.name}' overrides")
    tree = merge(dict(base), nest(experiment.overrides))
    return merge(tree, cli_overrides or {})


def experiment_base(experiment: Experiment, config_file: str | None, overrides: Sequence[str]) -> tuple[Config, dict[str, Any]]:
    """The base of an experiment's trials: the config (file, else the experiment's `base`, then the
    command line's `section.key=value` overrides) validated, and as the tree trials are built from."""
    config_file = config_file or experiment.base
    base_config = load_config(config_file, overrides)
    return base_config, base_tree(load_config(config_file).to_dict(), experiment, parse_overrides(overrides))


def trial_overrides(experiment_variants: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's dotted overrides: its variant's, then its sampled parameters (which win)."""
    out: dict[str, Any] = {}
    variant = params.get(VARIANT_KEY)
    if variant is not None:
        out.update(experiment_variants[variant])
    out.update({k: v for k, v in params.items() if k != VARIANT_KEY})
    return out


def trial_config(
    base: Mapping[str, Any], variants: Mapping[str, Mapping[str, Any]], params: Mapping[str, Any], **train: Any
) -> Config:
    """The Config of one trial: base tree + variant + parameters, then train.* settings (storage, name)."""
    tree = merge(dict(base), nest(trial_overrides(variants, params)))
    tree = merge(tree, {"train": train}) if train else tree
    return config_from_dict(tree)


def check_values(config: Config, where: str) -> None:
    """Method-level constraints (gamma, E, tau, loss name, stages) that config types alone do not catch."""
    from proco_ray.method.registry import create_method, stages_for

    try:
        create_method(config.method, config.model, 2, [1, 1])
        stages_for(config.method, config.optim.epochs, config.data.augmentation)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def validate(experiment: Experiment, base: Mapping[str, Any]) -> list[Config]:
    """Check every key and representative value of the experiment against Config; returns those configs.

    Each variant is built once, and each search value (grid/choice values, the
    bounds of ranges) once with the other parameters at their first value, so an
    unknown key or a bad value is an error before any trial starts.
    """
    check_metric(experiment.metric, experiment.mode)
    if experiment.num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {experiment.num_samples}")
    if VARIANT_KEY in experiment.search_space:
        raise ConfigError(f"'{VARIANT_KEY}' is reserved for the variants grid; list variants under 'variants'")
    if experiment.seeds and SEED_KEY in experiment.search_space:
        raise ConfigError(f"'{SEED_KEY}' is set by both 'seeds' and 'search_space'; keep one")
    for name, overrides in experiment.variants.items():
        for key in overrides:
            check_key(key, f"variant '{name}'")
    for key in experiment.search_space:
        check_key(key, "search_space")
    plan = experiment.plan()
    first = {key: domain.representatives()[0] for key, domain in plan.items()}
    configs = []
    seen = set()
    for key, domain in plan.items():
        for value in domain.representatives():
            params = {**first, key: value}
            label = ", ".join(f"{k}={v}" for k, v in params.items())
            if label in seen:
                continue
            seen.add(label)
            where = f"experiment '{experiment.name}' trial with {label}"
            try:
                config = trial_config(base, experiment.variants, params)
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
            check_values(config, where)
            configs.append(config)
    if not configs:
        configs.append(trial_config(base, experiment.variants, {}))
    if experiment.asha is not None:
        max_t = max(c.optim.epochs for c in configs)
        grace, factor = experiment.asha.grace_period, experiment.asha.reduction_factor
        if not (isinstance(grace, int) and 1 <= grace <= max_t):
            raise ConfigError(f"asha.grace_period must be an integer in [1, optim.epochs={max_t}], got {grace!r}")
        if not factor > 1:
            raise ConfigError(f"asha.reduction_factor must be > 1, got {factor!r}")
    return configs


def trial_resources(config: Config, streams_data: bool = True) -> dict[str, float]:
    """What one trial holds: its training run (workers, Ray Data) plus the Tune trial actor that drives it."""
    need = config.run_resources(streams_data)
    need["CPU"] += DRIVER_CPUS
    return need


def max_concurrent_trials(cluster: Mapping[str, float], need: Mapping[str, float], autoscaling: bool = False) -> int:
    """How many trials fit the cluster at once; a trial that cannot fit at all is refused (Ray would wait forever)."""
    fits = min(int(cluster.get(resource, 0) // amount) for resource, amount in need.items() if amount > 0)
    if fits < 1:
        if autoscaling:
            return 1
        have = ", ".join(f"{r}={cluster.get(r, 0):g}" for r in need)
        wants = ", ".join(f"{r}={a:g}" for r, a in need.items())
        raise ConfigError(
            f"one trial needs {wants} (train.num_workers x train.cpus_per_worker [+ train.gpus_per_worker GPUs each], {DATA_CPUS} CPU for "
            f"Ray Data when it streams the data, {DRIVER_CPUS:g} CPU for the Tune trial driver), the Ray cluster has {have} "
            "(set train.wait_for_autoscaler=true on an autoscaling cluster)"
        )
    return fits


def check_data(configs: Sequence[Config]) -> None:
    """Every trial's data exists and suits its config (splits, classes, body sites for mtl): before any trial starts."""
    from proco_ray.data.manifest import check_manifest, read_manifest

    uris = {c.data.uri for c in configs}
    if "" in uris:
        raise ConfigError("no dataset: pass --data URI or set data.uri (prepare one with proco-ray prepare)")
    manifests = {uri: read_manifest(uri) for uri in uris}
    for config in configs:
        check_manifest(config, manifests[config.data.uri])
