"""Networks: the ResNet backbone, ProCo's heads G and F with prototypes and a momentum key encoder,
and the plain classifier used by the baselines."""

from __future__ import annotations

import copy
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from proco_ray.config import ModelConfig
from proco_ray.distributed import batch_shuffle, batch_unshuffle
from proco_ray.errors import ProcoError


class PretrainedWeightsError(ProcoError, RuntimeError):
    """ImageNet weights were asked for but cannot be had."""


def _load_pretrained(model: nn.Module, arch: str, pretrained: str) -> None:
    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            state = weights.get_state_dict(progress=False)
        except (urllib.error.URLError, OSError) as error:
            raise PretrainedWeightsError(
                f"cannot download the ImageNet weights of {arch} ({weights.url}): {error}. "
                f"Download the file elsewhere and pass its local path as model.pretrained=/path/to/file.pth"
            ) from error
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"model.pretrained: no weights file at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"weights in {pretrained} do not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


def build_backbone(
    arch: str = "resnet50", small_input: bool = False, pretrained: str | None = None, norm: str = "batch"
) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier; returns (module giving [B, d] features, d).

    `small_input` swaps the stem for a 3x3 stride-1 convolution without max-pooling,
    the usual stem for 28-64 px images. `pretrained` is 'imagenet' (torchvision's
    weights, which must already be in the torch hub cache when offline) or a path.
    `norm='group'` uses GroupNorm, whose output does not depend on how the batch is
    split across workers (and which needs no SyncBN for small per-GPU batches).
    """
    norm_layer = _group_norm if norm == "group" else None
    model = torchvision.models.get_model(arch, weights=None, norm_layer=norm_layer)
    if pretrained:
        _load_pretrained(model, arch, pretrained)
    if small_input:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, dim


def resnet_neurons(backbone: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """(layer3's feature map, the pooled features) of a `build_backbone` ResNet in one pass.

    DANIL's neurons: layer4's gradient is the same at every position under global pooling, layer3's is not.
    """
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
    neurons = backbone.layer3(backbone.layer2(backbone.layer1(x)))
    return neurons, torch.flatten(backbone.avgpool(backbone.layer4(neurons)), 1)


class Encoder(nn.Module):
    """f with its two heads: G (contrastive, normalised) and F (classification, Linear -> ReLU)."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, feat_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_g = nn.Sequential(nn.Linear(backbone_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, feat_dim))
        self.head_f = nn.Sequential(nn.Linear(backbone_dim, feat_dim), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.backbone(x)
        return F.normalize(self.head_g(h), dim=1), self.head_f(h)


class ProCoNetwork(nn.Module):
    """MoCo v2 structure with ProCo's prototypes: query encoder, momentum key encoder, shared P.

    `forward(view_q, view_k)` first moves the key encoder towards the query
    encoder (theta_k = m theta_k + (1 - m) theta_q, which equals MoCo's update after
    the previous step), then encodes both views. Call it through DDP so that
    gradients are synchronised.
    """

    def __init__(self, num_classes: int, model: ModelConfig) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        backbone, dim = build_backbone(model.arch, model.small_input, model.pretrained, model.norm)
        self.encoder_q = Encoder(backbone, dim, model.feat_dim, model.hidden_dim)
        if model.batch_norm == "sync":
            self.encoder_q = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder_q)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)
        self.prototypes = nn.Parameter(torch.empty(num_classes, model.feat_dim))
        nn.init.kaiming_uniform_(self.prototypes, a=5**0.5)
        self.key_momentum = model.key_momentum
        self.shuffle_keys = model.batch_norm == "shuffle"

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.key_momentum
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(m).add_(param_q.detach(), alpha=1.0 - m)

    def classify(self, images: Tensor) -> Tensor:
        """Test-time logits z . p_c with the raw prototypes (no recalibration)."""
        _, z = self.encoder_q(images)
        return z @ self.prototypes.T

    def inference_network(self) -> nn.Module:
        """What `classify` uses and nothing else (no key encoder, G head or queue): the module to export."""
        return PrototypeClassifier(self.encoder_q.backbone, self.encoder_q.head_f, self.prototypes)

    @torch.no_grad()
    def encode_keys(self, view_k: Tensor) -> tuple[Tensor, Tensor]:
        if self.shuffle_keys:
            shuffled, unshuffle = batch_shuffle(view_k)
            k, z_k = self.encoder_k(shuffled)
            return batch_unshuffle(k, unshuffle), batch_unshuffle(z_k, unshuffle)
        return self.encoder_k(view_k)

    def forward(self, view_q: Tensor, view_k: Tensor | None = None) -> dict[str, Tensor]:
        q, z_q = self.encoder_q(view_q)
        out = {"q": q, "z_q": z_q, "logits": z_q @ self.prototypes.T, "prototypes": self.prototypes.detach()}
        if view_k is not None:
            self.momentum_update()
            k, z_k = self.encode_keys(view_k)
            out["k"] = k
            out["key_preds"] = (z_k @ self.prototypes.detach().T).argmax(dim=1)
        return out


class PrototypeClassifier(nn.Module):
    """ProCo at test time: backbone, F, and the logits z . p_c against the prototypes."""

    def __init__(self, backbone: nn.Module, head_f: nn.Module, prototypes: Tensor) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.head_f = copy.deepcopy(head_f)
        self.prototypes = nn.Parameter(prototypes.detach().clone(), requires_grad=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.head_f(self.backbone(images)) @ self.prototypes.T


class CosineLinear(nn.Module):
    """Cosine-similarity classifier (LDAM's NormedLinear): logits in [-1, 1], which the loss's scale then sharpens."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T


class Classifier(nn.Module):
    """Backbone + linear classifier for the baselines; `projector=True` adds the SupCon projection head,
    `cosine=True` makes the classifier a CosineLinear (LDAM's margins and scale are meant for cosine logits),
    `locations` > 0 adds MTL's body-location head, `probe_norm=True` puts a BatchNorm without affine
    parameters before the classifier (MAE's linear probe: frozen features of any scale reach it standardised)."""

    def __init__(
        self,
        num_classes: int,
        model: ModelConfig,
        projector: bool = False,
        cosine: bool = False,
        locations: int = 0,
        probe_norm: bool = False,
    ) -> None:
        super().__init__()
        self.backbone, dim = build_backbone(model.arch, model.small_input, model.pretrained, model.norm)
        self.fc: nn.Module = CosineLinear(dim, num_classes) if cosine else nn.Linear(dim, num_classes)
        if probe_norm:
            self.fc = nn.Sequential(nn.BatchNorm1d(dim, affine=False), self.fc)
        self.location_fc = nn.Linear(dim, locations) if locations else None
        self.projector = (
            nn.Sequential(nn.Linear(dim, model.hidden_dim), nn.ReLU(inplace=True), nn.Linear(model.hidden_dim, model.feat_dim))
            if projector
            else None
        )

    def classify(self, images: Tensor) -> Tensor:
        return self.fc(self.backbone(images))

    def inference_network(self) -> nn.Module:
        """What `classify` uses (no projection head): the module to export."""
        return nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.fc))

    def forward(
        self, images: Tensor, project: bool = False, neurons: bool = False, locations: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits; with `project`, the normalised projection; with `neurons`, (logits, layer3's feature map);
        with `locations`, (logits, body-location logits)."""
        if neurons:
            feature_map, h = resnet_neurons(self.backbone, images)
            return self.fc(h), feature_map
        h = self.backbone(images)
        if locations:
            if self.location_fc is None:
                raise ValueError("this Classifier was built without a body-location head (locations > 0)")
            return self.fc(h), self.location_fc(h)
        if not project:
            return self.fc(h)
        if self.projector is None:
            raise ValueError("this Classifier was built without a projection head (projector=True)")
        return F.normalize(self.projector(h), dim=1)
