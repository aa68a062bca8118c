"""`proco-ray evaluate`: a checkpoint on any prepared dataset with the same classes."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from proco_ray.checkpoint import CheckpointError, load_checkpoint
from proco_ray.cluster import connect_or_start_ray
from proco_ray.config import config_from_dict
from proco_ray.methods import build_method
from proco_ray.pipeline import build_dataset, read_manifest
from proco_ray.report import markdown_table, per_class_rows, plot_confusion_matrix, write_csv
from proco_ray.storage import is_s3, resolve
from proco_ray.train_loop import evaluate


@contextlib.contextmanager
def local_checkpoint(uri: str) -> Iterator[Path]:
    """A local directory holding the checkpoint at `uri` (downloaded first when it is on S3)."""
    if not is_s3(uri):
        yield Path(uri)
        return
    import ray.train

    fs, path = resolve(uri)
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as directory:
        yield Path(directory)


def evaluate_checkpoint(checkpoint_uri: str, data_uri: str, split: str = "test", batch_size: int = 256) -> dict[str, Any]:
    """Metrics of a checkpoint on one split of a prepared dataset."""
    manifest = read_manifest(data_uri)
    with local_checkpoint(checkpoint_uri) as directory:
        state = load_checkpoint(directory)
    if list(state["class_names"]) != manifest.classes:
        raise CheckpointError(
            f"the checkpoint was trained on classes {list(state['class_names'])}, the dataset at {data_uri} has "
            f"{manifest.classes}"
        )
    config = config_from_dict(state["config"])
    method = build_method(config.method, config.model, manifest.num_classes, [1] * manifest.num_classes)
    model = method.build_model()
    model.load_state_dict(state["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    method.to(device)
    dataset = build_dataset(data_uri, split, image_size=config.data.image_size, train=False)
    metrics = evaluate(model, method, dataset.iter_torch_batches(batch_size=batch_size), device, manifest.classes)
    return {"checkpoint": checkpoint_uri, "data": data_uri, "split": split, "epoch": state["epoch"], **metrics}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (local or s3://)")
    parser.add_argument("--data", required=True, help="prepared dataset URI (local or s3://)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", default="eval", help="folder for the confusion-matrix PNG and the per-class tables")
    parser.add_argument("--batch-size", type=int, default=256)


def run(args: argparse.Namespace) -> int:
    connect_or_start_ray()
    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = per_class_rows(metrics)
    plot_confusion_matrix(
        metrics["confusion_matrix"], metrics["class_names"], out / "confusion_matrix.png", f"{args.split} split"
    )
    write_csv(rows, out / "per_class.csv")
    (out / "per_class.md").write_text(markdown_table(rows))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'confusion_matrix.png'}, {out / 'per_class.csv'}, {out / 'per_class.md'}")
    return 0
