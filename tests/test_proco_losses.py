"""ProCo's equations against brute-force loops written straight from the spec."""

import math

import pytest
import torch
import torch.nn.functional as F

from proco_ray.method.losses import (
    PROTO_FORMS,
    PrototypeRecalibration,
    adversarial_negatives,
    adversarial_positives,
    contrast_terms,
    embedding_std,
    proto_loss,
    supervised_infonce,
    unified_proto_loss,
)


def brute_proto_loss(pos, neg, pos_mask, neg_mask):
    out = []
    for j in range(pos.shape[0]):
        s_neg = sum(math.exp(float(a)) for a, m in zip(neg[j], neg_mask[j]) if m)
        s_pos = sum(math.exp(-float(b)) for b, m in zip(pos[j], pos_mask[j]) if m)
        out.append(math.log(1.0 + s_neg * s_pos))
    return torch.tensor(out, dtype=torch.float64)


def normalise(v):
    return v / v.norm()


def brute_adversarial(query, bank, bank_labels, bank_preds, labels, protos, gamma, eps, positive):
    batch, dim = query.shape
    feats = torch.zeros(batch, gamma, dim)
    mask = torch.zeros(batch, gamma, dtype=torch.bool)
    for j in range(batch):
        g = normalise(query[j])
        y = int(labels[j])
        candidates = []
        for i in range(bank.shape[0]):
            s = normalise(bank[i])
            dist = 1.0 - float(g @ s)
            if positive and int(bank_labels[i]) == y and int(bank_preds[i]) != y:
                candidates.append((dist, s, int(bank_preds[i])))
            if not positive and int(bank_labels[i]) != y:
                candidates.append((dist, s, y))
        candidates.sort(key=lambda t: t[0], reverse=positive)
        for r, (_, s, c) in enumerate(candidates[:gamma]):
            e = float(eps[j, r])
            feats[j, r] = normalise((1 - e) * s + e * normalise(protos[c]))
            mask[j, r] = True
    return feats, mask


@pytest.mark.parametrize("seed", range(3))
def test_proto_loss_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(6, 5, generator=g) * 3
    neg = torch.randn(6, 9, generator=g) * 3
    pos_mask = torch.rand(6, 5, generator=g) > 0.3
    neg_mask = torch.rand(6, 9, generator=g) > 0.3
    pos_mask[:, 0] = True
    got = proto_loss(pos, neg, pos_mask, neg_mask)
    assert got.shape == (6,)
    torch.testing.assert_close(got.double(), brute_proto_loss(pos, neg, pos_mask, neg_mask), rtol=1e-5, atol=1e-6)


def test_proto_loss_without_masks_and_masked_entries_ignored():
    pos, neg = torch.randn(4, 3), torch.randn(4, 7)
    full = proto_loss(pos, neg)
    ones_p, ones_n = torch.ones_like(pos, dtype=torch.bool), torch.ones_like(neg, dtype=torch.bool)
    torch.testing.assert_close(full, proto_loss(pos, neg, ones_p, ones_n))
    neg_mask = ones_n.clone()
    neg_mask[:, -1] = False
    changed = neg.clone()
    changed[:, -1] = 1e4
    torch.testing.assert_close(proto_loss(pos, changed, ones_p, neg_mask), proto_loss(pos, neg, ones_p, neg_mask))


def test_proto_loss_no_negatives_is_zero_with_finite_gradient():
    pos = torch.randn(3, 4, requires_grad=True)
    neg = torch.randn(3, 5, requires_grad=True)
    neg_mask = torch.zeros(3, 5, dtype=torch.bool)
    loss = proto_loss(pos, neg, None, neg_mask)
    assert torch.equal(loss, torch.zeros(3))
    loss.sum().backward()
    assert torch.isfinite(pos.grad).all() and torch.isfinite(neg.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_proto_loss_finite_for_large_logits(dtype):
    pos = torch.tensor([[1e4, -1e4], [-1e4, -1e4]]).to(dtype).requires_grad_()
    neg = torch.tensor([[1e4, 1e4, -1e4], [1e4, -1e4, 0.0]]).to(dtype).requires_grad_()
    loss = proto_loss(pos, neg)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(pos.grad.float()).all() and torch.isfinite(neg.grad.float()).all()
    assert loss[1].item() == pytest.approx(2e4, rel=1e-2)


def test_proto_loss_bad_shapes():
    with pytest.raises(ValueError, match="pos"):
        proto_loss(torch.randn(3), torch.randn(3, 2))
    with pytest.raises(ValueError, match="neg"):
        proto_loss(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="neg_mask"):
        proto_loss(torch.randn(3, 2), torch.randn(3, 2), None, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="pos_mask"):
        proto_loss(torch.randn(3, 2), torch.randn(3, 2), torch.ones(3, 2))


def random_bank(seed, batch=5, bank=17, dim=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    return dict(
        query=torch.randn(batch, dim, generator=g),
        bank_feats=torch.randn(bank, dim, generator=g) * 2,
        bank_labels=torch.randint(0, classes, (bank,), generator=g),
        bank_preds=torch.randint(0, classes, (bank,), generator=g),
        labels=torch.randint(0, classes, (batch,), generator=g),
        prototypes=torch.randn(classes, dim, generator=g),
        generator=g,
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma", [1, 3, 30])
def test_adversarial_negatives_match_brute_force(seed, gamma):
    d = random_bank(seed)
    eps = torch.rand(5, gamma, generator=d["generator"]) * 0.4
    feats, mask = adversarial_negatives(d["query"], d["bank_feats"], d["bank_labels"], d["labels"], d["prototypes"], gamma, eps)
    ref_feats, ref_mask = brute_adversarial(
        d["query"], d["bank_feats"], d["bank_labels"], d["bank_preds"], d["labels"], d["prototypes"], gamma, eps, positive=False
    )
    assert feats.shape == (5, gamma, 8) and mask.shape == (5, gamma)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(feats[mask], ref_feats[ref_mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma", [1, 2, 30])
def test_adversarial_positives_match_brute_force(seed, gamma):
    d = random_bank(seed)
    eps = torch.rand(5, gamma, generator=d["generator"]) * 0.4
    feats, mask = adversarial_positives(
        d["query"], d["bank_feats"], d["bank_labels"], d["bank_preds"], d["labels"], d["prototypes"], gamma, eps
    )
    ref_feats, ref_mask = brute_adversarial(
        d["query"], d["bank_feats"], d["bank_labels"], d["bank_preds"], d["labels"], d["prototypes"], gamma, eps, positive=True
    )
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(feats[mask], ref_feats[ref_mask], rtol=1e-5, atol=1e-5)


def test_no_candidates_and_empty_bank_and_gamma_zero():
    d = random_bank(0)
    same = torch.zeros(17, dtype=torch.long)
    labels = torch.zeros(5, dtype=torch.long)
    eps = torch.zeros(5, 3)
    _, mask = adversarial_negatives(d["query"], d["bank_feats"], same, labels, d["prototypes"], 3, eps)
    assert not mask.any()
    _, mask = adversarial_positives(d["query"], d["bank_feats"], same, same, labels, d["prototypes"], 3, eps)
    assert not mask.any()
    empty = torch.zeros(0, 8)
    feats, mask = adversarial_negatives(d["query"], empty, torch.zeros(0, dtype=torch.long), labels, d["prototypes"], 3, eps)
    assert feats.shape == (5, 3, 8) and not mask.any()
    feats, mask = adversarial_negatives(
        d["query"], d["bank_feats"], d["bank_labels"], labels, d["prototypes"], 0, torch.zeros(5, 0)
    )
    assert feats.shape == (5, 0, 8) and mask.shape == (5, 0)


def test_adversarial_instances_carry_no_gradient():
    d = random_bank(1)
    query = d["query"].requires_grad_()
    protos = d["prototypes"].requires_grad_()
    feats, _ = adversarial_negatives(query, d["bank_feats"], d["bank_labels"], d["labels"], protos, 3, torch.rand(5, 3) * 0.4)
    assert not feats.requires_grad


def test_adversarial_bad_input():
    d = random_bank(2)
    args = (d["query"], d["bank_feats"], d["bank_labels"], d["labels"], d["prototypes"])
    with pytest.raises(ValueError, match="gamma"):
        adversarial_negatives(*args, -1, torch.zeros(5, 0))
    with pytest.raises(ValueError, match="eps"):
        adversarial_negatives(*args, 2, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="eps"):
        adversarial_negatives(*args, 2, torch.full((5, 2), 1.0))
    with pytest.raises(ValueError, match="labels"):
        adversarial_negatives(
            d["query"], d["bank_feats"], d["bank_labels"], d["labels"] + 10, d["prototypes"], 2, torch.zeros(5, 2)
        )
    with pytest.raises(ValueError, match="bank_feats"):
        adversarial_negatives(
            d["query"], torch.randn(17, 3), d["bank_labels"], d["labels"], d["prototypes"], 2, torch.zeros(5, 2)
        )
    with pytest.raises(ValueError, match="bank_preds"):
        adversarial_positives(*args[:3], d["bank_preds"] - 9, d["labels"], d["prototypes"], 2, torch.zeros(5, 2))


def brute_recalibration(batches, num_classes, beta=0.95, init=0.01):
    w = [init] * num_classes
    for logits, labels in batches:
        for c in range(num_classes):
            values = [torch.sigmoid(logits[j, c]).item() for j in range(len(labels)) if int(labels[j]) == c]
            if values:
                w[c] = beta * w[c] + (1 - beta) * sum(values) / len(values)
    return torch.tensor(w)


def test_recalibration_matches_brute_force_and_keeps_absent_classes():
    g = torch.Generator().manual_seed(3)
    recal = PrototypeRecalibration(5, beta=0.9, init=0.02)
    batches = [(torch.randn(8, 5, generator=g) * 2, torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    for logits, labels in batches:
        recal.update(logits, labels)
    expected = brute_recalibration(batches, 5, beta=0.9, init=0.02)
    torch.testing.assert_close(recal.weights, expected, rtol=1e-5, atol=1e-7)
    assert recal.weights[4] == pytest.approx(0.02)
    torch.testing.assert_close(recal.log_weights, expected.log(), rtol=1e-5, atol=1e-6)
    restored = PrototypeRecalibration(5)
    restored.load_state_dict(recal.state_dict())
    assert torch.equal(restored.weights, recal.weights)


def test_recalibration_bad_input():
    with pytest.raises(ValueError, match="beta"):
        PrototypeRecalibration(3, beta=1.0)
    recal = PrototypeRecalibration(3)
    with pytest.raises(ValueError, match="logits"):
        recal.update(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        recal.update(torch.randn(4, 3), torch.full((4,), 3))


def test_supervised_infonce_matches_definition():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 6, generator=g)
    pos = torch.rand(4, 6, generator=g) > 0.5
    pos[0] = False
    got = supervised_infonce(logits, pos)
    log_prob = F.log_softmax(logits, dim=1)
    for j in range(4):
        expected = -log_prob[j][pos[j]].mean() if pos[j].any() else torch.tensor(0.0)
        assert got[j].item() == pytest.approx(expected.item(), abs=1e-5)


def test_embedding_std_separates_collapsed_from_spread_features():
    torch.manual_seed(0)
    k = 64
    spread = F.normalize(torch.randn(4096, k), dim=1)
    assert embedding_std(spread).item() == pytest.approx(1 / math.sqrt(k), rel=0.02)
    collapsed = torch.randn(1, k).repeat(32, 1) * torch.rand(32, 1).add(0.5)  # one direction, any length
    assert embedding_std(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 rows"):
        embedding_std(spread[:1])


def brute_unified(similarity, positive, negative, logits, labels, tau, form, margin):
    """Each form of the assembled Eq. 7, sample by sample, from its definition in docs/method.md."""
    out = []
    for j in range(similarity.shape[0]):
        y = int(labels[j])
        s_pos = [float(v) for v, m in zip(similarity[j], positive[j]) if m]
        s_neg = [float(v) for v, m in zip(similarity[j], negative[j]) if m]
        if form == "circle":
            a = [max(0.0, s + margin) * (s - margin) / tau for s in s_neg]
            b = [max(0.0, 1 + margin - s) * (s - 1 + margin) / tau for s in s_pos]
        else:
            a = [s / tau for s in s_neg]
            b = [s / tau for s in s_pos]
        l_own = float(logits[j, y])
        l_other = [float(logits[j, c]) for c in range(logits.shape[1]) if c != y]
        if form == "mean":
            a = [math.log(sum(math.exp(v) for v in a) / len(a))] if a else []
            b = [-math.log(sum(math.exp(-v) for v in b) / len(b))] if b else []
        if form == "split":
            inst = math.log(1 + sum(math.exp(v) for v in a) * sum(math.exp(-v) for v in b))
            proto = math.log(1 + sum(math.exp(v) for v in l_other) * math.exp(-l_own))
            out.append(inst + proto)
            continue
        neg_sum = sum(math.exp(v) for v in a + l_other)
        pos_sum = sum(math.exp(-v) for v in b + [l_own])
        out.append(math.log(1 + neg_sum * pos_sum))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("form", ["eq7", "mean", "split", "circle"])
@pytest.mark.parametrize("tau", [1.0, 0.2])
@pytest.mark.parametrize("seed", range(2))
def test_unified_proto_loss_matches_brute_force(form, tau, seed):
    g = torch.Generator().manual_seed(seed)
    batch, entries, classes = 6, 11, 4
    similarity = torch.rand(batch, entries, generator=g) * 2 - 1
    kind = torch.randint(0, 3, (batch, entries), generator=g)  # 0 positive, 1 negative, 2 neither
    positive, negative = kind == 0, kind == 1
    positive[0], negative[1] = False, False  # a sample without positives, one without negatives
    logits = torch.randn(batch, classes, generator=g) * 2
    labels = torch.randint(0, classes, (batch,), generator=g)
    got = unified_proto_loss(similarity, positive, negative, logits, labels, tau=tau, form=form, margin=0.25)
    expected = brute_unified(similarity, positive, negative, logits, labels, tau, form, 0.25)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_unified_eq7_is_proto_loss_of_the_concatenated_sets():
    g = torch.Generator().manual_seed(5)
    similarity = torch.rand(3, 7, generator=g) * 2 - 1
    positive = torch.rand(3, 7, generator=g) > 0.5
    negative = ~positive
    logits, labels = torch.randn(3, 4, generator=g), torch.tensor([0, 3, 1])
    own = F.one_hot(labels, 4).bool()
    pos = torch.cat([similarity / 0.1, logits.gather(1, labels[:, None])], 1)
    neg = torch.cat([similarity / 0.1, logits], 1)
    expected = proto_loss(pos, neg, torch.cat([positive, torch.ones(3, 1, dtype=torch.bool)], 1), torch.cat([negative, ~own], 1))
    torch.testing.assert_close(unified_proto_loss(similarity, positive, negative, logits, labels, tau=0.1), expected)


def test_unified_proto_loss_gradients_finite_and_bad_input():
    similarity = (torch.rand(4, 5) * 2 - 1).requires_grad_()
    logits = torch.randn(4, 3, requires_grad=True)
    none = torch.zeros(4, 5, dtype=torch.bool)
    for form in PROTO_FORMS:
        loss = unified_proto_loss(similarity, none, none, logits, torch.tensor([0, 1, 2, 0]), tau=0.07, form=form)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(similarity.grad).all() and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="form"):
        unified_proto_loss(similarity, none, none, logits, torch.tensor([0, 1, 2, 0]), tau=1.0, form="sum")
    with pytest.raises(ValueError, match="logits"):
        unified_proto_loss(similarity, none, none, logits[:2], torch.tensor([0, 1, 2, 0]), tau=1.0)
    with pytest.raises(ValueError, match="labels"):
        unified_proto_loss(similarity, none, none, logits, torch.tensor([0, 1]), tau=1.0)


def test_collapsed_embedding_scores_worse_than_a_clustered_one_under_circle():
    """Circle's optimum is an absolute target (s_p >= 1 - m, s_n <= m), so collapse is not a cheap way down."""
    labels = torch.tensor([0, 1])
    positive = torch.tensor([[True, False], [False, True]])
    logits = torch.zeros(2, 2)
    collapsed = torch.ones(2, 2)
    clustered = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = lambda s: unified_proto_loss(s, positive, ~positive, logits, labels, tau=0.1, form="circle").mean()  # noqa: E731
    assert loss(clustered) < loss(collapsed)


@pytest.mark.parametrize("seed", range(3))
def test_contrast_terms_match_a_loop_over_every_instance(seed):
    """Eq. 7's instance terms, built one (sample, instance) pair at a time: the contrast set by label, then the
    valid negative and positive proto-instances; invalid ones in neither set."""
    d = random_bank(seed)
    q, bank, gamma = d["query"], d["bank_feats"], 3
    same = d["labels"][:, None] == d["bank_labels"][None, :]
    eps = torch.rand(5, gamma, generator=d["generator"]) * 0.4
    negatives = adversarial_negatives(q, bank, d["bank_labels"], d["labels"], d["prototypes"], gamma, eps)
    positives = adversarial_positives(q, bank, d["bank_labels"], d["bank_preds"], d["labels"], d["prototypes"], gamma, eps)
    for proto_negatives, proto_positives in [(None, None), (negatives, positives), (negatives, None)]:
        similarity, positive, negative = contrast_terms(q, bank, same, proto_negatives, proto_positives)
        for i in range(q.shape[0]):
            rows = [
                (float(q[i] @ s), bool(d["labels"][i] == y), bool(d["labels"][i] != y)) for s, y in zip(bank, d["bank_labels"])
            ]
            for instances, in_positive in ((proto_negatives, False), (proto_positives, True)):
                if instances is not None:
                    rows += [
                        (float(q[i] @ v), ok and in_positive, ok and not in_positive)
                        for v, ok in zip(instances[0][i], instances[1][i].tolist())
                    ]
            assert positive[i].tolist() == [r[1] for r in rows] and negative[i].tolist() == [r[2] for r in rows]
            torch.testing.assert_close(similarity[i], torch.tensor([r[0] for r in rows]), rtol=1e-5, atol=1e-5)
