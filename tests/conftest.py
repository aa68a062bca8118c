"""Shared fixtures: one local Ray and one real S3 server (SeaweedFS) per session, and tiny datasets in every layout."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from proco_ray.data.sources import APTOS_CLASSES, ISIC_CLASSES
from proco_ray.storage.seaweedfs import LocalS3Server, S3Endpoint

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def start_local_ray():
    """The tests' local Ray (2 cores here; 4 logical CPUs so Train tests can place 2 workers)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray started once per session."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    yield start_local_ray()
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> S3Endpoint:
    """A real SeaweedFS S3 server on a free 127.0.0.1 port, for the whole session."""
    server = LocalS3Server(tmp_path_factory.mktemp("s3"), port=None)
    endpoint = server.start()
    yield endpoint
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """Point the AWS variables at the session's S3 server for one test."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


# --------------------------------------------------------------------------- tiny datasets


def image_bytes(label: int, index: int, size: int = 16, fmt: str = "JPEG") -> bytes:
    """A small image whose colour depends on the label, with noise so that no two are equal."""
    rng = np.random.default_rng(label * 1000 + index)
    base = np.array([(37 * label) % 256, (91 * label) % 256, (153 * label) % 256], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-40, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


ISIC_COUNTS = [8, 20, 6, 5, 7, 4, 4]  # MEL NV BCC AKIEC BKL DF VASC: long-tailed like the real set


def make_isic(
    root: Path, counts: list[int] = ISIC_COUNTS, val_counts: list[int] | None = None, images_per_lesion: int = 2
) -> Path:
    """ISIC 2018 Task 3 layout; lesions of `images_per_lesion` images each, in HAM10000_metadata.csv."""
    meta = []
    for folder, per_class in (("Training", counts), ("Validation", val_counts)):
        if per_class is None:
            continue
        image_dir = root / f"ISIC2018_Task3_{folder}_Input"
        image_dir.mkdir(parents=True)
        (image_dir / "LICENSE.txt").write_text("not an image")
        rows = []
        for label, count in enumerate(per_class):
            for i in range(count):
                image_id = f"ISIC_{folder[0]}{label}{i:04d}"
                (image_dir / f"{image_id}.jpg").write_bytes(image_bytes(label, i))
                rows.append([image_id] + [f"{float(c == label):.1f}" for c in range(len(ISIC_CLASSES))])
                lesion = f"HAM_{folder[0]}{label}{i // images_per_lesion:04d}"
                site = ("back", "face", "unknown", "lower extremity")[i % 4]
                meta.append([lesion, image_id, ISIC_CLASSES[label].lower(), "histo", 50, "male", site])
        write_csv(root / f"ISIC2018_Task3_{folder}_GroundTruth.csv", ["image", *ISIC_CLASSES], rows)
    header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    write_csv(root / "HAM10000_metadata.csv", header, meta)
    return root


def make_aptos(root: Path, per_class: int = 10) -> Path:
    (root / "train_images").mkdir(parents=True)
    rows = []
    for label in range(len(APTOS_CLASSES)):
        for i in range(per_class):
            code = f"{label:x}{i:03x}abc"
            (root / "train_images" / f"{code}.png").write_bytes(image_bytes(label, i, fmt="PNG"))
            rows.append([code, label])
    write_csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    return root


def make_medmnist(path: Path, splits: dict[str, int] | None = None, classes: int = 5, channels: int = 3) -> Path:
    """A MedMNIST-style npz; every split holds every class."""
    splits = splits or {"train": 40, "val": 10, "test": 10}
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in splits.items():
        shape = (n, 16, 16, 3) if channels == 3 else (n, 16, 16)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).reshape(n, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def make_imagefolder(root: Path, counts: dict[str, int] | None = None) -> Path:
    counts = counts or {"benign": 9, "malignant": 5, "other": 4}
    for label, (name, count) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            fmt = "PNG" if i % 2 else "JPEG"
            (root / name / f"img{i:03d}.{fmt.lower()}").write_bytes(image_bytes(label, i, fmt=fmt))
    return root


@pytest.fixture(scope="session")
def datagen() -> SimpleNamespace:
    """Builders of tiny datasets in each downloaded layout: isic, aptos, medmnist, imagefolder."""
    return SimpleNamespace(
        isic=make_isic,
        aptos=make_aptos,
        medmnist=make_medmnist,
        imagefolder=make_imagefolder,
        image_bytes=image_bytes,
        write_csv=write_csv,
    )


@pytest.fixture
def shared_data() -> Path:
    """The real sample data beside the project (../shared/data); skips where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (it lives beside the project, not in it)")
    return SHARED_DATA
