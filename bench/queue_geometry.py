"""Where a ProCo checkpoint's sample queue puts each class: how many of its entries and of the key encoder's
predictions each class has, how narrow a cone the embeddings fill, and how close each class's mean direction
sits to the head class's. A tail class whose mean direction coincides with the head's cannot be told from it
by the proto-loss, whatever the classifier does.

    .venv/bin/python bench/queue_geometry.py RUNS/t2-e30/proco_paper_seed0/checkpoint_epoch_0030 [more ...] [--reference NV]

Prints one markdown table per checkpoint. Needs no Ray and no data: the queue is in the checkpoint.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from proco_ray.engine.checkpoint import load_checkpoint
from proco_ray.evaluation.report import markdown_table


def queue_geometry(feats: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
    """Per class: queue entries, queue entries predicted as it, and the cosine of its mean direction with every
    class's; and the norm of the mean of all unit embeddings (0 spread evenly, 1 all one direction)."""
    unit = F.normalize(feats.float(), dim=1)
    labels, preds = labels.long(), preds.long()
    means = torch.stack(
        [unit[labels == c].mean(0) if (labels == c).any() else torch.full_like(unit[0], float("nan")) for c in range(classes)]
    )
    directions = F.normalize(means, dim=1)
    return {
        "entries": torch.bincount(labels, minlength=classes),
        "predicted": torch.bincount(preds, minlength=classes),
        "mean_cosine": directions @ directions.T,
        "cone": unit.mean(0).norm(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint directories of a ProCo run")
    parser.add_argument("--reference", help="the class every class's mean is compared with (default: the queue's largest)")
    args = parser.parse_args()
    for directory in args.checkpoints:
        state = load_checkpoint(directory)
        method, names = state["method"], list(state["class_names"])
        if "queue.feats" not in method:
            raise SystemExit(f"{directory}: no sample queue in this checkpoint (not a ProCo run)")
        filled = int(method["queue.filled"])
        geometry = queue_geometry(
            method["queue.feats"][:filled], method["queue.labels"][:filled], method["queue.preds"][:filled], len(names)
        )
        if args.reference is not None and args.reference not in names:
            raise SystemExit(f"--reference {args.reference}: not a class of {directory} ({', '.join(names)})")
        head = names.index(args.reference) if args.reference else int(geometry["entries"].argmax())
        rows = [
            {
                "class": name,
                "queue entries": int(geometry["entries"][c]),
                "predicted as it": int(geometry["predicted"][c]),
                f"cos(mean, {names[head]} mean)": f"{float(geometry['mean_cosine'][c, head]):.2f}",
                "nearest other class (cos)": _nearest(geometry["mean_cosine"], c, names),
            }
            for c, name in enumerate(names)
        ]
        print(
            f"{directory} (epoch {state['epoch']}): {filled} queue entries, mean unit embedding norm {float(geometry['cone']):.3f}\n"
        )
        print(markdown_table(rows) + "\n")


def _nearest(cosine: torch.Tensor, c: int, names: list[str]) -> str:
    others = cosine[c].clone()
    others[c] = float("-inf")
    other = int(others.nan_to_num(nan=float("-inf")).argmax())
    return f"{names[other]} ({float(cosine[c, other]):.2f})"


if __name__ == "__main__":
    main()
