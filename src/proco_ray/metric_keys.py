"""The names of what a run reports each epoch, for the loop that writes them and every table, sweep and
logger that reads them.

Keys are `<prefix>/<name>`: train/* (epoch means of the step's logs), val/* (this epoch's validation),
best/* and test/* (the epoch with the best validation macro-F1 so far and its test metrics), last/test/*
(the last epoch's test metrics, reported once).
"""

from __future__ import annotations

EPOCH = "epoch"
STAGE = "stage"
HEADLINE = ("accuracy", "macro_f1", "balanced_accuracy")  # the metrics results tables show
SCALAR_METRICS = (*HEADLINE, "qwk")  # reported per split beside per-class recall

TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_STEPS = "train/steps"
IMAGES_PER_S = "train/images_per_s"
DATA_WAIT_SHARE = "train/data_wait_share"
EMBEDDING_STD = "train/embedding_std"
COLLAPSED = "train/collapsed"

TRAIN, VAL, TEST, LAST_TEST = "train", "val", "test", "last/test"
VAL_MACRO_F1 = "val/macro_f1"  # what model selection ranks epochs by
TEST_MACRO_F1 = "test/macro_f1"
LAST_TEST_MACRO_F1 = "last/test/macro_f1"
BEST_EPOCH = "best/epoch"
BEST_VAL_MACRO_F1 = "best/val_macro_f1"
# What checkpoints are ranked by: val macro-F1 with ties going to the earlier epoch (loop.checkpoint_score).
CHECKPOINT_SCORE = "val/selection_score"

# Reported by every worker in every epoch, so ASHA and model selection may use them (val/recall/<class> too).
EPOCH_METRICS = (EPOCH, TRAIN_LOSS, TRAIN_LR, IMAGES_PER_S, *(f"{VAL}/{name}" for name in SCALAR_METRICS))
