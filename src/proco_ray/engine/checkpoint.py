"""Training checkpoints: everything an exact resume needs, in one file inside a directory.

The directory is what Ray Train's `Checkpoint.from_directory` carries to the
run's storage; the same layout is read by `proco-ray evaluate` and by a plain
process resuming without Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from proco_ray.errors import ProcoError
from proco_ray.metric_keys import EPOCH
from proco_ray.processes import process_runs

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format_version", "config", "class_names", "model", "method", "epoch", "global_step")
STAGING_PREFIX = "proco-ray-checkpoint-"


class CheckpointError(ProcoError, RuntimeError):
    """A checkpoint that is missing, corrupt, or made for another model."""


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` atomically (a temporary file renamed into place) and return the directory."""
    missing = [k for k in REQUIRED_KEYS if k != "format_version" and k not in state]
    if missing:
        raise CheckpointError(f"checkpoint state lacks {missing}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / (CHECKPOINT_FILE + ".partial")
    torch.save({"format_version": FORMAT_VERSION, **state}, partial)
    partial.replace(directory / CHECKPOINT_FILE)
    return directory


@contextmanager
def staging_directory(root: str | Path | None = None) -> Iterator[Path]:
    """A folder to write one checkpoint into before Ray Train copies it to the run's storage.

    Its name carries this process's id, and every new one first removes the folders of processes that no
    longer run: a SIGKILLed worker cannot clean up, and each folder it leaves holds a whole checkpoint.
    """
    root = Path(root) if root is not None else Path(tempfile.gettempdir())
    remove_orphaned_staging(root)
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=root) as folder:
        yield Path(folder)


def remove_orphaned_staging(root: str | Path) -> None:
    """Delete the staging folders in `root` whose process is gone; folders of live processes stay."""
    for folder in Path(root).glob(f"{STAGING_PREFIX}*"):
        pid = folder.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not process_runs(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint directory, failing with a message that says what is wrong with it."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"no {CHECKPOINT_FILE} in checkpoint directory {directory}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a proco_ray checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a proco_ray checkpoint: it lacks {missing}")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['format_version']}, this proco_ray reads {FORMAT_VERSION}"
        )
    return state


def check_compatible(state: dict[str, Any], config: dict[str, Any], class_names: list[str]) -> None:
    """Refuse to resume into a different network or label set."""
    saved_model, model = state["config"]["model"], config["model"]
    for key in ("arch", "small_input", "feat_dim", "hidden_dim"):
        if saved_model.get(key) != model.get(key):
            raise CheckpointError(
                f"checkpoint is incompatible: model.{key} is {saved_model.get(key)!r} there, {model.get(key)!r} here"
            )
    if state["config"]["method"]["name"] != config["method"]["name"]:
        raise CheckpointError(
            f"checkpoint is incompatible: it was trained with method '{state['config']['method']['name']}', "
            f"not '{config['method']['name']}'"
        )
    if list(state["class_names"]) != list(class_names):
        raise CheckpointError(
            f"checkpoint is incompatible: its classes are {list(state['class_names'])}, the data's are {list(class_names)}"
        )


EPOCH_FOLDER_PREFIX = "checkpoint_epoch_"


class CheckpointFolder:
    """The training loop's `report` for a plain process (local-sweep, tests): the reports so far, optionally
    written to `history_file` first, and the newest `keep` checkpoints as `checkpoint_epoch_NNNN` folders.

    A checkpoint is copied in under a partial name and renamed into place when whole, so a process killed at
    any point leaves complete checkpoints only, and a history that reaches at least the newest of them.
    """

    def __init__(
        self,
        directory: str | Path,
        keep: int = 1,
        history_file: Path | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.history_file = history_file
        self.history: list[dict[str, Any]] = []

    def checkpoints(self) -> list[tuple[int, Path]]:
        """The complete checkpoint folders, oldest first, with their epochs."""
        found = self.directory.glob(f"{EPOCH_FOLDER_PREFIX}[0-9]*")
        return sorted((int(d.name[len(EPOCH_FOLDER_PREFIX) :]), d) for d in found if d.is_dir())

    @property
    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.history.append(metrics)
        if self.history_file is not None:
            partial = self.history_file.with_name(self.history_file.name + ".partial")
            partial.write_text(json.dumps(self.history))
            partial.replace(self.history_file)
        if checkpoint_dir is not None:
            self.add(checkpoint_dir, int(metrics[EPOCH]))

    def add(self, checkpoint_dir: Path, epoch: int) -> Path:
        """Copy a new checkpoint in, rename it into place, then drop all but the newest `keep`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"{EPOCH_FOLDER_PREFIX}{epoch:04d}"
        partial = self.directory / f".{target.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(checkpoint_dir, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        for _, older in self.checkpoints()[: -self.keep]:
            shutil.rmtree(older, ignore_errors=True)
        return target
