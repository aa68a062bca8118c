"""The per-worker loop in a plain process: epochs, metrics, checkpoints, exact resume."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proco_ray.config import load_config
from proco_ray.data.synthetic import generate_images
from proco_ray.engine.checkpoint import STAGING_PREFIX, CheckpointError, CheckpointFolder, load_checkpoint, staging_directory
from proco_ray.engine.feeds import tensor_feed
from proco_ray.engine.loop import WorkerEnv, train_worker, warmup_cosine

TINY = Path(__file__).parent / "tiny.yaml"
OVERRIDES = ["optim.epochs=3"]


def small_feed(seed=0):
    images, labels = generate_images([24, 12, 6], 16, seed)
    val = generate_images([6, 6, 6], 16, seed + 1)
    return tensor_feed((images, labels), {"val": val, "test": val}, ["a", "b", "c"], 16, seed=seed)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["proco", "cl_resample"])
def test_loop_reports_every_epoch_and_test_of_the_best_validation_epoch(tmp_path, method):
    config = load_config(TINY, OVERRIDES + [f"method.name={method}"])
    reports = CheckpointFolder(tmp_path / "ckpt", keep=1)
    metrics = train_worker(config, small_feed(), WorkerEnv(report=reports, log_dir=tmp_path / "tb", print_progress=False))
    history = reports.history
    assert [m["epoch"] for m in history] == [1, 2, 3]
    for seen, report in enumerate(history, 1):
        best = max(history[:seen], key=lambda m: (m["val/macro_f1"], -m["epoch"]))  # first epoch with the best val F1
        assert report["best/epoch"] == best["epoch"] and report["best/val_macro_f1"] == best["val/macro_f1"]
        selected = history[best["epoch"] - 1]
        assert {k: v for k, v in report.items() if k.startswith("test/")} == {
            k: v for k, v in selected.items() if k.startswith("test/")
        }
    assert "test/macro_f1" in metrics
    assert 0.0 <= metrics["val/macro_f1"] <= 1.0
    assert any((tmp_path / "tb").iterdir())
    assert load_checkpoint(reports.latest)["epoch"] == 3


def test_resume_continues_exactly(tmp_path):
    config = load_config(TINY, OVERRIDES)
    straight = CheckpointFolder(tmp_path / "straight", keep=3)
    train_worker(config, small_feed(), WorkerEnv(report=straight, print_progress=False))

    resumed = CheckpointFolder(tmp_path / "resumed", keep=3)
    from_epoch_2 = straight.directory / "checkpoint_epoch_0002"
    train_worker(config, small_feed(), WorkerEnv(report=resumed, resume_from=from_epoch_2, print_progress=False))
    assert [m["epoch"] for m in resumed.history] == [3]
    a = load_checkpoint(straight.latest)
    b = load_checkpoint(resumed.latest)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], msg=key)
    for key in a["method"]:
        torch.testing.assert_close(a["method"][key], b["method"][key], msg=key)
    assert a["metrics"]["train/loss"] == pytest.approx(b["metrics"]["train/loss"], rel=1e-5)


def test_corrupt_and_incompatible_checkpoints(tmp_path):
    config = load_config(TINY, OVERRIDES + ["optim.epochs=1"])
    reports = CheckpointFolder(tmp_path / "ckpt")
    train_worker(config, small_feed(), WorkerEnv(report=reports, print_progress=False))
    other = load_config(TINY, OVERRIDES + ["model.feat_dim=8"])
    with pytest.raises(CheckpointError, match="model.feat_dim"):
        train_worker(other, small_feed(), WorkerEnv(resume_from=reports.latest, print_progress=False))
    (reports.latest / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(reports.latest)
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        load_checkpoint(tmp_path)


def test_checkpoint_staging_removes_what_killed_processes_left_and_nothing_else(tmp_path):
    """A SIGKILLed worker leaves its staged checkpoint behind; the next save on the node deletes it, never
    the folder of a process that still runs (another trial saving on the same machine)."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    orphan = tmp_path / f"{STAGING_PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{STAGING_PREFIX}{os.getppid()}-def"
    unrelated = tmp_path / f"{STAGING_PREFIX}notapid"
    for folder in (orphan, live, unrelated):
        folder.mkdir()
        (folder / "checkpoint.pt").write_bytes(b"x")
    with staging_directory(tmp_path) as staged:
        assert staged.parent == tmp_path and staged.name.startswith(f"{STAGING_PREFIX}{os.getpid()}-")
        assert not orphan.exists() and live.is_dir() and unrelated.is_dir()
    assert not staged.exists()


def test_collapse_guard_names_the_threshold_and_the_docs():
    from proco_ray.engine.loop import COLLAPSE_DOC, collapse_warning

    assert collapse_warning({"train/embedding_std": 0.10}, feat_dim=64) is None
    assert collapse_warning({"train/loss": 1.0}, feat_dim=64) is None  # methods without a contrastive embedding
    message = collapse_warning({"train/embedding_std": 0.005}, feat_dim=64)
    assert "COLLAPSED" in message and "0.0050 < 0.0250" in message and COLLAPSE_DOC in message


def test_a_collapsed_run_says_so_in_its_progress_line_and_metrics(tmp_path, capsys, monkeypatch):
    import proco_ray.engine.loop as loop

    monkeypatch.setattr(loop, "COLLAPSE_FRACTION", 10.0)  # every embedding counts as collapsed
    config = load_config(TINY, OVERRIDES + ["optim.epochs=1"])
    metrics = train_worker(config, small_feed(), WorkerEnv(report=CheckpointFolder(tmp_path / "c"), log_dir=tmp_path / "tb"))
    assert metrics["train/collapsed"] == 1.0
    assert "COLLAPSED: embedding_std" in capsys.readouterr().out


def test_the_checkpoint_kept_as_best_is_the_selected_epoch_also_on_ties(tmp_path):
    """Ties in val macro-F1 go to the earlier epoch, for the loop's selection and for the kept checkpoints alike."""
    from proco_ray.engine.loop import checkpoint_score, is_better
    from proco_ray.metric_keys import CHECKPOINT_SCORE

    reports: list[dict] = []
    best: dict = {}
    for epoch, val in enumerate([0.5, 0.9, 0.9, 0.7], 1):
        metrics = {"epoch": epoch, "val/macro_f1": val, CHECKPOINT_SCORE: checkpoint_score(val, epoch)}
        if is_better(metrics, best):
            best = {"best/epoch": epoch, "best/val_macro_f1": val}
        reports.append(metrics)
    kept_as_best = max(reports, key=lambda m: m[CHECKPOINT_SCORE])  # Ray Train's CheckpointConfig: score order "max"
    assert best["best/epoch"] == 2
    assert kept_as_best["epoch"] == 2


def test_a_checkpoint_folder_keeps_the_newest_checkpoints_whole_and_the_history_first(tmp_path):
    import json

    folder = CheckpointFolder(tmp_path / "trial", keep=2, history_file=tmp_path / "history.json")
    for epoch in (1, 2, 3):
        source = tmp_path / f"staged{epoch}"
        source.mkdir()
        (source / "checkpoint.pt").write_text(str(epoch))
        folder({"epoch": epoch}, source)
    assert [epoch for epoch, _ in folder.checkpoints()] == [2, 3]
    assert (folder.latest / "checkpoint.pt").read_text() == "3"
    assert json.loads((tmp_path / "history.json").read_text()) == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    assert not list((tmp_path / "trial").glob(".*partial")) and not (tmp_path / "history.json.partial").exists()
    (tmp_path / "trial" / ".checkpoint_epoch_0004.partial").mkdir()  # a copy a killed process left half done
    assert [epoch for epoch, _ in CheckpointFolder(tmp_path / "trial").checkpoints()] == [2, 3]


def test_selection_evaluates_the_test_split_only_when_validation_improves_and_once_at_the_last_epoch():
    from proco_ray.engine.loop import select_on_validation

    calls: list[int] = []

    def test_split() -> dict:
        calls.append(len(calls))
        return {
            "accuracy": 0.5,
            "macro_f1": 0.1 * len(calls),
            "balanced_accuracy": 0.5,
            "qwk": 0.0,
            "class_names": [],
            "recall": [],
        }

    best: dict = {}
    reports = []
    for epoch, val in enumerate([0.5, 0.4, 0.6, 0.6], 1):
        metrics = {"epoch": epoch, "val/macro_f1": val}
        best = select_on_validation(metrics, best, last_epoch=epoch == 4, test=test_split)
        reports.append(metrics)
    assert len(calls) == 3  # epochs 1 and 3 improve; epoch 4 (a tie, the last) is evaluated once more for last/test
    assert [m["best/epoch"] for m in reports] == [1, 1, 3, 3]
    assert [m["test/macro_f1"] for m in reports] == [0.1, 0.1, 0.2, 0.2]
    assert reports[-1]["last/test/macro_f1"] == pytest.approx(0.3) and "last/test/macro_f1" not in reports[-2]
