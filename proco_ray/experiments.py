"""Ray Tune experiments as data: search spaces, named variants and seeds, checked before any trial starts.

Everything here is pure (no Ray): parsing the experiment YAML, validating every
key and value against the `Config` schema, building a trial's Config from its
parameters, sizing concurrency from cluster resources, and aggregating finished
trials into mean ± std tables. `proco_ray.tune` adapts this to Ray Tune.

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
import difflib
import itertools
import math
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proco_ray.config import (
    DATA_CPUS,
    Config,
    ConfigError,
    config_from_dict,
    find_named_file,
    load_config,
    merge,
    parse_overrides,
)

CONFIG_TUNE_DIR = Path(__file__).resolve().parent.parent / "configs" / "tune"
SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
VARIANT_KEY = "variant"
SEED_KEY = "train.seed"
HEADLINE = ("accuracy", "macro_f1", "balanced_accuracy")
# Shown beside the headline test metrics: the validation score the model was selected on, and the collapse monitor.
SIDE_METRICS = {"selected val macro_f1": "best/val_macro_f1", "embedding_std": "train/embedding_std"}
# Reported by every worker in every epoch (see train_loop.train_worker); test/* (of the best-validation
# epoch so far) only when the data has a test split.
EPOCH_METRICS = (
    "epoch",
    "train/loss",
    "train/lr",
    "train/images_per_s",
    "val/accuracy",
    "val/macro_f1",
    "val/balanced_accuracy",
    "val/qwk",
)
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
    metric: str = "val/macro_f1"
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


def _closest(key: str, valid: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def config_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every settable dotted key of the Config schema (method.gamma, optim.lr, ...)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def check_key(key: str, where: str) -> None:
    """An unknown dotted key is an error naming it and the closest valid key."""
    valid = config_keys()
    if key not in valid:
        raise ConfigError(f"{where}: unknown parameter '{key}'{_closest(key, valid)}")


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def yaml_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string; search spaces mean the number."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'method': {'gamma': 4}} -> {'method.gamma': 4}; dotted keys pass through."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = yaml_number(value)
    return out


def nest(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """{'method.gamma': 4} -> {'method': {'gamma': 4}}, the shape `config_from_dict` takes."""
    tree: dict[str, Any] = {}
    for key, value in dotted.items():
        node = tree
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def parse_domain(key: str, spec: Any) -> Domain:
    """`{grid: [...]}`, `{choice: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{randint: [lo, hi]}` or a constant."""
    where = f"search_space.{key}"
    if not isinstance(spec, Mapping):
        return Domain("grid", (yaml_number(spec),))
    if len(spec) != 1:
        raise ConfigError(f"{where} must have exactly one of {SEARCH_KINDS}, got {sorted(spec)}")
    kind, values = next(iter(spec.items()))
    if kind not in SEARCH_KINDS:
        raise ConfigError(f"{where}: unknown search kind '{kind}'{_closest(kind, SEARCH_KINDS)}")
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
            raise ConfigError(f"unknown experiment key '{key}'{_closest(key, EXPERIMENT_KEYS)}")
    variants = values.get("variants") or {}
    if not isinstance(variants, Mapping):
        raise ConfigError(f"variants must map a name to overrides, got {variants!r}")
    parsed_variants = {}
    for name, overrides in variants.items():
        if overrides is not None and not isinstance(overrides, Mapping):
            raise ConfigError(f"variants.{name} must be a mapping of overrides, got {overrides!r}")
        parsed_variants[str(name)] = flatten(overrides or {})
    space = values.get("search_space") or {}
    if not isinstance(space, Mapping):
        raise ConfigError(f"search_space must be a mapping, got {space!r}")
    asha = values.get("asha", {})
    if asha is not None and not isinstance(asha, Mapping):
        raise ConfigError(f"asha must be a mapping (grace_period, reduction_factor) or null, got {asha!r}")
    if asha is not None:
        for key in asha:
            if key not in ("grace_period", "reduction_factor"):
                raise ConfigError(f"unknown asha key '{key}'{_closest(key, ('grace_period', 'reduction_factor'))}")
    seeds = values.get("seeds") or ()
    if not isinstance(seeds, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds must be a list of integers, got {seeds!r}")
    experiment = Experiment(
        name=str(values.get("name") or default_name),
        description=str(values.get("description") or ""),
        base=values.get("base"),
        overrides=flatten(values.get("overrides") or {}),
        variants=parsed_variants,
        seeds=tuple(seeds),
        search_space={str(k): parse_domain(str(k), v) for k, v in flatten_space(space).items()},
        num_samples=int(values.get("num_samples", 1)),
        metric=str(values.get("metric", "val/macro_f1")),
        mode=str(values.get("mode", "max")),
        asha=None if asha is None else Asha(**{k: yaml_number(v) for k, v in asha.items()}),
    )
    return experiment


def flatten_space(space: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Like `flatten`, but a mapping whose only key is a search kind is a domain, not a section."""
    out: dict[str, Any] = {}
    for key, value in space.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and not (len(value) == 1 and next(iter(value)) in SEARCH_KINDS):
            if any(k in SEARCH_KINDS for k in value):
                out[dotted] = value  # malformed domain: let parse_domain say why
            else:
                out.update(flatten_space(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


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
    if metric in EPOCH_METRICS or (metric.startswith("val/recall/") and len(metric) > len("val/recall/")):
        return
    if metric.startswith("test/"):
        raise ConfigError(
            f"metric '{metric}' is the test split's (reported only when validation improves), so neither ASHA nor "
            f"model selection may use it; "
            f"use '{metric.replace('test/', 'val/', 1)}'"
        )
    raise ConfigError(
        f"metric '{metric}' is never reported{_closest(metric, EPOCH_METRICS)} "
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
    from proco_ray.methods import METHODS, build_method

    try:
        build_method(config.method, config.model, 2, [1, 1])
        METHODS[config.method.name].stages_for(config.method, config.optim.epochs)
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
            f"one trial needs {wants} (train.num_workers x train.cpus_per_worker [+1 GPU each], {DATA_CPUS} CPU for "
            f"Ray Data when it streams the data, {DRIVER_CPUS:g} CPU for the Tune trial driver), the Ray cluster has {have} "
            "(set train.wait_for_autoscaler=true on an autoscaling cluster)"
        )
    return fits


# --------------------------------------------------------------------------- aggregation


@dataclass
class TrialRecord:
    """One finished (or stopped, or failed) trial: its parameters and every epoch it reported."""

    trial_id: str
    params: dict[str, Any]
    history: list[dict[str, Any]]
    error: str | None = None

    @property
    def epochs(self) -> int:
        return max((int(row["epoch"]) for row in self.history if "epoch" in row), default=0)

    @property
    def group(self) -> str:
        return group_label(self.params)


def group_label(params: Mapping[str, Any]) -> str:
    """Trials that differ only in seed share a group: the variant name, else the non-seed parameters."""
    if params.get(VARIANT_KEY) is not None:
        return str(params[VARIANT_KEY])
    rest = [(k, v) for k, v in sorted(params.items()) if k != SEED_KEY]
    return ", ".join(f"{k}={_short(v)}" for k, v in rest) or "base"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def final_metrics(history: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, float]]:
    """('test', test/*) when the trial reported test metrics, else ('val', the last val/*); keys unprefixed.

    test/* in a report are the test metrics of the epoch with the best validation macro-F1 so far (the
    training loop evaluates the test split only when validation improves), so the last report holds
    the test metrics of the model selected on validation.
    """
    if not history:
        return "none", {}
    last = history[-1]
    for source in ("test", "val"):
        values = {k[len(source) + 1 :]: float(v) for k, v in last.items() if k.startswith(f"{source}/") and _finite(v)}
        if values:
            return source, values
    return "none", {}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def format_mean_std(mean: float, std: float, n: int, digits: int = 3) -> str:
    """'0.812 ± 0.013'; a single run has no spread to show."""
    if n == 0 or math.isnan(mean):
        return "–"
    if n == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass
class GroupSummary:
    """A variant/config over its seeds."""

    group: str
    params: dict[str, Any]
    trials: int
    n: int
    sources: tuple[str, ...]
    stats: dict[str, tuple[float, float]]
    epochs: tuple[int, ...]
    stopped_early: int
    errors: int
    recall: dict[str, tuple[float, float]]
    side: dict[str, tuple[float, float]] = field(default_factory=dict)


def last_reported(history: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The last finite value of `key` in a trial's history (a two-stage method logs some keys in one stage only)."""
    return next((float(row[key]) for row in reversed(history) if _finite(row.get(key))), None)


def summarise_groups(records: Sequence[TrialRecord], max_epochs: int, order: Sequence[str] = ()) -> list[GroupSummary]:
    """Mean ± std over seeds per variant/config; groups in `order` first, then by mean macro-F1."""
    groups: dict[str, list[TrialRecord]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)
    out = []
    for name, members in groups.items():
        finals = [final_metrics(r.history) for r in members if r.error is None]
        finals = [(s, m) for s, m in finals if s != "none"]
        stats = {k: mean_std([m[k] for _, m in finals if k in m]) for k in HEADLINE}
        classes = sorted({k for _, m in finals for k in m if k.startswith("recall/")})
        recall = {c[len("recall/") :]: mean_std([m[c] for _, m in finals if c in m]) for c in classes}
        params = {k: v for k, v in members[0].params.items() if k != SEED_KEY}
        out.append(
            GroupSummary(
                group=name,
                params=params,
                trials=len(members),
                n=len(finals),
                sources=tuple(sorted({s for s, _ in finals})),
                stats=stats,
                epochs=tuple(sorted(r.epochs for r in members)),
                stopped_early=sum(1 for r in members if r.error is None and r.epochs < max_epochs),
                errors=sum(1 for r in members if r.error is not None),
                recall=recall,
                side={
                    name: mean_std(values)
                    for name, key in SIDE_METRICS.items()
                    if (values := [v for r in members if r.error is None and (v := last_reported(r.history, key)) is not None])
                },
            )
        )
    rank = {name: i for i, name in enumerate(order)}
    score = lambda g: -g.stats["macro_f1"][0] if not math.isnan(g.stats["macro_f1"][0]) else math.inf  # noqa: E731
    return sorted(out, key=lambda g: (rank.get(g.group, len(rank)), score(g)))


def table_rows(groups: Sequence[GroupSummary], markdown: bool) -> list[dict[str, Any]]:
    """Markdown rows ('mean ± std' cells) or CSV rows (separate mean/std columns)."""
    shown_side = [name for name in SIDE_METRICS if any(name in g.side for g in groups)]
    rows = []
    for g in groups:
        row: dict[str, Any] = {"variant": g.group, "seeds": g.n, "metrics from": "+".join(g.sources) or "–"}
        for key in HEADLINE:
            mean, std = g.stats[key]
            if markdown:
                row[key.replace("_", " ")] = format_mean_std(mean, std, g.n)
            else:
                row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        for name in shown_side:
            mean, std = g.side.get(name, (math.nan, math.nan))
            if markdown:
                row[name.replace("_", " ")] = format_mean_std(mean, std, g.n, digits=3 if "f1" in name else 4)
            else:
                row[f"{name.replace(' ', '_')}_mean"], row[f"{name.replace(' ', '_')}_std"] = mean, std
        row["epochs reached" if markdown else "epochs"] = ",".join(str(e) for e in g.epochs)
        row["stopped early" if markdown else "stopped_early"] = g.stopped_early
        row["failed"] = g.errors
        rows.append(row)
    return rows


def best_group(groups: Sequence[GroupSummary], key: str = "macro_f1") -> GroupSummary | None:
    """The variant/config with the highest mean of `key` among groups with metrics."""
    scored = [g for g in groups if g.n and not math.isnan(g.stats[key][0])]
    return max(scored, key=lambda g: g.stats[key][0]) if scored else None


def best_trial(records: Sequence[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    """The trial whose last reported `metric` is best (the metric ASHA compared)."""
    scored = [(r.history[-1][metric], r) for r in records if r.history and _finite(r.history[-1].get(metric))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda item: item[0])[1]


def curves(records: Sequence[TrialRecord], metric: str) -> dict[str, list[tuple[int, float]]]:
    """Per trial, (epoch, metric) points in epoch order, for the per-epoch plot."""
    out = {}
    for r in records:
        points = sorted(
            {int(row["epoch"]): float(row[metric]) for row in r.history if "epoch" in row and _finite(row.get(metric))}.items()
        )
        out[f"{r.group} [{r.trial_id}]"] = points
    return out


def asha_rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[float]:
    """The epochs at which ASHA compares trials: grace_period x reduction_factor^k below max_t (as Ray's ASHA)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor**k for k in range(count) if grace_period * reduction_factor**k < max_t]


def product_labels(experiment: Experiment) -> list[str]:
    """Every grid combination's group label (variants first), in definition order, for table order."""
    plan = {k: d for k, d in experiment.plan().items() if d.kind == "grid" and k != SEED_KEY}
    labels = []
    for values in itertools.product(*(d.values for d in plan.values())):
        label = group_label(dict(zip(plan, values)))
        if label not in labels:
            labels.append(label)
    return labels
