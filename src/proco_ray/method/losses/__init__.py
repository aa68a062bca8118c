"""Loss functions: ProCo's equations (proco.py) and the baselines' losses (baselines.py)."""

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
from proco_ray.method.losses.proco import (
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

__all__ = [
    "PROTO_FORMS",
    "PrototypeRecalibration",
    "adversarial_negatives",
    "adversarial_positives",
    "contrast_terms",
    "embedding_std",
    "proto_loss",
    "supervised_infonce",
    "unified_proto_loss",
    "LDAMLoss",
    "distractor_aware_loss",
    "distractor_classes",
    "drw_class_weights",
    "focal_loss",
    "logit_adjustments",
    "ohem_loss",
    "supcon_loss",
]
