"""Progress of a long pass: a bar (tqdm) in an interactive terminal, else a line every few seconds.

Ray Data's own bars are off in this project's processes (`launch.cluster.quiet_ray_process`): in a terminal
they draw one bar per operator of every execution, named by dataset ids, and without one they log a
seven-line block every ten seconds. A pass here is what a user waits for (images encoded, images predicted),
counted as its results arrive.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

LINE_EVERY_S = 10.0  # without a terminal: one line per this many seconds, and one at the end
VERBOSE = "PROCO_RAY_VERBOSE"  # =1 (or a command's --verbose): Ray's own logging and progress bars, as Ray prints them


class Progress:
    """`update(n)` as work completes; `close()` draws the last state."""

    def __init__(self, what: str, total: int | None, unit: str = "images", stream: TextIO | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream or sys.stderr
        self.done = 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", file=self.stream, dynamic_ncols=True, leave=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last_line >= LINE_EVERY_S:
            self.last_line = time.monotonic()
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._line()

    def _line(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        print(f"{self.what}: {self.done}{of} {self.unit} ({time.monotonic() - self.started:.0f} s)", file=self.stream, flush=True)


@contextmanager
def progress(what: str, total: int | None, unit: str = "images") -> Iterator[Progress]:
    shown = Progress(what, total, unit)
    try:
        yield shown
    finally:
        shown.close()
