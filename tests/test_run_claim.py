"""A live run claims its folder: a second run of the same name is refused, a killed run's claim is not (issue 26.7)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from proco_ray.cli import main
from proco_ray.config import load_config
from proco_ray.data.prepare import PrepareOptions, prepare
from proco_ray.data.synthetic import write_image_folder
from proco_ray.errors import StorageError
from proco_ray.launch.run_claim import (
    CLAIM_FILE,
    Claim,
    RunInUseError,
    acquire,
    claimed,
    read_claim,
    release,
    storage_gone,
    storage_unreachable_from_a_worker,
)
from proco_ray.storage.s3 import join, read_bytes, write_bytes

TINY = Path(__file__).parent / "tiny.yaml"


def dead_pid() -> int:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_claim_refuses_a_second_holder_until_released_or_stale(where, tmp_path, request, monkeypatch):
    if where == "s3":
        request.getfixturevalue("s3_env")
        monkeypatch.setattr("proco_ray.launch.run_claim.S3_SETTLE_S", 0.1)
    uri = str(tmp_path / "runs" / "p4") if where == "local" else f"s3://proco-claims/{tmp_path.name}/p4"
    first = acquire(uri)
    assert read_claim(uri) == first and first.pid == os.getpid()
    with pytest.raises(RunInUseError, match=rf"run {uri} is in use by a live run \(pid {os.getpid()} on host"):
        acquire(uri)
    release(uri, first)
    assert read_claim(uri) is None
    second = acquire(uri)
    release(uri, second)

    def leave(**fields) -> None:
        now = time.time()
        claim = Claim(**{"token": "old", "pid": 1, "host": socket.gethostname(), "started": now, "refreshed": now, **fields})
        write_bytes(join(uri, CLAIM_FILE), json.dumps(asdict(claim)).encode())

    leave(pid=dead_pid())  # a killed run on this host
    release(uri, acquire(uri))
    leave(host="another-host", refreshed=time.time() - 3600)  # another host's run, silent for an hour
    release(uri, acquire(uri))
    leave(host="another-host")  # another host's run that refreshed its claim just now
    with pytest.raises(RunInUseError, match="on host another-host"):
        acquire(uri)
    write_bytes(join(uri, CLAIM_FILE), b'{"token": "cut sh')  # a claim cut short by a crash holds nothing
    release(uri, acquire(uri))


def test_storage_that_stopped_answering_is_one_line_naming_it_and_the_resume(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("PROCO_S3_CONNECT_TIMEOUT_S", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    gone = storage_gone(load_config(TINY, ["train.storage_path=s3://proco-runs", "train.name=p4"]))
    assert isinstance(gone, StorageError) and len(str(gone).splitlines()) == 1
    assert str(gone).startswith("the run's storage s3://proco-runs stopped answering during training")
    assert "rerun the same command to resume" in str(gone)
    assert storage_gone(load_config(TINY, ["train.storage_path=/tmp/runs"])) is None


@pytest.fixture
def prepared(ray_local, tmp_path) -> str:
    write_image_folder(tmp_path / "source", [40, 16, 8], image_size=16)
    data = str(tmp_path / "prepared")
    prepare(str(tmp_path / "source"), data, PrepareOptions(image_size=16))
    return data


def train_command(data: str, runs: Path | str, *overrides: str) -> list[str]:
    common = [f"train.storage_path={runs}", "train.name=p4", "data.batch_size=8", "method.queue_size=32", *overrides]
    return ["train", "--config", str(TINY), "--data", data, *common]


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_rerun_says_where_it_resumes(ray_local, prepared, tmp_path, capsys):
    """Issue 26.7: Ctrl-C gave exit 1 after Ray Train's own SIGINT handler, and the rerun resumed silently."""
    runs = tmp_path / "runs"
    command = train_command(prepared, runs, "optim.epochs=6")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}  # this session's Ray
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        train = subprocess.Popen([sys.executable, "-m", "proco_ray", *command], stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while not list(runs.glob("p4/checkpoint_*/checkpoint.pt")) and train.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # past the registration of that first checkpoint
        train.send_signal(signal.SIGINT)
        assert train.wait(timeout=120) == 130
    hint = "proco-ray train: interrupted; rerun the same command to resume from the run's latest checkpoint"
    # Ray's log-forwarding thread writes to the same file: a line of its own can end just before the hint
    assert hint + "\n" in log.read_text()
    assert not (runs / "p4" / CLAIM_FILE).exists()
    capsys.readouterr()
    assert main(train_command(prepared, runs, "optim.epochs=6", "train.max_steps_per_epoch=1")) == 0
    resumed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resuming run")]
    assert len(resumed) == 1 and resumed[0].startswith(f"resuming run {runs / 'p4'} from its latest checkpoint: epoch ")
    assert resumed[0].endswith(" of 6 done") and int(resumed[0].split("epoch ")[1].split()[0]) >= 1


@pytest.mark.slow
def test_a_second_live_run_of_the_same_name_is_refused_and_the_first_loses_nothing(ray_local, prepared, tmp_path, capsys):
    runs = tmp_path / "runs"
    command = train_command(prepared, runs)
    codes: list[int] = []
    first = threading.Thread(target=lambda: codes.append(main(command)))
    first.start()
    deadline = time.time() + 120
    while read_bytes(str(runs / "p4" / CLAIM_FILE)) is None and first.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    env = {**os.environ, "RAY_ADDRESS": "local"}
    second = subprocess.run([sys.executable, "-m", "proco_ray", *command], capture_output=True, text=True, env=env, timeout=120)
    first.join(timeout=600)
    assert second.returncode == 1, second.stderr
    assert second.stderr.startswith(f"proco-ray train: error: run {runs / 'p4'} is in use by a live run (pid {os.getpid()}")
    assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    assert codes == [0]
    summary = json.loads((runs / "p4" / "summary.json").read_text())
    kept = sorted(p.name for p in (runs / "p4").glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2 and summary["best_checkpoint"].rsplit("/", 1)[-1] in kept
    assert not (runs / "p4" / CLAIM_FILE).exists()
    saved = (runs / "p4" / "config.yaml").read_text()  # issue 26.1: the run states how it trained
    assert "sampling: class_balanced" in saved and "augmentation: supervised" in saved and ": auto" not in saved
    # a killed run's claim does not block the resume, which says where it picks up
    now = time.time()
    stale = Claim("killed", dead_pid(), socket.gethostname(), now, now)
    (runs / "p4" / CLAIM_FILE).write_text(json.dumps(asdict(stale)))
    capsys.readouterr()
    assert main(command) == 0
    assert f"resuming run {runs / 'p4'} from its latest checkpoint: epoch 2 of 2 done" in capsys.readouterr().out


@pytest.mark.slow
def test_storage_gone_mid_run_is_one_line_naming_it_and_the_resume(ray_local, prepared, tmp_path):
    """Issue 26.7: a local S3 server stopped during training gave a 40-line ray.train.ControllerError traceback."""
    from proco_ray.storage.seaweedfs import LocalS3Server

    server = LocalS3Server(tmp_path / "s3", port=None)
    endpoint = server.start()
    try:
        env = {**os.environ, **endpoint.env(), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
        runs = "s3://proco-gone/runs"
        command = train_command(prepared, runs, "optim.epochs=8")
        log = tmp_path / "train.log"
        with open(log, "w") as out:
            train = subprocess.Popen([sys.executable, "-m", "proco_ray", *command], stdout=out, stderr=subprocess.STDOUT, env=env)
            deadline = time.time() + 300
            while "epoch 2/8" not in log.read_text() and train.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            server.stop()
            assert train.wait(timeout=300) == 1
    finally:
        server.stop()
    errors = [line for line in log.read_text().splitlines() if line.startswith("proco-ray train: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"proco-ray train: error: the run's storage {runs} stopped answering during training ("
    )
    assert errors[0].endswith("rerun the same command to resume from the run's latest checkpoint")


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_storage_and_the_resume(prepared, tmp_path):
    """Issue 37.3: train.storage_path on a 6 MB tmpfs ended with a 100-line traceback ending in pyarrow's
    `OSError: [Errno 28] ... No space left on device`. The run gets a Ray of its own in a mount namespace of its
    own, where the tmpfs exists (Ray's workers must see it too)."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("unshare of a mount namespace is refused here")
    runs = tmp_path / "runs"
    runs.mkdir()
    command = shlex.join([sys.executable, "-m", "proco_ray", *train_command(prepared, runs, "optim.epochs=4")])
    mounts = f"mount -t tmpfs -o size=6m tmpfs {runs} && mount -t tmpfs tmpfs /tmp/ray"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    done = subprocess.run(
        ["unshare", "--mount", "bash", "-c", f"mkdir -p /tmp/ray && {mounts} && exec {command}"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    # the driver's own lines: Ray's log thread forwards the workers' lines ("(RayTrainWorker pid=...)") on its own
    lines = [line for line in done.stderr.strip().splitlines() if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=", line)]
    errors = [line for line in done.stdout.splitlines() + lines if line.startswith("proco-ray train: error:")]
    assert errors == [lines[-1]], lines[-20:]
    assert errors[0].startswith(f"proco-ray train: error: no space left on the device the run writes to (its storage is {runs})")
    assert errors[0].endswith("rerun the same command to resume from the run's latest checkpoint")
    assert not [line for line in lines if line.startswith("Traceback")], "the driver printed a traceback"


def test_a_worker_cut_off_from_storage_is_one_line_naming_it():
    """Issue 37: a worker node whose packets to S3 were lost failed the run with a worker traceback; the driver,
    which still reaches S3 (storage_gone finds nothing), names the storage, the cause and the resume."""
    config = load_config(TINY, ["train.storage_path=s3://proco-faults/runs"])
    upload = (
        "When initiating multiple part upload for key 'runs/r/tensorboard/events' in bucket 'proco-faults': AWS Error "
        "NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 28, Timeout was reached"
    )
    worker_error = RuntimeError(f"Training failed due to worker errors:\n[Rank 0 Worker]\nTraceback ...\nOSError: {upload}\n")
    failed = RuntimeError("the run failed")
    failed.__cause__ = worker_error
    explained = str(storage_unreachable_from_a_worker(config, failed))
    assert explained.startswith("a training worker could not reach the run's storage s3://proco-faults/runs, which answers")
    assert upload in explained and "\n" not in explained
    assert storage_unreachable_from_a_worker(config, RuntimeError("CUDA out of memory")) is None


def test_a_run_that_never_wrote_leaves_no_folder_it_created(tmp_path):
    """Issue 37: a run refused after its claim (a local path on a cluster of several nodes) left the empty
    folders the claim had created."""
    config = load_config(TINY, [f"train.storage_path={tmp_path / 'runs' / 'nested'}", "train.name=never"])
    with pytest.raises(RuntimeError, match="refused"), claimed(config):
        assert (tmp_path / "runs" / "nested" / "never").is_dir()
        raise RuntimeError("refused")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs").mkdir()
    with claimed(config):
        (tmp_path / "runs" / "nested" / "never" / "written").write_text("1")
    assert [p.name for p in (tmp_path / "runs" / "nested" / "never").iterdir()] == ["written"]
