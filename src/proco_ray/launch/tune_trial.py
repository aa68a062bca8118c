"""A Ray Tune trial that drives one TorchTrainer run (Train V2 inside Tune).

Each trial (`ProCoTrial`) builds its Config and its TorchTrainer with
`build_trainer(..., callbacks=[ReportToTrial(...)])` and runs `fit()` in a thread; the callback
forwards every epoch's report to the trial, where ASHA decides which trials continue. It plays the
part of Ray's `TuneReportCallback` and also ends the Train run when Tune stops the trial, so a stopped
trial's workers (and their placement group) are released before the next trial starts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray.train import UserCallback

from proco_ray.config import Config
from proco_ray.experiments.spec import trial_config
from proco_ray.launch.train_worker import FeedFactory
from proco_ray.launch.trainer import build_trainer, fit_and_tidy, save_resolved_config
from proco_ray.metric_keys import EPOCH
from proco_ray.storage.s3 import join

STOP_TIMEOUT_S = 540.0  # below Tune's TUNE_FORCE_TRIAL_CLEANUP_S (600 s), after which it kills the trial


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs besides its parameters; picklable, shipped once via `tune.with_parameters`."""

    base: Mapping[str, Any]
    variants: Mapping[str, Mapping[str, Any]]
    experiment_uri: str
    feed_factory: FeedFactory | None = None

    def config(self, params: Mapping[str, Any], trial_dir_name: str) -> Config:
        """The trial's Config; its Train run lives in the trial's folder, so a restarted trial resumes it."""
        return trial_config(
            self.base, self.variants, params, storage_path=join(self.experiment_uri, trial_dir_name), name="train"
        )


class TrialStopped(RuntimeError):
    """Raised in the Train controller once Ray Tune has stopped the trial (ASHA), to end the run cleanly."""


class TrialChannel:
    """A tiny actor between a trial's Train controller and its Tune trial: epochs one way, the stop request back."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []
        self._stopped = False

    def put(self, metrics: dict[str, Any]) -> bool:
        if self._stopped:
            return False
        self._items.append(metrics)
        return True

    def take(self) -> list[dict[str, Any]]:
        items, self._items = self._items, []
        return items

    def stop(self) -> None:
        self._stopped = True


class ReportToTrial(UserCallback):
    """Train V2 controller callback: forward each epoch's rank-0 metrics to the trial; end the run once it is stopped.

    Like Ray's `TuneReportCallback`, plus the way back: when ASHA stops a trial,
    the next report raises here, and Train shuts its worker group down itself,
    releasing the workers' placement group. (With `TuneReportCallback` the stopped
    trial's actor dies, taking the controller with it, and the group's placement
    group stays reserved unless Train's PlacementGroupCleaner can reach the State
    API — it cannot without a dashboard, so later trials waited forever.)
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        item = dict(metrics[0])
        if checkpoint is not None:
            item["checkpoint_path"] = checkpoint.path
        if not ray.get(self.channel.put.remote(item)):
            raise TrialStopped("Ray Tune stopped this trial; ending its Train run")


class ProCoTrial(ray.tune.Trainable):
    """One Tune trial: runs the trial's TorchTrainer in a thread; each `step` is one reported epoch.

    The trial actor only drives the trainer (its controller takes 0 CPUs; the workers
    get their own placement group). `cleanup` (Tune stopped or finished the trial)
    asks the Train run to end and waits until it has released its workers.
    """

    def setup(self, config: dict[str, Any], setup: TrialSetup) -> None:
        self._channel = ray.remote(num_cpus=0)(TrialChannel).remote()
        trial_config_ = setup.config(config, Path(self.logdir).name)
        self._epochs = trial_config_.optim.epochs
        trainer = build_trainer(trial_config_, setup.feed_factory, callbacks=[ReportToTrial(self._channel)])
        save_resolved_config(trial_config_)
        self._pending: list[dict[str, Any]] = []
        self._error: BaseException | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._fit, args=(trainer, trial_config_), name="proco-trial-fit", daemon=True)
        self._thread.start()

    def _fit(self, trainer: Any, trial_config: Config) -> None:
        try:
            fit_and_tidy(trainer, trial_config)
        except BaseException as error:  # noqa: BLE001 - re-raised in step()
            self._error = error
        finally:
            self._finished.set()

    def step(self) -> dict[str, Any]:
        while not self._pending:
            finished = self._finished.wait(timeout=0.2)
            self._pending += ray.get(self._channel.take.remote())
            if not self._pending and finished:
                if self._error is not None:
                    raise self._error
                raise RuntimeError("the Train run ended without reporting an epoch")
        metrics = self._pending.pop(0)
        return {**metrics, "done": int(metrics.get(EPOCH, 0)) >= self._epochs}

    def save_checkpoint(self, checkpoint_dir: str) -> dict[str, Any]:
        """Nothing to save at the Tune level: the Train run checkpoints itself and resumes from its own checkpoints."""
        return {}

    def load_checkpoint(self, checkpoint: Any) -> None:
        """See `save_checkpoint`: a restarted trial's Train run finds its checkpoints in the trial folder."""

    def cleanup(self) -> None:
        ray.get(self._channel.stop.remote())
        # The run ends at its next report (within one epoch); Tune waits for stop() before reclaiming the trial.
        self._finished.wait(timeout=STOP_TIMEOUT_S)
