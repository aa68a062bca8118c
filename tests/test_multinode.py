"""Paths a run across nodes can use (the runs themselves: tests/test_faults.py, on nodes with addresses of their own)."""

from pathlib import Path

import pytest

from proco_ray.config import ConfigError
from proco_ray.launch.cluster import check_paths_reach_every_node

TINY = Path(__file__).parent / "tiny.yaml"


def test_local_paths_are_refused_only_where_other_nodes_cannot_see_them():
    paths = {"data.uri": "/data/isic", "train.storage_path": "s3://runs"}
    check_paths_reach_every_node(paths, nodes=1, shared_filesystem=False)
    check_paths_reach_every_node(paths, nodes=4, shared_filesystem=True)
    check_paths_reach_every_node({"data.uri": "s3://d", "train.storage_path": "s3://r"}, nodes=4, shared_filesystem=False)
    with pytest.raises(ConfigError, match=r"data.uri=/data/isic: a local path, but the Ray cluster has 4 nodes"):
        check_paths_reach_every_node(paths, nodes=4, shared_filesystem=False)
