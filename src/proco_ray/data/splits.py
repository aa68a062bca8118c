"""Train/val/test splits as pure functions of labels, groups and a seed.

Splitting assigns whole groups (a lesion, a patient; each image is its own
group when none is known), stratified by class: within each class, groups in a
seeded random order go to the split furthest below its target share. So a
lesion never straddles two splits, every split gets about its share of every
class, and the same seed gives the same split.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from proco_ray.errors import DataError

MODES = ("paper", "official", "official-val-as-test", "test")


def group_labels(labels: Sequence[int], groups: Sequence[str]) -> dict[str, int]:
    """Each group's class: the most frequent label of its images (the smallest on a tie)."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for label, group in zip(labels, groups):
        votes[group][label] += 1
    return {g: min(c, key=lambda label: (-c[label], label)) for g, c in votes.items()}


def assign_groups(
    labels: Sequence[int], groups: Sequence[str], fractions: Mapping[str, float], rng: np.random.Generator
) -> list[str]:
    """Split name per image: whole groups, stratified by group class, greedily towards `fractions`."""
    names = [name for name, share in fractions.items() if share > 0]
    shares = np.array([fractions[n] for n in names], dtype=float)
    shares /= shares.sum()
    size = Counter(groups)
    by_class: dict[int, list[str]] = defaultdict(list)
    for group, label in sorted(group_labels(labels, groups).items()):
        by_class[label].append(group)
    placed: dict[str, str] = {}
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        target = shares * sum(size[g] for g in members)
        have = np.zeros(len(names))
        for i in order:
            group = members[i]
            pick = int(np.argmax(target - have))
            placed[group] = names[pick]
            have[pick] += size[group]
    return [placed[g] for g in groups]


def paper_split(
    labels: Sequence[int],
    groups: Sequence[str] | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.3,
    val_fraction: float = 0.1,
) -> list[str]:
    """ProCo's protocol: stratified random train:test = 7:3, then `val_fraction` of train for model selection."""
    if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1:
        raise DataError(f"fractions must lie in [0, 1): test {test_fraction}, val {val_fraction}")
    groups = list(groups) if groups is not None else [str(i) for i in range(len(labels))]
    outer = assign_groups(labels, groups, {"train": 1 - test_fraction, "test": test_fraction}, np.random.default_rng([seed, 0]))
    return carve_val(outer, labels, groups, seed=seed, val_fraction=val_fraction)


def carve_val(
    splits: Sequence[str], labels: Sequence[int], groups: Sequence[str], *, seed: int, val_fraction: float
) -> list[str]:
    """A stratified, group-aware `val_fraction` of the images in the train split moved to val."""
    out = list(splits)
    train = [i for i, s in enumerate(out) if s == "train"]
    inner = assign_groups(
        [labels[i] for i in train],
        [groups[i] for i in train],
        {"train": 1 - val_fraction, "val": val_fraction},
        np.random.default_rng([seed, 1]),
    )
    for i, split in zip(train, inner):
        out[i] = split
    return out


def official_split(official: Sequence[str | None], where: str) -> list[str]:
    """The split the source itself defines for each image (MedMNIST arrays, ISIC folders)."""
    if any(s is None for s in official):
        raise DataError(f"{where} defines no official split: use --split paper (or test)")
    return [str(s) for s in official]


def val_as_test_split(
    labels: Sequence[int],
    groups: Sequence[str] | None,
    official: Sequence[str],
    *,
    seed: int,
    val_fraction: float,
    where: str = "source",
) -> list[str]:
    """The source's official val split held out as test, and a stratified `val_fraction` of its train split
    as val for model selection (MedMNIST files published without their test split: select on val, report test)."""
    if set(official) != {"train", "val"}:
        raise DataError(f"{where} has official splits {sorted(set(official))}; official-val-as-test needs exactly train and val")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must lie in (0, 1) to carve a val split from train, got {val_fraction}")
    groups = list(groups) if groups is not None else [str(i) for i in range(len(labels))]
    return carve_val(["test" if s == "val" else s for s in official], labels, groups, seed=seed, val_fraction=val_fraction)


def make_split(
    mode: str,
    labels: Sequence[int],
    groups: Sequence[str] | None,
    official: Sequence[str | None],
    *,
    seed: int,
    test_fraction: float,
    val_fraction: float,
    where: str = "source",
) -> list[str]:
    """One split name per image for a mode: 'paper', 'official', 'official-val-as-test' or 'test' (all
    images as an external test set)."""
    if mode == "paper":
        return paper_split(labels, groups, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction)
    if mode == "official":
        return official_split(official, where)
    if mode == "official-val-as-test":
        return val_as_test_split(
            labels, groups, official_split(official, where), seed=seed, val_fraction=val_fraction, where=where
        )
    if mode == "test":
        return ["test"] * len(labels)
    raise DataError(f"unknown split mode '{mode}'; choose one of {list(MODES)}")


def split_counts(splits: Sequence[str], labels: Sequence[int], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """{split: {class name: images}} with every class listed, for the manifest."""
    counts = Counter(zip(splits, labels))
    return {
        split: {name: counts.get((split, i), 0) for i, name in enumerate(classes)}
        for split in sorted(set(splits), key=lambda s: (["train", "val", "test"] + [s]).index(s))
    }
