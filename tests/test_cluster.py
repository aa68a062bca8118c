"""cluster.yaml against Ray's own validation, and `ray job submit` end to end against a local cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from proco_ray.data.prepare import PrepareOptions, prepare
from proco_ray.data.synthetic import write_image_folder
from proco_ray.storage.seaweedfs import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-") and config["docker"]["image"].endswith("-gpu")
    gpu_types = [t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)
    assert "GPU" not in config["available_node_types"][config["head_node_type"]]["resources"]


def cluster_env() -> dict[str, str]:
    """As in an activated venv; Ray 2.60 turns token authentication on once a token exists
    (~/.ray/auth_token), so say so to the CLI too."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "PATH": path}


@pytest.fixture
def local_cluster(tmp_path):
    """`ray start --head --block` on 127.0.0.1 with a dashboard (the job server), in its own process group.

    Stopping it kills that group only: `ray stop` would end every Ray on the machine,
    the test session's own included.
    """
    port, dashboard, agent, agent_grpc, runtime_env_agent, metrics = (free_port() for _ in range(6))
    env = cluster_env()
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60, check=True)
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}",
            f"--metrics-export-port={metrics}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            assert head.poll() is None, "ray start --head exited"
            assert time.time() < deadline, "the job server did not come up within 120 s"
            time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)  # a graceful stop took 30 s; the group is the test's own, SIGKILL loses nothing
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


@pytest.mark.slow
def test_ray_job_submit_trains_on_a_local_cluster(ray_local, local_cluster, tmp_path):
    write_image_folder(tmp_path / "source", [24, 12, 8], image_size=16)
    data = tmp_path / "prepared"
    prepare(str(tmp_path / "source"), str(data), PrepareOptions(image_size=16))
    overrides = [
        "data.num_classes=3",
        "data.batch_size=8",
        "method.queue_size=32",
        "optim.epochs=1",
        "train.num_workers=2",
        "train.use_gpu=false",
        "train.cpus_per_worker=1",
        "train.wait_for_autoscaler=false",
        "train.name=job",
        f"train.storage_path={tmp_path / 'runs'}",
    ]
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        local_cluster,
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "jobs/train_isic.py",
        "--config",
        "tests/tiny.yaml",
        "--data",
        str(data),
        *overrides,
    ]
    deadline = time.time() + 180
    while True:
        submitted = subprocess.run(command, capture_output=True, text=True, timeout=600, env=cluster_env())
        if "No available agent" not in submitted.stdout + submitted.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout[-6000:]
    assert "succeeded" in submitted.stdout
    summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
    assert summary["metrics"]["epoch"] == 1 and "test/macro_f1" in summary["metrics"]
    assert (tmp_path / "runs" / "job" / "config.yaml").is_file()


def test_a_stale_cluster_record_is_ignored_and_a_named_dead_address_is_an_error(tmp_path, monkeypatch):
    from proco_ray.config import ConfigError
    from proco_ray.launch.cluster import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(str(tmp_path)) is None
    dead = f"127.0.0.1:{free_port()}"
    (tmp_path / "ray_current_cluster").write_text(dead)
    assert cluster_address(str(tmp_path)) is None
    with socket.create_server(("127.0.0.1", 0)) as live:
        alive = f"127.0.0.1:{live.getsockname()[1]}"
        (tmp_path / "ray_current_cluster").write_text(alive)
        assert cluster_address(str(tmp_path)) == alive
        monkeypatch.setenv("RAY_ADDRESS", alive)
        assert cluster_address(str(tmp_path)) == alive
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(ConfigError, match="RAY_ADDRESS"):
        cluster_address(str(tmp_path))


def test_a_local_ray_is_sized_to_the_machine_not_to_the_request():
    """16 workers on 2 cores must be refused by the resource check, not given 33 logical CPUs to hang on."""
    from proco_ray.launch.cluster import local_cpus

    assert local_cpus(0, cores=2) == 2
    assert local_cpus(3, cores=2) == 3  # one worker on both cores + Ray Data's CPU
    assert local_cpus(33, cores=2) == 3
    assert local_cpus(5, cores=16) == 16


def test_rays_meaningless_lines_stay_off_the_screen():
    """Issue 26.6: every local run printed Ray Data's "no available CPUs ... will hang" (nothing hangs: the run
    keeps a CPU for Ray Data), its "execution finished" after every pass and Ray Train's own use of a deprecated
    ExecutionOptions argument; other warnings and lines still show."""
    import logging
    import warnings

    from ray.data import ExecutionOptions
    from ray.data._internal.execution.interfaces import ExecutionResources

    from proco_ray.launch.cluster import quiet_ray_process

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        quiet_ray_process()  # after a reset of the filters, as in a fresh worker
        ExecutionOptions(exclude_resources=ExecutionResources.zero())
        warnings.warn("another deprecation", DeprecationWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["another deprecation"]
    lines = {
        "ray.data.dataset": [
            "Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang unless ...",
            "a warning that matters",
        ],
        "ray.data._internal.execution.streaming_executor": [
            "\u2714\ufe0f  Dataset train_035A9 execution finished in 4.38 seconds",
            "\u26a0\ufe0f  Dataset train_035A9 execution failed",
        ],
    }
    seen: list[str] = []
    handler = logging.Handler()  # Ray's loggers do not propagate to the root
    handler.emit = lambda record: seen.append(record.getMessage())
    for name, messages in lines.items():
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            for message in messages:
                logger.warning(message)
        finally:
            logger.removeHandler(handler)
    assert seen == ["a warning that matters", "\u26a0\ufe0f  Dataset train_035A9 execution failed"]
