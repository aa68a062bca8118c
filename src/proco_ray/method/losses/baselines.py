"""Losses of the paper's baselines: focal, LDAM(-DRW), OHEM, SupCon and DANIL's distractor-aware term.

Every function validates its inputs eagerly and raises a ``ValueError`` naming
the offending argument: a silently broadcast shape or an out-of-range label
would otherwise train a wrong model without any error. The label range check
reads two scalars back from the device, a negligible cost next to a step.

Softmax-type reductions run in at least float32 (as autocast does for
``cross_entropy``), so bf16/fp16 inputs give finite, accurate losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from proco_ray.method.losses.checks import check_labels

__all__ = [
    "LDAMLoss",
    "distractor_aware_loss",
    "distractor_classes",
    "drw_class_weights",
    "focal_loss",
    "logit_adjustments",
    "ohem_loss",
    "supcon_loss",
]


def _check_logits_labels(logits: Tensor, labels: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (B, C) with B, C > 0, got {tuple(logits.shape)}")
    check_labels(labels, logits.shape[0], logits.shape[1])


def _check_class_weight(weight: Tensor | None, num_classes: int) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor) or weight.shape != (num_classes,):
        shape = tuple(getattr(weight, "shape", ()))
        raise ValueError(f"weight must be a tensor of shape ({num_classes},), got {shape}")


def _class_counts(class_counts: Sequence[int]) -> Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    bad = (~torch.isfinite(counts) | (counts <= 0)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"class_counts must be positive, got {counts[i].item():g} at index {i}")
    return counts


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def focal_loss(logits: Tensor, labels: Tensor, gamma: float = 2.0, weight: Tensor | None = None) -> Tensor:
    """Focal loss, mean of -(1 - p_t)^gamma log p_t (Lin et al. 2017, Eq. 4).

    ``p_t`` comes from ``log_softmax`` so confident samples do not underflow;
    ``1 - p_t`` is ``-expm1(log p_t)`` to keep precision when p_t -> 1.
    With ``weight`` (per-class, e.g. DRW weights) the reduction follows
    ``torch.nn.functional.cross_entropy``: ``sum_i w_{y_i} l_i / sum_i w_{y_i}``;
    without it, the plain mean over the batch. ``gamma = 0`` is cross-entropy.
    """
    _check_logits_labels(logits, labels)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    _check_class_weight(weight, logits.shape[1])
    labels = labels.long()
    dtype = _float_dtype(logits.dtype)
    log_pt = F.log_softmax(logits.to(dtype), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    # clamped away from 0 so d/dx x^gamma stays finite for gamma < 1 when p_t == 1
    one_minus_pt = (-torch.expm1(log_pt)).clamp_min(torch.finfo(dtype).tiny)
    per_sample = -one_minus_pt.pow(gamma) * log_pt
    if weight is None:
        return per_sample.mean()
    w = weight.to(device=logits.device, dtype=dtype)[labels]
    return (w * per_sample).sum() / w.sum()


class LDAMLoss(torch.nn.Module):
    """Label-distribution-aware margin loss (Cao et al. 2019, Eq. 13).

    The true-class logit is reduced by ``m_y = C / n_y^{1/4}``, with ``C`` set so
    the rarest class gets ``max_margin``; the result is multiplied by ``scale``
    and fed to cross-entropy, exactly as the reference implementation does.
    ``scale=30`` is meant for cosine logits in [-1, 1] (the ldam_drw method's
    classifier is a CosineLinear); on raw logits it multiplies the gradients
    thirtyfold and training collapses onto one class.
    ``forward``'s ``weight`` is the DRW per-class weight (see
    :func:`drw_class_weights`), passed to cross-entropy.
    """

    margins: Tensor

    def __init__(self, class_counts: Sequence[int], max_margin: float = 0.5, scale: float = 30.0) -> None:
        super().__init__()
        counts = _class_counts(class_counts)
        if not max_margin >= 0:
            raise ValueError(f"max_margin must be >= 0, got {max_margin}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        inv_quartic = counts.pow(-0.25)
        self.register_buffer("margins", (max_margin * inv_quartic / inv_quartic.max()).float())
        self.max_margin = float(max_margin)
        self.scale = float(scale)

    def forward(self, logits: Tensor, labels: Tensor, weight: Tensor | None = None) -> Tensor:
        _check_logits_labels(logits, labels)
        num_classes = self.margins.numel()
        if logits.shape[1] != num_classes:
            raise ValueError(f"logits must have {num_classes} classes (one per class count), got {logits.shape[1]}")
        _check_class_weight(weight, num_classes)
        labels = labels.long()
        dtype = _float_dtype(logits.dtype)
        margin = self.margins.to(device=logits.device, dtype=dtype)[labels]
        onehot = F.one_hot(labels, num_classes).to(dtype)
        adjusted = logits.to(dtype) - margin.unsqueeze(1) * onehot
        if weight is not None:
            weight = weight.to(device=logits.device, dtype=dtype)
        return F.cross_entropy(self.scale * adjusted, labels, weight=weight)

    def extra_repr(self) -> str:
        return f"num_classes={self.margins.numel()}, max_margin={self.max_margin}, scale={self.scale}"


def drw_class_weights(class_counts: Sequence[int], beta: float = 0.9999) -> Tensor:
    """Class-balanced weights ``(1 - beta) / (1 - beta^{n_c})`` (Cui et al. 2019, Eq. 3).

    Used by LDAM-DRW from the deferred re-weighting epoch on. Normalised to
    sum to C so the loss scale matches the unweighted loss; ``beta = 0`` gives
    all ones. Returned on CPU as float32; move it with ``.to(device)``.
    """
    counts = _class_counts(class_counts)
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights * counts.numel() / weights.sum()).float()


def logit_adjustments(class_counts: Sequence[int], tau: float = 1.0) -> Tensor:
    """``tau * log(pi_c)``, the training prior pi_c = n_c / N: the offsets of the logit-adjusted loss
    (Menon et al., ICLR 2021: softmax cross-entropy on ``f_c(x) + tau log pi_c``).

    Added to the logits in training only, they make the rare classes' logits win by a larger margin,
    so the raw logits predict as if the classes were balanced: a correction for the prior without
    resampling, which leaves every image's share of the representation learning as it is. Returned on
    CPU as float32; ``tau = 0`` gives zeros.
    """
    counts = _class_counts(class_counts)
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau}")
    return (tau * torch.log(counts / counts.sum())).float()


def ohem_loss(logits: Tensor, labels: Tensor, keep_ratio: float) -> Tensor:
    """Online hard example mining (Shrivastava et al. 2016): mean CE of the hardest samples.

    Keeps the ``ceil(keep_ratio * B)`` (at least 1) largest per-sample losses;
    ``topk`` selects them, so dropped samples get exactly zero gradient.
    The product is rounded to 9 decimals before ``ceil`` so that e.g.
    ``0.7 * 10`` keeps 7, not 8.
    """
    _check_logits_labels(logits, labels)
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    batch = logits.shape[0]
    keep = min(batch, max(1, math.ceil(round(keep_ratio * batch, 9))))
    per_sample = F.cross_entropy(logits.to(_float_dtype(logits.dtype)), labels.long(), reduction="none")
    return per_sample.topk(keep, sorted=False).values.mean()


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss, L^sup_out (Khosla et al. 2020, Eq. 2).

    ``features`` is (B, V, k): V views of each sample, L2-normalised here.
    Every one of the B*V views is an anchor; its positives are the other views
    with the same label, its denominator all other views. Anchors without a
    positive are left out of the mean; with none at all the loss is a zero
    that still depends on ``features`` (DDP needs every parameter to get a
    gradient), computed without a host-device sync. The reference code's extra factor
    ``temperature / base_temperature`` is 1 at its defaults and is omitted.
    Self-similarities are masked with -inf inside ``logsumexp``, computed in
    at least float32, so large similarities (small temperatures) and bf16
    inputs stay finite.
    """
    if not isinstance(features, Tensor) or not features.dtype.is_floating_point:
        raise ValueError(f"features must be a floating-point tensor, got {getattr(features, 'dtype', type(features))}")
    if features.ndim != 3 or 0 in features.shape:
        raise ValueError(f"features must have shape (B, V, k) with B, V, k > 0, got {tuple(features.shape)}")
    batch, views, _ = features.shape
    check_labels(labels, batch)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    n = batch * views
    if n == 1:
        return features.sum() * 0
    anchor_labels = labels.repeat_interleave(views)
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    positive = (anchor_labels.unsqueeze(0) == anchor_labels.unsqueeze(1)) & ~self_mask
    num_positive = positive.sum(dim=1)

    z = F.normalize(features.to(_float_dtype(features.dtype)).reshape(n, -1), dim=1)
    logits = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = positive_log_prob / num_positive.clamp_min(1)
    num_anchors = (num_positive > 0).sum().clamp_min(1)
    return -per_anchor.sum() / num_anchors


def distractor_classes(logits: Tensor, labels: Tensor) -> Tensor:
    """DANIL's distractor of each sample: the wrong class the classifier scores highest (no gradient)."""
    return logits.detach().scatter(1, labels[:, None].long(), float("-inf")).argmax(dim=1)


def distractor_aware_loss(logits: Tensor, neurons: Tensor, labels: Tensor, eps: float = 1.0) -> Tensor:
    """DANIL's distractor-aware loss (Gong et al., MICCAI 2020), as reconstructed in docs/method.md.

        L_DA = 1/B sum_i 1 / (|| g_i(y_i) - g_i(d_i) ||^2 + eps),  g_i(c) = grad_{A_i} CE(z_i, c) / ||.||

    A_i is sample i's neurons (a feature map the logits are computed from), d_i its distractor
    (`distractor_classes`). The "neuron intrinsic" response of an image to a class is the unit gradient of
    that class's loss at the neurons; the loss is lowest when the responses to the true class and to the
    distractor point apart. The gradients keep their graph (double back-propagation), so L_DA trains the
    network. Normalising keeps the network from growing the distance by inflating its input sensitivity.
    Per-sample gradients come from one gradient of the summed loss: exact when samples do not interact
    after `neurons` (BatchNorm in training mode couples them slightly).
    """
    _check_logits_labels(logits, labels)
    if neurons.shape[0] != logits.shape[0] or not neurons.requires_grad:
        raise ValueError(
            f"neurons must be a ({logits.shape[0]}, ...) tensor the logits were computed from, "
            f"got shape {tuple(neurons.shape)}, requires_grad={neurons.requires_grad}"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    scores = logits.to(_float_dtype(logits.dtype))
    distractors = distractor_classes(scores, labels)
    responses = []
    for target in (labels.long(), distractors):
        (grad,) = torch.autograd.grad(F.cross_entropy(scores, target, reduction="sum"), neurons, create_graph=True)
        responses.append(F.normalize(grad.flatten(1).to(scores.dtype), dim=1))
    distance = (responses[0] - responses[1]).pow(2).sum(dim=1)
    return (1.0 / (distance + eps)).mean()
