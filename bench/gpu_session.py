"""The Ray path on one GPU: Ray Train runs with uint8 batches and views made on the device, then a short sweep.

Called by bench/gpu_session.sh after the step benchmark; every run stops at the budget's deadline. On a
generated long-tailed image set prepared here (no download; throughput does not depend on the images):

1. resnet18, ProCo at 64 px, 1 worker on the GPU (its process group cpu:gloo,cuda:nccl), bfloat16;
2. resnet50, ProCo at 224 px, likewise;
3. 2 workers sharing the GPU (train.gpus_per_worker=0.5) over gloo: the queue and the recalibration state
   synchronised across ranks on CUDA tensors;
4. `proco-ray tune` with 4 trials of a quarter GPU each.

Writes OUT/ray_runs.json and prints a table: images/s and data-wait share of each run's last epoch.
With --device cpu the same runs go through at toy sizes (the dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def prepare_generated(root: Path, size: int, head: int) -> str:
    """A 7-class long-tailed ImageFolder (imbalance 50) at `size` px, prepared as JPEG shards into root."""
    from proco_ray.data.prepare import PrepareOptions, prepare
    from proco_ray.data.synthetic import long_tailed_counts, write_image_folder

    folder = root / f"images-{size}"
    write_image_folder(folder, long_tailed_counts(7, head=head, imbalance=50), image_size=size)
    prepare(str(folder), str(root / f"prepared-{size}"), PrepareOptions(image_size=size))
    return str(root / f"prepared-{size}")


def train_run(name: str, overrides: list[str], storage: Path) -> dict:
    """One `proco-ray train` on the running Ray; the last epoch's throughput and data wait."""
    from proco_ray.config import load_config
    from proco_ray.launch.trainer import fit
    from proco_ray.metric_keys import DATA_WAIT_SHARE, EPOCH, IMAGES_PER_S, VAL_MACRO_F1

    config = load_config("gpu-64px", [*overrides, f"train.name={name}", f"train.storage_path={storage}"])
    started = time.perf_counter()
    result = fit(config)
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    return {
        "images_per_s": metrics.get(IMAGES_PER_S),
        "data_wait_share": metrics.get(DATA_WAIT_SHARE),
        "val_macro_f1": metrics.get(VAL_MACRO_F1),
        "epochs": metrics.get(EPOCH),
        "wall_s": time.perf_counter() - started,
    }


def tune_run(data: str, overrides: list[str], storage: Path) -> dict:
    """`proco-ray tune`: 2 variants x 2 seeds, each trial a quarter of the GPU, as many at once as fit."""
    from proco_ray.cli import main as cli

    experiment = storage / "fractional.yaml"
    experiment.write_text(
        "name: fractional\nbase: gpu-64px\nvariants:\n  proco: {method.name: proco}\n  ce: {method.name: ce}\n"
        "seeds: [0, 1]\nmetric: val/macro_f1\nmode: max\nasha: null\n"
    )
    started = time.perf_counter()
    code = cli(
        ["tune", "--experiment", str(experiment), "--data", data, "--name", "fractional", "--storage", str(storage), *overrides]
    )
    return {"exit_code": code, "wall_s": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--deadline", type=float, required=True, help="time.time() by which every run must have ended")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import ray

    gpu = args.device == "cuda"
    # a GPU machine's cores; the dry run on a small CPU machine oversubscribes its cores to place the same runs
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 16), include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # the dry run: the same runs on the CPU at toy sizes
    small, large, head = (64, 224, 1500) if gpu else (16, 32, 60)
    scale = [] if gpu else ["model.arch=resnet18", "model.small_input=true", "data.batch_size=16", "method.queue_size=64"]
    device = ["train.use_gpu=true", "optim.amp=true"] if gpu else ["train.use_gpu=false", "optim.amp=false"]
    common = [
        *device,
        *scale,
        "data.num_classes=7",
        "optim.warmup_epochs=0",
        "train.cpus_per_worker=2",
        "train.log_every_steps=0",
    ]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-session-") as tmp:
        root = Path(tmp)
        data_small = prepare_generated(root, small, head)
        data_large = prepare_generated(root, large, head // 2)
        runs = {
            f"resnet18-{small}px-1gpu": (data_small, ["optim.epochs=3", "data.batch_size=128"] if gpu else ["optim.epochs=2"]),
            f"resnet50-{large}px-1gpu": (
                data_large,
                ["optim.epochs=2", "model.arch=resnet50", f"data.image_size={large}", "data.batch_size=128"]
                if gpu
                else ["optim.epochs=1", f"data.image_size={large}"],
            ),
            f"resnet18-{small}px-2workers-shared-gloo": (
                data_small,
                ["optim.epochs=2", "train.num_workers=2", "train.dist_backend=gloo"]
                + (["train.gpus_per_worker=0.5", "data.batch_size=128"] if gpu else []),
            ),
        }
        for name, (data, overrides) in runs.items():
            if time.time() > args.deadline - 30:
                results[name] = {"skipped": "no time left"}
                continue
            try:
                results[name] = train_run(name, [*common, f"data.uri={data}", f"data.image_size={small}", *overrides], root)
            except Exception:  # noqa: BLE001 - a failed run is recorded, the session goes on
                results[name] = {"error": traceback.format_exc(limit=3).strip().splitlines()[-1]}
            print(name, json.dumps(results[name]), flush=True)
        if time.time() < args.deadline - 60:
            fraction = ["train.gpus_per_worker=0.25", "train.cpus_per_worker=1"] if gpu else ["train.cpus_per_worker=1"]
            tune_overrides = [*common, *fraction, "optim.epochs=1", f"data.image_size={small}"]
            try:
                results["tune-4-trials-quarter-gpu"] = tune_run(data_small, tune_overrides, root)
            except Exception:  # noqa: BLE001
                results["tune-4-trials-quarter-gpu"] = {"error": traceback.format_exc(limit=3).strip().splitlines()[-1]}
    (args.out / "ray_runs.json").write_text(json.dumps(results, indent=2) + "\n")
    print("| run | img/s (last epoch) | data-wait share | wall s | outcome |\n| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        rate, wait = r.get("images_per_s"), r.get("data_wait_share")
        outcome = r.get("error") or r.get("skipped") or (f"exit {r['exit_code']}" if "exit_code" in r else "ok")
        numbers = f"{rate:.0f} | {wait:.1%}" if rate is not None else "– | –"
        print(f"| {name} | {numbers} | {r.get('wall_s', 0):.0f} | {outcome} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
