"""A checkpoint's metrics on a split of a prepared dataset, and the evaluation folder they are written to."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proco_ray.data.augment import eval_view
from proco_ray.data.manifest import read_manifest
from proco_ray.data.pipeline import build_dataset
from proco_ray.engine.checkpoint import CheckpointError
from proco_ray.evaluation.report import markdown_table, per_class_rows, plot_confusion_matrix, plot_reliability, write_csv
from proco_ray.metrics import (
    calibration_error_of_bins,
    confusion_matrix,
    fit_temperature,
    metrics_from_confusion,
    reliability_bins,
    roc_auc_one_vs_rest,
)
from proco_ray.progress import Progress, progress
from proco_ray.runs import best_checkpoint, read_checkpoint, restore_model
from proco_ray.storage.s3 import ClaimedOutput, claim_output, join, output_marker, resolve, write_bytes


@torch.no_grad()
def split_logits(
    model: torch.nn.Module, method: Any, dataset: Any, device: torch.device, batch_size: int, image_size: int, shown: Progress
) -> tuple[np.ndarray, np.ndarray]:
    """The method's test-time logits (of the evaluation view) and the labels of every image of a split."""
    model.eval()
    logits, labels = [], []
    for batch in dataset.iter_torch_batches(batch_size=batch_size, device=device):
        logits.append(method.predict(model, eval_view(batch["image"], image_size)).float().cpu())
        labels.append(batch["label"].cpu())
        shown.update(len(labels[-1]))
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
        with progress(f"evaluating the {name} split", manifest.num_rows(name)) as shown:
            return split_logits(model, method, dataset, device, batch_size, image_size, shown)

    logits, labels = logits_of(split)
    metrics = metrics_from_confusion(confusion_matrix(labels, logits.argmax(axis=1), manifest.num_classes), manifest.classes)
    metrics.update(probability_metrics(logits, labels, manifest.classes))
    if calibrate_on is not None:
        temperature = fit_temperature(*logits_of(calibrate_on))
        calibrated = calibration(logits, labels, temperature)
        metrics.update(temperature=temperature, calibrated_on=calibrate_on, ece_calibrated=calibrated["ece"])
        metrics["reliability_calibrated"] = calibrated["reliability"]
    return {"checkpoint": checkpoint_uri, "data": data_uri, "split": split, "epoch": state["epoch"], **metrics}


def claim_evaluation_output(out_uri: str, overwrite: bool) -> ClaimedOutput:
    """Refuse an output holding files unless --overwrite and they are an earlier evaluate's own."""
    marker = join(resolve(out_uri)[1], output_marker("evaluate"))
    return claim_output(out_uri, overwrite, "evaluate", lambda names: "an earlier evaluation" if marker in names else "files")


def write_evaluation(metrics: dict[str, Any], output: ClaimedOutput, title: str) -> list[str]:
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
        output.replace_earlier()
        return [write_bytes(join(output.uri, f.name), f.read_bytes()) for f in files]
