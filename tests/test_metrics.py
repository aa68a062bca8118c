"""Metrics against scikit-learn and a hand-computed case."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from proco_ray.metrics import classification_metrics, confusion_matrix, quadratic_weighted_kappa


def _cases():
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(4):
        n, c = int(rng.integers(20, 200)), int(rng.integers(2, 9))
        cases.append((rng.integers(0, c, n), rng.integers(0, c, n), c))
    y_true = rng.integers(0, 7, 100)
    cases.append((y_true, rng.choice([0, 2, 5], 100), 7))  # classes never predicted
    cases.append((rng.choice([1, 3, 4], 100), rng.integers(0, 7, 100), 7))  # classes absent from y_true
    cases.append((rng.choice([0, 1], 50), rng.choice([0, 1, 2], 50), 5))  # classes absent from both
    skewed = np.minimum(rng.geometric(0.5, 300) - 1, 6)  # long-tailed labels
    cases.append((skewed, np.where(rng.random(300) < 0.7, skewed, rng.integers(0, 7, 300)), 7))
    return cases


@pytest.mark.parametrize(("y_true", "y_pred", "num_classes"), _cases())
def test_matches_sklearn(y_true, y_pred, num_classes):
    labels = list(range(num_classes))
    got = classification_metrics(y_true, y_pred, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        balanced = skm.balanced_accuracy_score(y_true, y_pred)
        kappa = skm.cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0))
    assert got["balanced_accuracy"] == pytest.approx(balanced)
    np.testing.assert_allclose(got["precision"], precision)
    np.testing.assert_allclose(got["recall"], recall)
    np.testing.assert_allclose(got["f1"], f1)
    assert got["support"] == support.tolist()
    assert got["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert got["qwk"] == pytest.approx(kappa)
    assert quadratic_weighted_kappa(y_true, y_pred, num_classes) == pytest.approx(kappa)
    cm = confusion_matrix(y_true, y_pred, num_classes)
    assert cm.dtype == np.int64 and cm.shape == (num_classes, num_classes)
    json.dumps(got, allow_nan=False)


def test_hand_computed_case():
    y_true, y_pred = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    got = classification_metrics(y_true, y_pred, 3, class_names=["mel", "nv", "bcc"])
    assert got["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert got["accuracy"] == pytest.approx(0.6)
    assert got["precision"] == pytest.approx([0.5, 2 / 3, 0.0])
    assert got["recall"] == pytest.approx([0.5, 1.0, 0.0])
    assert got["f1"] == pytest.approx([0.5, 0.8, 0.0])
    assert got["macro_f1"] == pytest.approx(1.3 / 3)
    assert got["balanced_accuracy"] == pytest.approx(0.5)
    assert got["support"] == [2, 2, 1]
    # observed weighted disagreement 1*1 + 1*4 = 5; expected 1.2 + 0.8 + 0.4*4 + 0.6 = 4.2
    assert got["qwk"] == pytest.approx(1 - 5 / 4.2)
    assert got["class_names"] == ["mel", "nv", "bcc"]


def test_input_types_and_plain_python_values():
    y_true, y_pred = [2, 0, 1, 1], [2, 0, 0, 1]
    reference = classification_metrics(y_true, y_pred, 4)
    assert classification_metrics(torch.tensor(y_true), torch.tensor(y_pred), 4) == reference
    assert classification_metrics(np.array(y_true, dtype=np.uint8), np.array(y_pred, dtype=float), 4) == reference
    assert reference["class_names"] == ["0", "1", "2", "3"]
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "qwk"):
        assert type(reference[key]) is float
    assert all(type(v) is int for v in reference["support"])
    assert all(type(v) is int for row in reference["confusion_matrix"] for v in row)
    json.loads(json.dumps(reference, allow_nan=False))


def test_qwk_perfect_and_undefined():
    assert quadratic_weighted_kappa([0, 1, 2, 3], [0, 1, 2, 3], 4) == pytest.approx(1.0)
    # both raters use a single shared class: 0/0, NaN as in scikit-learn
    assert math.isnan(quadratic_weighted_kappa([2, 2, 2], [2, 2, 2], 4))


def test_confusion_matrix_rows_are_true_labels():
    cm = confusion_matrix([0, 0, 2], [1, 1, 0], 3)
    np.testing.assert_array_equal(cm, [[0, 2, 0], [0, 0, 0], [1, 0, 0]])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: confusion_matrix([0, 1], [0], 2), "same length"),
        (lambda: confusion_matrix([], [], 2), "y_true must not be empty"),
        (lambda: confusion_matrix([0, 3], [0, 1], 3), r"y_true must be in \[0, 3\), got max 3"),
        (lambda: confusion_matrix([0, 1], [0, -1], 3), r"y_pred must be in \[0, 3\), got min -1"),
        (lambda: confusion_matrix([[0, 1]], [[0, 1]], 2), "y_true must be 1-D"),
        (lambda: confusion_matrix([0, 1], [0.5, 1.0], 2), "y_pred must hold integer"),
        (lambda: confusion_matrix(["a"], ["b"], 2), "y_true must hold integer"),
        (lambda: confusion_matrix([0], [0], 0), "num_classes"),
        (lambda: classification_metrics([0, 1], [0, 1, 1], 2), "same length"),
        (lambda: classification_metrics([0, 5], [0, 1], 3), "y_true"),
        (lambda: classification_metrics([0, 1], [0, 1], 2, class_names=["a"]), "class_names"),
        (lambda: quadratic_weighted_kappa([0, 1], [0, 4], 3), "y_pred"),
    ],
)
def test_bad_inputs_raise_value_error_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_roc_auc_one_vs_rest_matches_sklearn_with_ties_and_absent_classes():
    from proco_ray.metrics import roc_auc_one_vs_rest

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    probs = rng.dirichlet(np.ones(4), 200).round(2)  # rounding makes ties; class 3 never occurs
    aucs = roc_auc_one_vs_rest(probs, labels)
    for c in range(3):
        assert aucs[c] == pytest.approx(skm.roc_auc_score(labels == c, probs[:, c]), abs=1e-12)
    assert math.isnan(aucs[3])


def test_ece_and_reliability_bins_against_a_loop():
    from proco_ray.metrics import expected_calibration_error, reliability_bins

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 500)
    probs = rng.dirichlet(np.ones(3) * 0.5, 500)
    bins = 10
    ece = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        conf = probs.max(1)
        members = [i for i in range(500) if (low < conf[i] <= high) or (b == 0 and conf[i] <= high)]
        if members:
            acc = np.mean([probs[i].argmax() == labels[i] for i in members])
            ece += len(members) / 500 * abs(acc - np.mean([conf[i] for i in members]))
    assert expected_calibration_error(probs, labels, bins) == pytest.approx(ece, abs=1e-12)
    assert sum(r["count"] for r in reliability_bins(probs, labels, bins)) == 500
    perfect = np.eye(3)[labels]
    assert expected_calibration_error(perfect, labels) == 0.0


def test_temperature_scaling_recovers_the_temperature_that_generated_the_labels():
    from proco_ray.metrics import fit_temperature

    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (4000, 5))
    true_t = 2.5
    p = torch.softmax(torch.as_tensor(logits) / true_t, dim=1).numpy()
    labels = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.1)
