"""`proco-ray local-sweep`: an experiment's grid in processes without Ray, resumable, same results files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from proco_ray.config import ConfigError, load_config
from proco_ray.data.prepare import PrepareOptions, prepare
from proco_ray.experiments.spec import base_tree, experiment_from_dict
from proco_ray.launch.local_sweep import grid_trials, local_sweep, narrow

TINY = Path(__file__).parent / "tiny.yaml"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, datagen, ray_local) -> str:
    root = tmp_path_factory.mktemp("local-sweep")
    source = datagen.imagefolder(root / "folder", {"common": 48, "rare": 16, "scarce": 12})
    prepare(str(source), str(root / "prepared"), PrepareOptions(image_size=16))
    return str(root / "prepared")


def test_grid_runs_every_variant_before_any_second_seed_and_refuses_searches():
    experiment = experiment_from_dict({"name": "g", "variants": {"a": {}, "b": {}}, "seeds": [0, 1], "asha": None})
    assert [(t["variant"], t["train.seed"]) for t in grid_trials(experiment)] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    search = experiment_from_dict({"name": "s", "search_space": {"optim.lr": {"loguniform": [1e-3, 1e-1]}}, "num_samples": 2})
    with pytest.raises(ConfigError, match="grids of variants and seeds only"):
        grid_trials(search)


def test_only_and_seeds_narrow_the_grid_under_the_same_trial_names():
    experiment = experiment_from_dict({"name": "g", "variants": {"a": {}, "b": {}, "c": {}}, "seeds": [0, 1, 2], "asha": None})
    narrowed = narrow(experiment, only="c,a", seeds="2,1")
    assert [(t["variant"], t["train.seed"]) for t in grid_trials(narrowed)] == [("c", 2), ("a", 2), ("c", 1), ("a", 1)]
    assert narrow(experiment) == experiment
    with pytest.raises(ConfigError, match=r"--only: no variant \['d'\]"):
        narrow(experiment, only="a,d")
    with pytest.raises(ConfigError, match=r"--seeds: no seed \[3\] .* has \[0, 1, 2\]"):
        narrow(experiment, seeds="1,3")
    with pytest.raises(ConfigError, match="--seeds: 'one' is not"):
        narrow(experiment, seeds="one")


def test_local_sweep_trains_in_processes_writes_results_and_resumes(prepared, tmp_path, capsys):
    experiment = experiment_from_dict(
        {
            "name": "mini",
            "variants": {"ce": {"method.name": "ce"}, "proco": {"method.name": "proco"}},
            "seeds": [0, 1],
            "asha": None,
        }
    )
    base = base_tree(
        load_config(TINY).to_dict(), experiment, {"data": {"uri": prepared, "image_size": 16}, "optim": {"epochs": 2}}
    )
    records = local_sweep(experiment, base, tmp_path / "sweep", parallel=2, workers=0)
    assert sorted(r.trial_id for r in records) == ["ce_seed0", "ce_seed1", "proco_seed0", "proco_seed1"]
    assert all(r.error is None and r.epochs == 2 for r in records)
    assert all("test/macro_f1" in r.history[-1] and "best/epoch" in r.history[-1] for r in records)
    progress = capsys.readouterr().out
    for record in records:  # each trial's line gives the score its epoch was selected on, not the last epoch's
        last = record.history[-1]
        assert f"{record.trial_id}: best epoch {last['best/epoch']}: val macro-F1 {last['best/val_macro_f1']:.3f}" in progress
    table = (tmp_path / "sweep" / "results" / "results.md").read_text()
    assert "| ce | 2 | test |" in table and "| proco | 2 | test |" in table
    history = tmp_path / "sweep" / "ce_seed0" / "history.json"
    before = history.stat().st_mtime_ns
    again = local_sweep(experiment, base, tmp_path / "sweep", parallel=2, workers=0)
    assert history.stat().st_mtime_ns == before  # complete trials are not rerun
    assert [r.history for r in again] == [r.history for r in records]
    assert json.loads(history.read_text())[-1]["epoch"] == 2
    changed = dataclasses.replace(experiment, variants={"ce": {"method.name": "focal"}, "proco": {"method.name": "proco"}})
    with pytest.raises(ConfigError, match="ce_seed0 was run with another config than experiment 'mini'"):
        local_sweep(changed, base, tmp_path / "sweep", parallel=2, workers=0)


def test_a_killed_sweep_resumes_its_trial_from_the_latest_checkpoint_and_matches_an_unbroken_one(prepared, tmp_path):
    """A machine that stops mid-trial (SIGKILL to the whole sweep) loses at most the epoch under way: the rerun
    resumes after the last checkpointed epoch, and the finished history equals an uninterrupted trial's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    (tmp_path / "exp.yaml").write_text(
        yaml.safe_dump({"name": "one", "variants": {"proco": {"method.name": "proco"}}, "seeds": [0], "asha": None})
    )
    command = [
        sys.executable, "-m", "proco_ray", "local-sweep", "--experiment", str(tmp_path / "exp.yaml"),
        "--config", str(TINY), "--data", prepared, "--workers", "0", "optim.epochs=4", "data.image_size=16",
    ]  # fmt: skip
    broken = subprocess.Popen([*command, "--out", str(tmp_path / "broken")], start_new_session=True, text=True)
    trial = tmp_path / "broken" / "proco_seed0"
    deadline = time.monotonic() + 300
    while not list(trial.glob("checkpoint_epoch_0002")) and broken.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(broken.pid, signal.SIGKILL)
    broken.wait()
    done_before = json.loads((trial / "history.json").read_text())
    assert 2 <= len(done_before) < 4, "the kill should land mid-trial"

    rerun = subprocess.run([*command, "--out", str(tmp_path / "broken")], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed_after = int(rerun.stdout.split("proco_seed0: resuming after epoch ")[1].split()[0])
    assert resumed_after >= 2
    unbroken = subprocess.run([*command, "--out", str(tmp_path / "unbroken")], capture_output=True, text=True, timeout=300)
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    assert "resuming" not in unbroken.stdout

    def comparable(path: Path) -> list[dict]:
        timing = ("train/images_per_s", "train/data_wait_share")
        return [{k: v for k, v in row.items() if k not in timing} for row in json.loads(path.read_text())]

    resumed = comparable(trial / "history.json")
    assert [row["epoch"] for row in resumed] == [1, 2, 3, 4]
    assert resumed == comparable(tmp_path / "unbroken" / "proco_seed0" / "history.json")
    assert "last/test/macro_f1" in resumed[-1] and all("last/test/macro_f1" not in row for row in resumed[:-1])
    assert [d.name for d in trial.glob("checkpoint_epoch_*")] == ["checkpoint_epoch_0004"]


def test_paired_difference_is_the_paired_t_interval_of_the_per_seed_differences():
    """Against the textbook formula: mean of d_i, +- t(0.975, n-1) s_d / sqrt(n)."""
    import math
    import statistics

    from scipy.stats import t

    from proco_ray.experiments.length import paired_difference

    method, baseline = {0: 0.41, 1: 0.39, 2: 0.45, 5: 0.5}, {0: 0.38, 1: 0.40, 2: 0.40, 3: 0.1}
    result = paired_difference(method, baseline)
    differences = [0.41 - 0.38, 0.39 - 0.40, 0.45 - 0.40]
    half = t.ppf(0.975, 2) * statistics.stdev(differences) / math.sqrt(3)
    assert result.per_seed == pytest.approx({0: 0.03, 1: -0.01, 2: 0.05})
    assert result.mean == pytest.approx(statistics.fmean(differences))
    assert (result.low, result.high) == pytest.approx((result.mean - half, result.mean + half))
    single = paired_difference({0: 0.5}, {0: 0.25})
    assert single.mean == 0.25 and math.isnan(single.low)


def test_length_curve_reads_both_readings_of_every_sweep_and_draws_the_figure(tmp_path, capsys):
    from proco_ray.cli import main

    for epochs, shift in ((15, 0.0), (50, 0.05)):
        for variant, base in (("proco", 0.40), ("ce_resample", 0.35)):
            for seed in range(3):
                trial = tmp_path / f"e{epochs}" / f"{variant}_seed{seed}"
                trial.mkdir(parents=True)
                last = {"epoch": epochs, "test/macro_f1": base + shift + 0.01 * seed, "last/test/macro_f1": base + shift}
                (trial / "history.json").write_text(json.dumps([{"epoch": 1}, last]))
    figure = tmp_path / "figures" / "length.png"
    argv = ["length-curve", "--dataset", "toy", "--sweep", f"15={tmp_path / 'e15'}", "--sweep", f"50={tmp_path / 'e50'}"]
    assert main([*argv, "--figure", str(figure)]) == 0
    table = capsys.readouterr().out
    assert "| toy | 50 | best-validation epoch | 0.460 ± 0.010 (n=3) | 0.410 ± 0.010 (n=3) | +0.050, +0.050, +0.050 |" in table
    assert "| toy | 15 | last epoch | 0.400 ± 0.000 (n=3) | 0.350 ± 0.000 (n=3) |" in table
    assert figure.stat().st_size > 10_000
    with pytest.raises(SystemExit, match="give --dataset NAME before"):
        main(["length-curve", "--sweep", f"15={tmp_path / 'e15'}", "--dataset", "toy"])


def test_spearman_p_value_is_the_share_of_pairings_at_least_as_extreme():
    """Against a brute-force loop over all 6! pairings (the exact test the p-value runs up to 8 methods)."""
    import itertools

    from scipy.stats import spearmanr

    from proco_ray.experiments.paper_table import spearman_p_value, spearman_rho

    x, y = [0.85, 0.86, 0.849, 0.857, 0.818, 0.811], [0.40, 0.46, 0.41, 0.44, 0.30, 0.37]
    observed = spearman_rho(x, y)
    assert observed == pytest.approx(spearmanr(x, y).statistic)
    pairings = [spearmanr(x, [y[i] for i in order]).statistic for order in itertools.permutations(range(6))]
    brute = sum(abs(rho) >= abs(observed) - 1e-12 for rho in pairings) / len(pairings)
    assert spearman_p_value(x, y) == pytest.approx(brute)


def test_paper_table_puts_each_method_beside_the_paper_with_ranks_correlation_and_paired_differences(tmp_path, capsys):
    from proco_ray.cli import main
    from proco_ray.experiments.paper_table import PAPER_TABLE2

    paper = PAPER_TABLE2["isic2018"]
    # Ours: the paper's F1 order exactly (F1 - 0.3), proco_paper at the bottom; seeds 0.01 apart (proco's 0.02).
    scores = {method: f1 - 0.3 for method, (_, f1) in paper.items()} | {"proco_paper": 0.2}
    for variant, score in scores.items():
        folder = tmp_path / ("first" if variant < "m" else "second")
        step = 0.02 if variant == "proco" else 0.01
        for seed in range(3):
            trial = folder / f"{variant}_seed{seed}"
            trial.mkdir(parents=True)
            last = {"epoch": 100, "best/val_macro_f1": score + 0.1}
            for prefix, shift in (("test", 0.0), ("last/test", -0.05)):
                last |= {
                    f"{prefix}/accuracy": 0.7,
                    f"{prefix}/balanced_accuracy": 0.5,
                    f"{prefix}/macro_f1": score + shift + step * seed,
                }
            (trial / "history.json").write_text(json.dumps([{"epoch": 1}, last]))
    unfinished = tmp_path / "second" / "ohem_seed3"
    unfinished.mkdir()
    (unfinished / "history.json").write_text(json.dumps([{"epoch": 1, "test/macro_f1": 0.9}]))

    assert main(["paper-table", "--sweep", str(tmp_path / "first"), "--sweep", str(tmp_path / "second")]) == 0
    out = capsys.readouterr().out
    assert (
        "| `proco` | 0.887 | 0.763 | 1 | 0.700 ± 0.000 | 0.483 ± 0.020 | 0.500 ± 0.000 | 0.700 ± 0.000 | 0.433 ± 0.020 |" in out
    )
    assert "| `proco_paper` | 0.887 | 0.763 | 1 | 0.700 ± 0.000 | 0.210 ± 0.010 |" in out and out.count("| 11 | 3 |") == 1
    assert "| `ohem` | 0.818 | 0.660 | 10 |" in out and "| 10 | 3 |" in out  # seed 3 unfinished: not counted
    assert "with `proco` as the paper's ProCo: Spearman rho = +1.00 over 10 methods, p = 0.000" in out
    assert "with `proco_paper` as the paper's ProCo: Spearman rho = +0.45 over 10 methods" in out
    assert "strongest baselines on validation (`cl_resample`, `cl`)" in out
    assert "| `proco` − `cl_resample` | best-validation epoch | +0.012, +0.022, +0.032 | +0.022 [-0.003, +0.047] |" in out

    (tmp_path / "first" / "ce_seed0").rename(tmp_path / "second" / "ce_seed0")
    (tmp_path / "dup" / "ce_seed0").mkdir(parents=True)
    (tmp_path / "dup" / "ce_seed0" / "history.json").write_text((tmp_path / "second" / "ce_seed0" / "history.json").read_text())
    with pytest.raises(SystemExit, match="ce seed 0 is finished in more than one of the folders"):
        main(["paper-table", "--sweep", str(tmp_path / "second"), "--sweep", str(tmp_path / "dup")])
    with pytest.raises(SystemExit, match="no such sweep folder"):
        main(["paper-table", "--sweep", str(tmp_path / "none")])
