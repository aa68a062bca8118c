"""Ray Tune experiments: search-space parsing, validation before any trial starts, aggregation, ASHA and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from proco_ray.config import ConfigError, load_config, merge, parse_overrides
from proco_ray.engine.feeds import GeneratedFeed
from proco_ray.experiments.spec import (
    CONFIG_TUNE_DIR,
    Domain,
    base_tree,
    check_metric,
    experiment_from_dict,
    load_experiment,
    max_concurrent_trials,
    parse_domain,
    trial_config,
    validate,
)
from proco_ray.experiments.stats import (
    TrialRecord,
    asha_rungs,
    best_group,
    final_metrics,
    format_mean_std,
    mean_std,
    product_labels,
    summarise_groups,
    table_rows,
)

FEED = GeneratedFeed(train_counts=(24, 12, 6, 6), eval_counts=(4, 4, 4, 4), image_size=16)
TINY_CONFIG = Path(__file__).parent / "tiny.yaml"
TINY = ["model.norm=group", "train.num_workers=1"]


def tiny_base(experiment, epochs: int) -> dict:
    return base_tree(load_config(TINY_CONFIG).to_dict(), experiment, parse_overrides(TINY + [f"optim.epochs={epochs}"]))


# --------------------------------------------------------------------------- search-space schema


def test_domains_of_every_kind():
    assert parse_domain("optim.lr", {"grid": [0.1, 0.2]}) == Domain("grid", (0.1, 0.2))
    assert parse_domain("method.beta", {"choice": [0.9, 0.95]}) == Domain("choice", (0.9, 0.95))
    assert parse_domain("method.eps_max", {"uniform": [0.1, 0.6]}).representatives() == (0.1, 0.6)
    assert parse_domain("optim.lr", {"loguniform": ["1e-3", 0.1]}) == Domain("loguniform", (0.001, 0.1))  # YAML 1e-3 is a str
    assert parse_domain("method.queue_size", {"randint": [512, 8192]}).representatives() == (512, 8191)
    assert parse_domain("data.batch_size", 64) == Domain("grid", (64,))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"grdi": [1, 2]}, "did you mean 'grid'"),
        ({"uniform": [0.5, 0.1]}, "low < high"),
        ({"loguniform": [0, 1]}, "low > 0"),
        ({"grid": []}, "non-empty list"),
        ({"grid": [1], "choice": [2]}, "exactly one"),
    ],
)
def test_malformed_domains_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_domain("optim.lr", spec)


def test_shipped_experiments_validate():
    shipped = sorted(CONFIG_TUNE_DIR.glob("*.yaml"))
    assert {p.stem for p in shipped} >= {
        "hparams",
        "ablation",
        "baselines",
        "cl-pretrain",
        "compare",
        "proco-loss",
        "proco-levers",
        "proco-la",
        "proco-momentum",
    }
    for path in shipped:
        experiment = load_experiment(path)
        configs = validate(experiment, base_tree(load_config(experiment.base).to_dict(), experiment))
        assert configs
    ablation = load_experiment("ablation")
    assert set(ablation.variants) >= {
        "proto_loss_only",
        "plus_proto_instances",
        "plus_recalibration",
        "full_proco",
        "loss_ce",
        "loss_infonce",
    }
    assert len(ablation.seeds) == 3 and ablation.num_trials() == 18
    from proco_ray.method.registry import METHODS

    assert {v["method.name"] for v in load_experiment("baselines").variants.values()} == set(METHODS)


def test_shipped_experiments_train_what_their_variants_say():
    """Issue 26.1: `proco` is ProCo as selected without overrides; the experiments keep the meaning of their rows."""
    from proco_ray.method.registry import resolved

    def how(name: str) -> dict[str, tuple[str, str, str]]:
        experiment = load_experiment(name)
        base = base_tree(load_config(experiment.base).to_dict(), experiment)
        configs = [resolved(trial_config(base, experiment.variants, {"variant": v})) for v in experiment.variants]
        return {v: (c.method.sampling, c.method.proto_form, c.data.augmentation) for v, c in zip(experiment.variants, configs)}

    selected, paper = ("class_balanced", "split", "supervised"), ("instance_balanced", "eq7", "moco_v2")
    assert how("compare")["proco"] == how("baselines")["proco"] == selected
    assert how("compare")["proco_paper"] == how("baselines")["proco_paper"] == paper
    assert how("compare")["ce"] == ("instance_balanced", "split", "supervised")
    assert set(how("ablation").values()) == set(how("proco-momentum").values()) == {selected}
    assert how("proco-levers") == {
        "proco_resample": ("class_balanced", "eq7", "moco_v2"),
        "proco_supervised": ("instance_balanced", "eq7", "supervised"),
        "proco_resample_supervised": ("class_balanced", "eq7", "supervised"),
        "split_resample": ("class_balanced", "split", "moco_v2"),
        "split_resample_supervised": selected,
    }
    assert how("proco-la")["proco_la"] == ("instance_balanced", "split", "supervised")
    assert how("proco-loss")["eq7_tau1"] == paper


def test_trial_config_layers_variant_then_parameters():
    experiment = experiment_from_dict({"variants": {"ce_loss": {"method": {"loss": "ce"}}}, "seeds": [0, 1]})
    config = trial_config(tiny_base(experiment, 2), experiment.variants, {"variant": "ce_loss", "train.seed": 1, "optim.lr": 0.2})
    assert (config.method.loss, config.train.seed, config.optim.lr, config.optim.epochs) == ("ce", 1, 0.2, 2)


# --------------------------------------------------------------------------- bad input, before any trial starts


def test_unknown_search_parameter_names_the_closest_key():
    experiment = experiment_from_dict({"search_space": {"method.gama": {"grid": [10, 20]}}})
    with pytest.raises(ConfigError, match=r"unknown parameter 'method.gama'; did you mean 'method.gamma'"):
        validate(experiment, tiny_base(experiment, 2))
    variant = experiment_from_dict({"variants": {"a": {"optim.momentm": 0.8}}})
    with pytest.raises(ConfigError, match=r"variant 'a': unknown parameter 'optim.momentm'; did you mean 'optim.momentum'"):
        validate(variant, tiny_base(variant, 2))
    with pytest.raises(ConfigError, match="unknown experiment key 'search_spaces'; did you mean 'search_space'"):
        experiment_from_dict({"search_spaces": {}})


def test_bad_search_values_are_refused():
    wrong_type = experiment_from_dict({"search_space": {"method.gamma": {"choice": [10, 2.5]}}})
    with pytest.raises(ConfigError, match="method.gamma must be an integer"):
        validate(wrong_type, tiny_base(wrong_type, 2))
    out_of_range = experiment_from_dict({"search_space": {"method.eps_max": {"uniform": [0.1, 1.5]}}})
    with pytest.raises(ConfigError, match=r"eps_max \(E\) must lie in \[0, 1\)"):
        validate(out_of_range, tiny_base(out_of_range, 2))
    grace = experiment_from_dict({"asha": {"grace_period": 5}})
    with pytest.raises(ConfigError, match="grace_period"):
        validate(grace, tiny_base(grace, 2))


def test_a_metric_that_is_never_reported_is_refused():
    with pytest.raises(ConfigError, match="metric 'val/f1' is never reported; did you mean 'val/"):
        check_metric("val/f1", "max")
    with pytest.raises(ConfigError, match="test split.s .reported only when validation improves"):
        check_metric("test/macro_f1", "max")
    with pytest.raises(ConfigError, match="mode"):
        check_metric("val/macro_f1", "maximum")
    for ok in ("val/macro_f1", "val/balanced_accuracy", "train/loss", "val/recall/MEL"):
        check_metric(ok, "max")
    experiment = experiment_from_dict({"metric": "val/macro-f1"})
    with pytest.raises(ConfigError, match="never reported"):
        validate(experiment, tiny_base(experiment, 2))


def test_more_resources_per_trial_than_the_cluster_has_is_refused():
    from proco_ray.launch.tune import validate_sweep

    assert max_concurrent_trials({"CPU": 4}, {"CPU": 2}) == 2
    assert max_concurrent_trials({"CPU": 64, "GPU": 8}, {"CPU": 17, "GPU": 4}) == 2
    assert max_concurrent_trials({"CPU": 2}, {"CPU": 5}, autoscaling=True) == 1
    experiment = experiment_from_dict({"seeds": [0, 1]})
    base = base_tree(load_config(TINY_CONFIG).to_dict(), experiment, parse_overrides(TINY + ["train.num_workers=4"]))
    with pytest.raises(ConfigError, match=r"one trial needs CPU=5 .* the Ray cluster has CPU=4"):
        validate_sweep(experiment, base, {"CPU": 4.0}, FEED)
    gpus = base_tree(load_config(TINY_CONFIG).to_dict(), experiment, parse_overrides(TINY + ["train.use_gpu=true"]))
    with pytest.raises(ConfigError, match="GPU=1"):
        validate_sweep(experiment, gpus, {"CPU": 4.0}, FEED)


# --------------------------------------------------------------------------- aggregation and the results table


def record(
    trial_id: str, params: dict, epochs: int, max_epochs: int, f1: float, error: str | None = None, val_f1: float | None = None
) -> TrialRecord:
    """A trial whose validation macro-F1 rises to `val_f1` (default `f1`) and whose selected test macro-F1 is `f1`."""
    val_f1 = f1 if val_f1 is None else val_f1
    history = []
    for epoch in range(1, epochs + 1):
        row = {
            "epoch": epoch,
            "train/loss": 2.0 / epoch,
            "val/accuracy": f1 + 0.1,
            "val/macro_f1": val_f1 * epoch / epochs,
            "best/val_macro_f1": val_f1 * epoch / epochs,
            "val/balanced_accuracy": f1,
            "val/recall/a": f1,
            "val/recall/b": 1 - f1,
        }
        if epoch == max_epochs:
            row.update(
                {
                    "test/accuracy": f1 + 0.2,
                    "test/macro_f1": f1,
                    "test/balanced_accuracy": f1,
                    "test/recall/a": f1,
                    "test/recall/b": 0.5,
                }
            )
        history.append(row)
    return TrialRecord(trial_id, params, history, error)


def test_final_metrics_prefer_test_then_last_val():
    finished = record("t1", {}, 3, 3, 0.6)
    stopped = record("t2", {}, 1, 3, 0.3)
    assert final_metrics(finished.history)[0] == "test" and final_metrics(finished.history)[1]["accuracy"] == pytest.approx(0.8)
    assert final_metrics(stopped.history) == (
        "val",
        pytest.approx({"accuracy": 0.4, "macro_f1": 0.3, "balanced_accuracy": 0.3, "recall/a": 0.3, "recall/b": 0.7}),
    )
    assert final_metrics([]) == ("none", {})


def test_mean_std_and_its_formatting():
    mean, std = mean_std([0.7, 0.8, 0.9])
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.1)
    assert format_mean_std(mean, std, 3) == "0.800 ± 0.100"
    assert format_mean_std(0.5, 0.0, 1) == "0.500 (n=1)"
    assert format_mean_std(math.nan, math.nan, 0) == "–"
    assert asha_rungs(4, 1, 2) == [1, 2, 4]  # Ray's milestones, max_t included when it is one
    assert asha_rungs(200, 20, 3) == [20, 60, 180]


def test_groups_aggregate_over_seeds_in_variant_order(tmp_path):
    from proco_ray.experiments.results import _write_results_to

    experiment = experiment_from_dict(
        {
            "name": "abl",
            "variants": {"full": {}, "ce_loss": {"method.loss": "ce"}},
            "seeds": [0, 1, 2],
            "asha": {"grace_period": 1},
        }
    )
    records = [
        record("a0", {"variant": "full", "train.seed": 0}, 3, 3, 0.6),
        record("a1", {"variant": "full", "train.seed": 1}, 3, 3, 0.7),
        record("a2", {"variant": "full", "train.seed": 2}, 3, 3, 0.8),
        record("b0", {"variant": "ce_loss", "train.seed": 0}, 3, 3, 0.5),
        record("b1", {"variant": "ce_loss", "train.seed": 1}, 1, 3, 0.2),  # stopped by ASHA after one epoch
        record("b2", {"variant": "ce_loss", "train.seed": 2}, 0, 3, 0.0, error="FloatingPointError: loss became nan"),
    ]
    groups = summarise_groups(records, max_epochs=3, order=product_labels(experiment))
    assert [g.group for g in groups] == ["full", "ce_loss"]
    full, ce = groups
    assert (full.n, full.sources, full.stopped_early, full.errors) == (3, ("test",), 0, 0)
    assert full.stats["macro_f1"] == pytest.approx((0.7, 0.1))
    assert (ce.n, ce.sources, ce.stopped_early, ce.errors, ce.epochs) == (2, ("test", "val"), 1, 1, (0, 1, 3))
    rows = table_rows(groups, markdown=True)
    assert rows[0]["macro f1"] == "0.700 ± 0.100" and rows[1]["metrics from"] == "test+val"

    names = _write_results_to(tmp_path, records, experiment, max_epochs=3)
    for key in ("markdown", "csv", "trials_csv", "best", "recall", "epochs", "curves:val/macro_f1"):
        assert (tmp_path / names[key]).is_file(), key
    markdown = (tmp_path / "results.md").read_text()
    assert "| full | 3 | test | 0.900 ± 0.100 | 0.700 ± 0.100 |" in markdown
    assert "`full`" in markdown and "mean ± sample std over seeds" in markdown
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("variant,seeds,metrics from,accuracy_mean,accuracy_std")
    assert "variant: full" in (tmp_path / "best.yaml").read_text()


def test_the_best_variant_is_chosen_on_validation_never_on_test(tmp_path):
    """`lucky` scores higher on test, `steady` on validation: the report and best.yaml choose `steady`."""
    from proco_ray.experiments.results import _write_results_to

    experiment = experiment_from_dict({"name": "pick", "variants": {"lucky": {}, "steady": {"optim.lr": 0.1}}, "seeds": [0, 1]})
    records = [
        record("l0", {"variant": "lucky", "train.seed": 0}, 3, 3, 0.9, val_f1=0.4),
        record("l1", {"variant": "lucky", "train.seed": 1}, 3, 3, 0.8, val_f1=0.5),
        record("s0", {"variant": "steady", "train.seed": 0}, 3, 3, 0.5, val_f1=0.6),
        record("s1", {"variant": "steady", "train.seed": 1}, 3, 3, 0.6, val_f1=0.7),
    ]
    groups = summarise_groups(records, max_epochs=3)
    assert [g.group for g in groups] == ["steady", "lucky"]
    assert best_group(groups).group == "steady"
    _write_results_to(tmp_path, records, experiment, max_epochs=3)
    chosen = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert chosen["variant"] == "steady" and chosen["overrides"] == {"optim.lr": 0.1}
    assert chosen["val_macro_f1"]["mean"] == pytest.approx(0.65) and chosen["macro_f1"]["mean"] == pytest.approx(0.55)
    assert "chosen on validation" in (tmp_path / "results.md").read_text()


# --------------------------------------------------------------------------- sweeps on Ray


def _events_with_hparams(trial_dir: Path) -> bool:
    return any(b"_hparams_/session_start_info" in f.read_bytes() for f in trial_dir.glob("events.out.tfevents*"))


@pytest.mark.slow
def test_asha_stops_bad_trials_early_and_releases_their_resources(ray_local, tmp_path):
    """lr 1e-5 barely moves the loss: ASHA (grace 1, factor 2) stops those trials at its first rung."""
    from proco_ray.launch.tune import sweep

    experiment = experiment_from_dict(
        {
            "name": "asha",
            # one trial at a time, seeds fastest: the two lr 1e-5 trials meet the first rung first (the second stops
            # if it is the worse of the two, as both seeds' losses are here), then the lr 0.05 ones, each below the
            # median of what is recorded there by then (ASHA keeps the top half)
            "search_space": {"optim.lr": {"grid": [1.0e-5, 0.05]}, "train.seed": {"grid": [0, 1]}},
            # val/macro_f1 ties on 48 generated images; the loss separates the learning rates clearly
            "metric": "train/loss",
            "mode": "min",
            "asha": {"grace_period": 1, "reduction_factor": 2},
        }
    )
    base = merge(tiny_base(experiment, 2), {"method": {"name": "proco_paper"}})  # whose loss lr 1e-5 barely moves
    result = sweep(experiment, base, name="asha", storage_path=str(tmp_path), feed_factory=FEED, max_concurrent=1)
    epochs = {r.params["optim.lr"]: [] for r in result.records}
    for r in result.records:
        assert r.error is None, r.error
        epochs[r.params["optim.lr"]].append(r.epochs)
    assert epochs[0.05] == [2, 2]
    assert any(e < 2 for e in epochs[1e-5]), epochs  # stopped early at the rung of epoch 1
    deadline = time.time() + 30  # a stopped trial's Train workers are gone, their CPUs back
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(0.5)
    assert ray_local.available_resources().get("CPU", 0) == ray_local.cluster_resources()["CPU"]

    results = tmp_path / "asha" / "results"
    for name in ("results.md", "results.csv", "trials.csv", "best.yaml", "curves_train_loss.png", "epochs.png", "recall.png"):
        assert (results / name).is_file(), name
    assert "stopped early (by ASHA" in (results / "results.md").read_text()
    trial_dirs = [d for d in (tmp_path / "asha").iterdir() if d.is_dir() and d.name != "results"]
    assert len(trial_dirs) == 4
    for trial_dir in trial_dirs:  # the TensorBoard dashboard: Tune's scalars + HParams per trial, rank-0 scalars of the run
        assert _events_with_hparams(trial_dir), trial_dir
        assert list((trial_dir / "train" / "tensorboard").glob("events.out.tfevents*")), trial_dir


DRIVER = textwrap.dedent(
    """
    import sys, ray
    sys.path.insert(0, {tests!r})
    from test_tune import FEED, RESUME_EXPERIMENT, tiny_base
    from proco_ray.experiments.spec import experiment_from_dict
    from proco_ray.launch.tune import sweep
    ray.init(address={address!r}, log_to_driver=False)
    experiment = experiment_from_dict(RESUME_EXPERIMENT)
    sweep(experiment, tiny_base(experiment, 2), name="resume", storage_path={storage!r}, feed_factory=FEED, max_concurrent=1)
    """
)
RESUME_EXPERIMENT = {
    "name": "resume",
    "variants": {"full": {}, "no_recalibration": {"method.recalibration": False}},
    "seeds": [0],
    "asha": None,
}


def _terminated(experiment_dir: Path) -> set[str]:
    done = set()
    for state in experiment_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (json.JSONDecodeError, KeyError):
            continue  # being written
        done |= {json.loads(t)["trial_id"] for t, _ in trials if json.loads(t)["status"] == "TERMINATED"}
    return done


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, tmp_path):
    from proco_ray.launch.tune import sweep

    address = ray_local.get_runtime_context().gcs_address
    script = DRIVER.format(tests=str(Path(__file__).parent), address=address, storage=str(tmp_path))
    driver = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    experiment_dir = tmp_path / "resume"
    try:
        deadline = time.time() + 180
        while not _terminated(experiment_dir) and time.time() < deadline and driver.poll() is None:
            time.sleep(0.5)
        finished_before = _terminated(experiment_dir)
        assert finished_before, "no trial finished before the deadline"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-sweep; Ray ends its job's actors
        driver.wait()
    lines_before = {
        d.name.split("-")[0]: len((d / "result.json").read_text().splitlines())
        for d in experiment_dir.iterdir()
        if (d / "result.json").is_file()
    }
    assert len(finished_before) < 2

    experiment = experiment_from_dict(RESUME_EXPERIMENT)
    result = sweep(experiment, tiny_base(experiment, 2), name="resume", storage_path=str(tmp_path), feed_factory=FEED)
    assert result.resumed
    assert len(result.records) == 2
    for r in result.records:
        assert r.error is None and r.epochs == 2, (r.trial_id, r.error, r.epochs)
    for trial_id in finished_before:  # not rerun: no new result rows
        trial_dir = next(d for d in experiment_dir.iterdir() if d.name.startswith(trial_id))
        assert len((trial_dir / "result.json").read_text().splitlines()) == lines_before[trial_id] == 2
    rows = (experiment_dir / "results" / "results.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["full", "no_recalibration"]
    assert "(n=1)" in (experiment_dir / "results" / "results.md").read_text()  # one seed: no spread to show

    with pytest.raises(ConfigError, match="different definition"):
        changed = experiment_from_dict({**RESUME_EXPERIMENT, "seeds": [0, 1]})
        sweep(changed, tiny_base(changed, 2), name="resume", storage_path=str(tmp_path), feed_factory=FEED)
