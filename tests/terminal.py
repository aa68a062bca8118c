"""Run a command as a user does in an interactive terminal (a pseudo-terminal of 160 x 50), and read its screen."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

# Lines Ray printed on every command before issue 39; none may reach a user's terminal.
RAY_NOISE = (
    "Token authentication is enabled",
    "A new progress UI is available",
    "tqdm is not installed",
    "Progress bars disabled",
    "Data sink",
    "concurrency`` is deprecated",
    "max_restarts",
    "Execution plan of Dataset",
    "Running Dataset",
    "is deprecated",
    "core_worker",
)


def run_in_terminal(args: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(exit status, everything written to the terminal) of `python -m proco_ray ARGS` on a pseudo-terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    command = [sys.executable, "-m", "proco_ray", *args]
    env = {**os.environ, "RAY_ADDRESS": "local", "TERM": "xterm-256color", "COLUMNS": "160", **(env or {})}
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{' '.join(args)} ran over {timeout} s; its terminal so far:\n{output.decode(errors='replace')}"
                )
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            output += chunk
        return process.wait(timeout=60), output.decode(errors="replace")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
        os.close(master)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def screen_lines(output: str) -> list[str]:
    """The lines left on the screen, without colour codes: a line redrawn after carriage returns (a progress bar)
    counts once."""
    lines = [ANSI_ESCAPE.sub("", line).split("\r")[-1] for line in output.replace("\r\n", "\n").split("\n")]
    return [line for line in lines if line.strip()]
