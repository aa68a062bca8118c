"""`proco-ray paper-table`: the paper's Table 2 beside finished local sweeps of its methods."""

from __future__ import annotations

import argparse
from pathlib import Path

from proco_ray.experiments.paper_table import PAPER_TABLE2, paper_table, read_sweeps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=sorted(PAPER_TABLE2), default="isic2018", help="whose column of the paper's table")
    parser.add_argument(
        "--sweep", type=Path, action="append", required=True, help="a finished local-sweep folder (repeat to combine several)"
    )


def run(args: argparse.Namespace) -> int:
    missing = [str(folder) for folder in args.sweep if not folder.is_dir()]
    if missing:
        raise SystemExit(f"paper-table: no such sweep folder: {', '.join(missing)}")
    try:
        trials = read_sweeps(args.sweep)
    except ValueError as error:
        raise SystemExit(f"paper-table: {error}") from None
    if not trials:
        raise SystemExit(f"paper-table: no finished trial in {', '.join(map(str, args.sweep))}")
    print(paper_table(trials, args.dataset))
    return 0
