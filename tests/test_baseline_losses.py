"""Baseline losses against brute-force per-sample loops in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from proco_ray.method.losses.baselines import (
    LDAMLoss,
    distractor_aware_loss,
    distractor_classes,
    drw_class_weights,
    focal_loss,
    logit_adjustments,
    ohem_loss,
    supcon_loss,
)

COUNTS = [500, 120, 60, 30, 9, 4, 1]


def _log_softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _random_batch(batch: int = 16, classes: int = 7, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(batch, classes, dtype=torch.float64) * scale
    labels = torch.randint(0, classes, (batch,))
    return logits, labels


# ---------------------------------------------------------------- DANIL's distractor-aware loss


def test_distractor_is_the_top_scoring_wrong_class():
    logits, labels = _random_batch(40)
    distractors = distractor_classes(logits, labels)
    for row, label, distractor in zip(logits.tolist(), labels.tolist(), distractors.tolist()):
        wrong = [c for c in range(len(row)) if c != label]
        assert distractor == max(wrong, key=lambda c: row[c])


def _danil_setup(batch: int = 6, classes: int = 5) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    neurons = torch.randn(batch, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(12, classes).double()
    return neurons, head, torch.randint(0, classes, (batch,))


@pytest.mark.parametrize("eps", [1.0, 0.1])
def test_distractor_aware_loss_matches_loop_with_its_gradient(eps):
    """Each sample's unit gradients taken one sample at a time (the head treats samples independently)."""
    neurons, head, labels = _danil_setup()
    loss = distractor_aware_loss(head(neurons.flatten(1)), neurons, labels, eps)
    (loss_grad,) = torch.autograd.grad(loss, head.weight)

    terms = []
    for i in range(len(labels)):
        logits = head(neurons[i].flatten())
        wrong = [c for c in range(logits.shape[0]) if c != int(labels[i])]
        distractor = max(wrong, key=lambda c: float(logits[c].detach()))
        units = []
        for target in (int(labels[i]), distractor):
            nll = -F.log_softmax(logits, dim=0)[target]
            (grad,) = torch.autograd.grad(nll, neurons, create_graph=True)
            units.append(grad[i].flatten() / grad[i].norm())
        terms.append(1.0 / ((units[0] - units[1]).pow(2).sum() + eps))
    expected = torch.stack(terms).mean()
    (expected_grad,) = torch.autograd.grad(expected, head.weight)
    assert torch.allclose(loss, expected, atol=1e-12)
    assert torch.allclose(loss_grad, expected_grad, atol=1e-10)
    assert 1 / (4 + eps) <= float(loss.detach()) <= 1 / eps


def test_distractor_aware_loss_trains_the_layers_below_the_neurons_in_bf16():
    """Double back-propagation reaches the parameters that made the neurons, also under bf16 inputs."""
    torch.manual_seed(0)
    below, head = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(64, 5)
    neurons = torch.tanh(below(torch.randn(8, 3, 4, 4)))
    loss = distractor_aware_loss(head(neurons.flatten(1)).bfloat16(), neurons, torch.randint(0, 5, (8,)))
    loss.backward()
    assert torch.isfinite(loss) and below.weight.grad is not None and below.weight.grad.abs().sum() > 0


def test_distractor_aware_loss_refuses_neurons_without_a_graph():
    neurons, head, labels = _danil_setup()
    with pytest.raises(ValueError, match="neurons"):
        distractor_aware_loss(head(neurons.flatten(1)), neurons.detach(), labels)
    with pytest.raises(ValueError, match="eps"):
        distractor_aware_loss(head(neurons.flatten(1)), neurons, labels, eps=0.0)


# ---------------------------------------------------------------- focal loss


def _focal_reference(logits, labels, gamma, weight=None) -> float:
    num = den = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_pt = _log_softmax_row(row)[y]
        loss = -((1 - math.exp(log_pt)) ** gamma) * log_pt
        w = 1.0 if weight is None else float(weight[y])
        num += w * loss
        den += w
    return num / den


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_matches_loop(gamma, weighted):
    torch.manual_seed(0)
    logits, labels = _random_batch()
    weight = torch.rand(7, dtype=torch.float64) + 0.1 if weighted else None
    got = focal_loss(logits, labels, gamma=gamma, weight=weight)
    assert got.item() == pytest.approx(_focal_reference(logits, labels, gamma, weight), rel=1e-10)


def test_focal_gamma_zero_is_cross_entropy():
    torch.manual_seed(1)
    logits, labels = _random_batch()
    weight = torch.rand(7, dtype=torch.float64) + 0.1
    torch.testing.assert_close(focal_loss(logits, labels, gamma=0.0), F.cross_entropy(logits, labels))
    torch.testing.assert_close(
        focal_loss(logits, labels, gamma=0.0, weight=weight), F.cross_entropy(logits, labels, weight=weight)
    )


def test_focal_gradcheck_and_saturated_gradient():
    torch.manual_seed(2)
    logits, labels = _random_batch(batch=5, classes=4)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: focal_loss(x, labels, gamma=2.0), (logits,))
    # p_t == 1 exactly with gamma < 1: the gradient must stay finite
    saturated = torch.tensor([[200.0, -200.0], [0.0, 1.0]], requires_grad=True)
    focal_loss(saturated, torch.tensor([0, 1]), gamma=0.5).backward()
    assert torch.isfinite(saturated.grad).all()


def test_focal_bf16_finite():
    torch.manual_seed(3)
    logits = (torch.randn(8, 7) * 100).bfloat16().requires_grad_(True)
    loss = focal_loss(logits, torch.randint(0, 7, (8,)))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad.float()).all()


# ---------------------------------------------------------------- LDAM / DRW


def test_ldam_margins():
    loss_fn = LDAMLoss(COUNTS, max_margin=0.5)
    expected = [0.5 * n**-0.25 / max(c**-0.25 for c in COUNTS) for n in COUNTS]
    torch.testing.assert_close(loss_fn.margins, torch.tensor(expected, dtype=torch.float32))
    assert loss_fn.margins[-1].item() == pytest.approx(0.5)
    assert "margins" in dict(loss_fn.named_buffers())
    assert loss_fn.to(torch.float64).margins.dtype == torch.float64


@pytest.mark.parametrize("weighted", [False, True])
def test_ldam_matches_loop(weighted):
    torch.manual_seed(4)
    logits, labels = _random_batch(scale=0.3)
    loss_fn = LDAMLoss(COUNTS, max_margin=0.5, scale=30.0)
    weight = drw_class_weights(COUNTS).double() if weighted else None
    margins = [0.5 * n**-0.25 / max(c**-0.25 for c in COUNTS) for n in COUNTS]
    num = den = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        adjusted = [30.0 * (v - (margins[y] if j == y else 0.0)) for j, v in enumerate(row)]
        w = 1.0 if weight is None else float(weight[y])
        num += -w * _log_softmax_row(adjusted)[y]
        den += w
    got = loss_fn(logits, labels, weight=weight)
    # margins are stored in float32
    assert got.item() == pytest.approx(num / den, rel=1e-6)


def test_ldam_zero_margin_is_scaled_cross_entropy_and_gradcheck():
    torch.manual_seed(5)
    logits, labels = _random_batch(batch=6, classes=3, scale=0.5)
    no_margin = LDAMLoss([5, 3, 1], max_margin=0.0, scale=4.0)
    torch.testing.assert_close(no_margin(logits, labels), F.cross_entropy(4.0 * logits, labels))
    loss_fn = LDAMLoss([5, 3, 1]).double()
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, labels), (logits,))


def test_drw_class_weights_formula():
    beta = 0.999
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    expected = [w * len(COUNTS) / sum(raw) for w in raw]
    got = drw_class_weights(COUNTS, beta=beta)
    assert got.dtype == torch.float32 and got.shape == (len(COUNTS),)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    assert got.sum().item() == pytest.approx(len(COUNTS))
    assert torch.all(got[1:] >= got[:-1])
    torch.testing.assert_close(drw_class_weights(COUNTS, beta=0.0), torch.ones(len(COUNTS)))


# ---------------------------------------------------------------- logit adjustment


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjustments_are_tau_log_prior_and_make_the_loss_of_a_loop(tau):
    total = sum(COUNTS)
    expected = [tau * math.log(n / total) for n in COUNTS]
    got = logit_adjustments(COUNTS, tau)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    logits, labels = _random_batch()
    loss = F.cross_entropy(logits + got.double(), labels)
    rows = [_log_softmax_row([v + a for v, a in zip(row, expected)]) for row in logits.tolist()]
    looped = -sum(row[y] for row, y in zip(rows, labels.tolist())) / len(rows)
    assert loss.item() == pytest.approx(looped, rel=1e-6)


# ---------------------------------------------------------------- OHEM


@pytest.mark.parametrize(("ratio", "batch", "keep"), [(0.7, 10, 7), (0.25, 10, 3), (0.01, 10, 1), (1.0, 9, 9), (0.5, 1, 1)])
def test_ohem_matches_loop_and_zero_grad_on_dropped(ratio, batch, keep):
    torch.manual_seed(6)
    logits, labels = _random_batch(batch=batch)
    logits.requires_grad_(True)
    per_sample = [-_log_softmax_row(row)[y] for row, y in zip(logits.tolist(), labels.tolist())]
    hardest = sorted(range(batch), key=per_sample.__getitem__, reverse=True)[:keep]
    loss = ohem_loss(logits, labels, keep_ratio=ratio)
    assert loss.item() == pytest.approx(sum(per_sample[i] for i in hardest) / keep, rel=1e-10)
    loss.backward()
    nonzero_rows = set(torch.nonzero(logits.grad.abs().sum(dim=1)).flatten().tolist())
    assert nonzero_rows == set(hardest)


# ---------------------------------------------------------------- SupCon


def _supcon_reference(features, labels, temperature) -> float:
    batch, views, _ = features.shape
    z = F.normalize(features.double(), dim=-1).reshape(batch * views, -1).tolist()
    lab = [y for y in labels.tolist() for _ in range(views)]
    n = len(z)
    losses = []
    for i in range(n):
        sims = {j: sum(a * b for a, b in zip(z[i], z[j])) / temperature for j in range(n) if j != i}
        positives = [j for j in sims if lab[j] == lab[i]]
        if not positives:
            continue
        m = max(sims.values())
        log_denominator = m + math.log(sum(math.exp(s - m) for s in sims.values()))
        losses.append(-sum(sims[p] - log_denominator for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize(
    ("batch", "views", "classes", "temperature"),
    [(8, 2, 3, 0.1), (6, 1, 2, 0.5), (5, 3, 5, 0.07), (7, 2, 10, 1.0)],
)
def test_supcon_matches_loop(batch, views, classes, temperature):
    torch.manual_seed(7)
    features = torch.randn(batch, views, 6, dtype=torch.float64)
    labels = torch.randint(0, classes, (batch,))
    got = supcon_loss(features, labels, temperature=temperature)
    assert got.item() == pytest.approx(_supcon_reference(features, labels, temperature), rel=1e-10)
    # normalisation happens inside: the scale of the features is irrelevant
    torch.testing.assert_close(supcon_loss(features * 7.5, labels, temperature=temperature), got)


def test_supcon_skips_anchors_without_positive():
    torch.manual_seed(8)
    features = torch.randn(5, 1, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 2])
    got = supcon_loss(features, labels, temperature=0.2)
    assert got.item() == pytest.approx(_supcon_reference(features, labels, 0.2), rel=1e-10)


@pytest.mark.parametrize("shape", [(4, 1, 3), (1, 1, 3)])
def test_supcon_no_positive_is_zero_with_gradient_path(shape):
    torch.manual_seed(9)
    features = torch.randn(*shape, requires_grad=True)
    loss = supcon_loss(features, torch.arange(shape[0]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(features.grad, torch.zeros_like(features))


def test_supcon_gradcheck():
    torch.manual_seed(10)
    features = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2])
    assert torch.autograd.gradcheck(lambda f: supcon_loss(f, labels, temperature=0.3), (features,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_supcon_finite_with_large_similarities(dtype):
    torch.manual_seed(11)
    features = (torch.randn(16, 2, 8) * 1e4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 3, (16,))
    loss = supcon_loss(features, labels, temperature=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(features.grad.float()).all()
    reference = supcon_loss(features.detach().double(), labels, temperature=1e-3)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-3)


# ---------------------------------------------------------------- bad inputs

_L = torch.zeros(4, 7)
_Y = torch.tensor([0, 1, 2, 3])
_F = torch.zeros(4, 2, 5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: focal_loss(torch.zeros(4), _Y), "logits"),
        (lambda: focal_loss(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long)), "logits"),
        (lambda: focal_loss(_L, torch.tensor([0, 1, 2])), "labels"),
        (lambda: focal_loss(_L, _Y.float()), "labels"),
        (lambda: focal_loss(_L, torch.tensor([0, 1, 2, 9])), r"labels must be in \[0, 7\), got max 9"),
        (lambda: focal_loss(_L, torch.tensor([0, -1, 2, 3])), r"labels must be in \[0, 7\), got min -1"),
        (lambda: focal_loss(_L, _Y, gamma=-1.0), "gamma"),
        (lambda: focal_loss(_L, _Y, weight=torch.ones(6)), "weight"),
        (lambda: LDAMLoss([10, 0, 3]), "class_counts"),
        (lambda: LDAMLoss([10, -2, 3]), "class_counts"),
        (lambda: LDAMLoss([]), "class_counts"),
        (lambda: LDAMLoss([10, 5], max_margin=-0.1), "max_margin"),
        (lambda: LDAMLoss([10, 5], scale=0.0), "scale"),
        (lambda: LDAMLoss([10, 5])(_L, _Y), "logits"),
        (lambda: LDAMLoss(COUNTS)(_L, torch.tensor([0, 1, 2, 7])), "labels"),
        (lambda: LDAMLoss(COUNTS)(_L, _Y, weight=torch.ones(3)), "weight"),
        (lambda: drw_class_weights([5, 0]), "class_counts"),
        (lambda: drw_class_weights([5, 1], beta=1.0), "beta"),
        (lambda: drw_class_weights([5, 1], beta=-0.1), "beta"),
        (lambda: logit_adjustments([5, 0]), "class_counts"),
        (lambda: logit_adjustments([5, 1], tau=-1.0), "tau"),
        (lambda: logit_adjustments([5, 1], tau=float("nan")), "tau"),
        (lambda: ohem_loss(_L, _Y, keep_ratio=0.0), "keep_ratio"),
        (lambda: ohem_loss(_L, _Y, keep_ratio=1.5), "keep_ratio"),
        (lambda: ohem_loss(_L, torch.tensor([0, 1, 2, 7]), keep_ratio=0.5), "labels"),
        (lambda: supcon_loss(torch.zeros(4, 5), _Y), "features"),
        (lambda: supcon_loss(_F, torch.tensor([0, 1])), "labels"),
        (lambda: supcon_loss(_F, _Y.float()), "labels"),
        (lambda: supcon_loss(_F, _Y, temperature=0.0), "temperature"),
        (lambda: supcon_loss(_F, _Y, temperature=-0.1), "temperature"),
    ],
)
def test_bad_inputs_raise_value_error_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
