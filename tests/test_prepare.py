"""`proco-ray prepare` end to end on a local Ray, into a local folder and into the real S3 server."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from terminal import RAY_NOISE, run_in_terminal, screen_lines

from proco_ray.cli import main
from proco_ray.config import INSTANCE_BALANCED
from proco_ray.data.prepare import PrepareOptions, prepare
from proco_ray.errors import DataError, StorageError
from proco_ray.storage.s3 import join, resolve

REPO = Path(__file__).resolve().parents[1]


def read_rows(uri: str) -> tuple[dict, list[dict]]:
    """The manifest and every row of every shard, checking each shard's sha256 and row count on the way."""
    fs, root = resolve(uri)
    with fs.open_input_stream(join(root, "manifest.json")) as stream:
        manifest = json.loads(stream.read())
    rows = []
    for shard in manifest["shards"]:
        with fs.open_input_stream(join(root, shard["path"])) as stream:
            data = stream.read()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        table = pq.read_table(io.BytesIO(data))
        assert table.num_rows == shard["rows"]
        assert set(table.column("split").to_pylist()) == {shard["split"]}
        rows += table.to_pylist()
    return manifest, rows


def counts_of(rows: list[dict], classes: list[str]) -> dict[str, dict[str, int]]:
    counts = Counter((r["split"], r["label"]) for r in rows)
    return {s: {c: counts.get((s, i), 0) for i, c in enumerate(classes)} for s in {r["split"] for r in rows}}


SOURCES = {
    "isic": lambda dg, tmp: dg.isic(tmp / "isic"),
    "aptos": lambda dg, tmp: dg.aptos(tmp / "aptos"),
    "medmnist": lambda dg, tmp: dg.medmnist(tmp / "retinamnist_small.npz"),
    "imagefolder": lambda dg, tmp: dg.imagefolder(tmp / "folder"),
}


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("name", list(SOURCES))
def test_prepare_every_format(name, where, tmp_path, datagen, ray_local, request):
    source = SOURCES[name](datagen, tmp_path)
    if where == "s3":
        request.getfixturevalue("s3_env")
        out = f"s3://prepared-{name}/run1"
    else:
        out = str(tmp_path / "out")
    manifest = prepare(str(source), out, PrepareOptions(image_size=24, encoding="png" if name == "aptos" else "jpeg"))
    stored, rows = read_rows(out)
    assert stored == manifest
    assert manifest["counts"] == counts_of(rows, manifest["classes"])
    assert set(manifest["counts"]) == {"train", "val", "test"}
    assert manifest["source"]["images"] == len(rows) and manifest["source"]["fingerprint"].startswith("sha256:")
    assert Image.open(io.BytesIO(rows[0]["image"])).size == (24, 24)
    assert len({r["id"] for r in rows}) == len(rows)


def test_split_is_stratified_reproducible_and_group_aware(tmp_path, datagen, ray_local):
    source = str(datagen.isic(tmp_path / "isic", counts=[20, 60, 14, 12, 16, 10, 10]))
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        prepare(source, str(tmp_path / name), PrepareOptions(image_size=16, seed=seed))
        runs[name] = read_rows(str(tmp_path / name))
    (manifest, first), (_, again), (_, other) = runs["a"], runs["b"], runs["c"]
    split_of = lambda rows: {r["id"]: r["split"] for r in rows}  # noqa: E731
    assert split_of(first) == split_of(again)
    assert split_of(first) != split_of(other)
    assert manifest["split"]["grouped_by"] == "HAM10000_metadata.csv"
    lesions = defaultdict(set)
    for r in first:
        lesions[r["id"][:-4] + str(int(r["id"][-4:]) // 2)].add(r["split"])  # 2 images per lesion in the fixture
    assert all(len(sides) == 1 for sides in lesions.values())
    for name, total in zip(manifest["classes"], [20, 60, 14, 12, 16, 10, 10]):
        assert abs(manifest["counts"]["test"][name] - 0.3 * total) <= 2


def test_official_and_external_test_modes(tmp_path, datagen, ray_local):
    npz = str(datagen.medmnist(tmp_path / "retinamnist.npz", {"train": 30, "test": 10}))
    official = prepare(npz, str(tmp_path / "official"), PrepareOptions(image_size=16, split="official"))
    assert {s: sum(c.values()) for s, c in official["counts"].items()} == {"train": 30, "test": 10}
    external = prepare(npz, str(tmp_path / "external"), PrepareOptions(image_size=16, split="test"))
    assert list(external["counts"]) == ["test"] and sum(external["counts"]["test"].values()) == 40


def _damage(root: Path) -> list[str]:
    image_dir = root / "ISIC2018_Task3_Training_Input"
    truncated = image_dir / "ISIC_T10000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = image_dir / "ISIC_T50000.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    return [str(truncated), str(garbage)]


def test_corrupt_images_are_listed_and_nothing_is_written(tmp_path, datagen, ray_local):
    root = datagen.isic(tmp_path / "isic")
    bad = _damage(root)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="2 corrupt or unreadable image") as info:
        prepare(str(root), str(out), PrepareOptions(image_size=16))
    assert all(path in str(info.value) for path in bad)
    assert not out.exists() or not any(out.rglob("*"))


def test_skip_corrupt_records_every_skipped_file(tmp_path, datagen, ray_local):
    root = datagen.isic(tmp_path / "isic")
    bad = _damage(root)
    manifest = prepare(str(root), str(tmp_path / "out"), PrepareOptions(image_size=16, skip_corrupt=True))
    assert sorted(s["source"] for s in manifest["skipped"]) == sorted(bad)
    assert all(s["error"] for s in manifest["skipped"])
    _, rows = read_rows(str(tmp_path / "out"))
    assert len(rows) == sum(map(sum, [c.values() for c in manifest["counts"].values()])) == 54 - 2  # 54 images in the fixture
    assert not {"ISIC_T10000", "ISIC_T50000"} & {r["id"] for r in rows}


def test_output_with_data_is_refused_unless_overwrite(tmp_path, datagen, ray_local):
    source = str(datagen.imagefolder(tmp_path / "folder"))
    out = tmp_path / "out"
    first = prepare(source, str(out), PrepareOptions(image_size=16))
    with pytest.raises(DataError, match="already holds a prepared dataset.*--overwrite"):
        prepare(source, str(out), PrepareOptions(image_size=16))
    second = prepare(source, str(out), PrepareOptions(image_size=20, overwrite=True))
    assert second["image_size"] == 20
    shard_files = {str(p.relative_to(out)) for p in out.rglob("*.parquet")}
    assert shard_files == {s["path"] for s in second["shards"]}
    assert not shard_files & {s["path"] for s in first["shards"]}


def test_incomplete_output_is_refused_and_unreadable(tmp_path, datagen, ray_local):
    from proco_ray.data.manifest import read_manifest

    source = str(datagen.imagefolder(tmp_path / "folder"))
    out = tmp_path / "out"
    prepare(source, str(out), PrepareOptions(image_size=16))
    (out / "manifest.json").unlink()  # as if the run had died before its last step
    with pytest.raises(DataError, match="no manifest.json at .*was it prepared with proco-ray prepare"):
        read_manifest(str(out))
    with pytest.raises(DataError, match="incomplete or foreign run"):
        prepare(source, str(out), PrepareOptions(image_size=16))


def test_wrong_credentials_fail_fast(tmp_path, datagen, s3_env, monkeypatch, ray_local):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    started = time.monotonic()
    with pytest.raises(StorageError, match="access denied"):
        prepare(str(datagen.imagefolder(tmp_path / "folder")), "s3://proco/denied", PrepareOptions(image_size=16))
    assert time.monotonic() - started < 10


def test_cli_reports_errors_and_jobs_scripts_run(tmp_path, datagen, capsys):
    root = datagen.aptos(tmp_path / "aptos")
    (root / "train_images" / "orphan.png").write_bytes(datagen.image_bytes(0, 1, fmt="PNG"))
    assert main(["prepare", "--format", "aptos2019", str(root), str(tmp_path / "out")]) == 1
    assert "orphan.png" in capsys.readouterr().err
    for script in ("jobs/prepare_isic.py", "jobs/prepare_aptos.py"):
        shown = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and "--skip-corrupt" in shown.stdout


def test_prepare_real_isic_into_s3(shared_data, s3_env, ray_local):
    """The 5,984 real ISIC images at 32 px into the S3 server (about 15 s): counts match the published ones."""
    out = "s3://proco/isic2018-32"
    manifest = prepare(str(shared_data / "isic2018"), out, PrepareOptions(image_size=32, overwrite=True))
    totals = Counter()
    for counts in manifest["counts"].values():
        totals.update(counts)
    assert dict(totals) == {"MEL": 491, "NV": 4323, "BCC": 264, "AKIEC": 183, "BKL": 583, "DF": 60, "VASC": 80}
    assert manifest["split"]["grouped_by"] == "HAM10000_metadata.csv"
    _, rows = read_rows(out)
    assert len(rows) == 5984 and manifest["counts"] == counts_of(rows, manifest["classes"])


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_output_overlapping_the_source_is_refused_and_the_source_kept(tmp_path, datagen, where):
    """Issue 11.1: `prepare SRC SRC --overwrite` deleted the whole source dataset and exited 0."""
    source = datagen.imagefolder(tmp_path / "data" / "folder")
    before = _snapshot(tmp_path / "data")
    output = {"same": source, "inside": source / "prepared", "around": tmp_path / "data"}[where]
    with pytest.raises(DataError, match="overlaps the input"):
        prepare(str(source), str(output), PrepareOptions(image_size=16, overwrite=True))
    assert _snapshot(tmp_path / "data") == before
    assert main(["prepare", str(source), str(output), "--overwrite"]) == 1


def test_overwrite_never_deletes_what_prepare_did_not_write(tmp_path, datagen):
    source = str(datagen.imagefolder(tmp_path / "folder"))
    foreign = tmp_path / "mine"
    (foreign / "notes").mkdir(parents=True)
    (foreign / "notes" / "thesis.tex").write_text("months of work")
    with pytest.raises(DataError, match="did not write .*--overwrite only replaces a previous prepare's output"):
        prepare(source, str(foreign), PrepareOptions(image_size=16, overwrite=True))
    assert (foreign / "notes" / "thesis.tex").read_text() == "months of work"


def test_overwrite_replaces_an_interrupted_prepare(tmp_path, datagen, ray_local):
    source = str(datagen.imagefolder(tmp_path / "folder"))
    out = tmp_path / "out"
    prepare(source, str(out), PrepareOptions(image_size=16))
    (out / "manifest.json").unlink()  # died before its last step: the marker still says whose folder it is
    manifest = prepare(source, str(out), PrepareOptions(image_size=16, overwrite=True))
    assert (out / "manifest.json").is_file() and manifest["image_size"] == 16


def test_shard_writes_to_a_vanished_server_fail_in_bounded_time(ray_local):
    """Ray Data's own write retries (10 attempts, backoff to 32 s) are off: the S3 client's bounded ones decide."""
    import ray

    from proco_ray.data.prepare import write_split
    from proco_ray.storage.s3 import S3Settings, s3_filesystem, storage_errors
    from proco_ray.storage.seaweedfs import free_port

    rows = [{"image": b"x" * 64, "label": 0, "id": str(i), "split": "train", "error": ""} for i in range(20)]
    processed = ray.data.from_items(rows).materialize()
    gone = s3_filesystem(S3Settings(f"http://127.0.0.1:{free_port()}", "a", "b", max_attempts=2))
    started = time.monotonic()
    with pytest.raises(StorageError, match="storage error at s3://proco/out: cannot connect"), storage_errors("s3://proco/out"):
        write_split(processed, "train", gone, "proco/out", shard_mb=1)
    assert time.monotonic() - started < 120  # seconds on an idle machine; over 300 with Ray Data's retries


def test_storage_timeouts_come_from_the_environment(tmp_path):
    from proco_ray.storage.s3 import aws_settings

    settings = aws_settings(
        {"PROCO_S3_CONNECT_TIMEOUT_S": "1.5", "PROCO_S3_REQUEST_TIMEOUT_S": "7", "AWS_MAX_ATTEMPTS": "2"}, tmp_path
    )
    assert (settings.connect_timeout_s, settings.request_timeout_s, settings.max_attempts) == (1.5, 7.0, 2)
    with pytest.raises(StorageError, match="AWS_MAX_ATTEMPTS must be a positive int, got 'many'"):
        aws_settings({"AWS_MAX_ATTEMPTS": "many"}, tmp_path)


def test_official_val_held_out_as_test_with_val_carved_from_train():
    from proco_ray.data.splits import make_split

    labels = [0] * 60 + [1] * 20 + [0] * 10 + [1] * 5
    official = ["train"] * 80 + ["val"] * 15
    kwargs = dict(seed=0, test_fraction=0.3, val_fraction=0.25)
    splits = make_split("official-val-as-test", labels, None, official, **kwargs)
    assert splits[80:] == ["test"] * 15
    carved = Counter(labels[i] for i in range(80) if splits[i] == "val")
    assert carved == {0: 15, 1: 5} and splits == make_split("official-val-as-test", labels, None, official, **kwargs)
    with pytest.raises(DataError, match="needs exactly train and val"):
        make_split("official-val-as-test", labels, None, ["train"] * 80 + ["test"] * 15, **kwargs)


def test_isic_body_sites_reach_the_shards_the_batches_and_mtl(tmp_path, datagen, ray_local):
    """HAM10000's `localization` travels: metadata -> shards and manifest -> Ray Data and local batches -> MTL."""
    from proco_ray.config import ConfigError, load_config
    from proco_ray.data.manifest import check_manifest, read_manifest
    from proco_ray.data.pipeline import build_dataset
    from proco_ray.data.sources import HAM10000_LOCATIONS
    from proco_ray.data.train_input import TrainInput
    from proco_ray.engine.feeds import local_feed
    from proco_ray.engine.loop import WorkerEnv, train_worker

    source = datagen.isic(tmp_path / "isic")
    out = str(tmp_path / "out")
    prepare(str(source), out, PrepareOptions(image_size=16))
    manifest, rows = read_rows(out)
    assert manifest["locations"] == list(HAM10000_LOCATIONS) and "location" in manifest["columns"]
    site = lambda image_id: ("back", "face", "unknown", "lower extremity")[int(image_id[-4:]) % 4]  # noqa: E731
    expected = {r["id"]: -1 if site(r["id"]) == "unknown" else HAM10000_LOCATIONS.index(site(r["id"])) for r in rows}
    assert {r["id"]: r["location"] for r in rows} == expected

    ds = build_dataset(out, "train", train=True, with_ids=True)
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy"):
        assert [expected[i] for i in batch["id"]] == batch["location"].tolist()

    overrides = ["data.image_size=16", "data.batch_size=8", "data.num_classes=7", "optim.epochs=1", "method.name=mtl"]
    config = load_config(Path(__file__).parent / "tiny.yaml", overrides + [f"data.uri={out}"])
    feed = local_feed(out, config, workers=0)
    batch = next(iter(feed.train_batches(TrainInput(INSTANCE_BALANCED, "supervised", 1), 0)))
    assert set(batch) == {"image", "label", "location"} and batch["location"].shape == batch["label"].shape
    metrics = train_worker(config, feed, WorkerEnv(print_progress=False))
    assert metrics["train/location_ce"] > 0 and 0.0 <= metrics["val/macro_f1"] <= 1.0

    npz = str(datagen.medmnist(tmp_path / "retinamnist.npz", {"train": 30, "val": 10}))
    prepare(npz, str(tmp_path / "retina"), PrepareOptions(image_size=16))
    with pytest.raises(ConfigError, match="method mtl needs the body site"):
        check_manifest(load_config(None, ["method.name=mtl"]), read_manifest(str(tmp_path / "retina")))


def test_in_a_terminal_prepare_draws_a_bar_and_ends_with_a_short_summary(tmp_path, datagen):
    """Issue 39: minutes of silence behind Ray's warnings, then a 35-line JSON dump."""
    source = datagen.imagefolder(tmp_path / "folder", {"common": 40, "rare": 12, "scarce": 8})
    status, output = run_in_terminal(["prepare", str(source), str(tmp_path / "out"), "--image-size", "16"], timeout=180)
    lines = screen_lines(output)
    assert status == 0, output
    assert any("encoding images" in line and "100%" in line and "60/60" in line for line in lines), output
    assert not [line for line in lines if any(noise in line for noise in RAY_NOISE)], output
    assert len(lines) <= 40 and [line for line in lines if line.startswith("prepared 60 images into 3 shards")], output
    assert lines[-1].startswith(f"dataset: {tmp_path / 'out'}") and "| train | 37 |" in output, output


def test_prepare_json_prints_the_manifest(tmp_path, datagen, ray_local, capsys):
    source = datagen.imagefolder(tmp_path / "folder", {"common": 12, "rare": 6})
    assert main(["prepare", str(source), str(tmp_path / "out"), "--image-size", "16", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "out" / "manifest.json").read_text())
