"""A run across nodes: a real three-node Ray cluster (ray.cluster_utils.Cluster), data and runs in real S3."""

from pathlib import Path

import pytest
import ray

from proco_ray.config import ConfigError, load_config
from proco_ray.data.prepare import PrepareOptions, prepare
from proco_ray.launch.cluster import check_paths_reach_every_node, live_nodes
from proco_ray.launch.trainer import fit, summarise

TINY = Path(__file__).parent / "tiny.yaml"


@pytest.mark.slow
def test_two_workers_on_two_nodes_train_from_s3(ray_three_nodes, s3_env, datagen, tmp_path):
    """Each node has one CPU, so the two training workers and Ray Data's CPU land on three different nodes,
    gloo synchronises them across nodes, and checkpoints reach the driver through S3. A local path is refused
    before anything starts, because the other nodes would not see it."""
    assert live_nodes() == 3
    source = datagen.imagefolder(tmp_path / "folder", {"common": 24, "rare": 10, "scarce": 8})
    uri = "s3://proco-multinode/tiny"
    prepare(str(source), uri, PrepareOptions(image_size=16, overwrite=True))
    overrides = [f"data.uri={uri}", "data.num_classes=3", "data.batch_size=8", "method.queue_size=32"]
    overrides += ["train.num_workers=2", "train.name=multinode", "optim.epochs=2"]
    local = load_config(TINY, [*overrides, f"train.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError, match="train.storage_path=.*3 nodes.*train.shared_filesystem=true"):
        fit(local)
    assert not (tmp_path / "runs").exists()
    config = load_config(TINY, [*overrides, "train.storage_path=s3://proco-multinode/runs"])
    summary = summarise(fit(config), config)
    assert summary["metrics"]["epoch"] == 2 and summary["best_checkpoint"].startswith("s3://proco-multinode/runs/")

    # the GCS's actor table (the state API would need the dashboard): where the training workers ran
    actors = ray._private.state.actors().values()
    nodes = {a["Address"]["NodeID"] for a in actors if a["ActorClassName"].endswith("RayTrainWorker")}
    assert len(nodes) == 2, [(a["ActorClassName"], a["Address"]["NodeID"]) for a in actors]


def test_local_paths_are_refused_only_where_other_nodes_cannot_see_them():
    paths = {"data.uri": "/data/isic", "train.storage_path": "s3://runs"}
    check_paths_reach_every_node(paths, nodes=1, shared_filesystem=False)
    check_paths_reach_every_node(paths, nodes=4, shared_filesystem=True)
    check_paths_reach_every_node({"data.uri": "s3://d", "train.storage_path": "s3://r"}, nodes=4, shared_filesystem=False)
    with pytest.raises(ConfigError, match=r"data.uri=/data/isic: a local path, but the Ray cluster has 4 nodes"):
        check_paths_reach_every_node(paths, nodes=4, shared_filesystem=False)
