"""The method registry: ProCo's step and every baseline on a tiny network."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from proco_ray.config import CLASS_BALANCED, INSTANCE_BALANCED, MethodConfig, ModelConfig
from proco_ray.method.base import unwrap
from proco_ray.method.registry import METHODS, create_method, stages_for

CLASSES = 3
TINY = ModelConfig(arch="resnet18", small_input=True, feat_dim=16, hidden_dim=32, batch_norm="plain")


def fixed_batch(seed=0, batch=12):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 16, 16, generator=g)
    return {
        "view_q": images + 0.1 * torch.randn(images.shape, generator=g),
        "view_k": images + 0.1 * torch.randn(images.shape, generator=g),
        "label": torch.arange(batch) % CLASSES,
        "location": torch.arange(batch) % 5 - 1,  # MTL's body sites, -1 where unknown
    }


def make(name="proco", model_cfg=TINY, **overrides):
    torch.manual_seed(0)
    cfg = MethodConfig(name=name, gamma=4, queue_size=16, **overrides)
    method = create_method(cfg, model_cfg, CLASSES, [8, 3, 1])
    model = method.build_model()
    return method, model


def train_steps(method, model, steps, lr=0.05):
    stage = stages_for(method.cfg, 10)[0]
    method.enter_stage(model, stage)
    optimizer = torch.optim.SGD(method.trainable_parameters(model, stage), lr=lr, momentum=0.9)
    batch = fixed_batch()
    losses = []
    for _ in range(steps):
        out = method.training_loss(model, batch, epoch=0, stage=stage)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses


def test_proco_step_lowers_the_loss():
    method, model = make()
    losses = train_steps(method, model, 15)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0]
    assert len(method.queue) == 16


def test_gradients_reach_query_encoder_heads_and_prototypes_never_keys():
    method, model = make()
    stage = stages_for(method.cfg, 10)[0]
    method.training_loss(model, fixed_batch(), 0, stage)
    out = method.training_loss(model, fixed_batch(1), 0, stage)
    out.loss.backward()
    for name in ("backbone.conv1.weight", "head_g.0.weight", "head_g.2.weight", "head_f.0.weight"):
        grad = dict(model.encoder_q.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.prototypes.grad is not None and model.prototypes.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    assert out.logs["proto_instances_neg"] > 0
    assert 0 < out.logs["embedding_std"] < 1


@pytest.mark.parametrize("key_momentum", [0.0, 0.999])
def test_key_encoder_lag_is_logged_as_its_accuracy_and_its_cosine_to_the_query(key_momentum):
    """m = 0 makes the key encoder the query encoder, so on identical views both logs are exact."""
    method, model = make(model_cfg=dataclasses.replace(TINY, key_momentum=key_momentum))
    train_steps(method, model, 3, lr=0.5)
    batch = fixed_batch(1)
    batch["view_k"] = batch["view_q"]
    logs = method.training_loss(model, batch, 0, stages_for(method.cfg, 10)[0]).logs
    if key_momentum == 0.0:
        with torch.no_grad():
            query_accuracy = (model(batch["view_q"])["logits"].argmax(1) == batch["label"]).float().mean()
        assert logs["query_key_cosine"].item() == pytest.approx(1.0, abs=1e-5)
        assert logs["key_accuracy"].item() == pytest.approx(query_accuracy.item())
    else:
        assert logs["query_key_cosine"].item() < 1.0 - 1e-4
        assert 0.0 <= logs["key_accuracy"].item() <= 1.0


def test_key_encoder_follows_query_encoder_by_momentum():
    method, model = make()
    before_k = model.encoder_k.head_f[0].weight.detach().clone()
    train_steps(method, model, 2)
    q = model.encoder_q.head_f[0].weight.detach()
    k = model.encoder_k.head_f[0].weight.detach()
    assert not torch.equal(k, before_k)
    assert (k - q).abs().max() > 0


@pytest.mark.parametrize(
    "switches",
    [
        dict(proto_instances=False, recalibration=False),
        dict(proto_instances=True, recalibration=False),
        dict(proto_instances=False, recalibration=True),
        dict(loss="ce"),
        dict(loss="infonce"),
    ],
)
def test_proco_ablation_switches(switches):
    method, model = make(**switches)
    losses = train_steps(method, model, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    recalibrated = method.recalibration.weights
    if switches.get("recalibration", True) and switches.get("loss", "proto") == "proto":
        assert not torch.allclose(recalibrated, torch.full_like(recalibrated, 0.01))
    else:
        assert torch.allclose(recalibrated, torch.full_like(recalibrated, 0.01))


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"proco"}))
def test_every_baseline_trains_and_predicts(name):
    method, model = make(name)
    stages = stages_for(method.cfg, 10)
    assert sum(s.epochs for s in stages) == 10
    for stage in stages:
        method.enter_stage(model, stage)
        params = list(method.trainable_parameters(model, stage))
        optimizer = torch.optim.SGD(params, lr=0.01)
        out = method.training_loss(model, fixed_batch(), epoch=9, stage=stage)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        assert torch.isfinite(out.loss)
    assert method.predict(model, fixed_batch()["view_q"]).shape == (12, CLASSES)
    assert (stages[-1].sampling == CLASS_BALANCED) == name.endswith("_resample")


def test_cl_linear_stage_trains_only_the_classifier():
    method, model = make("cl")
    linear = stages_for(method.cfg, 10)[1]
    method.enter_stage(model, linear)
    assert [p.shape for p in method.trainable_parameters(model, linear)] == [p.shape for p in unwrap(model).fc.parameters()]
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize(
    "field,value",
    [
        ("gamma", -1),
        ("eps_max", 1.0),
        ("eps_max", -0.1),
        ("tau", 0.0),
        ("loss", "mse"),
        ("queue_size", -5),
        ("proto_form", "sum"),
    ],
)
def test_bad_proco_settings_name_the_argument(field, value):
    with pytest.raises(ValueError, match=field):
        create_method(MethodConfig(**{field: value}), TINY, CLASSES, [1, 1, 1])


def test_unknown_method_and_bad_counts():
    with pytest.raises(ValueError, match="method.name"):
        create_method(MethodConfig(name="no_such_method"), TINY, CLASSES, [1, 1, 1])
    with pytest.raises(ValueError, match="class_counts"):
        create_method(MethodConfig(), TINY, CLASSES, [1, 1])


def test_ldam_classifies_with_cosine_logits_as_its_scale_assumes():
    method, model = make("ldam_drw")
    logits = method.predict(model, fixed_batch()["view_q"])
    assert logits.abs().max() <= 1 + 1e-5
    scaled = make("ldam_drw", ldam_scale=30.0)
    losses = train_steps(*scaled, 15)
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) / 3 < losses[0]


def test_each_method_reads_its_augmentation_and_views():
    from proco_ray.data.train_input import TrainInput

    def inputs(name: str, augmentation: str = "auto", **method: str) -> list[TrainInput]:
        return [stage.input for stage in stages_for(MethodConfig(name=name, **method), 10, augmentation)]

    assert inputs("proco") == [TrainInput(CLASS_BALANCED, "supervised", 2)]
    assert inputs("proco_paper") == [TrainInput(INSTANCE_BALANCED, "moco_v2", 2)]
    assert inputs("proco", sampling="instance_balanced") == [TrainInput(INSTANCE_BALANCED, "supervised", 2)]
    for single in ("ce", "focal", "ldam_drw", "ohem"):
        assert inputs(single) == [TrainInput(INSTANCE_BALANCED, "supervised", 1)]
    assert inputs("ce_resample") == [TrainInput(CLASS_BALANCED, "supervised", 1)]
    assert inputs("cl_resample") == [TrainInput(INSTANCE_BALANCED, "moco_v2", 2), TrainInput(CLASS_BALANCED, "supervised", 1)]
    assert inputs("cl", "pretrain:supervised,linear:none") == [
        TrainInput(INSTANCE_BALANCED, "supervised", 2),
        TrainInput(INSTANCE_BALANCED, "none", 1),
    ]
    assert inputs("ce", "moco_v2") == [TrainInput(INSTANCE_BALANCED, "moco_v2", 1)]
    with pytest.raises(ValueError, match="data.augmentation must be 'auto' or one of"):
        inputs("ce", "randaugment")
    with pytest.raises(ValueError, match="method 'ce' trains on instance_balanced batches; method.sampling applies to proco"):
        inputs("ce", sampling="class_balanced")
    with pytest.raises(ValueError, match="names no value for stage 'linear'"):
        inputs("cl", "pretrain:moco_v2")


META_CASES = (
    [(name, {}) for name in sorted(METHODS)]
    + [("proco", {"proto_form": form}) for form in ("split", "mean", "circle")]
    + [("proco", {"loss": "infonce"})]
)


@pytest.mark.parametrize("name,overrides", META_CASES)
def test_no_training_step_reads_a_device_value(name, overrides):
    """Every method's step and backward run on the meta device, where reading any value back (.item(),
    float(), a data-dependent shape) raises: on CUDA the same step never waits for the device."""
    from proco_ray.config import MethodConfig, ModelConfig

    cfg = MethodConfig(name=name, queue_size=64, gamma=5, **overrides)
    model_cfg = ModelConfig(arch="resnet18", small_input=True, feat_dim=16, hidden_dim=32, batch_norm="plain")
    method = create_method(cfg, model_cfg, 4, [8, 4, 2, 1])
    model = method.build_model()
    meta = torch.device("meta")
    method.to(meta), model.to(meta)
    method._draw_eps = lambda batch, device: torch.empty(batch, cfg.gamma, device=device)  # no meta generator
    batch = {
        "view_q": torch.empty(8, 3, 8, 8, device=meta),
        "view_k": torch.empty(8, 3, 8, 8, device=meta),
        "label": torch.empty(8, dtype=torch.long, device=meta),
        "location": torch.empty(8, dtype=torch.long, device=meta),
    }
    for stage in stages_for(method.cfg, 4):
        method.enter_stage(model, stage)
        for _ in range(2):  # the second step reads a filled queue
            method.training_loss(model, batch, 3, stage).loss.backward()


def test_mtl_location_term_leaves_out_unknown_sites_and_the_exported_network():
    method, model = make("mtl")
    batch = fixed_batch()
    unknown = {**batch, "location": torch.full_like(batch["label"], -1)}
    out = method.training_loss(model, unknown, 0, stages_for(method.cfg, 1)[0])
    logits = model(batch["view_q"])
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, batch["label"]))  # no site known: CE alone
    assert float(out.logs["location_ce"]) == 0.0
    known = method.training_loss(model, batch, 0, stages_for(method.cfg, 1)[0])
    _, site_logits = model(batch["view_q"], locations=True)
    mask = batch["location"] >= 0
    expected = F.cross_entropy(logits, batch["label"]) + F.cross_entropy(site_logits[mask], batch["location"][mask])
    torch.testing.assert_close(known.loss, expected)
    assert not any("location" in name for name, _ in model.inference_network().named_parameters())
    with pytest.raises(ValueError, match="body-location column"):
        method.training_loss(model, {k: v for k, v in batch.items() if k != "location"}, 0, stages_for(method.cfg, 1)[0])


def backbone_statistics(model):
    return [m.running_mean.clone() for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def linear_stage_losses(probe_norm, feature_scale, steps=12):
    """CL's linear stage on a backbone whose features are `feature_scale` times larger, at lr 0.05."""
    method, model = make("cl", linear_probe_norm=probe_norm)
    linear = stages_for(method.cfg, 10)[1]
    method.enter_stage(model, linear)
    frozen = backbone_statistics(model)
    model.backbone.register_forward_hook(lambda module, inputs, output: output * feature_scale)
    optimizer = torch.optim.SGD(method.trainable_parameters(model, linear), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        model.train()
        out = method.training_loss(model, fixed_batch(), epoch=9, stage=linear)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(torch.equal(a, b) for a, b in zip(frozen, backbone_statistics(model)))
    return model, losses


def test_cl_normalised_probe_standardises_frozen_features_of_any_scale():
    model, normalised = linear_stage_losses(probe_norm=True, feature_scale=100.0)
    norm, linear = model.fc
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine and isinstance(linear, torch.nn.Linear)
    assert norm.running_mean.abs().sum() > 0  # it learnt the frozen features' statistics
    _, unnormalised = linear_stage_losses(probe_norm=False, feature_scale=100.0)
    assert max(normalised) < 10 and normalised[-1] < normalised[0]
    assert max(unnormalised) > 10 * max(normalised)  # the plain probe at the same lr diverges on such features


def test_ce_with_logit_adjustment_is_the_logit_adjusted_loss_and_predicts_with_raw_logits():
    plain, model = make("ce")
    adjusted, _ = make("ce", logit_adjustment=1.0)
    batch = fixed_batch()
    logits = model(batch["view_q"])
    prior = [8 / 12, 3 / 12, 1 / 12]
    looped = sum(-F.log_softmax(row + torch.log(torch.tensor(prior)), dim=0)[y] for row, y in zip(logits, batch["label"])) / len(
        logits
    )
    torch.testing.assert_close(adjusted.training_loss(model, batch, 0, stages_for(adjusted.cfg, 1)[0]).loss, looped)
    torch.testing.assert_close(
        plain.training_loss(model, batch, 0, stages_for(plain.cfg, 1)[0]).loss, F.cross_entropy(logits, batch["label"])
    )
    torch.testing.assert_close(adjusted.predict(model, batch["view_q"]), plain.predict(model, batch["view_q"]))


@pytest.mark.parametrize("loss", ["proto", "ce"])
def test_proco_adds_tau_log_prior_to_its_recalibrated_training_logits(monkeypatch, loss):
    import proco_ray.method.proco as proco

    seen = []
    for tau in (0.0, 2.0):
        method, model = make("proco", loss=loss, logit_adjustment=tau)
        monkeypatch.setattr(proco, "unified_proto_loss", lambda *a, **k: seen.append(a[3]) or torch.zeros(12))
        monkeypatch.setattr(proco.F, "cross_entropy", lambda logits, labels: seen.append(logits) or logits.sum())
        method.training_loss(model, fixed_batch(), 0, stages_for(method.cfg, 1)[0])
        monkeypatch.undo()
    shift = seen[1] - seen[0]
    expected = 2.0 * torch.log(torch.tensor([8 / 12, 3 / 12, 1 / 12]))
    torch.testing.assert_close(shift, expected.expand_as(shift))


@pytest.mark.parametrize("name", ["focal", "ldam_drw", "cl_resample", "danil"])
def test_logit_adjustment_is_refused_by_methods_that_would_ignore_it(name):
    with pytest.raises(ValueError, match="method.logit_adjustment is not used by method"):
        make(name, logit_adjustment=1.0)


@pytest.mark.parametrize("tau", [-1.0, float("nan")])
def test_a_negative_or_undefined_logit_adjustment_is_refused(tau):
    with pytest.raises(ValueError, match="method.logit_adjustment must be >= 0"):
        make("ce", logit_adjustment=tau)


def test_the_registry_registers_a_class_under_several_names_with_its_choices():
    """Issue 27.1: resampling is a registration argument, not a subclass; names are unique and known to config."""
    from proco_ray.method.base import Method
    from proco_ray.method.registry import register

    assert METHODS["ce"].cls is METHODS["ce_resample"].cls
    assert METHODS["cl"].cls is METHODS["cl_resample"].cls
    assert METHODS["proco"].cls is METHODS["proco_paper"].cls
    assert (METHODS["ce"].choices.sampling, METHODS["ce_resample"].choices.sampling) == ("instance_balanced", "class_balanced")
    assert METHODS["proco_paper"].choices.proto_form == "eq7" and METHODS["proco"].choices.proto_form == "split"
    with pytest.raises(ValueError, match="registered twice"):
        register("ce")(Method)
    with pytest.raises(ValueError, match="config.MethodName"):
        register("no_such_method")
    ce, _ = make("ce")
    assert ce.name == "ce" and type(ce) is METHODS["ce"].cls


def test_the_loop_logs_a_methods_own_state_through_its_hook():
    proco, _ = make("proco")
    scalars = proco.state_scalars(["a", "b", "c"])
    assert set(scalars) == {"recalibration/a", "recalibration/b", "recalibration/c", "queue/a", "queue/b", "queue/c"}
    assert make("ce")[0].state_scalars(["a", "b", "c"]) == {}
