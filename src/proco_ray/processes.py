"""Whether a process still runs: for state left on disk by processes that may have been killed."""

from __future__ import annotations

import os
from pathlib import Path


def process_runs(pid: int, command: bytes = b"") -> bool:
    """True for a running process whose command line contains `command`; False for a dead, zombie or reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and command in cmdline
