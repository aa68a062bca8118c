"""ProCo's training step (MICCAI 2022), to be read next to docs/method.md as moco's builder.py reads next to
MoCo's paper: encode the two views, gather the keys over ranks, contrast the query with the queue and the
batch's keys, add the adversarial proto-instances (Eq. 1-3) and the recalibrated prototype logits (Eq. 4-6),
take the proto-loss (Eq. 7), enqueue the keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proco_ray import distributed
from proco_ray.config import CLASS_BALANCED
from proco_ray.method.base import Batch, LossOutput, Method, Stage
from proco_ray.method.losses import (
    PrototypeRecalibration,
    adversarial_negatives,
    adversarial_positives,
    contrast_terms,
    embedding_std,
    supervised_infonce,
    unified_proto_loss,
)
from proco_ray.method.networks import ProCoNetwork
from proco_ray.method.queue import SampleQueue
from proco_ray.method.registry import register


@register("proco", sampling=CLASS_BALANCED)
@register("proco_paper", augmentation="moco_v2", proto_form="eq7")
class ProCo(Method):
    """ProCo (MICCAI 2022): proto-loss over the queue, the batch's keys, proto-instances and recalibrated logits.

    `proco` is ProCo as selected on validation (docs/results.md): class-balanced batches, the split proto-loss
    and two views of the supervised augmentation; `proco_paper` is the paper's literal form (instance-balanced
    batches, Eq. 7, MoCo v2's views). Every part stays a switch: method.sampling, method.proto_form,
    data.augmentation and the ablation switches.
    """

    views = 2
    sampling_switch = True
    adjusts_logits = True

    def init_state(self) -> None:
        """The proto-loss form, the sample queue (Eq. 3's contrast set) and the recalibration weights (Eq. 4)."""
        cfg = self.cfg
        self.form = self.choices.proto_form_for(cfg.proto_form)
        self.find_unused_parameters = cfg.loss == "ce"
        self.queue = SampleQueue(cfg.queue_size, self.model_cfg.feat_dim)
        self.recalibration = PrototypeRecalibration(self.num_classes, cfg.beta, cfg.w_init)
        self._eps_generator: torch.Generator | None = None

    def reseed(self, seed: int, device: torch.device) -> None:
        self._eps_generator = torch.Generator(device=device).manual_seed(seed)

    def _draw_eps(self, batch: int, device: torch.device) -> Tensor:
        """eps ~ U(0, E) for the global batch from a generator shared by all ranks; this rank's rows.

        Drawing for the whole global batch makes a run on W workers draw exactly
        what one worker with the same global batch draws.
        """
        world, index = distributed.world_size(), distributed.rank()
        generator = self._eps_generator
        if generator is None or generator.device.type != torch.device(device).type:
            generator = self._eps_generator = torch.Generator(device=device).manual_seed(0)
        full = torch.rand(world * batch, self.cfg.gamma, generator=generator, device=device)
        return full[index * batch : (index + 1) * batch] * self.cfg.eps_max

    @property
    def uses_proto_instances(self) -> bool:
        return self.cfg.proto_instances and self.cfg.gamma > 0 and self.cfg.loss == "proto"

    def build_model(self) -> nn.Module:
        return ProCoNetwork(self.num_classes, self.model_cfg)

    def state_scalars(self, class_names: list[str]) -> dict[str, float]:
        """The recalibration weight per class and the class histogram of the queue."""
        out = {f"recalibration/{n}": float(w) for n, w in zip(class_names, self.recalibration.weights)}
        _, labels, _ = self.queue.contents()
        counts = torch.bincount(labels.cpu(), minlength=len(class_names))
        out.update({f"queue/{n}": float(c) for n, c in zip(class_names, counts)})
        return out

    def training_loss(self, model: nn.Module, batch: Batch, epoch: int, stage: Stage) -> LossOutput:
        """The proto-loss over queue + keys (method.loss=proto); `ce` and `infonce` are the loss ablation's rows."""
        labels = batch["label"]
        if self.cfg.loss == "ce":
            out = model(batch["view_q"])
            loss = F.cross_entropy(self.adjusted(out["logits"]), labels)
            return LossOutput(loss, {"ce": loss.detach()})
        out = model(batch["view_q"], batch["view_k"])
        keys, key_labels, key_preds = SampleQueue.gather(out["k"], labels, out["key_preds"])
        queue_feats, queue_labels, queue_preds = self.queue.contents()
        bank = torch.cat([queue_feats.to(keys.dtype), keys])
        bank_labels = torch.cat([queue_labels, key_labels])
        bank_preds = torch.cat([queue_preds, key_preds])
        q = out["q"]
        same = labels[:, None] == bank_labels[None, :]
        if self.cfg.loss == "infonce":
            nce = supervised_infonce(q @ bank.T / self.cfg.infonce_temperature, same).mean()
            ce = F.cross_entropy(self.adjusted(out["logits"]), labels)
            logs = {"infonce": nce.detach(), "ce": ce.detach()}
            loss = nce + ce
        else:
            loss, logs = self._proto_loss(q, out["logits"], out["prototypes"], labels, same, bank, bank_labels, bank_preds)
        self.queue.enqueue(keys, key_labels, key_preds)
        logs["embedding_std"] = embedding_std(q.detach())
        logs["key_accuracy"] = (out["key_preds"] == labels).float().mean()
        logs["query_key_cosine"] = (q.detach() * out["k"]).sum(dim=1).mean()
        logs["queue_fill"] = torch.tensor(len(self.queue) / max(1, self.queue.size))
        return LossOutput(loss, logs)

    def _proto_loss(
        self,
        q: Tensor,
        logits: Tensor,
        prototypes: Tensor,
        labels: Tensor,
        same: Tensor,
        bank: Tensor,
        bank_labels: Tensor,
        bank_preds: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 1-7: the proto-instances (1-3) and the recalibrated logits (4-6) with the contrast set, into the
        proto-loss (7)."""
        if self.cfg.recalibration:
            self.recalibration.update(logits.detach(), labels)
            logits = logits + self.recalibration.log_weights.to(logits.dtype)
        logits = self.adjusted(logits)
        logs: dict[str, Tensor] = {}
        proto_negatives = proto_positives = None
        if self.uses_proto_instances:
            batch, gamma = labels.shape[0], self.cfg.gamma
            eps_neg = self._draw_eps(batch, q.device)
            eps_pos = self._draw_eps(batch, q.device)
            proto_negatives = adversarial_negatives(q, bank, bank_labels, labels, prototypes, gamma, eps_neg)
            proto_positives = adversarial_positives(q, bank, bank_labels, bank_preds, labels, prototypes, gamma, eps_pos)
            logs["proto_instances_neg"] = proto_negatives[1].float().sum(1).mean()
            logs["proto_instances_pos"] = proto_positives[1].float().sum(1).mean()
        similarity, positive, negative = contrast_terms(q, bank, same, proto_negatives, proto_positives)
        per_sample = unified_proto_loss(
            similarity,
            positive,
            negative,
            logits,
            labels,
            tau=self.cfg.tau,
            form=self.form,
            margin=self.cfg.circle_margin,
        )
        loss = per_sample.mean()
        logs["proto_loss"] = loss.detach()
        return loss, logs
