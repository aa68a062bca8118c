"""The training input pipeline on a local Ray: manifest, checksums, epochs, two consumers, resampling, S3."""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from proco_ray.config import CLASS_BALANCED, INSTANCE_BALANCED
from proco_ray.data.manifest import read_manifest
from proco_ray.data.pipeline import build_dataset, load_split
from proco_ray.data.prepare import PrepareOptions, prepare
from proco_ray.errors import DataError

SIZE = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, datagen, ray_local) -> str:
    """A long-tailed 3-class ImageFolder set, prepared into several small shards per split."""
    root = tmp_path_factory.mktemp("pipeline")
    source = datagen.imagefolder(root / "folder", {"common": 60, "rare": 20, "scarce": 10})
    out = root / "prepared"
    prepare(str(source), str(out), PrepareOptions(image_size=SIZE, shard_mb=0.01))
    return str(out)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory, datagen, ray_local) -> str:
    """600 training rows, 70/20/10 % over three classes, for the resampling statistics."""
    root = tmp_path_factory.mktemp("skewed")
    labels = np.array([0] * 420 + [1] * 120 + [2] * 60, dtype=np.uint8).reshape(-1, 1)
    images = np.random.default_rng(0).integers(0, 256, size=(600, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "skewed.npz", train_images=images, train_labels=labels)
    prepare(str(root / "skewed.npz"), str(root / "out"), PrepareOptions(image_size=8, split="official"))
    return str(root / "out")


def epoch_ids(iterator) -> list[str]:
    return [i for batch in iterator.iter_batches(batch_size=16, batch_format="numpy") for i in batch["id"]]


def test_read_manifest(prepared):
    manifest = read_manifest(prepared)
    assert manifest.classes == ["common", "rare", "scarce"] and manifest.num_classes == 3
    assert manifest.class_counts("train") == [manifest.counts["train"][c] for c in manifest.classes]
    assert sum(manifest.class_counts("train")) + manifest.num_rows("val") + manifest.num_rows("test") == 90
    assert len(manifest.shards_of("train")) > 1 and manifest.image_size == SIZE
    with pytest.raises(DataError, match="split 'holdout' is not in the manifest"):
        manifest.class_counts("holdout")


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no manifest.json at .*was it prepared with proco-ray prepare"):
        read_manifest(str(tmp_path))


def first_batch(batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The first batch of a Ray Data iteration run to its end. Leaving an iteration early shuts its executor
    down with force, and Ray 2.60 can crash the driver when that force-cancel races a finishing task
    ("Check failed: ... Tried to complete task that was not pending")."""
    return list(batches)[0]


def test_train_batches_are_the_stored_uint8_images(prepared):
    """The pipeline delivers what prepare stored, decoded only: uint8 at the stored size, 3 bytes a pixel."""
    batch = first_batch(build_dataset(prepared, "train", train=True).iter_torch_batches(batch_size=8))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64
    assert int(batch["image"].max()) > 1  # pixels 0-255, not normalised


def test_eval_is_deterministic_and_complete(prepared):
    ds = build_dataset(prepared, "test", train=False, with_ids=True)
    runs = [
        {i: img for b in ds.iter_batches(batch_size=8, batch_format="numpy") for i, img in zip(b["id"], b["image"])}
        for _ in range(2)
    ]
    assert len(runs[0]) == read_manifest(prepared).num_rows("test")
    assert runs[0].keys() == runs[1].keys() and all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    batch = first_batch(build_dataset(prepared, "test", train=False).iter_torch_batches(batch_size=4))
    assert set(batch) == {"image", "label"} and batch["image"].shape == (4, SIZE, SIZE, 3)


def test_every_training_row_once_per_epoch_across_two_consumers(prepared):
    ds = build_dataset(prepared, "train", train=True, with_ids=True)
    consumers = ds.streaming_split(2, equal=False)
    expected = read_manifest(prepared).num_rows("train")
    orders = []
    for _ in range(2):
        seen: list[list[str]] = [[], []]
        threads = [threading.Thread(target=lambda k=k: seen[k].extend(epoch_ids(consumers[k]))) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        ids = seen[0] + seen[1]
        assert len(ids) == expected and len(set(ids)) == expected
        orders.append(ids)
    assert orders[0] != orders[1]


def test_shuffle_is_fresh_each_epoch_and_seeded(prepared, ray_local):
    context = ray_local.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    try:
        first = build_dataset(prepared, "train", train=True, with_ids=True, seed=1)
        again = build_dataset(prepared, "train", train=True, with_ids=True, seed=1)
        other = build_dataset(prepared, "train", train=True, with_ids=True, seed=2)
        epochs = [epoch_ids(first), epoch_ids(first)]
        assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])
        assert epoch_ids(again) == epochs[0]
        assert epoch_ids(other) != epochs[0]
        [through_coordinator] = first.streaming_split(1)  # as Ray Train workers consume it
        assert epoch_ids(through_coordinator) != epoch_ids(through_coordinator)
    finally:
        context.execution_options.preserve_order = False


def test_a_dataset_for_a_resumed_run_continues_the_row_orders(prepared, ray_local):
    """Built with first_epoch=2 (a run resumed after 2 epochs), the first epoch is the uninterrupted run's third,
    shuffled and class-balanced, also through streaming_split as Ray Train consumes it."""
    context = ray_local.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    try:
        for sampling in (INSTANCE_BALANCED, CLASS_BALANCED):
            common = dict(train=True, with_ids=True, seed=3, sampling=sampling)
            [straight] = build_dataset(prepared, "train", **common).streaming_split(1)
            orders = [epoch_ids(straight) for _ in range(3)]
            [resumed] = build_dataset(prepared, "train", first_epoch=2, **common).streaming_split(1)
            assert epoch_ids(resumed) == orders[2] != orders[1]
    finally:
        context.execution_options.preserve_order = False


def test_class_balanced_resampling(skewed):
    ds = build_dataset(skewed, "train", train=True, sampling=CLASS_BALANCED)
    draws = []
    for _ in range(2):
        labels = torch.cat([b["label"] for b in ds.iter_torch_batches(batch_size=64)])
        assert len(labels) == 600
        draws.append(labels)
    counts = Counter(torch.cat(draws).tolist())
    assert all(abs(counts[c] - 400) < 80 for c in range(3)), counts
    assert not torch.equal(draws[0], draws[1])


def test_tampered_shard_is_named(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = read_manifest(str(copy)).shards_of("val")[0].path
    data = bytearray((copy / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / shard).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"(?s)do not match manifest.json.*{shard}: sha256"):
        build_dataset(str(copy), "val", train=False)
    Path(copy / shard).unlink()
    with pytest.raises(DataError, match=f"{shard}: missing"):
        build_dataset(str(copy), "val", train=False)


def test_label_outside_the_classes_is_named_where_data_enters(prepared, tmp_path):
    """A shard whose checksum matches but whose label is out of range fails in load_split, not in a device step."""
    import hashlib
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = read_manifest(str(copy)).shards_of("val")[0].path
    table = pq.read_table(copy / shard)
    labels = table.column("label").to_pylist()
    labels[1] = 7
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, table.schema.field("label").type))
    pq.write_table(table, copy / shard)
    data = (copy / shard).read_bytes()
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["path"] == shard:
            entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    fixed = read_manifest(str(copy))
    with pytest.raises(DataError, match=f"{shard} row 1 has label 7, outside the manifest's 3 classes"):
        load_split(str(copy), fixed.shards_of("val"), fixed.num_classes)


def test_streams_from_s3(tmp_path, datagen, s3_env, ray_local):
    source = datagen.medmnist(tmp_path / "retinamnist.npz", {"train": 30, "val": 10})
    uri = "s3://proco/pipeline-test"
    prepare(str(source), uri, PrepareOptions(image_size=SIZE, split="official", overwrite=True))
    manifest = read_manifest(uri)
    batches = list(build_dataset(uri, "train", train=True).iter_torch_batches(batch_size=10))
    assert sum(len(b["label"]) for b in batches) == manifest.num_rows("train") == 30


def test_local_feed_reads_what_the_ray_pipeline_reads_without_ray(prepared):
    """The Ray-free feed: same manifest, splits, class counts and eval images as build_dataset."""
    from proco_ray.config import load_config
    from proco_ray.data.train_input import TrainInput
    from proco_ray.engine.feeds import local_feed

    config = load_config(None, [f"data.image_size={SIZE}", "data.batch_size=8", "data.eval_batch_size=16"])
    feed = local_feed(prepared, config, workers=0)
    manifest = read_manifest(prepared)
    assert feed.class_names == manifest.classes and feed.class_counts == manifest.class_counts("train")
    assert feed.steps_per_epoch == manifest.num_rows("train") // 8
    batches = list(feed.train_batches(TrainInput(INSTANCE_BALANCED, "moco_v2", 2), 0))
    assert len(batches) == feed.steps_per_epoch and set(batches[0]) == {"image", "label"}
    assert batches[0]["image"].shape == (8, SIZE, SIZE, 3) and batches[0]["image"].dtype == torch.uint8
    local = torch.cat([b["image"] for b in feed.eval_batches("val")])
    ray_side = torch.cat([b["image"] for b in build_dataset(prepared, "val", train=False).iter_torch_batches(batch_size=16)])
    assert image_rows(local) == image_rows(ray_side)  # the same images, in any order
    with pytest.raises(KeyError, match="no split 'holdout'"):
        feed.eval_batches("holdout")


def image_rows(images: torch.Tensor) -> list[bytes]:
    """Each image's bytes, sorted: equal lists mean the same images (the generated images are all distinct)."""
    return sorted(bytes(row) for row in images.reshape(len(images), -1).numpy())


@pytest.mark.parametrize("sampling", [INSTANCE_BALANCED, CLASS_BALANCED])
def test_one_sampler_gives_both_feeds_the_same_rows(prepared, ray_local, sampling):
    """The same (seed, epoch) gives the Ray Data pipeline and the local feed the same rows in the same order
    (`sampling.epoch_rows`), on 1 rank; on 2 ranks, the local feed's ranks together give exactly those rows
    in step order, and Ray Train's two dataset shards together hold the same rows as its one."""
    from proco_ray.config import load_config
    from proco_ray.data.train_input import TrainInput
    from proco_ray.engine.feeds import local_feed

    config = load_config(None, [f"data.image_size={SIZE}", "data.batch_size=8", "train.seed=5"])
    source = TrainInput(sampling, "none", 1)
    context = ray_local.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    try:
        for epoch in range(2):

            def dataset():
                return build_dataset(prepared, "train", train=True, sampling=sampling, seed=5, first_epoch=epoch)

            [one] = dataset().streaming_split(1)  # as Ray Train's one worker reads it
            ray_epoch = torch.cat([b["image"] for b in one.iter_torch_batches(batch_size=8)])
            local = torch.cat([b["image"] for b in local_feed(prepared, config, workers=0).train_batches(source, epoch)])
            assert torch.equal(local, ray_epoch[: len(local)])
            ranks = [list(local_feed(prepared, config, rank, 2, workers=0).train_batches(source, epoch)) for rank in (0, 1)]
            interleaved = torch.cat([torch.cat([a["image"], b["image"]]) for a, b in zip(*ranks)])
            assert torch.equal(interleaved, local)
            shards = dataset().streaming_split(2, equal=False)
            ray_two: list[torch.Tensor] = [torch.empty(0), torch.empty(0)]

            def consume(k: int) -> None:
                ray_two[k] = torch.cat([b["image"] for b in shards[k].iter_torch_batches(batch_size=8)])

            threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            assert image_rows(torch.cat(ray_two)) == image_rows(ray_epoch)
    finally:
        context.execution_options.preserve_order = False


def test_raw_shards_hold_the_pixels_png_shards_encode_and_the_manifest_says_so(tmp_path, datagen, ray_local):
    """prepare --encoding raw stores each image's uint8 pixels (nothing to decode when training): the same
    images as lossless PNG shards deliver, in both feeds."""
    from proco_ray.config import load_config
    from proco_ray.engine.feeds import local_feed

    source = datagen.imagefolder(tmp_path / "folder", {"a": 20, "b": 12})
    for encoding in ("png", "raw"):
        prepare(str(source), str(tmp_path / encoding), PrepareOptions(image_size=SIZE, encoding=encoding))
    assert read_manifest(str(tmp_path / "raw")).encoding == "raw"
    delivered = {
        encoding: torch.cat(
            [b["image"] for b in build_dataset(str(tmp_path / encoding), "val", train=False).iter_torch_batches()]
        )
        for encoding in ("png", "raw")
    }
    assert delivered["raw"].dtype == torch.uint8 and image_rows(delivered["raw"]) == image_rows(delivered["png"])
    config = load_config(None, [f"data.image_size={SIZE}", "data.batch_size=4"])
    local = torch.cat([b["image"] for b in local_feed(str(tmp_path / "raw"), config, workers=0).eval_batches("val")])
    assert image_rows(local) == image_rows(delivered["png"])
