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
