"""`proco-ray length-curve`: one comparison at several training lengths, from finished local sweeps."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from proco_ray.experiments.length import length_table, plot_length_curve, read_datasets


def parse_datasets(items: Sequence[tuple[str, str]]) -> dict[str, dict[int, Path]]:
    """('--dataset', NAME) and ('--sweep', 'EPOCHS=FOLDER') in command-line order -> {NAME: {EPOCHS: FOLDER}}."""
    datasets: dict[str, dict[int, Path]] = {}
    current = None
    for kind, value in items:
        if kind == "dataset":
            current = datasets.setdefault(value, {})
            continue
        if current is None:
            raise SystemExit("length-curve: give --dataset NAME before its --sweep EPOCHS=FOLDER")
        epochs, sep, folder = value.partition("=")
        if not sep or not epochs.isdigit() or not Path(folder).is_dir():
            raise SystemExit(f"length-curve: --sweep '{value}' is not EPOCHS=FOLDER of an existing folder")
        current[int(epochs)] = Path(folder)
    return datasets


class _Ordered(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        namespace.items = [*(getattr(namespace, "items", None) or []), (self.dest, values)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", action=_Ordered, required=True, help="a dataset's name; its --sweep options follow")
    parser.add_argument("--sweep", action=_Ordered, required=True, help="EPOCHS=FOLDER of a finished local-sweep")
    parser.add_argument("--method", default="proco", help="variant compared (default proco)")
    parser.add_argument("--baseline", default="ce_resample", help="variant it is compared with (default ce_resample)")
    parser.add_argument("--others", nargs="*", default=[], help="further variants shown beside them")
    parser.add_argument("--figure", type=Path, help="write the length curve here (PNG)")


def run(args: argparse.Namespace) -> int:
    datasets = read_datasets(parse_datasets(args.items))
    print(length_table(datasets, args.method, args.baseline, args.others))
    if args.figure:
        print(f"figure written to {plot_length_curve(datasets, [args.method, args.baseline, *args.others], args.figure)}")
    return 0
