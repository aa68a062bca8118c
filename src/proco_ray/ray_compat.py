"""The one place in proco_ray that reads Ray's private parts.

Ray has no public API for a few things this project needs: which checkpoints Ray Train registered (resume,
orphan clean-up, a run folder's best checkpoint), the cluster `ray start` recorded on this machine, the loggers
of two lines printed on every run, and which metrics Tune puts in the HParams table. Each entry below was read
from Ray 2.60 (RAY_VERSION) and says what breaks if Ray changes it; tests/test_ray_compat.py checks each
against the installed Ray, so an upgrade that changes one fails there, by name, instead of deep in a run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ray._private.services import find_bootstrap_address as _find_bootstrap_address
from ray._private.services import parse_address as _parse_address
from ray.tune.logger import TBXLoggerCallback

RAY_VERSION = "2.60.0"  # the Ray whose private parts are read below

# --------------------------------------------------------------------------- Ray Train's checkpoint snapshot

# ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, written in the run folder
# (StorageContext.checkpoint_manager_snapshot_path). If renamed: a resumed run reads its rows in a new run's order
# and does not say it resumes, no unregistered folder is removed, and a run folder no longer stands for its best
# checkpoint.
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"

# StorageContext.make_default_checkpoint_dir_name(): the names of Ray Train's checkpoint folders, directly in the
# run folder. If changed: remove_unregistered_checkpoints no longer recognises (and removes) any orphan.
RAY_CHECKPOINT_DIR = re.compile(r"checkpoint_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}\.\d{6}")


@dataclass(frozen=True)
class RegisteredCheckpoint:
    """One entry of the snapshot (Ray's `_TrainingResultState`): a checkpoint folder and the metrics reported with it."""

    dir_name: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class TrainSnapshot:
    """Ray Train's snapshot (`_CheckpointManagerState`), reduced to the checkpoints it lists.

    `latest` is what `ray.train.get_checkpoint()` hands a restarted worker group; `kept` the checkpoints
    within keep_checkpoints; `pending` those reported but awaiting validation.
    """

    latest: RegisteredCheckpoint | None
    kept: list[RegisteredCheckpoint]
    pending: list[RegisteredCheckpoint]

    def dir_names(self) -> set[str]:
        """Every checkpoint folder the snapshot lists."""
        entries = [self.latest] if self.latest else []
        return {entry.dir_name for entry in entries + self.kept + self.pending}


def _registered(entry: dict[str, Any]) -> RegisteredCheckpoint:
    return RegisteredCheckpoint(entry.get("checkpoint_dir_name", ""), entry.get("metrics", {}))


def parse_train_snapshot(text: str | bytes) -> TrainSnapshot:
    """The contents of a RAY_TRAIN_SNAPSHOT file (JSON of `_CheckpointManagerState`, Ray 2.60)."""
    state = json.loads(text)
    latest = state.get("latest_checkpoint_result")
    return TrainSnapshot(
        latest=_registered(latest) if latest else None,
        kept=[_registered(entry) for entry in state.get("checkpoint_results", [])],
        pending=[_registered(entry) for entry in state.get("pending_training_results", [])],
    )


# --------------------------------------------------------------------------- the cluster this machine runs


def find_bootstrap_address(temp_dir: str | None = None) -> str | None:
    """The GCS address the last `ray start` on this machine recorded, None without one
    (`ray._private.services.find_bootstrap_address`). If it changes: `proco-ray` stops joining that cluster."""
    return _find_bootstrap_address(temp_dir)


def parse_address(address: str) -> tuple[str, str] | None:
    """`host:port` as (host, port), None when it is not one (`ray._private.services.parse_address`).
    If it changes: cluster_address misjudges whether a recorded or named cluster answers."""
    return _parse_address(address)


# --------------------------------------------------------------------------- the local cluster's authentication

RAY_AUTH_MODE = "RAY_AUTH_MODE"  # token or disabled; read by ray.init when it starts a local cluster


def choose_token_authentication() -> None:
    """Token authentication for the local Ray this process starts, chosen explicitly where RAY_AUTH_MODE is unset.

    It is Ray 2.60's default for a new local cluster, which Ray announces with a warning on every start unless
    RAY_AUTH_MODE says it. Ray caches its config when it is imported, so setting the variable is not enough: this
    calls what Ray itself calls when it turns the default on
    (`ray._private.authentication.authentication_token_setup._enable_token_auth`: the variable, then its cached
    config refreshed). If it goes: the local Ray is started with token authentication but this process sends no
    token and ray.init fails (tests/test_ray_compat.py checks it is there).
    """
    import os

    if os.environ.get(RAY_AUTH_MODE) is None:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()


# --------------------------------------------------------------------------- loggers of lines kept off the screen

# The logger of Ray Data's "Dataset ... execution finished in N seconds" after every pass over a split
# (`logging.getLogger(__name__)` in that module). If moved: the line shows again, in every worker, every epoch.
STREAMING_EXECUTOR_LOGGER = "ray.data._internal.execution.streaming_executor"


def train_report_logger_name() -> str | None:
    """The logger of Ray Train V2's "Reporting training result ..." line, named by the file path of
    `ray.train.v2._internal.execution.context`; None where Ray has no such module (the line then shows)."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return None
    return context.__file__


# The `log_once` key of Ray Data's "Progress bars disabled. To enable, set ..." warning, printed once per process
# when an execution starts with enable_progress_bars off (`ray.data._internal.progress.get_progress_manager`). This
# project turns them off on purpose (proco_ray.progress draws its own) and takes the key first. If renamed: the
# warning shows once per process again.
PROGRESS_BARS_OFF_NOTICE = "ray_data_progress_manager_disabled"


def skip_progress_bars_off_notice() -> None:
    """Take Ray Data's once-per-process "Progress bars disabled" warning, so it never prints in this process."""
    from ray.util.debug import log_once

    log_once(PROGRESS_BARS_OFF_NOTICE)


# --------------------------------------------------------------------------- Tune's HParams table


class HParamsFilterLogger(TBXLoggerCallback):
    """Tune's TensorBoard logger with a hook, `hparams_metrics`, that chooses a finished trial's HParams metrics.

    Tune has no option for that: `TBXLoggerCallback.log_trial_end` passes every metric to its private
    `_try_log_hparams(trial, result)`, overridden here. If Ray renames it, the hook is never called and the
    HParams table shows every metric again.
    """

    def hparams_metrics(self, result: dict[str, Any]) -> dict[str, Any]:
        """The metrics of the trial's HParams entry: all of them, unless a subclass narrows them."""
        return result

    def _try_log_hparams(self, trial: Any, result: dict) -> None:
        super()._try_log_hparams(trial, self.hparams_metrics(result))
