"""The cluster launcher as a user types it, on this machine: `ray up` / `ray submit` / `ray exec` / `ray down`
against the project's own cluster.yaml, with a provider whose nodes are folders (tests/launcher/folder_provider.py).

Everything runs inside pid, network and mount namespaces of the test's own: the start commands run `ray stop`
and bind Ray's fixed ports, which must never touch another Ray on the machine; /home is a tmpfs there (the
head sees its folder at /home/ray, as on the rayproject image), /tmp/ray a tmpfs, and the virtual environment
an overlay, so the head's `pip install -e` changes nothing outside. Killing the namespace's first process ends
everything started in it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from netcluster import REAPER, UNSHARE, namespaces_refused

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
NODE_HOME = "/home/ray"

pytestmark = pytest.mark.slow


def local_cluster_config(state: Path, nodes: Path, environment: dict[str, str]) -> dict:
    """cluster.yaml with the folder provider in place of AWS: the same file mounts, excludes and commands; no
    Docker, no GPU node types; the keys the external provider gets no defaults for spelt out."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config.pop("docker")
    config["provider"] = {
        "type": "external",
        "module": "folder_provider.FolderNodeProvider",
        "state_path": str(state),
        "nodes_dir": str(nodes),
        "node_home": NODE_HOME,
        "environment": environment,
    }
    config["auth"] = {"ssh_user": "ray"}
    head = config["head_node_type"]
    # the head advertises 4 CPUs (the updater passes a node type's resources to `ray start`): 2 Train workers and
    # Ray Data's reader fit on a 2-core machine, as they would on the m6i.4xlarge
    config["available_node_types"] = {head: {"resources": {"CPU": 4}, "node_config": {}, "min_workers": 0, "max_workers": 0}}
    config["max_workers"] = 0
    for key in (
        "initialization_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "cluster_synced_files",
        "rsync_filter",
    ):
        config.setdefault(key, [])
    config.setdefault("file_mounts_sync_continuously", False)
    return config


class Namespace:
    """A process that holds fresh pid/net/mount namespaces; `run` executes a command inside them."""

    def __init__(self, work: Path) -> None:
        self.work = work
        ready = work / "namespace-ready"
        overlay = work / "venv-overlay"
        init = f"""set -e
ip link set lo up
mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray
mount -t tmpfs tmpfs /home && mkdir {NODE_HOME}
mkdir -p {overlay} && mount -t tmpfs tmpfs {overlay} && mkdir {overlay}/up {overlay}/work
mount -t overlay overlay -o lowerdir={VENV},upperdir={overlay}/up,workdir={overlay}/work {VENV}
touch {ready}
exec {sys.executable} -c "{REAPER}"
"""
        self.holder = subprocess.Popen([*UNSHARE, "bash", "-c", init], start_new_session=True)
        deadline = time.time() + 30
        while not ready.exists():
            assert self.holder.poll() is None, "the namespace's init script failed"
            assert time.time() < deadline, "the namespace did not come up within 30 s"
            time.sleep(0.1)
        self.pid = int(Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children").read_text().split()[0])

    def inside(self, command: list[str], cwd: Path = ROOT) -> list[str]:
        """`command` run in the namespaces (entering the mount namespace resets the working folder: --wd)."""
        return ["nsenter", "-t", str(self.pid), "--pid", "--net", "--mount", f"--wd={cwd}", "--", *command]

    def run(self, command: list[str], env: dict[str, str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        started = time.monotonic()
        done = subprocess.run(self.inside(command, cwd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        done.seconds = time.monotonic() - started
        return done

    def processes(self) -> list[str]:
        ps = self.run(["ps", "-eo", "pid=,args="], env=dict(os.environ), timeout=30)
        return [line.strip() for line in ps.stdout.splitlines() if line.strip()]

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(timeout=30)


def browser_missing() -> str | None:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "no headless browser: apt-get install chromium chromium-driver (.ci/run does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def ok(done: subprocess.CompletedProcess, what: str) -> str:
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{output[-8000:]}"
    print(f"{what}: {done.seconds:.0f} s")
    return output


class Launched:
    """A cluster that `ray up` started from the local cluster.yaml, the files the jobs write, and how to run
    the ray CLI as a user's laptop would (its own HOME, the provider importable)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.namespace = Namespace(work)
        self.data, self.runs, self.sweeps = work / "prepared", work / "runs", work / "sweeps"
        self.tiny = shutil.copy(ROOT / "tests" / "tiny.yaml", work / "tiny.yaml")  # on storage every node reaches
        laptop = work / "laptop"
        (laptop / "tmp").mkdir(parents=True)
        self.env = {
            "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(laptop),
            "TMPDIR": str(laptop / "tmp"),
            "PYTHONPATH": str(ROOT / "tests" / "launcher"),  # the provider, for `ray up` here and the head's autoscaler
            "LANG": "C.UTF-8",
        }
        # the head's "image" has the project's dependencies and a pip that builds offline (no network here)
        offline_pip = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}  # (sic: pip reads 0 as "no isolation")
        self.state = work / "provider" / "state.json"
        self.cluster_yaml = work / "cluster-local.yaml"
        config = local_cluster_config(self.state, work / "provider" / "nodes", offline_pip)
        self.cluster_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
        self.experiment = work / "asha.yaml"
        self.experiment.write_text(yaml.safe_dump(ASHA_EXPERIMENT))
        self.jobs: dict[str, str] = {}

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.namespace.run(["ray", *args], env=self.env, timeout=timeout)

    def head_folder(self) -> Path:
        (node,) = json.loads(self.state.read_text())["nodes"].values()
        return Path(node["folder"])


ASHA_EXPERIMENT = {
    "name": "asha",
    "search_space": {"optim.lr": {"grid": [0.01, 0.05]}},
    "seeds": [0],
    "metric": "val/macro_f1",
    "mode": "max",
    "asha": {"grace_period": 1, "reduction_factor": 2},
}
COMMON = ["data.num_classes=7", "optim.epochs=1", "train.use_gpu=false", "train.wait_for_autoscaler=false"]
DASHBOARD = "http://127.0.0.1:8265"


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    refused = namespaces_refused()
    if refused:
        pytest.skip(refused)
    cluster = Launched(tmp_path_factory.mktemp("launcher"))
    try:
        ok(cluster.ray("up", "-y", "--no-config-cache", str(cluster.cluster_yaml)), "ray up")
        yield cluster
    finally:
        cluster.ray("down", "-y", str(cluster.cluster_yaml))
        cluster.namespace.close()


def test_ray_submit_runs_every_job_script_on_the_launched_head(launched, datagen):
    """The project as cluster.yaml ships it to the head, then prepare and train as `ray submit` jobs, and
    `import proco_ray` from any folder of the head, as `ray exec` runs it (sweeps: `ray job submit`, below)."""
    head = launched.head_folder()
    shipped = {p.relative_to(head / "proco_ray").as_posix() for p in (head / "proco_ray").rglob("*")}
    assert {"src/proco_ray/__init__.py", "jobs/train_isic.py", "pyproject.toml"} <= shipped
    assert not {p for p in shipped if p.split("/")[0] not in ("src", "jobs", "pyproject.toml", "README.md")}
    assert not {p for p in shipped if "__pycache__" in p or ".egg-info" in p}

    source = datagen.isic(launched.work / "isic2018")
    submit = ["submit", str(launched.cluster_yaml)]
    ok(launched.ray(*submit, "jobs/prepare_isic.py", str(source), str(launched.data), "--image-size", "16"), "prepare")
    manifest = json.loads((launched.data / "manifest.json").read_text())
    assert manifest["created_by"] == "proco-ray 0.1.0" and manifest["counts"]["train"]["NV"] > 0

    train = ["--data", str(launched.data), "--config", str(launched.tiny), *COMMON, "train.num_workers=2"]
    train += ["train.cpus_per_worker=1", "train.name=launcher", f"train.storage_path={launched.runs}"]
    ok(launched.ray(*submit, "jobs/train_isic.py", *train), "train")
    summary = json.loads((launched.runs / "launcher" / "summary.json").read_text())
    assert summary["metrics"]["epoch"] == 1 and "test/macro_f1" in summary["metrics"]
    assert list((launched.runs / "launcher").glob("checkpoint_*/checkpoint.pt"))

    anywhere = 'cd /tmp && python -c "import proco_ray; print(proco_ray.__file__, proco_ray.__version__)"'
    printed = ok(launched.ray("exec", str(launched.cluster_yaml), anywhere), "exec")
    assert f"{NODE_HOME}/proco_ray/src/proco_ray/__init__.py 0.1.0" in printed


def test_ray_job_submit_runs_a_sweep_on_the_launched_head(launched):
    """As the README writes it; 127.0.0.1:8265 is the head's dashboard here, as it is on a laptop through
    `ray dashboard cluster.yaml`."""
    if not (launched.data / "manifest.json").exists():
        pytest.skip("needs the prepared data of the ray submit test")
    sweep = ["--experiment", str(launched.experiment), "--data", str(launched.data), "--config", str(launched.tiny)]
    sweep += ["--storage", str(launched.sweeps), "--name", "asha", *COMMON, "train.num_workers=1"]
    job = ["job", "submit", "--address", DASHBOARD, "--submission-id", "tune-asha", "--working-dir", "."]
    submitted = launched.ray(*job, "--", "python", "jobs/tune_isic.py", *sweep)
    ok(submitted, "ray job submit")
    assert "Job 'tune-asha' succeeded" in submitted.stdout
    results = (launched.sweeps / "asha" / "results" / "results.md").read_text()
    assert "val/macro_f1" in results and "0.01" in results and "0.05" in results
    launched.jobs["tune-asha"] = "SUCCEEDED"


def browse(launched: Launched, url: str, picture: str, *expected: str) -> str:
    """The page's visible text once every expected string shows, read in headless Chromium inside the namespace;
    its screenshot goes to the test's folder, and to $PROCO_SCREENSHOTS (e.g. docs/figures) when set."""
    shot = launched.work / picture
    script = [sys.executable, str(ROOT / "tests" / "launcher" / "browse.py"), url, str(shot), *expected]
    done = launched.namespace.run(script, env={**os.environ, "HOME": str(launched.work)}, timeout=240)
    assert done.returncode == 0, f"{url}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    if os.environ.get("PROCO_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["PROCO_SCREENSHOTS"]) / picture)
    return json.loads(done.stdout.splitlines()[-1])["text"]


def test_the_dashboards_in_a_browser(launched):
    """Ray's Jobs page lists the submitted sweep as SUCCEEDED; TensorBoard's HParams table compares its trials by
    the swept learning rate and validation macro-F1."""
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    if launched.jobs.get("tune-asha") != "SUCCEEDED" or not (launched.sweeps / "asha").is_dir():
        pytest.skip("needs the sweep of the test above")
    browse(launched, DASHBOARD + "/#/jobs", "ray-dashboard-jobs.png", "tune-asha", "SUCCEEDED")

    port = "6006"
    board = ["tensorboard", "--logdir", str(launched.sweeps / "asha"), "--host", "127.0.0.1", "--port", port]
    server = subprocess.Popen(
        launched.namespace.inside(board), env=launched.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    trials = sorted(d.name for d in (launched.sweeps / "asha").iterdir() if d.is_dir() and d.name != "results")
    assert len(trials) == 2
    try:  # the table's rows: each trial by name, its learning rate, and the metric columns
        url = f"http://127.0.0.1:{port}/#hparams"
        browse(launched, url, "tensorboard-hparams.png", "optim.lr", "ray/tune/val/macro_f1", *trials, "0.010000", "0.050000")
    finally:  # nsenter does not pass signals on: stop TensorBoard inside the namespace, where pkill sees nothing else
        launched.namespace.run(["pkill", "-f", "tensorboard"], env=dict(os.environ), timeout=30)
        server.wait(timeout=30)


def test_ray_down_leaves_nothing_running(launched):
    ok(launched.ray("down", "-y", str(launched.cluster_yaml)), "ray down")
    left = [p for p in launched.namespace.processes() if not p.startswith("1 ") and " ps -eo" not in p]
    assert not left, f"left running after ray down: {left}"
    assert not json.loads(launched.state.read_text())["nodes"]
