"""A Ray cluster whose nodes have network stacks of their own, inside namespaces of one test's own.

The test's namespaces (pid, net, mount) hold a bridge, 10.37.0.1/24, where the S3 server listens. Each node is
a nested pid, net, mount and UTS namespace: a veth pair joins its `eth0` (10.37.0.1N) to the bridge; it has its
own host name (resolving to its address in its own /etc/hosts) and /tmp/ray; and `ray start` runs there as on a
machine of its own (`--address=HEAD_IP:6379`). The addresses exist only inside these namespaces and there is no
route out of them; killing the outer namespace's first process ends every process started in it. Faults are what a cloud does to a machine: all of a node's processes killed
at once (its pid namespace ended), its link set down, its packets to S3 lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SUBNET = "10.37.0"
S3_HOST = f"{SUBNET}.1"
HEAD_PORT = 6379
# The namespace's first process: it holds the namespaces and reaps what dies in them, as an init does.
REAPER = "import os, time\nwhile True:\n    try:\n        os.wait()\n    except ChildProcessError:\n        time.sleep(0.2)"
UNSHARE = ["unshare", "--pid", "--net", "--mount", "--fork", "--mount-proc", "--kill-child"]
# Ray's GCS marks a node dead after `threshold` health checks failed in a row, one every `period`: the defaults
# (3 s, 10 s timeout, 5 failures) take 15-60 s, which a test can shorten without changing what happens.
HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def namespaces_refused() -> str | None:
    """Why this machine cannot run the namespaced tests, or None."""
    if not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip")):
        return "needs unshare, nsenter and ip"
    probe = subprocess.run(
        [*UNSHARE, "bash", "-c", "mount -t tmpfs tmpfs /mnt && ip link add br-probe type bridge"], capture_output=True, text=True
    )
    if probe.returncode:
        return f"unshare of pid/net/mount namespaces, or a bridge in them, refused here: {probe.stderr.strip()}"
    return None


def _holder(command: list[str], init: str, marker: str, timeout: float = 30) -> tuple[subprocess.Popen, int]:
    """Start `init` (which ends by exec-ing the reaper with `marker` as its argument) and return the launcher
    process and the reaper's pid as this process sees it."""
    script = f"set -e\n{init}\nexec {sys.executable} -c '{REAPER}' {marker}\n"
    launcher = subprocess.Popen([*command, "bash", "-c", script], start_new_session=True)
    deadline = time.time() + timeout
    while True:
        for entry in Path("/proc").iterdir():
            try:  # the reaper's own last argument (the launchers' scripts only contain the marker)
                if entry.name.isdigit() and (entry / "cmdline").read_bytes().split(b"\0")[-2] == marker.encode():
                    return launcher, int(entry.name)
            except (OSError, IndexError):
                continue
        assert launcher.poll() is None, f"the namespace init script exited {launcher.returncode}"
        assert time.time() < deadline, f"the namespace {marker} did not come up within {timeout:.0f} s"
        time.sleep(0.1)


def _run(command: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done


def _in_net(pid: int, *command: str) -> None:
    """A network tool (ip) run in the network namespace of process `pid`."""
    _run(["nsenter", "-t", str(pid), "--net", *command])


class Running:
    """A command started in a node, its output lines kept with the time each arrived (and written to `log`)."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self.log = log
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as out:
            for line in self.process.stdout:
                self.lines.append((time.time(), line.rstrip("\n")))
                out.write(line)
                out.flush()

    def first(self, pattern: str, after: float = 0.0) -> float | None:
        """When a line matching `pattern` first arrived after `after`, or None."""
        return next((t for t, line in list(self.lines) if t >= after and re.search(pattern, line)), None)

    def wait_for(self, pattern: str, timeout: float, after: float = 0.0) -> float:
        deadline = time.time() + timeout
        while (seen := self.first(pattern, after)) is None:
            assert self.process.poll() is None, f"exited {self.process.returncode} before {pattern!r}:\n{self.tail()}"
            assert time.time() < deadline, f"no {pattern!r} within {timeout:.0f} s:\n{self.tail()}"
            time.sleep(0.2)
        return seen

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return code

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def tail(self, count: int = 60) -> str:
        return "\n".join(line for _, line in self.lines[-count:])


class Node:
    """One machine of the cluster: nested pid/net/mount namespaces with one address on the bridge."""

    def __init__(self, cluster: NetworkedCluster, name: str, index: int) -> None:
        self.cluster, self.name, self.ip = cluster, name, f"{SUBNET}.{10 + index}"
        marker = f"proco-node-{name}-{uuid.uuid4().hex[:8]}"
        enter = ["nsenter", "-t", str(cluster.pid), "--pid", "--net", "--mount", "--"]
        # its host name resolves to its address, as a cloud's DNS makes it (gloo announces what it resolves to)
        hosts = cluster.work / f"hosts-{name}"
        hosts.write_text(f"127.0.0.1 localhost\n{self.ip} node-{name}\n")
        init = f"hostname node-{name}\nmount --bind {hosts} /etc/hosts\nip link set lo up\n"
        init += "mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray"
        self.launcher, self.pid = _holder([*enter, *UNSHARE, "--uts"], init, marker)
        veth = f"v-{name}"[:15]
        _in_net(cluster.pid, "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", str(self.pid))
        _in_net(cluster.pid, "ip", "link", "set", veth, "master", "br0", "up")
        _in_net(self.pid, "ip", "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _in_net(self.pid, "ip", "link", "set", "eth0", "up")

    def inside(self, command: list[str], cwd: Path = ROOT) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "--pid", "--net", "--mount", "--uts", f"--wd={cwd}", "--", *command]

    def run(self, command: list[str], timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run(self.inside(command), env=env or self.cluster.env, capture_output=True, text=True, timeout=timeout)
        done.seconds = time.monotonic() - started
        return done

    def start(self, command: list[str], log: Path, env: dict[str, str] | None = None) -> Running:
        return Running(self.inside(command), log, env or self.cluster.env)

    def start_ray(self, head: bool = False, cpus: int = 1) -> None:
        common = [
            f"--node-ip-address={self.ip}",
            f"--num-cpus={cpus}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ]
        if head:
            role = ["--head", f"--port={HEAD_PORT}", "--include-dashboard=true", "--dashboard-host=0.0.0.0"]
        else:
            role = [f"--address={self.cluster.head_address}"]
        done = self.run(["ray", "start", *role, *common], timeout=180)
        assert done.returncode == 0, f"ray start on {self.name}: {done.stdout[-3000:]}{done.stderr[-3000:]}"

    def processes(self, needle: str = "") -> list[int]:
        """This node's processes (pids as this process sees them) whose command line contains `needle`."""
        own = os.readlink(f"/proc/{self.pid}/ns/pid")
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.pid:
                continue
            try:
                if os.readlink(entry / "ns" / "pid") == own and needle.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def kill(self) -> None:
        """All of the node's processes at once, as when its machine is lost: its pid namespace ends with its init."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.launcher.wait(timeout=30)

    def cut_link(self) -> None:
        _in_net(self.pid, "ip", "link", "set", "eth0", "down")

    def restore_link(self) -> None:
        _in_net(self.pid, "ip", "link", "set", "eth0", "up")

    def drop_packets_to(self, host: str) -> None:
        """Every packet this node sends to `host` silently lost (a broken route to one service only): the host's
        address is pinned to a hardware address nobody has, so connections hang until the client's own timeouts,
        as they do in a cloud when a security group or route drops them."""
        _in_net(self.pid, "ip", "neigh", "replace", host, "lladdr", "02:00:00:00:00:99", "nud", "permanent", "dev", "eth0")


class NetworkedCluster:
    """The test's outer namespaces: the bridge, the S3 server on it, and the nodes."""

    def __init__(self, work: Path) -> None:
        self.work = work
        home = work / "home"
        (home / ".ray").mkdir(parents=True)
        # a fixed hardware address: a bridge otherwise takes its lowest port's, which changes as nodes come and go
        # and leaves every node's ARP entry for the S3 server pointing nowhere until it expires
        init = f"ip link set lo up\nip link add br0 address 02:00:00:00:00:01 type bridge\nip addr add {S3_HOST}/24 dev br0"
        init += "\nip link set br0 up"
        self.launcher, self.pid = _holder(UNSHARE, init, f"proco-cluster-{uuid.uuid4().hex[:8]}")
        self.nodes: dict[str, Node] = {}
        self.created = 0  # nodes ever started: each gets the next address, as a cloud gives a new machine a new one
        self.head: Node | None = None
        self.nodes_log = work / "nodes.log"
        self.watcher: Running | None = None
        self.env = {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "RAY_AUTH_MODE": "token",
            "PYTHONPATH": str(ROOT / "tests"),
            **HEALTH_CHECKS,
        }
        _run(["ray", "get-auth-token", "--generate"], env=self.env)
        self.s3 = self._start_s3(work / "s3")
        self.env.update(self.s3)

    @property
    def head_address(self) -> str:
        return f"{self.head.ip}:{HEAD_PORT}"

    @property
    def driver_env(self) -> dict[str, str]:
        """A driver's environment on the head, as `ray submit` gives it."""
        return {**self.env, "RAY_ADDRESS": self.head_address}

    def _start_s3(self, folder: Path) -> dict[str, str]:
        """SeaweedFS on the bridge's address, started inside the outer namespaces; returns the client variables."""
        start = (
            "import json, sys; from proco_ray.storage.seaweedfs import LocalS3Server; "
            f"print(json.dumps(LocalS3Server({str(folder)!r}, host={S3_HOST!r}).start().env()))"
        )
        enter = ["nsenter", "-t", str(self.pid), "--pid", "--net", "--mount", "--"]
        done = _run([*enter, sys.executable, "-c", start], env=self.env, timeout=120)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def add_node(self, name: str, head: bool = False, cpus: int = 1) -> Node:
        node = Node(self, name, self.created)
        self.created += 1
        self.nodes[name] = node
        if head:
            self.head = node
        node.start_ray(head=head, cpus=cpus)
        return node

    def watch_nodes(self) -> None:
        """From now on, the head logs the set of nodes the GCS counts alive whenever it changes (see declared_dead_at)."""
        call = f"import netcluster; netcluster.watch_nodes({str(self.nodes_log)!r})"
        self.watcher = self.head.start([sys.executable, "-c", call], self.work / "watcher.log", self.driver_env)

    def declared_dead_at(self, address: str, after: float, timeout: float = 120) -> float:
        """When the GCS stopped counting the node at `address` alive, after the time `after`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.nodes_log.read_text().splitlines():
                stamp, *alive = line.split()
                if float(stamp) >= after and address not in alive:
                    return float(stamp)
            time.sleep(0.5)
        raise AssertionError(f"the GCS still counted {address} alive {timeout:.0f} s after the fault")

    def worker_node_with(self, needle: str) -> Node | None:
        """A node other than the head running a process whose command line contains `needle`."""
        return next((n for n in self.nodes.values() if n is not self.head and n.processes(needle)), None)

    def in_head(self, call: str, timeout: float = 300) -> str:
        """`netcluster.<call>` run by Python in the head node; its output."""
        done = self.head.run(
            [sys.executable, "-c", f"import netcluster; netcluster.{call}"], timeout=timeout, env=self.driver_env
        )
        assert done.returncode == 0, f"{call}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done.stdout

    def down(self) -> None:
        """Every node lost at once, as `ray down` terminates a cluster's machines; the S3 server stays."""
        for node in self.nodes.values():
            node.kill()
        self.nodes.clear()
        self.head = None

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.launcher.kill()
        self.launcher.wait(timeout=30)


# What the test runs inside the head node (`python -c "import netcluster; ..."`): only there do S3 and Ray answer.


def record_run(uri: str, out: str) -> None:
    """A run folder as the fault tests check it, written to `out` (JSON): the epochs Ray Train registered, the
    checkpoint folders present, and the epochs of the validation scalars TensorBoard shows."""
    import tempfile

    import pyarrow.fs as pafs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from proco_ray.ray_compat import RAY_CHECKPOINT_DIR
    from proco_ray.runs import TENSORBOARD_DIR, RunFolder

    run = RunFolder.at(uri)
    snapshot = run.snapshot()
    listing = run.fs.get_file_info(pafs.FileSelector(run.path))
    folders = sorted(i.base_name for i in listing if RAY_CHECKPOINT_DIR.fullmatch(i.base_name))
    with tempfile.TemporaryDirectory() as local:  # read as TensorBoard reads it, purges of resumed runs included
        pafs.copy_files(f"{run.path}/{TENSORBOARD_DIR}", local, source_filesystem=run.fs)
        board = EventAccumulator(local)
        board.Reload()
        steps = [event.step for event in board.Scalars("val/macro_f1")]
    registered = sorted(int(c.metrics["epoch"]) for c in snapshot.kept) if snapshot else []
    record = {"registered": registered, "folders": folders, "scalar_epochs": steps}
    Path(out).write_text(json.dumps(record))


GENERATED = {"train_counts": (24, 12, 6, 6), "eval_counts": (4, 4, 4, 4), "image_size": 16}
EXACT = ["model.norm=group", "model.batch_norm=shuffle", "train.max_steps_per_epoch=1", "method.queue_size=24"]


def fit_generated(name: str, workers: int, storage: str, out: str) -> None:
    """An exactness run (generated data, one step per epoch, a queue that wraps) on this cluster;
    writes the final checkpoint's state and the addresses its workers ran at to `out`.pt and `out`.json."""
    import ray
    import torch

    from proco_ray.config import load_config
    from proco_ray.engine.checkpoint import load_checkpoint
    from proco_ray.engine.feeds import GeneratedFeed
    from proco_ray.launch.cluster import connect_or_start_ray
    from proco_ray.launch.trainer import fit

    connect_or_start_ray()
    overrides = [*EXACT, f"train.num_workers={workers}", f"train.name={name}", f"train.storage_path={storage}"]
    result = fit(load_config(ROOT / "tests" / "tiny.yaml", overrides), GeneratedFeed(**GENERATED))
    assert result.error is None, result.error
    with result.checkpoint.as_directory() as directory:
        torch.save(load_checkpoint(directory), f"{out}.pt")
    actors = [a for a in ray._private.state.actors().values() if a["ActorClassName"].endswith("RayTrainWorker")]
    latest = sorted(actors, key=lambda a: a["StartTime"])[-workers:]
    Path(f"{out}.json").write_text(json.dumps({"addresses": sorted(a["Address"]["IPAddress"] for a in latest)}))


def watch_nodes(out: str) -> None:
    """Append a line `time alive-addresses` to `out` whenever the set of nodes the GCS counts alive changes."""
    import ray

    ray.init(log_to_driver=False)
    seen = None
    while True:
        alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
        if alive != seen:
            with open(out, "a") as log:
                log.write(f"{time.time():.2f} {' '.join(alive)}\n")
            seen = alive
        time.sleep(0.25)
