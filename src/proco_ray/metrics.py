"""Classification metrics for long-tailed evaluation, in plain numpy.

Defined over a fixed label set ``range(num_classes)`` rather than the labels
that happen to occur, so a class missing from a split or never predicted
still counts (as 0 F1) in the macro average, which is what long-tailed
evaluation needs. Results match scikit-learn called with
``labels=range(num_classes)`` and ``zero_division=0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["classification_metrics", "confusion_matrix", "metrics_from_confusion", "quadratic_weighted_kappa"]


def _as_labels(values: Any, name: str, num_classes: int) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if arr.dtype.kind == "f":
        if not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise ValueError(f"{name} must hold integer class indices, got non-integer values")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise ValueError(f"{name} must be in [0, {num_classes}), got min {lo}")
    if hi >= num_classes:
        raise ValueError(f"{name} must be in [0, {num_classes}), got max {hi}")
    return arr


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def _pair(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray, int]:
    num_classes = _check_num_classes(num_classes)
    t = _as_labels(y_true, "y_true", num_classes)
    p = _as_labels(y_pred, "y_pred", num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}")
    return t, p, num_classes


def _confusion(t: np.ndarray, p: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (scikit-learn's ``zero_division=0``)."""
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _qwk(cm: np.ndarray) -> float:
    """Cohen's kappa with weights (i - j)^2 (Cohen 1968), as in scikit-learn.

    Undefined (0/0) when both raters use a single, common class; like
    scikit-learn we return NaN then.
    """
    cm = cm.astype(np.float64)
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / cm.sum()
    idx = np.arange(cm.shape[0])
    weights = (idx[:, None] - idx[None, :]) ** 2
    denominator = float((weights * expected).sum())
    if denominator == 0:
        return float("nan")
    return float(1.0 - (weights * cm).sum() / denominator)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts; rows are true classes, columns predicted classes."""
    t, p, num_classes = _pair(y_true, y_pred, num_classes)
    return _confusion(t, p, num_classes)


def quadratic_weighted_kappa(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Quadratic weighted kappa over ``range(num_classes)``.

    The weights use the class indices themselves, i.e. scikit-learn's
    ``cohen_kappa_score(..., labels=range(C), weights="quadratic")``; without
    ``labels`` scikit-learn re-indexes the classes present, which changes the
    distances between ordinal grades when a grade is absent.
    """
    t, p, num_classes = _pair(y_true, y_pred, num_classes)
    return _qwk(_confusion(t, p, num_classes))


def classification_metrics(
    y_true: Any,
    y_pred: Any,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, balanced accuracy, per-class P/R/F1, confusion matrix and QWK.

    Macro-F1 averages over all ``num_classes`` (a class with no true and no
    predicted sample scores 0). Balanced accuracy averages recall over the
    classes present in ``y_true`` only, as scikit-learn does. Every value is
    a plain Python int/float/list, ready for JSON or TensorBoard.
    """
    t, p, num_classes = _pair(y_true, y_pred, num_classes)
    return metrics_from_confusion(_confusion(t, p, num_classes), class_names)


def metrics_from_confusion(cm: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The metrics of `classification_metrics` from a (C, C) confusion matrix.

    Data-parallel evaluation sums the workers' confusion matrices and calls this once.
    """
    cm = np.asarray(cm, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 1:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    if cm.sum() == 0:
        raise ValueError("confusion matrix must count at least one sample")
    num_classes = cm.shape[0]
    if class_names is None:
        names = [str(c) for c in range(num_classes)]
    else:
        names = [str(n) for n in class_names]
        if len(names) != num_classes:
            raise ValueError(f"class_names must have {num_classes} entries, got {len(names)}")
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_ratio(tp, predicted)
    recall = _safe_ratio(tp, support)
    f1 = _safe_ratio(2 * tp, support + predicted)

    return {
        "accuracy": float(tp.sum() / cm.sum()),
        "macro_f1": float(f1.mean()),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "f1": [float(v) for v in f1],
        "support": [int(v) for v in support],
        "confusion_matrix": cm.tolist(),
        "qwk": _qwk(cm),
        "class_names": names,
    }


def _probabilities(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with N >= 1 and C >= 2, got {p.shape}")
    y = _as_labels(labels, "labels", p.shape[1])
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"labels has {y.shape[0]} entries, probs has {p.shape[0]} rows")
    return p, y


def roc_auc_one_vs_rest(probs: Any, labels: Any) -> np.ndarray:
    """Per-class ROC-AUC of probs[:, c] for class c against the rest (the ISIC 2018 challenge's AUC).

    The Mann-Whitney statistic with tied scores counted as half, i.e. the area under the ROC curve with
    ties interpolated, as scikit-learn's roc_auc_score; NaN for a class with no positive or no negative.
    """
    p, y = _probabilities(probs, labels)
    aucs = np.full(p.shape[1], np.nan)
    for c in range(p.shape[1]):
        positive = y == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        order = np.argsort(p[:, c], kind="mergesort")
        scores = p[order, c]
        ranks = np.empty(len(scores))
        start = 0
        while start < len(scores):  # average ranks over runs of tied scores
            end = start
            while end + 1 < len(scores) and scores[end + 1] == scores[start]:
                end += 1
            ranks[start : end + 1] = (start + end) / 2 + 1
            start = end + 1
        rank_of = np.empty(len(scores))
        rank_of[order] = ranks
        aucs[c] = (rank_of[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return aucs


def reliability_bins(probs: Any, labels: Any, bins: int = 15) -> list[dict[str, float]]:
    """Per equal-width confidence bin (low, high] (the first includes 0): the count, mean top-class
    confidence and accuracy of its samples; the reliability diagram's data."""
    p, y = _probabilities(probs, labels)
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[members].mean()) if count else float("nan"),
                "accuracy": float(correct[members].mean()) if count else float("nan"),
            }
        )
    return rows


def expected_calibration_error(probs: Any, labels: Any, bins: int = 15) -> float:
    """ECE (Guo et al. 2017, 15 bins): |accuracy - confidence| of each confidence bin, weighted by its share."""
    return calibration_error_of_bins(reliability_bins(probs, labels, bins))


def calibration_error_of_bins(rows: Sequence[dict[str, float]]) -> float:
    """The ECE of reliability_bins' rows."""
    total = sum(r["count"] for r in rows)
    return float(sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"]))


def fit_temperature(logits: Any, labels: Any, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of softmax(logits / T), by LBFGS on log T."""
    import torch

    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(_as_labels(labels, "labels", z.shape[1]), dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())
