"""The per-worker training loop, free of Ray: it runs in a Ray Train worker and in a plain process.

What differs between the two is passed in: the `DataFeed` (batches for this
rank) and the `WorkerEnv` (device, how to wrap the model for data parallelism,
where to report metrics and checkpoints, what to resume from).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from proco_ray import distributed
from proco_ray.config import Config, ConfigError, OptimConfig
from proco_ray.data.augment import eval_view, make_views, view_generator
from proco_ray.data.train_input import TrainInput
from proco_ray.engine.checkpoint import check_compatible, load_checkpoint, save_checkpoint, staging_directory
from proco_ray.engine.feeds import Batch, DataFeed
from proco_ray.method.base import Method, Stage, unwrap
from proco_ray.method.registry import create_method, stages_for
from proco_ray.metric_keys import (
    BEST_EPOCH,
    BEST_VAL_MACRO_F1,
    CHECKPOINT_SCORE,
    COLLAPSED,
    DATA_WAIT_SHARE,
    EMBEDDING_STD,
    EPOCH,
    IMAGES_PER_S,
    LAST_TEST,
    SCALAR_METRICS,
    STAGE,
    TEST,
    TRAIN,
    TRAIN_LOSS,
    TRAIN_LR,
    TRAIN_STEPS,
    VAL,
    VAL_MACRO_F1,
)
from proco_ray.metrics import metrics_from_confusion

Report = Callable[[dict[str, Any], "Path | None"], None]


@dataclass
class WorkerEnv:
    """How this worker talks to the outside world."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[nn.Module, bool], nn.Module] = lambda model, find_unused: model
    report: Report = lambda metrics, checkpoint_dir: None
    resume_from: Path | None = None
    log_dir: Path | None = None
    print_progress: bool = True
    save_checkpoints: bool = True


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def say(line: str) -> None:
    """A progress line on stdout, written directly: Ray Train patches print() into its logger, whose console
    handler and Ray's stdout forwarding then showed every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Reseeding at every epoch from (seed, epoch, rank) makes a resumed run draw what an unbroken one draws."""
    return int(np.random.SeedSequence([seed, epoch + 1, rank]).generate_state(1)[0])


def view_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's views: the same on every rank (they draw for the global batch), a stream of its
    own (numpy's spawn key), apart from the epoch_seed streams of the method and the global generators."""
    return int(np.random.SeedSequence([seed, epoch + 1], spawn_key=(1,)).generate_state(1)[0])


def autocast_for(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA when asked for; a no-op on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


ViewMaker = Callable[[Batch], Batch]


def view_maker(source: TrainInput, image_size: int, generator: torch.Generator) -> ViewMaker:
    """uint8 images on the device -> the stage's views (view_q, and view_k for two views), made on that device
    with parameters for the global batch drawn from `generator` (seeded alike on every rank)."""

    def make(batch: Batch) -> Batch:
        batch = dict(batch)
        views = make_views(
            batch.pop("image"),
            source.augmentation,
            image_size,
            source.views,
            generator,
            distributed.rank(),
            distributed.world_size(),
        )
        return {**batch, **dict(zip(("view_q", "view_k"), views))}

    return make


def train_one_epoch(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[Batch],
    stage: Stage,
    epoch: int,
    device: torch.device,
    add_views: ViewMaker,
    amp: bool = False,
    max_steps: int | None = None,
    progress_every: int = 0,
) -> dict[str, float]:
    """One pass over this rank's batches of uint8 images, whose views `add_views` makes on the device;
    returns the epoch means of the method's logs (over ranks).

    The step never waits for the device: losses and logs are summed on the device and read once at
    the end of the epoch, and a non-finite loss is recorded there (first bad step) and raised then.
    `progress_every` > 0 prints steps, images/s and the epoch's ETA every that many steps, from host
    clocks only (no loss: reading it would wait for the device).
    """
    model.train()
    totals: dict[str, Tensor] = {}
    first_bad_step = torch.tensor(-1, device=device)
    steps, images, start, data_wait = 0, 0, time.perf_counter(), 0.0
    iterator = iter(batches)
    while max_steps is None or steps < max_steps:
        waited = time.perf_counter()
        batch = next(iterator, None)
        data_wait += time.perf_counter() - waited
        if batch is None:
            break
        batch = add_views(_to_device(batch, device))
        with autocast_for(device, amp):
            out = method.training_loss(model, batch, epoch, stage)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        loss = out.loss.detach().float()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), steps, first_bad_step)
        for key, value in {"loss": loss, **out.logs}.items():
            value = value.detach().float()
            totals[key] = totals[key] + value if key in totals else value
        steps += 1
        images += batch["label"].shape[0]
        if progress_every and steps % progress_every == 0:
            say(_step_progress(epoch, steps, max_steps, images, time.perf_counter() - start))
    if int(first_bad_step) >= 0:
        raise FloatingPointError(f"loss became {float(totals['loss'])} at epoch {epoch}, step {int(first_bad_step)}")
    if steps == 0:
        raise RuntimeError(f"epoch {epoch} produced no training batch: the training split is smaller than one batch")
    elapsed = time.perf_counter() - start
    logs = distributed.mean_over_ranks({f"{TRAIN}/{k}": v / steps for k, v in totals.items()})
    logs[TRAIN_LR] = optimizer.param_groups[0]["lr"]
    logs[IMAGES_PER_S] = images * distributed.world_size() / elapsed
    logs[DATA_WAIT_SHARE] = data_wait / elapsed
    logs[TRAIN_STEPS] = steps
    return logs


def _step_progress(epoch: int, steps: int, total: int | None, images: int, elapsed: float) -> str:
    rate = images * distributed.world_size() / max(elapsed, 1e-9)
    eta = f", epoch ETA {elapsed / steps * (total - steps):.0f}s" if total else ""
    return f"  epoch {epoch + 1} step {steps}/{total or '?'}: {rate:.0f} img/s{eta}"


@torch.no_grad()
def evaluate(
    model: nn.Module,
    method: Method,
    batches: Iterable[Batch],
    device: torch.device,
    class_names: list[str],
    image_size: int,
    amp: bool = False,
) -> dict[str, Any]:
    """Metrics of this rank's share of a split (uint8 images, given the evaluation view on the device),
    combined over ranks by summing confusion matrices."""
    model.eval()
    num_classes = len(class_names)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    for batch in batches:
        batch = _to_device(batch, device)
        with autocast_for(device, amp):
            logits = method.predict(model, eval_view(batch["image"], image_size))
        index = batch["label"] * num_classes + logits.argmax(dim=1)
        confusion += torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)
    distributed.all_reduce_sum(confusion)
    if int(confusion.sum()) == 0:
        raise RuntimeError("evaluation saw no image: the split is empty")
    return metrics_from_confusion(confusion.cpu().numpy(), class_names)


TIE_BREAK = 1e-9


def checkpoint_score(val_macro_f1: float, epoch: int) -> float:
    """What checkpoints are ranked by (CHECKPOINT_SCORE): val macro-F1 with ties going to the earlier epoch,
    as `is_better` selects, so the checkpoint kept as best is always the selected epoch's."""
    return val_macro_f1 - TIE_BREAK * epoch


COLLAPSE_FRACTION = 0.2
COLLAPSE_DOC = "docs/method.md#collapse-guard"


def is_better(metrics: dict[str, Any], best: dict[str, float]) -> bool:
    """Model selection on validation: a strictly higher val macro-F1 than every earlier epoch."""
    return not best or metrics[VAL_MACRO_F1] > best[BEST_VAL_MACRO_F1]


def select_on_validation(
    metrics: dict[str, Any], best: dict[str, float], last_epoch: bool, test: Callable[[], dict[str, Any]] | None
) -> dict[str, float]:
    """Model selection for the epoch whose `metrics` hold its validation: returns the best so far, and adds to
    `metrics` best/* and test/* (the test split evaluated only when validation improves), last/test/* at the
    last epoch, and the score checkpoints are ranked by."""
    epoch = int(metrics[EPOCH])
    selected = None
    if is_better(metrics, best):
        best = {BEST_EPOCH: epoch, BEST_VAL_MACRO_F1: metrics[VAL_MACRO_F1]}
        if test is not None:
            selected = test()
            best.update(flat_metrics(TEST, selected))
    metrics.update(best)
    if test is not None and last_epoch:
        metrics.update(flat_metrics(LAST_TEST, selected or test()))
    metrics[CHECKPOINT_SCORE] = checkpoint_score(metrics[VAL_MACRO_F1], epoch)
    return best


def collapse_warning(metrics: dict[str, Any], feat_dim: int) -> str | None:
    """A message when the contrastive embedding has collapsed: embedding_std below COLLAPSE_FRACTION of
    the 1/sqrt(feat_dim) of features spread over the sphere (0.025 for 64 dimensions)."""
    value = metrics.get(EMBEDDING_STD)
    threshold = COLLAPSE_FRACTION / math.sqrt(feat_dim)
    if value is None or value >= threshold:
        return None
    return (
        f"COLLAPSED: embedding_std {value:.4f} < {threshold:.4f}, the contrastive terms carry almost no signal "
        f"(see {COLLAPSE_DOC})"
    )


def flat_metrics(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars for reporting: the headline metrics and per-class recall by class name."""
    out = {f"{prefix}/{k}": float(metrics[k]) for k in SCALAR_METRICS}
    for name, recall in zip(metrics["class_names"], metrics["recall"]):
        out[f"{prefix}/recall/{name}"] = float(recall)
    return out


class ScalarLog:
    """TensorBoard scalars from rank 0 (a no-op elsewhere), one step per epoch.

    Every writer starts with a purge at its first epoch: TensorBoard then hides what a worker group that
    failed after its last registered checkpoint had written for the epochs being redone (from the first, when
    none was registered), so each epoch shows once; in a new run's empty folder it hides nothing.
    """

    def __init__(self, log_dir: Path | None, enabled: bool, first_epoch: int = 0) -> None:
        self.writer = None
        if enabled and log_dir is not None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=first_epoch + 1)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_device(config: Config, device: torch.device) -> None:
    if config.model.batch_norm == "sync" and device.type != "cuda":
        raise ConfigError("model.batch_norm=sync needs CUDA devices (SyncBatchNorm); use 'shuffle' on CPU")


def make_optimizer(method: Method, model: nn.Module, stage: Stage, optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum over what the stage trains."""
    return torch.optim.SGD(
        method.trainable_parameters(model, stage), lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, stage: Stage, steps_per_epoch: int, optim: OptimConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step warm-up and cosine decay over the stage, ending at lr 0."""
    warmup = min(optim.warmup_epochs, stage.epochs) * steps_per_epoch
    schedule = partial(warmup_cosine, warmup_steps=warmup, total_steps=stage.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def checkpoint_state(
    config: Config,
    class_names: list[str],
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    stage: Stage,
    metrics: dict[str, Any],
    best: dict[str, float],
    global_step: int,
) -> dict[str, Any]:
    """Everything an exact resume needs after this epoch. No random state: every epoch reseeds from
    (seed, epoch), so a resumed run draws what an unbroken one draws."""
    return {
        "config": config.to_dict(),
        "class_names": class_names,
        "model": unwrap(model).state_dict(),
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "stage": stage.name,
        "epoch": metrics[EPOCH],
        "global_step": global_step,
        "metrics": metrics,
        "best": best,
    }


def progress_line(metrics: dict[str, Any], best: dict[str, float], total_epochs: int, eta_s: float, collapse: str | None) -> str:
    return (
        f"epoch {metrics[EPOCH]}/{total_epochs} [{metrics[STAGE]}] loss {metrics[TRAIN_LOSS]:.4f} "
        f"val acc {metrics[f'{VAL}/accuracy']:.3f} macro-F1 {metrics[VAL_MACRO_F1]:.3f} "
        f"bal-acc {metrics[f'{VAL}/balanced_accuracy']:.3f} (best epoch {best[BEST_EPOCH]}) "
        f"| {metrics[IMAGES_PER_S]:.0f} img/s | ETA {eta_s:.0f}s" + (f" | {collapse}" if collapse else "")
    )


def train_worker(config: Config, feed: DataFeed, env: WorkerEnv) -> dict[str, Any]:
    """Train `config.method` on `feed`, reporting every epoch; returns the last epoch's metrics.

    Every report carries the validation metrics of its epoch and, under best/* and test/*, the epoch
    with the best validation macro-F1 so far and its test metrics: the test split is evaluated only
    when validation improves, so test/* are always those of the model selected on validation (the
    checkpoint kept as best). The last epoch's report adds last/test/*, the test metrics of the last
    epoch, a reading that involves no selection on the small validation split.
    """
    device = env.device
    _check_device(config, device)
    rank = distributed.rank()
    seed_everything(epoch_seed(config.train.seed, -1))
    method = create_method(config.method, config.model, len(feed.class_names), feed.class_counts)
    model = method.build_model()
    state = None
    if env.resume_from is not None:
        state = load_checkpoint(env.resume_from)
        check_compatible(state, config.to_dict(), feed.class_names)
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
    model.to(device)
    method.to(device)
    model = env.prepare_model(model, method.find_unused_parameters)
    start_epoch = state["epoch"] if state else 0
    best: dict[str, float] = dict(state.get("best", {})) if state else {}
    global_step = state["global_step"] if state else 0
    log = ScalarLog(env.log_dir, enabled=rank == 0, first_epoch=start_epoch)
    total_epochs = config.optim.epochs
    cap = config.train.max_steps_per_epoch
    steps_per_epoch = feed.steps_per_epoch if cap is None else min(feed.steps_per_epoch, cap)
    has_test = config.data.test_split in feed.eval_splits
    metrics: dict[str, Any] = {}

    def evaluate_split(split: str) -> dict[str, Any]:
        return evaluate(
            model, method, feed.eval_batches(split), device, feed.class_names, config.data.image_size, config.optim.amp
        )

    run_start, epochs_run, offset = time.perf_counter(), 0, 0
    try:
        for stage in stages_for(config.method, total_epochs, config.data.augmentation):
            end = offset + stage.epochs
            if start_epoch >= end:
                offset = end
                continue
            method.enter_stage(model, stage)
            optimizer = make_optimizer(method, model, stage, config.optim)
            scheduler = make_scheduler(optimizer, stage, steps_per_epoch, config.optim)
            if state and state.get("stage") == stage.name and start_epoch > offset:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            for epoch in range(max(start_epoch, offset), end):
                seed_everything(epoch_seed(config.train.seed, epoch, rank))
                method.reseed(epoch_seed(config.train.seed, epoch), device)
                views = view_generator(device, view_seed(config.train.seed, epoch))
                train_logs = train_one_epoch(
                    model,
                    method,
                    optimizer,
                    scheduler,
                    feed.train_batches(stage.input, epoch),
                    stage,
                    epoch,
                    device,
                    view_maker(stage.input, config.data.image_size, views),
                    amp=config.optim.amp,
                    max_steps=steps_per_epoch,
                    progress_every=config.train.log_every_steps if env.print_progress and rank == 0 else 0,
                )
                global_step += int(train_logs[TRAIN_STEPS])
                metrics = {
                    **train_logs,
                    **flat_metrics(VAL, evaluate_split(config.data.val_split)),
                    EPOCH: epoch + 1,
                    STAGE: stage.name,
                }
                test = partial(evaluate_split, config.data.test_split) if has_test else None
                best = select_on_validation(metrics, best, last_epoch=epoch + 1 == total_epochs, test=test)
                collapse = collapse_warning(metrics, config.model.feat_dim)
                metrics[COLLAPSED] = float(collapse is not None)
                log.scalars({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, epoch + 1)
                log.scalars(method.state_scalars(feed.class_names), epoch + 1)
                if collapse is not None:
                    log.text("train/collapse", collapse, epoch + 1)
                epochs_run += 1
                if env.print_progress and rank == 0:
                    eta = (time.perf_counter() - run_start) / epochs_run * (total_epochs - epoch - 1)
                    say(progress_line(metrics, best, total_epochs, eta, collapse))
                if rank == 0 and env.save_checkpoints:
                    state_now = checkpoint_state(
                        config, feed.class_names, model, method, optimizer, scheduler, stage, metrics, best, global_step
                    )
                    with staging_directory() as tmp:
                        env.report(metrics, save_checkpoint(tmp, state_now))
                else:
                    env.report(metrics, None)
            offset = end
    finally:
        log.close()
    return metrics
