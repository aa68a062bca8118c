"""cluster.yaml against Ray's own validation, and how a command finds its cluster (`ray job submit` end to end:
tests/test_launcher.py, against the head `ray up` started)."""

import socket
import sys
from pathlib import Path

import pytest
import yaml

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

    from ray.data import DataContext, ExecutionOptions
    from ray.data._internal.execution.interfaces import ExecutionResources

    from proco_ray.launch.cluster import quiet_ray_process

    DataContext.get_current()  # made once per process, with deprecation notices of Ray's own defaults
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


def test_a_stale_cluster_record_does_not_reach_the_state_api_of_a_local_rays_workers(tmp_path):
    """A `ray start` never stopped leaves its address in Ray's temp folder; Ray Train's placement-group cleaner
    asks the state API from a worker, which read that address, waited 40 s on it and printed a GCS timeout
    traceback into every local run. The workers of a local Ray started here ask their own Ray."""
    import os
    import subprocess
    import tempfile

    temp_root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live under it
    (temp_root / "ray").mkdir()
    (temp_root / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nothing answers there
    script = """
import ray
from proco_ray.launch.cluster import connect_or_start_ray

assert connect_or_start_ray(join_existing=False)

@ray.remote
def nodes_seen_by_the_state_api():
    from ray.util.state import list_nodes

    return len(list_nodes(timeout=10))

print("nodes:", ray.get(nodes_seen_by_the_state_api.remote()))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp_root)}
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    finally:
        subprocess.run(["rm", "-rf", str(temp_root)], check=False)
    assert done.returncode == 0 and "nodes: 1" in done.stdout, done.stderr[-3000:]
