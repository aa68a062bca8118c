"""ProCo's equations (docs/method.md; MICCAI 2022, Eq. 1-7), as small tensor functions.

Every function is vectorised over the batch and the bank; none loops over samples.
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proco_ray.config import ProtoForm
from proco_ray.distributed import all_reduce_sum
from proco_ray.method.losses.checks import check_labels


def _check_matrix(name: str, x: Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(x.shape)}")


def _check_mask(name: str, mask: Tensor | None, like: Tensor) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {mask.dtype}")
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(mask.shape)}")


def masked_logsumexp(x: Tensor, mask: Tensor | None) -> Tensor:
    """logsumexp over dim 1 of the entries where mask is True; -inf for a row with none.

    Rows without a valid entry are computed on zeros and then replaced, so their
    gradient is exactly zero instead of NaN.
    """
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    has_any = mask.any(dim=1)
    safe = torch.where(mask, x, torch.full_like(x, float("-inf")))
    safe = torch.where(has_any[:, None], safe, torch.zeros_like(x))
    lse = torch.logsumexp(safe, dim=1) if x.shape[1] else torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    return torch.where(has_any, lse, torch.full_like(lse, float("-inf")))


def proto_loss(pos: Tensor, neg: Tensor, pos_mask: Tensor | None = None, neg_mask: Tensor | None = None) -> Tensor:
    """Eq. 7 per sample: log(1 + sum_neg e^a * sum_pos e^-b) = softplus(lse(neg) + lse(-pos)).

    `pos` [B, P] and `neg` [B, N] are logits with the temperature already applied;
    masked-out entries contribute nothing. Computed in float32 whatever the input
    dtype, so it stays finite for logits up to +-1e4 in bfloat16 and float16.
    """
    _check_matrix("pos", pos)
    _check_matrix("neg", neg, rows=pos.shape[0])
    _check_mask("pos_mask", pos_mask, pos)
    _check_mask("neg_mask", neg_mask, neg)
    lse_neg = masked_logsumexp(neg.float(), neg_mask)
    lse_pos = masked_logsumexp(-pos.float(), pos_mask)
    return F.softplus(lse_neg + lse_pos)


PROTO_FORMS = typing.get_args(ProtoForm)


def contrast_terms(
    q: Tensor,
    bank: Tensor,
    same: Tensor,
    proto_negatives: tuple[Tensor, Tensor] | None = None,
    proto_positives: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 7's instance terms of each sample i: (similarity, positive, negative), each [B, N].

    The columns are the contrast set (bank [M, d]: the queue and every rank's keys; s in H+ where
    same[i, j], the label is shared, else in H-), then the negative proto-instances (Eq. 1-2, in H-)
    and the positive ones (Eq. 3, in H+), each given as (instances [B, gamma, d], valid [B, gamma]);
    an invalid proto-instance is in neither set.
    """
    similarity, positive, negative = [q @ bank.T], [same], [~same]
    if proto_negatives is not None:
        instances, valid = proto_negatives
        similarity.append(torch.einsum("bk,bgk->bg", q, instances.to(q.dtype)))
        positive.append(torch.zeros_like(valid))
        negative.append(valid)
    if proto_positives is not None:
        instances, valid = proto_positives
        similarity.append(torch.einsum("bk,bgk->bg", q, instances.to(q.dtype)))
        positive.append(valid)
        negative.append(torch.zeros_like(valid))
    return torch.cat(similarity, 1), torch.cat(positive, 1), torch.cat(negative, 1)


def _log_mean_exp(x: Tensor, mask: Tensor) -> Tensor:
    """log mean_{mask} e^x per row; -inf for a row with no entry."""
    count = mask.sum(dim=1).to(x.dtype)
    return masked_logsumexp(x, mask) - torch.log(count.clamp(min=1))


def unified_proto_loss(
    similarity: Tensor,
    positive: Tensor,
    negative: Tensor,
    logits: Tensor,
    labels: Tensor,
    tau: float,
    form: str = "eq7",
    margin: float = 0.25,
) -> Tensor:
    """Eq. 7 assembled from its parts, per sample; `form` chooses how the instance terms enter.

    similarity [B, N]: cosines g . s with every instance s (contrast set and proto-instances);
    positive / negative [B, N]: s in H+ / H- (an entry in neither is ignored); logits [B, C]: the
    recalibrated prototype logits l_hat; labels [B].

    - eq7: the paper's Eq. 7 with tau on the instance terms (tau = 1 is the literal equation):
      softplus(lse({g.s/tau : H-} U {l_c : c != y}) + lse({-g.s/tau : H+} U {-l_y})).
    - mean: the same, but each instance set enters as one term, its log-mean-exp, so the few
      prototype logits are not outvoted by hundreds of instance terms.
    - split: the instance part and the prototype part as two Eq. 7 terms added together.
    - circle: Eq. 7 with Circle loss's self-paced instance terms (Sun et al., CVPR 2020),
      a_n = [s_n + m]_+ (s_n - m) / tau and b_p = [1 + m - s_p]_+ (s_p - 1 + m) / tau, whose
      optimum is s_p >= 1 - m, s_n <= m rather than a mere ordering (a collapsed embedding scores badly).
    """
    if form not in PROTO_FORMS:
        raise ValueError(f"form must be one of {PROTO_FORMS}, got '{form}'")
    _check_matrix("similarity", similarity)
    _check_mask("positive", positive, similarity)
    _check_mask("negative", negative, similarity)
    _check_matrix("logits", logits, rows=similarity.shape[0])
    if labels.shape != (similarity.shape[0],):
        raise ValueError(f"labels must have shape [{similarity.shape[0]}], got {tuple(labels.shape)}")
    sim, logits = similarity.float(), logits.float()
    if form == "circle":
        pos_inst = torch.relu(1.0 + margin - sim.detach()) * (sim - 1.0 + margin) / tau
        neg_inst = torch.relu(sim.detach() + margin) * (sim - margin) / tau
    else:
        pos_inst = neg_inst = sim / tau
    own = F.one_hot(labels, logits.shape[1]).bool()
    own_logit = logits.gather(1, labels[:, None])
    always = torch.ones_like(own_logit, dtype=torch.bool)
    if form == "split":
        instance = proto_loss(pos_inst, neg_inst, positive, negative)
        return instance + proto_loss(own_logit, logits, always, ~own)
    if form == "mean":
        pooled_neg = _log_mean_exp(neg_inst, negative)[:, None]
        pooled_pos = -_log_mean_exp(-pos_inst, positive)[:, None]
        pos_inst, neg_inst = pooled_pos, pooled_neg
        positive, negative = positive.any(dim=1, keepdim=True), negative.any(dim=1, keepdim=True)
    pos = torch.cat([pos_inst, own_logit], dim=1)
    neg = torch.cat([neg_inst, logits], dim=1)
    return proto_loss(pos, neg, torch.cat([positive, always], dim=1), torch.cat([negative, ~own], dim=1))


def supervised_infonce(logits: Tensor, pos_mask: Tensor, valid_mask: Tensor | None = None) -> Tensor:
    """Supervised InfoNCE per sample (the loss ablation): -mean_p log softmax(logits)_p over positives.

    `logits` [B, N] with the temperature applied; the softmax runs over the valid
    entries. A sample without a positive contributes 0.
    """
    _check_matrix("logits", logits)
    _check_mask("pos_mask", pos_mask, logits)
    _check_mask("valid_mask", valid_mask, logits)
    if valid_mask is not None:
        pos_mask = pos_mask & valid_mask
    log_denominator = masked_logsumexp(logits.float(), valid_mask)
    log_prob = logits.float() - log_denominator[:, None]
    positives = pos_mask.sum(dim=1)
    summed = torch.where(pos_mask, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    return -summed / positives.clamp(min=1)


def embedding_std(features: Tensor) -> Tensor:
    """Mean per-dimension std of L2-normalised features over a batch: the collapse monitor of SimSiam.

    About 1/sqrt(k) for k-dimensional features spread over the sphere, 0 when every
    image maps to the same point (the contrastive terms then carry no signal).
    """
    _check_matrix("features", features)
    if features.shape[0] < 2:
        raise ValueError(f"features needs at least 2 rows for a std, got {features.shape[0]}")
    return F.normalize(features.float(), dim=1).std(dim=0).mean()


def _check_adversarial_inputs(
    query: Tensor,
    bank_feats: Tensor,
    bank_labels: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    gamma: int,
    eps: Tensor,
) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 0:
        raise ValueError(f"gamma must be a non-negative integer, got {gamma!r}")
    _check_matrix("query", query)
    batch, dim = query.shape
    _check_matrix("bank_feats", bank_feats, cols=dim)
    _check_matrix("prototypes", prototypes, cols=dim)
    num_classes = prototypes.shape[0]
    check_labels(labels, batch, num_classes, "labels")
    check_labels(bank_labels, bank_feats.shape[0], num_classes, "bank_labels")
    if eps.shape != (batch, gamma):
        raise ValueError(f"eps must have shape ({batch}, {gamma}), got {tuple(eps.shape)}")
    if eps.numel() and eps.device.type == "cpu" and (float(eps.min()) < 0 or float(eps.max()) >= 1):
        raise ValueError(f"eps must lie in [0, 1), got values in [{float(eps.min())}, {float(eps.max())}]")


def _mix_with_prototypes(
    query: Tensor,
    bank_feats: Tensor,
    candidates: Tensor,
    mix_classes: Tensor,
    prototypes: Tensor,
    gamma: int,
    eps: Tensor,
    farthest: bool,
) -> tuple[Tensor, Tensor]:
    """Pick gamma candidates per sample by cosine distance and mix each with a prototype (Eq. 2-3).

    `candidates` [B, M] marks eligible bank entries; `mix_classes` [B, M] names the
    class whose normalised prototype each entry is mixed with. One batched top-k
    over the B x M distance matrix: O(B x M).
    """
    batch, dim = query.shape
    query = F.normalize(query.detach().float(), dim=1)
    bank = F.normalize(bank_feats.detach().float(), dim=1)
    protos = F.normalize(prototypes.detach().float(), dim=1)
    feats = query.new_zeros(batch, gamma, dim)
    mask = torch.zeros(batch, gamma, dtype=torch.bool, device=query.device)
    take = min(gamma, bank.shape[0])
    if take == 0:
        return feats, mask
    distance = 1.0 - query @ bank.T
    fill = float("-inf") if farthest else float("inf")
    distance = torch.where(candidates, distance, torch.full_like(distance, fill))
    _, index = torch.topk(distance, take, dim=1, largest=farthest, sorted=True)
    chosen = bank[index]
    proto = protos[mix_classes.gather(1, index)]
    e = eps[:, :take, None].float()
    feats[:, :take] = F.normalize((1.0 - e) * chosen + e * proto, dim=2)
    mask[:, :take] = candidates.gather(1, index)
    feats = torch.where(mask[..., None], feats, torch.zeros_like(feats))
    return feats, mask


def adversarial_negatives(
    query: Tensor,
    bank_feats: Tensor,
    bank_labels: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    gamma: int,
    eps: Tensor,
) -> tuple[Tensor, Tensor]:
    """Eq. 1-3, negatives: the gamma nearest other-class entries pushed towards p_y.

    Returns constants (no gradient): feats [B, gamma, k] and mask [B, gamma], False
    in slots beyond the number of other-class entries.
    """
    _check_adversarial_inputs(query, bank_feats, bank_labels, labels, prototypes, gamma, eps)
    candidates = bank_labels[None, :] != labels[:, None]
    own_class = labels[:, None].expand_as(candidates)
    return _mix_with_prototypes(query, bank_feats, candidates, own_class, prototypes, gamma, eps, farthest=False)


def adversarial_positives(
    query: Tensor,
    bank_feats: Tensor,
    bank_labels: Tensor,
    bank_preds: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    gamma: int,
    eps: Tensor,
) -> tuple[Tensor, Tensor]:
    """The positive rule: the gamma farthest misclassified same-class entries pushed towards their wrong class.

    Returns constants (no gradient): feats [B, gamma, k] and mask [B, gamma].
    """
    _check_adversarial_inputs(query, bank_feats, bank_labels, labels, prototypes, gamma, eps)
    check_labels(bank_preds, bank_feats.shape[0], prototypes.shape[0], "bank_preds")
    candidates = (bank_labels[None, :] == labels[:, None]) & (bank_preds[None, :] != labels[:, None])
    wrong_class = bank_preds[None, :].expand_as(candidates)
    return _mix_with_prototypes(query, bank_feats, candidates, wrong_class, prototypes, gamma, eps, farthest=True)


class PrototypeRecalibration(nn.Module):
    """Eq. 4-6: an EMA per class of the mean sigmoid(z . p_c) of that class's samples.

    Sums and counts are all-reduced over the default process group when
    torch.distributed is initialised, so every rank holds the same weights;
    `update` must then be called on every rank. Classes absent from the global
    batch keep their weight.
    """

    weights: Tensor

    def __init__(self, num_classes: int, beta: float = 0.95, init: float = 0.01) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        if not 0.0 < init <= 1.0:
            raise ValueError(f"init must lie in (0, 1], got {init}")
        self.num_classes = num_classes
        self.beta = beta
        self.register_buffer("weights", torch.full((num_classes,), float(init)))

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        _check_matrix("logits", logits, cols=self.num_classes)
        check_labels(labels, logits.shape[0], self.num_classes, "labels")
        own = torch.sigmoid(logits.float().gather(1, labels[:, None]).squeeze(1))
        stats = torch.zeros(2, self.num_classes, device=self.weights.device)
        stats[0].index_add_(0, labels.to(stats.device), own.to(stats.device))
        stats[1].index_add_(0, labels.to(stats.device), torch.ones_like(own, device=stats.device))
        all_reduce_sum(stats)
        sums, counts = stats
        present = counts > 0
        omega = sums / counts.clamp(min=1)
        updated = self.beta * self.weights + (1.0 - self.beta) * omega
        self.weights.copy_(torch.where(present, updated, self.weights))

    @property
    def log_weights(self) -> Tensor:
        return torch.log(self.weights)
