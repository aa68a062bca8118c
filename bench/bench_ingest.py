"""What Ray Data delivers to a training worker: uint8 images (this project) vs. CPU-augmented float32 views (before).

Both sides read the same shards of the real ISIC 2018 sample, prepared once at each size into the local
SeaweedFS S3 server, through `build_dataset` on the same local Ray with the same CPUs, and hand batches
of 128 to a consumer that only counts them:

* new: the stored images as prepare stores them by default (raw pixels up to 64 px, JPEG above), decoded in
  Ray Data tasks where JPEG, delivered as uint8 [B, H, W, 3] (the worker then makes the views on its
  device); at 64 px the JPEG shards are measured too;
* baseline: the path this project had before, two MoCo v2 views per image made with torchvision's PIL
  transforms in Ray Data tasks and shipped as normalised float32 [B, 3, H, W] each.

Per side: images/s at the consumer (median of the epochs after the first, which alternate between the
sides), CPU milliseconds per image (user + system time of this process and every process under it: Ray's
workers, raylet, GCS), and bytes per image of the batches the object store carries to the consumer.
Then the batched view-making of `proco_ray.data.augment` on its own: two views of each uint8 image of
a batch, images/s on one CPU thread (and on `--device cuda` when there is one).

    python bench/bench_ingest.py --sizes 64 224 [--epochs 3] [--cpus 2] [--json OUT.json] [--write-doc]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "isic2018"
BATCH = 128


class PILGaussianBlur:
    """MoCo v2's blur as the baseline had it: PIL's Gaussian filter, sigma uniform in [0.1, 2.0]."""

    def __call__(self, image):
        import random

        from PIL import ImageFilter

        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def baseline_two_views(batch: dict[str, np.ndarray], *, size: int) -> dict[str, np.ndarray]:
    """The former Ray Data task: per image, two MoCo v2 views with torchvision's PIL transforms, each batch
    normalised to float32 [B, 3, H, W]."""
    import torchvision.transforms as T
    from PIL import Image

    from proco_ray.data.augment import IMAGENET_MEAN, IMAGENET_STD

    view = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PILGaussianBlur()], p=0.5),
            T.RandomHorizontalFlip(),
        ]
    )
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)

    def normalised(images) -> np.ndarray:
        pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 255
        return np.ascontiguousarray(((pixels - mean) / std).transpose(0, 3, 1, 2))

    images = [Image.fromarray(pixels) for pixels in batch["image"]]
    views = {"view_q": normalised([view(image) for image in images]), "view_k": normalised([view(image) for image in images])}
    return {**views, **{k: batch[k] for k in ("label", "location") if k in batch}}


def process_tree_cpu_s() -> float:
    """User + system CPU seconds of this process and all its descendants (Ray's workers, raylet, GCS)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def epoch(dataset) -> dict[str, float]:
    """One epoch to a counting consumer: images/s, CPU ms per image, bytes per image delivered."""
    images, nbytes = 0, 0
    cpu, started = process_tree_cpu_s(), time.perf_counter()
    for batch in dataset.iter_torch_batches(batch_size=BATCH, drop_last=True):
        images += len(batch["label"])
        nbytes += sum(t.numel() * t.element_size() for t in batch.values())
    elapsed = time.perf_counter() - started
    return {"img_per_s": images / elapsed, "cpu_ms": (process_tree_cpu_s() - cpu) * 1000 / images, "bytes": nbytes / images}


def measure(sides: dict, epochs: int) -> dict[str, list[dict[str, float]]]:
    """Epoch 1 of each side (cold), then the sides alternate so that they see the same machine load."""
    runs = {name: [epoch(ds)] for name, ds in sides.items()}
    names = list(sides)
    for round_ in range(epochs - 1):
        for name in names if round_ % 2 else reversed(names):
            runs[name].append(epoch(sides[name]))
    return runs


def steady(values: list[dict[str, float]], key: str) -> float:
    """Median over the warm epochs."""
    return statistics.median(v[key] for v in (values[1:] or values))


def augment_rate(size: int, device: str, seconds: float = 3.0) -> dict[str, float]:
    """Two views of each uint8 image of a batch of 128, images/s (one thread on the CPU)."""
    import torch

    from proco_ray.data.augment import make_views, view_generator

    if device == "cpu":
        torch.set_num_threads(1)
    images = torch.randint(0, 256, (BATCH, size, size, 3), dtype=torch.uint8, device=device)
    generator = view_generator(torch.device(device), 0)
    out = {}
    for augmentation in ("moco_v2", "supervised"):
        make_views(images, augmentation, size, 2, generator)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            make_views(images, augmentation, size, 2, generator)
            count += BATCH
        if device != "cpu":
            torch.cuda.synchronize()
        out[augmentation] = count / (time.perf_counter() - started)
    return out


def run_size(source: str, endpoint_bucket: str, size: int, args) -> dict:
    import ray

    from proco_ray.data.pipeline import build_dataset
    from proco_ray.data.prepare import PrepareOptions, prepare, resolve_encoding

    encoding = resolve_encoding("auto", size)
    uris = {name: f"s3://{endpoint_bucket}/isic2018-{size}-{name}" for name in dict.fromkeys(["jpeg", encoding])}
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for name, uri in uris.items():
            prepare(source, uri, PrepareOptions(image_size=size, encoding=name))
        jpeg = build_dataset(uris["jpeg"], "train", train=True)
        sides = {"new": build_dataset(uris[encoding], "train", train=True)}
        if encoding != "jpeg":
            sides["jpeg"] = jpeg
        sides["baseline"] = jpeg.map_batches(baseline_two_views, batch_size=64, fn_kwargs=dict(size=size))
        runs = measure(sides, args.epochs)
    finally:
        ray.shutdown()
    result = {
        "encoding": encoding,
        "ray_data_img_per_s": steady(runs["new"], "img_per_s"),
        "baseline_img_per_s": steady(runs["baseline"], "img_per_s"),
        "cpu_ms_per_image": {side: steady(runs[side], "cpu_ms") for side in runs},
        "object_store_bytes_per_image": {side: steady(runs[side], "bytes") for side in runs},
        "epochs_img_per_s": {side: [round(r["img_per_s"]) for r in runs[side]] for side in runs},
        "augment_img_per_s_per_cpu_thread": augment_rate(size, "cpu"),
    }
    if "jpeg" in runs:
        result["ray_data_jpeg_img_per_s"] = steady(runs["jpeg"], "img_per_s")
    if args.device != "cpu":
        result[f"augment_img_per_s_{args.device}"] = augment_rate(size, args.device)
    return result


def render(results: dict[str, dict]) -> str:
    lines = [
        "| size | new: stored as | new: uint8 img/s | baseline: PIL views img/s | speed-up | JPEG shards, uint8: img/s "
        "| CPU ms/img new / baseline | bytes/img new / baseline | bytes ratio | views on 1 CPU thread: moco_v2 / supervised img/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, r in results.items():
        cpu, size_b, aug = r["cpu_ms_per_image"], r["object_store_bytes_per_image"], r["augment_img_per_s_per_cpu_thread"]
        jpeg = r.get("ray_data_jpeg_img_per_s", r["ray_data_img_per_s"])
        lines.append(
            f"| {size} px | {r['encoding']} | {r['ray_data_img_per_s']:.0f} | {r['baseline_img_per_s']:.0f} "
            f"| {r['ray_data_img_per_s'] / r['baseline_img_per_s']:.1f}x | {jpeg:.0f} ({jpeg / r['baseline_img_per_s']:.1f}x) "
            f"| {cpu['new']:.2f} / {cpu['baseline']:.2f} | {size_b['new']:,.0f} / {size_b['baseline']:,.0f} "
            f"| {size_b['baseline'] / size_b['new']:.2f}x | {aug['moco_v2']:.0f} / {aug['supervised']:.0f} |"
        )
    lines.append("")
    for size, r in results.items():
        lines.append(
            f"- {size} px, img/s per epoch (epoch 1 cold): " + "; ".join(f"{k} {v}" for k, v in r["epochs_img_per_s"].items())
        )
    return "\n".join(lines)


def document(table: str, args) -> str:
    command = f"python bench/bench_ingest.py --sizes {' '.join(map(str, args.sizes))} --epochs {args.epochs} --cpus {args.cpus} --json OUT.json"
    load = os.getloadavg()
    return f"""# Ingest benchmark: uint8 images to the device vs. CPU-augmented float32 views

{(__doc__ or "").split(chr(10), 2)[2].split("    python bench")[0].strip()}

Machine: {os.cpu_count()} cores, no GPU, {platform.platform()}, Python {platform.python_version()}.
Load average when written: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.

Command:

    {command}

{table}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="ISIC 2018 folder (Task 3 layout)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="also time the view-making on this device, e.g. cuda")
    parser.add_argument("--json", type=Path, help="write the results as one JSON object keyed by image size")
    parser.add_argument("--write-doc", action="store_true", help="write the table to docs/benchmarks-ingest.md")
    args = parser.parse_args()
    if not Path(args.source).is_dir():
        print(f"no ISIC 2018 folder at {args.source} (pass --source)", file=sys.stderr)
        return 2

    from proco_ray.storage.seaweedfs import LocalS3Server

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, LocalS3Server(Path(tmp) / "s3") as endpoint:
        os.environ.update(endpoint.env())
        for size in args.sizes:
            results[str(size)] = run_size(args.source, endpoint.bucket, size, args)
            print(f"size {size}: {json.dumps(results[str(size)])}", file=sys.stderr)
    table = render(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.write_doc:
        (REPO / "docs" / "benchmarks-ingest.md").write_text(document(table, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
