"""Where Ray runs: the cluster this process belongs to, or a local one."""

from __future__ import annotations

import logging
import math
import os
import re
import socket

import ray
import ray.data

from proco_ray.config import ConfigError
from proco_ray.progress import VERBOSE
from proco_ray.ray_compat import (
    STREAMING_EXECUTOR_LOGGER,
    choose_token_authentication,
    find_bootstrap_address,
    parse_address,
    skip_progress_bars_off_notice,
)

log = logging.getLogger(__name__)


def reachable(address: str, timeout_s: float = 3.0) -> bool:
    """Whether something listens at host:port (a Ray GCS), without joining it."""
    parsed = parse_address(address)
    if parsed is None:
        return False
    try:
        with socket.create_connection((parsed[0], int(parsed[1])), timeout=timeout_s):
            return True
    except OSError:
        return False


def cluster_address(temp_dir: str | None = None) -> str | None:
    """The cluster to join: RAY_ADDRESS, else the live one `ray start` recorded on this machine; None: start one here.

    A record left behind by a crashed cluster is ignored (Ray itself would wait minutes on it);
    an unreachable RAY_ADDRESS is an error, since the user named it.
    """
    named = os.environ.get("RAY_ADDRESS", "")
    if named == "local":
        return None
    if named:
        if named.startswith(("ray://", "http://", "https://")) or named == "auto" or reachable(named):
            return named
        raise ConfigError(f"RAY_ADDRESS={named} names a Ray cluster that does not answer")
    recorded = find_bootstrap_address(temp_dir)
    if recorded is None:
        return None
    if not reachable(recorded):
        log.warning("ignoring the stale Ray cluster record %s (nothing answers there); starting a local Ray", recorded)
        return None
    return recorded


# Lines Ray prints on every local run that say nothing to a user of this project, by the logger that prints
# them: Ray Data's "no available CPUs, the Dataset job will hang" (the run holds its workers' CPUs by design and
# keeps one for Ray Data, so nothing hangs), its "Data sink Parquet finished. N rows written" after each shard
# write of prepare (the command sums them up), and its "Dataset ... execution finished in N seconds" after every
# pass over a split (each epoch, in every worker); and Ray Train's own use of a deprecated Ray Data option.
DROPPED_LINES = {
    "ray.data.dataset": r"Warning: The Ray cluster currently does not have any available CPUs|Data sink \S+ finished\.",
    STREAMING_EXECUTOR_LOGGER: r"\S+\s+Dataset \S+ execution finished in ",
}
EXCLUDE_RESOURCES_DEPRECATION = r"`ExecutionOptions\.exclude_resources` is deprecated"


class _DropLines(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(str(record.msg))


def quiet_ray_process() -> None:
    """Keep Ray's meaningless lines (above) off the screen, in this process; the local Ray runs it in every
    worker (`setup_local_worker`). Ray Data's progress bars are off (`proco_ray.progress` draws one
    bar per pass a user waits for) and so is its notice that they are. `--verbose` (PROCO_RAY_VERBOSE=1) keeps all."""
    import warnings

    if os.environ.get(VERBOSE) == "1":
        return

    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", message=EXCLUDE_RESOURCES_DEPRECATION, category=RayDeprecationWarning)
    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = False  # "Starting execution of Dataset ..." and its plan
    context.enable_progress_bars = False
    skip_progress_bars_off_notice()
    for name, pattern in DROPPED_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(pattern))


def setup_local_worker() -> None:
    """Every worker process of a local Ray started here: quiet (above), and Ray's state API pointed at this Ray.

    Without RAY_ADDRESS the state API reads the address of the last `ray start` from Ray's temp folder
    (`ray_current_cluster`), which a `ray start` never stopped leaves behind; cluster_address ignores such a
    record, but Ray Train's placement-group cleaner, in a worker, waited 40 s on the dead address and printed a
    30-line GCS timeout traceback into every local run.
    """
    quiet_ray_process()
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by Ray Train's controller from the driver's environment
LOCAL_EXTRA_CPUS = 1  # one logical CPU beyond the cores, for Ray Data beside workers that use every core


def local_cpus(min_cpus: float = 0, cores: int | None = None) -> int:
    """Logical CPUs of a local Ray: the machine's cores, or one more where a run needs it for Ray Data.

    Never sized to the request beyond that: a run that needs more is then refused by the resource
    check with what the machine has, instead of hanging while it starts more workers than fit.
    """
    cores = cores or os.cpu_count() or 1
    return max(cores, min(math.ceil(min_cpus), cores + LOCAL_EXTRA_CPUS))


def connect_or_start_ray(min_cpus: float = 0, join_existing: bool = True) -> bool:
    """Join the cluster this process belongs to (`ray submit`, `ray job submit`, RAY_ADDRESS) or start a local one.

    A local Ray gets `local_cpus(min_cpus)` logical CPUs (this machine's cores, one more where a run
    needs it for its Ray Data CPU), and its dashboard on 127.0.0.1 only: Ray Train's placement-group
    cleaner asks the dashboard's state API every second whether the run is alive and, without it, printed
    a warning each time. `join_existing=False` always starts a fresh local Ray (the one-machine demo).
    Returns True when a local Ray was started here. Ray Data's announcement of every execution and its
    plan (two INFO lines per prepare phase, evaluation pass and prediction) is turned off in this process.
    """
    quiet_ray_process()
    if ray.is_initialized():
        return False
    address = cluster_address() if join_existing else None
    if address is not None:
        ray.init(address=address, log_to_driver=True)
        return False
    # Ray Train's PreemptionWatcher follows the draining of spot nodes, which a local Ray never has; it only
    # printed a core_worker error line about its own restart policy on every run.
    os.environ.setdefault(PREEMPTION_WATCHER, "0")
    choose_token_authentication()  # Ray's default, without its warning (the token: ~/.ray/auth_token)
    ray.init(
        address="local",
        num_cpus=local_cpus(min_cpus),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"worker_process_setup_hook": f"{__name__}.setup_local_worker"},
    )
    return True


def live_nodes() -> int:
    """Alive nodes of the connected Ray cluster."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_paths_reach_every_node(paths: dict[str, str], nodes: int, shared_filesystem: bool) -> None:
    """Refuse local paths on a cluster of several nodes (unless they are on a filesystem every node mounts):
    each node would read its own disk, or write checkpoints where the others and the driver never look."""
    local = {key: path for key, path in paths.items() if path and not path.startswith("s3://")}
    if nodes < 2 or shared_filesystem or not local:
        return
    named = ", ".join(f"{key}={path}" for key, path in local.items())
    raise ConfigError(
        f"{named}: a local path, but the Ray cluster has {nodes} nodes and each would use its own disk; put it in "
        "object storage (s3://...), or set train.shared_filesystem=true if every node mounts it at the same path"
    )
