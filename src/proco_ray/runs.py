"""A run's folder, `<train.storage_path>/<train.name>` (local or s3://), and everything read from it afterwards.

Ray Train writes a run's checkpoints and its snapshot of the registered ones there; `train` adds the resolved
config, the summary and TensorBoard files. Resume, orphan clean-up, `evaluate`, `predict` and `export` read it
through the one class below, so the folder's layout is written down once.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from proco_ray.config import Config, config_from_dict
from proco_ray.engine.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from proco_ray.method.registry import create_method
from proco_ray.metric_keys import CHECKPOINT_SCORE, EPOCH
from proco_ray.ray_compat import RAY_CHECKPOINT_DIR, RAY_TRAIN_SNAPSHOT, TrainSnapshot, parse_train_snapshot
from proco_ray.storage.s3 import is_file, is_s3, join, read_bytes, resolve, storage_errors, write_bytes

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"
TEMPERATURE_FILE = "temperature.json"  # written beside checkpoint.pt by `evaluate --calibrate`, read by `predict --calibrated`


@dataclass(frozen=True)
class RunFolder:
    """One run's folder: `uri` as commands print it; `storage` and `filesystem` as Ray Train's RunConfig takes them.

    The filesystem is built once, in the process that makes the RunFolder, from its endpoint and credentials,
    and travels with it (pickled into the Train controller and the workers), so they reach the same S3
    whatever their own environment holds. Local storage is an absolute path, fixed where it was made.
    """

    uri: str
    storage: str
    name: str
    filesystem: pafs.FileSystem | None = None  # None on local disk, as RunConfig.storage_filesystem wants it

    @classmethod
    def of(cls, storage_path: str, name: str) -> RunFolder:
        if is_s3(storage_path):
            filesystem, storage = resolve(storage_path)
            return cls(join(storage_path, name), storage, name, filesystem)
        return cls(join(storage_path, name), os.path.abspath(storage_path), name)

    @classmethod
    def of_config(cls, config: Config) -> RunFolder:
        return cls.of(config.train.storage_path, config.train.name)

    @classmethod
    def at(cls, uri: str) -> RunFolder:
        """The run folder `uri` names: its last path element is the run's name."""
        storage, _, name = uri.rstrip("/").rpartition("/")
        if not name or storage in ("s3:", "s3:/"):
            raise CheckpointError(f"{uri} is not a run folder (<storage>/<run name>)")
        return cls.of(storage or ".", name)

    @property
    def path(self) -> str:
        """The folder in `fs`'s terms."""
        return f"{self.storage}/{self.name}"

    @property
    def fs(self) -> pafs.FileSystem:
        return self.filesystem or pafs.LocalFileSystem()

    def file(self, *parts: str) -> str:
        """The URI of something in the folder."""
        return join(self.uri, *parts)

    @property
    def tensorboard(self) -> str:
        return self.file(TENSORBOARD_DIR)

    def has_file(self, name: str) -> bool:
        with storage_errors(self.uri):
            return self.fs.get_file_info(f"{self.path}/{name}").type == pafs.FileType.File

    def read_file(self, name: str) -> bytes | None:
        if not self.has_file(name):
            return None
        with storage_errors(self.uri), self.fs.open_input_stream(f"{self.path}/{name}") as stream:
            return stream.read()

    def write_file(self, name: str, data: bytes) -> str:
        """A whole file in the folder (next to its checkpoints), written in one step; returns its URI."""
        return write_bytes(self.file(name), data)

    def snapshot(self) -> TrainSnapshot | None:
        """Ray Train's snapshot of the run's registered checkpoints, None before the first registration."""
        text = self.read_file(RAY_TRAIN_SNAPSHOT)
        return None if text is None else parse_train_snapshot(text)

    def resumed_epoch(self) -> int:
        """Epochs done by the checkpoint a (re)started worker group resumes from, 0 for a new run.

        Read from Ray Train's own snapshot, whose latest entry is what `ray.train.get_checkpoint()` hands the
        workers: a checkpoint written but not registered when a worker died is neither resumed from nor counted.
        """
        snapshot = self.snapshot()
        return int(snapshot.latest.metrics[EPOCH]) if snapshot and snapshot.latest else 0

    def remove_unregistered_checkpoints(self) -> list[str]:
        """Delete the checkpoint folders of a finished run that Ray Train never registered; return their names.

        A worker uploads its checkpoint before the report that registers it; a worker group that fails in
        between leaves a folder that no resume reads and keep_checkpoints never counts. Only folders named as
        Ray Train names checkpoints, directly in the run folder, are candidates; everything the snapshot
        lists (kept, latest, pending) stays.
        """
        snapshot = self.snapshot()
        registered = snapshot.dir_names() if snapshot else set()
        with storage_errors(self.uri):
            listing = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
            orphans = sorted(
                info.base_name
                for info in listing
                if info.type == pafs.FileType.Directory
                and RAY_CHECKPOINT_DIR.fullmatch(info.base_name)
                and info.base_name not in registered
            )
            for name in orphans:
                self.fs.delete_dir(f"{self.path}/{name}")
        return orphans

    def uri_of(self, reported_path: str) -> str:
        """A path Ray reports inside the run storage, as a URI the next command takes (Ray drops the s3:// scheme)."""
        return "s3://" + reported_path.lstrip("/") if is_s3(self.uri) and not is_s3(reported_path) else reported_path

    def best_checkpoint(self) -> str:
        """The checkpoint summary.json calls best, else the best Ray Train registered (highest validation score).

        Checkpoints are looked up by name inside the folder, so a run folder that was moved or copied still works.
        """
        summary = self.read_file(SUMMARY_FILE)
        snapshot = self.snapshot()
        candidates: list[str] = []
        if summary is not None and json.loads(summary).get("best_checkpoint"):
            candidates.append(json.loads(summary)["best_checkpoint"].rstrip("/").rsplit("/", 1)[-1])
        if snapshot is not None:
            registered = sorted(
                (c for c in snapshot.kept if c.dir_name),
                key=lambda c: c.metrics.get(CHECKPOINT_SCORE, float("-inf")),
                reverse=True,
            )
            candidates += [c.dir_name for c in registered]
        for name in candidates:
            if self.has_file(f"{name}/{CHECKPOINT_FILE}"):  # a checkpoint of a moved folder may be gone
                return self.file(name)
        if summary is None and snapshot is None:
            raise CheckpointError(
                f"no {CHECKPOINT_FILE} in {self.uri}, and it is not a run folder (it has no {SUMMARY_FILE} or "
                f"{RAY_TRAIN_SNAPSHOT})"
            )
        raise CheckpointError(
            f"run folder {self.uri} holds no checkpoint: none of {candidates or 'its registered checkpoints'} is there"
        )


def best_checkpoint(uri: str) -> str:
    """The checkpoint `uri` names: itself when it holds checkpoint.pt, else its run folder's best checkpoint."""
    uri = uri.rstrip("/")
    if is_file(join(uri, CHECKPOINT_FILE)):
        return uri
    return RunFolder.at(uri).best_checkpoint()


@contextlib.contextmanager
def local_checkpoint(uri: str) -> Iterator[Path]:
    """A local directory holding the checkpoint at `uri` (downloaded first when it is on S3)."""
    if not is_s3(uri):
        yield Path(uri)
        return
    import ray.train

    fs, path = resolve(uri)
    with ray.train.Checkpoint(path, filesystem=fs).as_directory() as directory:
        yield Path(directory)


def read_checkpoint(uri: str) -> dict[str, Any]:
    """A checkpoint's state (local or s3://), checked by load_checkpoint."""
    with local_checkpoint(uri) as directory:
        return load_checkpoint(directory)


def restore_model(state: dict[str, Any], device: torch.device | None = None) -> tuple[Any, torch.nn.Module, torch.device]:
    """(method, network with the checkpoint's weights, device) ready for inference on `device` (default: CUDA
    when there is one)."""
    config = config_from_dict(state["config"])
    classes = len(state["class_names"])
    method = create_method(config.method, config.model, classes, [1] * classes)
    model = method.build_model()
    model.load_state_dict(state["model"])
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    method.to(device)
    return method, model, device


def save_temperature(checkpoint_uri: str, temperature: float, fitted_on: str) -> str:
    """Beside the checkpoint, for `predict --calibrated` and `export`; returns the file's URI."""
    return write_bytes(
        join(checkpoint_uri, TEMPERATURE_FILE),
        json.dumps({"temperature": temperature, "fitted_on": fitted_on}, indent=2).encode(),
    )


def saved_temperature(checkpoint_uri: str) -> float | None:
    """The temperature `evaluate --calibrate` saved beside the checkpoint, or None when it was never fitted."""
    saved = read_bytes(join(checkpoint_uri, TEMPERATURE_FILE))
    return None if saved is None else float(json.loads(saved)["temperature"])
