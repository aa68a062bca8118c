"""A live run's claim on its folder, and the one-line account of a run whose storage went away.

Two runs of the same name on the same storage would train into one folder, each deleting the other's
checkpoints as "never registered". A run therefore claims its folder while it is live: a small file,
`.proco-ray-run.json`, with its pid, host and start time, refreshed six times per claim timeout and removed
when the run ends. A second run of the same name is refused with the claim's contents. A claim whose
process is gone (same host, dead pid) or that was not refreshed for PROCO_RUN_CLAIM_TIMEOUT_S seconds
(default 180; another host, whose processes this one cannot see, such as the head of a cluster that was
brought down) is stale: a killed run's claim never blocks its resume for longer than that.

On local disk the claim is created atomically (O_EXCL). S3 has no create-if-absent, so there a run
writes its claim, waits a moment and reads it back: of two runs started within that moment, the later
writer keeps the folder and the other is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from proco_ray.config import Config, ConfigError
from proco_ray.errors import ProcoError, StorageError
from proco_ray.processes import process_runs
from proco_ray.runs import RunFolder
from proco_ray.storage.s3 import is_s3, join, read_bytes, resolve, storage_errors, write_bytes

CLAIM_FILE = ".proco-ray-run.json"
TIMEOUT_VARIABLE = "PROCO_RUN_CLAIM_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 180.0
HEARTBEATS_PER_TIMEOUT = 6
S3_SETTLE_S = 1.0  # how long an S3 claim waits before reading itself back


class RunInUseError(ProcoError):
    """Another live run holds the run folder."""


@dataclass(frozen=True)
class Claim:
    token: str
    pid: int
    host: str
    started: float
    refreshed: float

    def describe(self) -> str:
        started = datetime.datetime.fromtimestamp(self.started).isoformat(timespec="seconds")
        return f"pid {self.pid} on host {self.host}, started {started}"

    def stale(self, now: float | None = None) -> bool:
        """A claim of a process that is gone, or (another host) not refreshed within the timeout."""
        if self.host == socket.gethostname():
            return not process_runs(self.pid)
        return (now or time.time()) - self.refreshed > claim_timeout()


def claim_timeout() -> float:
    """Seconds without a refresh after which another host's claim is stale ($PROCO_RUN_CLAIM_TIMEOUT_S)."""
    text = os.environ.get(TIMEOUT_VARIABLE)
    try:
        timeout = DEFAULT_TIMEOUT_S if text is None else float(text)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ConfigError(f"{TIMEOUT_VARIABLE}={text}: expected a positive number of seconds")
    return timeout


def read_claim(uri: str) -> Claim | None:
    data = read_bytes(join(uri, CLAIM_FILE))
    if data is None:
        return None
    try:
        return Claim(**json.loads(data))
    except (ValueError, TypeError):  # a claim cut short by a crash while writing: nobody holds it
        return None


def _encode(claim: Claim) -> bytes:
    return json.dumps(asdict(claim), indent=2).encode()


def _refuse(uri: str, holder: Claim) -> RunInUseError:
    if holder.host == socket.gethostname():
        ignored = "once its process is gone"
    else:
        ignored = f"{claim_timeout():.0f} s after its last refresh ({TIMEOUT_VARIABLE}), as after a cluster was brought down"
    return RunInUseError(
        f"run {uri} is in use by a live run ({holder.describe()}); wait for it to end, or choose another train.name "
        f"(a claim left by a killed run is ignored {ignored}: {join(uri, CLAIM_FILE)})"
    )


def _create_local(path: str, claim: Claim) -> bool:
    """Create the claim file atomically; False when one exists."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as out:
        out.write(_encode(claim))
    return True


def acquire(uri: str) -> Claim:
    """Claim the run folder at `uri`, replacing a stale claim; RunInUseError names a live holder."""
    now = time.time()
    claim = Claim(uuid.uuid4().hex, os.getpid(), socket.gethostname(), now, now)
    path = join(uri, CLAIM_FILE)
    with storage_errors(uri):
        if not is_s3(uri):
            local = resolve(path)[1]
            for _ in range(3):
                if _create_local(local, claim):
                    return claim
                holder = read_claim(uri)
                if holder is not None and not holder.stale():
                    raise _refuse(uri, holder)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(local)
            raise RunInUseError(f"run {uri}: another run keeps claiming it at the same moment ({path})")
        holder = read_claim(uri)
        if holder is not None and not holder.stale():
            raise _refuse(uri, holder)
        write_bytes(path, _encode(claim))
        time.sleep(S3_SETTLE_S)
        holder = read_claim(uri)
    if holder is None or holder.token != claim.token:
        raise _refuse(uri, holder) if holder is not None else RunInUseError(f"run {uri}: its claim {path} vanished")
    return claim


def release(uri: str, claim: Claim) -> None:
    """Remove the claim if it is still this run's."""
    with contextlib.suppress(ProcoError, OSError):
        holder = read_claim(uri)
        if holder is not None and holder.token == claim.token:
            filesystem, path = resolve(join(uri, CLAIM_FILE))
            filesystem.delete_file(path)


@contextlib.contextmanager
def claimed(config: Config) -> Iterator[Claim]:
    """Hold the run folder of `config` for the duration of the block, refreshing the claim in the background."""
    uri = RunFolder.of_config(config).uri
    local = None if is_s3(uri) else resolve(uri)[1]
    created = _first_missing(local) if local else None
    claim = acquire(uri)
    stop = threading.Event()
    period = claim_timeout() / HEARTBEATS_PER_TIMEOUT

    def heartbeat() -> None:
        nonlocal claim
        while not stop.wait(period):
            refreshed = Claim(**{**asdict(claim), "refreshed": time.time()})
            with contextlib.suppress(ProcoError, OSError):  # unreachable storage fails the run itself, with its message
                write_bytes(join(uri, CLAIM_FILE), _encode(refreshed))
                claim = refreshed

    thread = threading.Thread(target=heartbeat, name="proco-run-claim", daemon=True)
    thread.start()
    try:
        yield claim
    finally:
        stop.set()
        thread.join(timeout=5)
        release(uri, claim)
        if created is not None:  # a run refused or failed before it wrote anything leaves no empty folders
            _remove_empty(local, up_to=created)


def _first_missing(path: str) -> str | None:
    """The topmost folder on the way to `path` that does not exist yet (what the claim creates), or None."""
    missing = None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _remove_empty(path: str, up_to: str) -> None:
    while True:
        try:
            os.rmdir(path)
        except OSError:  # not empty (or gone): everything above stays
            return
        if path == up_to:
            return
        path = os.path.dirname(path)


def storage_gone(config: Config) -> StorageError | None:
    """For a run that failed: a one-line StorageError when its s3:// storage no longer answers, else None."""
    if not is_s3(config.train.storage_path):
        return None
    uri = RunFolder.of_config(config).uri
    try:
        filesystem, path = resolve(uri)
        with storage_errors(uri):
            filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except StorageError as unreachable:
        return StorageError(
            f"the run's storage {config.train.storage_path} stopped answering during training ({unreachable}); "
            f"once it is back (proco-ray storage start, for the local server), rerun the same command to resume "
            f"from the run's latest checkpoint"
        )
    return None


def storage_full(config: Config, error: BaseException) -> StorageError | None:
    """For a run that failed: a one-line StorageError when a write ran out of space ([Errno 28], which Ray Train
    hands back as the text of a worker's traceback), else None. The partial checkpoint is never registered."""
    if not any("[Errno 28]" in str(e) or "No space left on device" in str(e) for e in _chain(error)):
        return None
    return StorageError(
        f"no space left on the device the run writes to (its storage is {config.train.storage_path}): free space "
        f"there, or set train.storage_path to a place with room, then rerun the same command to resume from the "
        f"run's latest checkpoint"
    )


def storage_unreachable_from_a_worker(config: Config, error: BaseException) -> StorageError | None:
    """For a run that failed while its storage still answers this machine (storage_gone found nothing): a one-line
    StorageError when a worker's S3 request could not connect (pyarrow's NETWORK_CONNECTION, which Ray Train hands
    back as the text of the worker's traceback), else None. Ray's health checks do not cover a node's route to
    S3, so such a node stays in the cluster and may be given the restarted workers again."""
    for text in (str(e) for e in _chain(error)):
        found = re.search(r"(When [^\n]*?: )?AWS Error NETWORK_CONNECTION during \w+ operation[^\n]*", text)
        if found:
            return StorageError(
                f"a training worker could not reach the run's storage {config.train.storage_path}, which answers "
                f"from this machine ({found.group(0)[:300]}): check the worker nodes' route to the S3 endpoint, then "
                f"rerun the same command to resume from the run's latest checkpoint"
            )
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
