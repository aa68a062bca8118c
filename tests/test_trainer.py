"""ProCo under Ray Train's TorchTrainer: synchronised state across gloo workers, checkpoints, bad input."""

import json
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from proco_ray.config import ConfigError, load_config
from proco_ray.engine.checkpoint import STAGING_PREFIX
from proco_ray.engine.feeds import GeneratedFeed
from proco_ray.launch.cluster import connect_or_start_ray
from proco_ray.launch.train_worker import quiet_report_lines
from proco_ray.launch.trainer import check_resources, fit, quiet_dataset
from proco_ray.ray_compat import RAY_TRAIN_SNAPSHOT
from proco_ray.runs import RunFolder
from proco_ray.storage.s3 import join, list_files, write_bytes

FEED = GeneratedFeed(train_counts=(24, 12, 6, 6), eval_counts=(4, 4, 4, 4), image_size=16)
TINY = Path(__file__).parent / "tiny.yaml"
OVERRIDES = ["model.norm=group", "model.batch_norm=shuffle"]


def run(tmp_path, name, workers, extra=()):
    config = load_config(
        TINY, OVERRIDES + [f"train.num_workers={workers}", f"train.name={name}", f"train.storage_path={tmp_path}"] + list(extra)
    )
    return fit(config, FEED)


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


@pytest.mark.parametrize("where", ["local", "s3"])
def test_only_checkpoint_folders_ray_never_registered_are_removed(where, tmp_path, request):
    """Issue 11: folders a failed worker group uploaded but never registered outlive keep_checkpoints;
    they go once the run ends, and nothing else in the run folder does."""
    if where == "s3":
        request.getfixturevalue("s3_env")
        storage = "s3://runs/tidy"
    else:
        storage = str(tmp_path)
    kept, latest, orphan = (f"checkpoint_2026-11-28_22-0{i}-00.123456" for i in range(3))
    snapshot = {
        "checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {"epoch": e}} for e, n in ((1, kept), (3, latest))],
        "latest_checkpoint_result": {"checkpoint_dir_name": latest, "metrics": {"epoch": 3}},
        "pending_training_results": [],
    }
    run_uri = join(storage, "run")
    write_bytes(join(run_uri, RAY_TRAIN_SNAPSHOT), json.dumps(snapshot).encode())
    for folder in (kept, latest, orphan, "checkpoint_notes", "tensorboard"):
        write_bytes(join(run_uri, folder, "state.pt"), b"x")
    write_bytes(join(run_uri, "checkpoint_2026-11-28_22-09-00.123456"), b"a file, not a folder")
    run = RunFolder.of(storage, "run")
    assert run.remove_unregistered_checkpoints() == [orphan]
    left = {info.path.split("/run/", 1)[1] for info in list_files(run.fs, run.path)}
    assert left == {
        RAY_TRAIN_SNAPSHOT,
        f"{kept}/state.pt",
        f"{latest}/state.pt",
        "checkpoint_notes/state.pt",
        "tensorboard/state.pt",
        "checkpoint_2026-11-28_22-09-00.123456",
    }
    assert RunFolder.of(storage, "never-ran").remove_unregistered_checkpoints() == []


def kill_one_training_worker_when(ray_module, ready: Callable[[], bool], killed: list[int]) -> threading.Thread:
    """A thread that SIGKILLs one Ray Train worker of this session (children of its raylet: other Ray
    instances may be training on this machine) as soon as `ready()` holds and a worker is running."""
    import psutil  # Ray's vendored copy, importable once ray is

    session = ray_module._private.worker._global_node.get_session_dir_path()
    raylets = {
        p.pid for p in psutil.process_iter(["cmdline"]) if any(f"{session}/sockets/raylet" in a for a in p.info["cmdline"] or [])
    }
    assert raylets, f"no raylet found for {session}"

    def holds() -> bool:
        try:
            return ready()
        except ValueError:  # Ray's snapshot read while Ray rewrites it (not atomic): not ready yet
            return False

    def kill() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            if holds():
                for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and proc.info["ppid"] in raylets:
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.info["pid"])
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return killer


def checkpoint_folders(run: Path) -> set[str]:
    return {p.name for p in run.glob("checkpoint_*") if p.is_dir()}


KILL_TIMINGS = {
    "once the first checkpoint is registered": lambda run: RunFolder.at(str(run)).resumed_epoch() >= 1,
    "as the second checkpoint is written": lambda run: len(checkpoint_folders(run)) >= 2,
}


@pytest.mark.slow
@pytest.mark.parametrize("timing", list(KILL_TIMINGS))
def test_killed_worker_resumes_from_the_latest_registered_checkpoint(timing, ray_local, tmp_path):
    """SIGKILL a worker at several points around the checkpoint write: the run resumes from the latest
    registered checkpoint (never repeating or skipping an epoch), and keeps no folder Ray never registered."""
    run_folder = tmp_path / "faulty"
    killed: list[int] = []
    killer = kill_one_training_worker_when(ray_local, lambda: KILL_TIMINGS[timing](run_folder), killed)
    result = run(tmp_path, "faulty", 2, ["optim.epochs=4", "train.max_failures=2", "train.keep_checkpoints=10"])
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert result.error is None
    assert result.metrics["epoch"] == 4
    epochs = sorted(metrics["epoch"] for _, metrics in result.best_checkpoints)
    assert epochs == [1, 2, 3, 4], epochs
    assert checkpoint_folders(run_folder) == {Path(c.path).name for c, _ in result.best_checkpoints}
    left = [p for pid in killed for p in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}{pid}-*")]
    assert not left, f"the killed worker's staged checkpoint outlived the run: {left}"
    # what a restarted worker group's training datasets start from: Ray Train's record of this real run
    assert RunFolder.at(str(run_folder)).resumed_epoch() == 4 and RunFolder.at(str(tmp_path / "never-ran")).resumed_epoch() == 0


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
