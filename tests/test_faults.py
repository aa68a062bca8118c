"""Faults a real cluster meets, on nodes with network stacks and addresses of their own (tests/netcluster.py):
a node lost mid-epoch, a node cut off mid-epoch, S3 unreachable from one node, the whole cluster brought down.

`proco-ray train` runs on the head as `ray submit` runs it, with data and runs on S3, two training workers on
nodes of one CPU each, `train.max_failures=2` and a spare node. After each fault the run must lose nothing: it
finishes its epochs, going on from its latest registered checkpoint without skipping an epoch; Ray Train
registered each epoch's checkpoint once; TensorBoard shows each epoch's validation scalars once. The seconds
each fault took to detect and to recover from are printed (and written to the test's folder as recovery.json)
for docs/results.md. The last two tests are `extended`: `make test-extended` runs them.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from netcluster import EXACT, GENERATED, S3_HOST, NetworkedCluster, Node, Running, namespaces_refused

from proco_ray.config import load_config
from proco_ray.engine.checkpoint import CheckpointFolder, load_checkpoint
from proco_ray.engine.feeds import GeneratedFeed
from proco_ray.engine.loop import WorkerEnv, train_worker

pytestmark = pytest.mark.slow

TINY = Path(__file__).parent / "tiny.yaml"
DATA = "s3://proco-faults/data"
RUNS = "s3://proco-faults/runs"
EPOCHS = 3
EPOCH_LINE = rf"epoch (\d+)/{EPOCHS}\b"
RECOVERY: dict[str, dict[str, float]] = {}


def train_command(name: str, *extra: str) -> list[str]:
    overrides = [f"train.storage_path={RUNS}", f"train.name={name}", "train.num_workers=2", f"optim.epochs={EPOCHS}"]
    overrides += ["data.batch_size=8", "method.queue_size=32", "train.max_failures=2", "train.keep_checkpoints=10", *extra]
    return [sys.executable, "-m", "proco_ray", "train", "--config", str(TINY), "--data", DATA, *overrides]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, datagen):
    refused = namespaces_refused()
    if refused:
        pytest.skip(refused)
    work = tmp_path_factory.mktemp("faults")
    cluster = NetworkedCluster(work)
    try:
        cluster.add_node("head", head=True)
        for name in ("a", "b", "c"):  # two for the training workers, one for Ray Data and as the spare
            cluster.add_node(name)
        cluster.watch_nodes()
        source = datagen.imagefolder(work / "source", {"common": 48, "rare": 16, "scarce": 12})
        prepare = [sys.executable, "-m", "proco_ray", "prepare", str(source), DATA, "--image-size", "16"]
        done = cluster.head.run(prepare, env=cluster.driver_env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield cluster
    finally:
        cluster.close()
        if RECOVERY:
            (work / "recovery.json").write_text(json.dumps(RECOVERY, indent=2))
            print("\n".join(f"{fault}: {json.dumps(numbers)}" for fault, numbers in RECOVERY.items()))


def record(cluster: NetworkedCluster, name: str) -> dict:
    out = cluster.work / f"{name}-record.json"
    cluster.in_head(f"record_run({RUNS + '/' + name!r}, {str(out)!r})")
    return json.loads(out.read_text())


def epochs_printed(run: Running, after: float = 0.0, before: float = float("inf")) -> list[int]:
    return [int(m.group(1)) for t, line in run.lines if after <= t < before and (m := re.search(EPOCH_LINE, line))]


def nothing_lost(cluster: NetworkedCluster, name: str, run: Running, struck: float) -> dict[str, float]:
    """The run went on from where its last registered checkpoint left it: no epoch skipped, the rest done in
    order, every epoch registered once, its TensorBoard scalars shown once, no unregistered checkpoint folder
    left. Returns the epochs the fault made it repeat."""
    before, after = epochs_printed(run, before=struck), epochs_printed(run, after=struck)
    assert after and after == list(range(after[0], EPOCHS + 1)) and after[0] <= max(before, default=0) + 1, (before, after)
    seen = record(cluster, name)
    assert seen["registered"] == list(range(1, EPOCHS + 1)), seen
    assert len(seen["folders"]) == EPOCHS, seen  # no folder a failed worker group wrote but never registered
    assert seen["scalar_epochs"] == list(range(1, EPOCHS + 1)), seen
    return {"epochs_repeated": max(before, default=0) - after[0] + 1}


def test_two_workers_on_nodes_of_their_own_match_one_worker(cluster, tmp_path):
    """Exactness across real network stacks: two workers on two nodes (gloo over the
    bridge) end with the queue, recalibration and model of the per-worker loop run alone, without Ray, on the
    same global batch."""
    out = cluster.work / "generated-2"
    cluster.in_head(f"fit_generated('generated-2', 2, {RUNS!r}, {str(out)!r})", timeout=600)
    addresses = json.loads(Path(f"{out}.json").read_text())["addresses"]
    assert len(set(addresses)) == 2 and all(a.startswith("10.37.0.") for a in addresses), addresses
    two = torch.load(f"{out}.pt", weights_only=False)

    config = load_config(TINY, EXACT)
    alone = CheckpointFolder(tmp_path / "alone", keep=1)
    train_worker(config, GeneratedFeed(**GENERATED)(config, 0, 1), WorkerEnv(report=alone, print_progress=False))
    one = load_checkpoint(alone.latest)
    assert one["epoch"] == two["epoch"] == 2
    for key in ("queue.labels", "queue.preds", "queue.ptr", "recalibration.weights"):
        torch.testing.assert_close(one["method"][key], two["method"][key], rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(one["method"]["queue.feats"], two["method"]["queue.feats"], rtol=1e-5, atol=1e-5)
    for key, value in one["model"].items():
        torch.testing.assert_close(value, two["model"][key], rtol=1e-5, atol=1e-5, msg=key)


def test_a_local_path_is_refused_before_anything_starts(cluster):
    """Each node would write its own disk, where the driver and the other nodes never look."""
    command = [*train_command("local"), f"train.storage_path={cluster.work / 'runs'}"]
    done = cluster.head.run(command, env=cluster.driver_env, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert re.match(
        rf"proco-ray train: error: train.storage_path={cluster.work / 'runs'}: a local path, but the Ray cluster has \d nodes",
        error,
    ), error
    assert not (cluster.work / "runs").exists()


def fault_mid_epoch(cluster: NetworkedCluster, name: str, fault, *extra: str) -> tuple[Running, Node, float]:
    """Start a run, apply `fault` to a worker node as the second epoch begins (rank 0's, which writes the
    checkpoints, unless it shares the head with the driver); the run, the node, the fault's time."""
    run = cluster.head.start(train_command(name, *extra), cluster.work / f"{name}.log", cluster.driver_env)
    at = run.wait_for(rf"epoch 1/{EPOCHS}\b", timeout=400)
    rank0 = re.search(r"RayTrainWorker pid=\d+, ip=([\d.]+)\)\S* epoch 1/", run.text())  # none: on the driver's node
    node = next((n for n in cluster.nodes.values() if rank0 and n.ip == rank0.group(1)), None)
    node = node or cluster.worker_node_with("RayTrainWorker")
    assert node is not None and node is not cluster.head, "no node other than the head runs a training worker"
    fault(node)
    return run, node, max(at, time.time())


def test_a_worker_node_lost_mid_epoch(cluster):
    """All of a worker node's processes killed at once: the GCS marks it dead, Ray Train restarts the worker
    group on the spare node and resumes from the latest registered checkpoint."""
    run, node, struck = fault_mid_epoch(cluster, "lost", lambda node: node.kill())
    detected = cluster.declared_dead_at(node.ip, struck)
    resumed = run.wait_for(EPOCH_LINE, timeout=400, after=struck)
    assert run.wait(timeout=600) == 0, run.tail()
    repeated = nothing_lost(cluster, "lost", run, struck)
    RECOVERY["node lost"] = {"detected_s": detected - struck, "recovered_s": resumed - struck, **repeated}
    cluster.nodes.pop(node.name)
    cluster.add_node("d")  # the autoscaler's replacement: the next test has a spare again


def test_a_worker_node_cut_off_mid_epoch(cluster):
    """The node's link set down: the GCS's health checks find it, Ray Train restarts the group elsewhere; the
    node's link back up afterwards, its raylet learns it was declared dead and exits, and the run is untouched."""
    run, node, struck = fault_mid_epoch(cluster, "cut", lambda node: node.cut_link())
    detected = cluster.declared_dead_at(node.ip, struck)
    resumed = run.wait_for(EPOCH_LINE, timeout=400, after=struck)
    node.restore_link()
    deadline = time.time() + 120
    while node.processes("raylet") and time.time() < deadline:
        time.sleep(1)
    assert not node.processes("raylet"), "the cut node's raylet kept running after its link came back"
    assert run.wait(timeout=600) == 0, run.tail()
    repeated = nothing_lost(cluster, "cut", run, struck)
    RECOVERY["node cut off"] = {"detected_s": detected - struck, "recovered_s": resumed - struck, **repeated}
    node.kill()
    cluster.nodes.pop(node.name)
    cluster.add_node("e")


@pytest.mark.extended
def test_s3_unreachable_from_one_node_ends_in_bounded_time(cluster):
    """Every packet from one worker node to S3 lost: the run ends within the S3 client's bounded timeouts, never
    hangs. Ray's health checks do not see a node's route to S3, so a restarted group may land on that node again:
    with `train.max_failures=0` the run ends at the first failure, in one line naming the storage and the cause,
    or, when the cut node's worker never touched S3, completes."""
    cut = lambda node: node.drop_packets_to(S3_HOST)  # noqa: E731
    run, node, struck = fault_mid_epoch(cluster, "s3-cut", cut, "train.max_failures=0")
    code = run.wait(timeout=600)
    RECOVERY["S3 unreachable from one node"] = {"ended_s": time.time() - struck, "exit": code}
    errors = [line for line in run.text().splitlines() if line.startswith("proco-ray train: error:")]
    if code == 0:
        assert not errors
        RECOVERY["S3 unreachable from one node"].update(nothing_lost(cluster, "s3-cut", run, struck))
    else:
        assert code == 1 and len(errors) == 1, run.tail()
        assert errors[0].startswith(f"proco-ray train: error: a training worker could not reach the run's storage {RUNS}")
        assert "AWS Error NETWORK_CONNECTION" in errors[0] and errors[0].endswith("from the run's latest checkpoint")
    node.kill()
    cluster.nodes.pop(node.name)


@pytest.mark.extended
def test_the_whole_cluster_brought_down_mid_run_resumes_on_a_new_one(cluster):
    """Every node lost (the driver with the head), then a new cluster and the same command: it resumes from the
    checkpoints on S3, as a run whose claim the lost head still held."""
    claim_timeout = {"PROCO_RUN_CLAIM_TIMEOUT_S": "20"}  # the lost head's claim: stale 20 s after its last refresh
    env = {**cluster.driver_env, **claim_timeout}
    run = cluster.head.start(train_command("restarted"), cluster.work / "restarted.log", env)
    run.wait_for(rf"epoch 2/{EPOCHS}\b", timeout=400)  # epoch 1 registered: its report is a barrier
    struck = time.time()
    cluster.down()
    run.wait(timeout=60)
    cluster.add_node("head2", head=True)
    for name in ("a2", "b2"):
        cluster.add_node(name)
    time.sleep(max(0.0, struck + 21 - time.time()))
    env = {**cluster.driver_env, **claim_timeout}
    again = cluster.head.start(train_command("restarted"), cluster.work / "restarted-again.log", env)
    assert again.wait(timeout=600) == 0, again.tail()
    resumed = re.search(rf"resuming run {RUNS}/restarted from its latest checkpoint: epoch (\d) of {EPOCHS} done", again.text())
    assert resumed and int(resumed.group(1)) >= 1, again.tail()
    before = epochs_printed(run)
    assert epochs_printed(again) == list(range(int(resumed.group(1)) + 1, EPOCHS + 1)), again.tail()
    seen = record(cluster, "restarted")
    assert seen["registered"] == seen["scalar_epochs"] == list(range(1, EPOCHS + 1)), seen
    RECOVERY["whole cluster down"] = {
        "recovered_s": again.first(EPOCH_LINE) - struck,
        "epochs_repeated": max(before) - int(resumed.group(1)),
    }
