"""ProCo under Ray Train's TorchTrainer: synchronised state across gloo workers, checkpoints, bad input."""

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray
import torch

from proco_ray.config import ConfigError, load_config
from proco_ray.engine.checkpoint import load_checkpoint
from proco_ray.engine.feeds import GeneratedFeed
from proco_ray.launch.cluster import connect_or_start_ray
from proco_ray.launch.trainer import check_resources, fit, quiet_dataset, quiet_report_lines, resumed_epoch

FEED = GeneratedFeed(train_counts=(24, 12, 6, 6), eval_counts=(4, 4, 4, 4), image_size=16, augment=True)
TINY = Path(__file__).parent / "tiny.yaml"
OVERRIDES = ["model.norm=group", "model.batch_norm=shuffle"]


def run(tmp_path, name, workers, extra=()):
    config = load_config(
        TINY, OVERRIDES + [f"train.num_workers={workers}", f"train.name={name}", f"train.storage_path={tmp_path}"] + list(extra)
    )
    return fit(config, FEED)


def test_two_workers_match_one_worker_with_the_same_global_batch(ray_local, tmp_path):
    one = run(tmp_path, "one", 1)
    two = run(tmp_path, "two", 2)
    assert one.error is None and two.error is None
    with one.checkpoint.as_directory() as a_dir, two.checkpoint.as_directory() as b_dir:
        a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    assert a["epoch"] == b["epoch"] == 2
    for key in ("queue.feats", "queue.labels", "queue.preds", "queue.ptr", "recalibration.weights"):
        torch.testing.assert_close(a["method"][key], b["method"][key], rtol=1e-4, atol=1e-5, msg=key)
    # six SGD steps amplify float32 reduction-order differences (gradient all-reduce vs one big batch)
    for key, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][key], rtol=1e-3, atol=1e-3, msg=key)
    assert one.metrics["train/loss"] == pytest.approx(two.metrics["train/loss"], rel=1e-4)
    assert "test/macro_f1" in two.metrics


def test_more_workers_than_cpus_is_refused_before_starting(ray_local):
    config = load_config(TINY, OVERRIDES + ["train.num_workers=64"])
    with pytest.raises(ConfigError, match="num_workers=64"):
        check_resources(config)
    cpus = int(ray.cluster_resources()["CPU"])
    filling = load_config(TINY, OVERRIDES + [f"train.num_workers={cpus}"])
    check_resources(filling, streams_data=False)
    with pytest.raises(ConfigError, match="CPU for Ray Data"):
        check_resources(filling)
    gpus = load_config(TINY, OVERRIDES + ["train.use_gpu=true"])
    if not ray.cluster_resources().get("GPU"):
        with pytest.raises(ConfigError, match="GPU=1"):
            check_resources(gpus)


def kill_one_training_worker_when(ray_module, ready: Callable[[], bool], killed: list[int]) -> threading.Thread:
    """A thread that SIGKILLs one Ray Train worker of this session (children of its raylet: other Ray
    instances may be training on this machine) as soon as `ready()` holds."""
    import psutil  # Ray's vendored copy, importable once ray is

    session = ray_module._private.worker._global_node.get_session_dir_path()
    raylets = {
        p.pid for p in psutil.process_iter(["cmdline"]) if any(f"{session}/sockets/raylet" in a for a in p.info["cmdline"] or [])
    }
    assert raylets, f"no raylet found for {session}"

    def kill() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not ready():
            time.sleep(0.05)
        for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
            if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and proc.info["ppid"] in raylets:
                proc.send_signal(signal.SIGKILL)
                killed.append(proc.info["pid"])
                return

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return killer


@pytest.mark.slow
def test_killed_worker_resumes_from_the_latest_checkpoint(ray_local, tmp_path):
    """SIGKILL a worker once the epoch-1 checkpoint is registered; the run resumes instead of starting over."""
    killed: list[int] = []
    killer = kill_one_training_worker_when(ray_local, lambda: len(list((tmp_path / "faulty").glob("checkpoint_2*"))) >= 2, killed)
    result = run(tmp_path, "faulty", 2, ["optim.epochs=4", "train.max_failures=2", "train.keep_checkpoints=10"])
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert result.error is None
    assert result.metrics["epoch"] == 4
    epochs = sorted(metrics["epoch"] for _, metrics in result.best_checkpoints)
    assert set(epochs) == {1, 2, 3, 4} and epochs.count(1) == 1, epochs
    # what a restarted worker group's training datasets start from: Ray Train's record of this real run
    assert resumed_epoch(str(tmp_path / "faulty")) == 4 and resumed_epoch(str(tmp_path / "never-ran")) == 0


def test_train_and_data_do_not_echo_every_report_and_execution(ray_local):
    """Issue 12: Train V2 logs each report from a logger outside "ray.train" (LoggingConfig misses it), and
    Ray Data announces every epoch's execution and plan; both are lifted out of the user's way."""
    import logging

    from ray.train.v2._internal.execution import context

    reports = logging.getLogger(context.__file__)
    reports.setLevel(logging.INFO)
    quiet_report_lines()
    assert reports.getEffectiveLevel() == logging.WARNING
    dataset = quiet_dataset(ray.data.range(4))
    assert not dataset.context.enable_progress_bars and not dataset.context.print_on_execution_start
    ray.data.DataContext.get_current().print_on_execution_start = True
    connect_or_start_ray()  # prepare, evaluate and predict run Ray Data in the driver
    assert not ray.data.DataContext.get_current().print_on_execution_start
