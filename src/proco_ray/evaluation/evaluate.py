"""`proco-ray evaluate`: a checkpoint on any prepared dataset with the same classes."""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proco_ray.config import config_from_dict
from proco_ray.data.augment import eval_view
from proco_ray.data.manifest import read_manifest
from proco_ray.data.pipeline import build_dataset
from proco_ray.engine.checkpoint import CHECKPOINT_FILE, CHECKPOINT_HELP, CheckpointError, load_checkpoint
from proco_ray.evaluation.report import markdown_table, per_class_rows, plot_confusion_matrix, plot_reliability, write_csv
from proco_ray.launch.cluster import connect_or_start_ray
from proco_ray.method.registry import create_method
from proco_ray.metrics import (
    calibration_error_of_bins,
    confusion_matrix,
    fit_temperature,
    metrics_from_confusion,
    reliability_bins,
    roc_auc_one_vs_rest,
)
from proco_ray.storage.s3 import claim_output, is_s3, join, read_bytes, resolve, storage_errors, write_bytes


def best_checkpoint(uri: str) -> str:
    """The checkpoint `uri` names: itself when it holds checkpoint.pt, else, for a run folder, the checkpoint
    summary.json calls best, or the best of those Ray Train registered (highest validation score).

    Checkpoints are looked up by name inside `uri`, so a run folder that was moved or copied still works.
    """
    from proco_ray.launch.ray_compat import RAY_TRAIN_SNAPSHOT, parse_train_snapshot
    from proco_ray.metric_keys import CHECKPOINT_SCORE

    uri = uri.rstrip("/")
    with storage_errors(uri):
        if read_bytes(join(uri, CHECKPOINT_FILE)) is not None:
            return uri
        summary = read_bytes(join(uri, "summary.json"))
        snapshot = read_bytes(join(uri, RAY_TRAIN_SNAPSHOT))
    candidates: list[str] = []
    if summary is not None and json.loads(summary).get("best_checkpoint"):
        candidates.append(json.loads(summary)["best_checkpoint"].rstrip("/").rsplit("/", 1)[-1])
    if snapshot is not None:
        registered = [c for c in parse_train_snapshot(snapshot).kept if c.dir_name]
        registered.sort(key=lambda c: c.metrics.get(CHECKPOINT_SCORE, float("-inf")), reverse=True)
        candidates += [c.dir_name for c in registered]
    for name in candidates:
        if read_bytes(join(uri, name, CHECKPOINT_FILE)) is not None:
            return join(uri, name)
    if summary is None and snapshot is None:
        raise CheckpointError(
            f"no {CHECKPOINT_FILE} in {uri}, and it is not a run folder (it has no summary.json or {RAY_TRAIN_SNAPSHOT})"
        )
    raise CheckpointError(f"run folder {uri} holds no checkpoint: none of {candidates or 'its registered checkpoints'} is there")


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


def read_checkpoint(uri: str) -> dict[str, Any]:
    """A checkpoint's state (local or s3://), checked by load_checkpoint."""
    with local_checkpoint(uri) as directory:
        return load_checkpoint(directory)


def restore_model(state: dict[str, Any], device: torch.device | None = None) -> tuple[Any, torch.nn.Module, torch.device]:
    """(method, network with the checkpoint's weights, device) ready for inference on `device` (default: CUDA
    when there is one)."""
    config = config_from_dict(state["config"])
    classes = len(state["class_names"])
    method = create_method(config.method, config.model, classes, [1] * classes)
    model = method.build_model()
    model.load_state_dict(state["model"])
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    method.to(device)
    return method, model, device


TEMPERATURE_FILE = "temperature.json"  # written beside checkpoint.pt by `evaluate --calibrate`, read by `predict --calibrated`


def saved_temperature(checkpoint_uri: str) -> float | None:
    """The temperature `evaluate --calibrate` saved beside the checkpoint, or None when it was never fitted."""
    with storage_errors(checkpoint_uri):
        saved = read_bytes(join(checkpoint_uri, TEMPERATURE_FILE))
    return None if saved is None else float(json.loads(saved)["temperature"])


@torch.no_grad()
def split_logits(
    model: torch.nn.Module, method: Any, dataset: Any, device: torch.device, batch_size: int, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The method's test-time logits (of the evaluation view) and the labels of every image of a split."""
    model.eval()
    logits, labels = [], []
    for batch in dataset.iter_torch_batches(batch_size=batch_size, device=device):
        logits.append(method.predict(model, eval_view(batch["image"], image_size)).float().cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def calibration(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict[str, Any]:
    """ECE and the reliability bins of softmax(logits / T)."""
    probs = torch.softmax(torch.as_tensor(logits) / temperature, dim=1).numpy()
    bins = reliability_bins(probs, labels)
    return {"ece": calibration_error_of_bins(bins), "reliability": bins}


def probability_metrics(logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """One-vs-rest ROC-AUC per class and macro (of the softmax; a temperature would not change it), ECE and
    the reliability bins."""
    aucs = roc_auc_one_vs_rest(torch.softmax(torch.as_tensor(logits), dim=1).numpy(), labels)
    return {
        "roc_auc": {name: float(a) for name, a in zip(class_names, aucs)},
        "macro_roc_auc": float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan"),
        **calibration(logits, labels),
    }


def evaluate_checkpoint(
    checkpoint_uri: str, data_uri: str, split: str = "test", batch_size: int = 256, calibrate_on: str | None = None
) -> dict[str, Any]:
    """Metrics of a checkpoint on one split of a prepared dataset; with `calibrate_on`, also the temperature
    fitted on that split and the ECE after scaling by it."""
    manifest = read_manifest(data_uri)
    checkpoint_uri = best_checkpoint(checkpoint_uri)
    state = read_checkpoint(checkpoint_uri)
    if list(state["class_names"]) != manifest.classes:
        raise CheckpointError(
            f"the checkpoint was trained on classes {list(state['class_names'])}, the dataset at {data_uri} has "
            f"{manifest.classes}"
        )
    if calibrate_on is not None and calibrate_on not in manifest.splits:
        raise CheckpointError(f"cannot calibrate on split '{calibrate_on}': {data_uri} has {sorted(manifest.splits)}")
    method, model, device = restore_model(state)
    image_size = int(state["config"]["data"]["image_size"])

    def logits_of(name: str) -> tuple[np.ndarray, np.ndarray]:
        dataset = build_dataset(data_uri, name, train=False)
        return split_logits(model, method, dataset, device, batch_size, image_size)

    logits, labels = logits_of(split)
    metrics = metrics_from_confusion(confusion_matrix(labels, logits.argmax(axis=1), manifest.num_classes), manifest.classes)
    metrics.update(probability_metrics(logits, labels, manifest.classes))
    if calibrate_on is not None:
        temperature = fit_temperature(*logits_of(calibrate_on))
        calibrated = calibration(logits, labels, temperature)
        metrics.update(temperature=temperature, calibrated_on=calibrate_on, ece_calibrated=calibrated["ece"])
        metrics["reliability_calibrated"] = calibrated["reliability"]
    return {"checkpoint": checkpoint_uri, "data": data_uri, "split": split, "epoch": state["epoch"], **metrics}


MARKER = ".proco-ray-evaluate"  # marks a folder as evaluate's own: --overwrite replaces only such a folder


def claim_evaluation_output(out_uri: str, overwrite: bool) -> bool:
    """Refuse an output holding files unless --overwrite and they are an earlier evaluate's own; returns whether
    that earlier evaluation is to be replaced."""
    fs, path = resolve(out_uri)

    def describe(names: set[str]) -> str:
        return "an earlier evaluation" if join(path, MARKER) in names else "files"

    return claim_output(fs, path, out_uri, overwrite, "evaluate", [MARKER], describe)


def write_evaluation(metrics: dict[str, Any], out_uri: str, title: str, replace: bool) -> list[str]:
    """metrics.json, the per-class tables, the confusion matrix and the reliability diagram into `out_uri` (local or
    s3://). Everything is drawn before anything is written, so a failure while drawing leaves the output as it was."""
    rows = per_class_rows(metrics)
    with tempfile.TemporaryDirectory(prefix="proco-evaluate-") as staging_dir:
        staging = Path(staging_dir)
        (staging / "per_class.md").write_text(markdown_table(rows))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        files = [
            plot_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"], staging / "confusion_matrix.png", title),
            plot_reliability(metrics["reliability"], staging / "reliability.png", f"{title}, ECE {metrics['ece']:.3f}"),
            write_csv(rows, staging / "per_class.csv"),
            staging / "per_class.md",
            staging / "metrics.json",
        ]
        if replace:
            fs, path = resolve(out_uri)
            with storage_errors(out_uri):
                fs.delete_dir_contents(path, missing_dir_ok=True)
        write_bytes(join(out_uri, MARKER), b"written by proco-ray evaluate; --overwrite may replace this folder\n")
        return [write_bytes(join(out_uri, f.name), f.read_bytes()) for f in files]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--data", required=True, help="prepared dataset URI (local or s3://)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    parser.add_argument(
        "--out", default="eval", help="folder or s3:// prefix for metrics.json, the per-class tables and the plots"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call (default: %(default)s)")
    parser.add_argument(
        "--calibrate",
        nargs="?",
        const="val",
        metavar="SPLIT",
        help="fit temperature scaling on SPLIT (default val), report ECE after it and save it beside the checkpoint "
        f"({TEMPERATURE_FILE}, used by predict --calibrated)",
    )


def run(args: argparse.Namespace) -> int:
    replace = claim_evaluation_output(args.out, args.overwrite)  # an occupied --out fails before the evaluation
    connect_or_start_ray()
    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.calibrate)
    written = write_evaluation(metrics, args.out, f"{args.split} split", replace)
    if args.calibrate:
        temperature = {"temperature": metrics["temperature"], "fitted_on": f"{args.data} {args.calibrate}"}
        written.append(write_bytes(join(metrics["checkpoint"], TEMPERATURE_FILE), json.dumps(temperature, indent=2).encode()))
    print(f"checkpoint: {metrics['checkpoint']} (epoch {metrics['epoch']})")
    print(markdown_table(per_class_rows(metrics)))
    headline = ["accuracy", "macro_f1", "balanced_accuracy", "macro_roc_auc", "ece", "temperature", "ece_calibrated"]
    print(" | ".join(f"{k} {metrics[k]:.4f}" for k in headline if k in metrics))
    print("wrote " + ", ".join(written))
    return 0
