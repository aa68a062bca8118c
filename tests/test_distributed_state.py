"""The queue and the recalibration weights stay identical across real gloo processes."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from proco_ray.method.losses import PrototypeRecalibration
from proco_ray.method.queue import SampleQueue

STEPS, LOCAL_BATCH, WORLD, CLASSES, DIM, QUEUE = 5, 6, 2, 4, 8, 20


def global_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        yield (
            torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g),
            torch.randint(0, CLASSES - 1, (WORLD * LOCAL_BATCH,), generator=g),
            torch.randint(0, CLASSES, (WORLD * LOCAL_BATCH,), generator=g),
            torch.randn(WORLD * LOCAL_BATCH, CLASSES, generator=g),
        )


def run_steps(rank: int, world: int):
    queue = SampleQueue(QUEUE, DIM)
    recal = PrototypeRecalibration(CLASSES)
    part = slice(rank * LOCAL_BATCH * WORLD // world, (rank + 1) * LOCAL_BATCH * WORLD // world)
    for feats, labels, preds, logits in global_batches():
        recal.update(logits[part], labels[part])
        queue.enqueue(*SampleQueue.gather(feats[part], labels[part], preds[part]))
    return {"queue": queue.state_dict(), "recal": recal.state_dict()}


def worker(rank: int, port: int, out_dir: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(run_steps(rank, WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_queue_and_recalibration_synchronised_across_ranks(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = run_steps(0, 1)
    assert int(single["queue"]["filled"]) == QUEUE
    for state in ranks:
        for part in ("queue", "recal"):
            for key, value in single[part].items():
                torch.testing.assert_close(state[part][key], value, msg=f"{part}.{key}")
    assert not torch.allclose(single["recal"]["weights"][:3], torch.full((3,), 0.01))
    assert single["recal"]["weights"][3] == 0.01


def test_queue_wraps_around_for_any_size():
    queue = SampleQueue(5, 2)
    assert len(queue) == 0 and queue.contents()[0].shape == (0, 2)
    seen = []
    for step in range(4):
        feats = torch.arange(3 * step, 3 * step + 3, dtype=torch.float32)[:, None].repeat(1, 2)
        queue.enqueue(feats, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
        seen.extend(range(3 * step, 3 * step + 3))
    assert len(queue) == 5
    assert sorted(queue.feats[:, 0].tolist()) == seen[-5:]
    queue.enqueue(
        torch.arange(100, 107, dtype=torch.float32)[:, None].repeat(1, 2),
        torch.ones(7, dtype=torch.long),
        torch.ones(7, dtype=torch.long),
    )
    assert sorted(queue.feats[:, 0].tolist()) == list(range(102, 107))
    restored = SampleQueue(5, 2)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.feats, queue.feats) and int(restored.ptr) == int(queue.ptr)
    partly = SampleQueue(5, 2)
    partly.enqueue(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    fresh = SampleQueue(5, 2)
    assert len(fresh) == 0
    fresh.load_state_dict(partly.state_dict())
    assert len(fresh) == 2 == int(fresh.filled) and fresh.contents()[0].shape == (2, 2)


def danil_worker(rank: int, port: int, out_dir: str):
    """One DANIL step of a DDP-wrapped classifier on this rank's half of the batch."""
    from torch.nn.parallel import DistributedDataParallel

    from proco_ray.config import MethodConfig, ModelConfig
    from proco_ray.method.registry import create_method, stages_for

    if rank >= 0:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model_cfg = ModelConfig(arch="resnet18", small_input=True, norm="group")
        method = create_method(MethodConfig(name="danil"), model_cfg, CLASSES, [4, 3, 2, 1])
        torch.manual_seed(0)
        model = method.build_model()
        g = torch.Generator().manual_seed(1)
        images, labels = (
            torch.randn(WORLD * LOCAL_BATCH, 3, 8, 8, generator=g),
            torch.randint(0, CLASSES, (WORLD * LOCAL_BATCH,), generator=g),
        )
        if rank >= 0:
            model = DistributedDataParallel(model)
            part = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            images, labels = images[part], labels[part]
        method.training_loss(model, {"view_q": images, "label": labels}, 0, stages_for(method.cfg, 1)[0]).loss.backward()
        module = model.module if rank >= 0 else model
        grads = {name: p.grad for name, p in module.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"danil{rank}.pt"))
    finally:
        if rank >= 0:
            dist.destroy_process_group()


def test_danil_double_backprop_under_ddp_gives_the_full_batch_gradient(tmp_path):
    """DDP all-reduces the gradients of DANIL's double back-propagation like any other (GroupNorm: samples independent)."""
    mp.spawn(danil_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    danil_worker(-1, 0, str(tmp_path))
    full = torch.load(tmp_path / "danil-1.pt")
    for rank in range(WORLD):
        ranked = torch.load(tmp_path / f"danil{rank}.pt")
        for name, grad in full.items():
            torch.testing.assert_close(ranked[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_gpu_workers_get_a_process_group_for_cpu_and_cuda_tensors(tmp_path):
    """With train.use_gpu, Ray Train's default group is NCCL alone, which refuses CPU tensors, so the end of the
    first epoch (a CPU all-reduce) failed on every multi-GPU run. The trainer now asks for one backend per device."""
    from proco_ray.config import load_config
    from proco_ray.engine.feeds import GeneratedFeed
    from proco_ray.launch.trainer import build_trainer

    feed = GeneratedFeed(train_counts=(8, 8), eval_counts=(2, 2), image_size=16)
    tiny = os.path.join(os.path.dirname(__file__), "tiny.yaml")

    def backend(*overrides: str) -> str:
        config = load_config(tiny, [f"train.storage_path={tmp_path}", "train.num_workers=2", *overrides])
        return build_trainer(config, feed).backend_config.backend

    assert backend("train.use_gpu=true") == "cpu:gloo,cuda:nccl"
    assert backend("train.use_gpu=false") == "gloo"
    assert backend("train.use_gpu=true", "train.gpus_per_worker=0.5", "train.dist_backend=gloo") == "gloo"


def test_workers_sharing_a_gpu_are_refused_an_nccl_group(tmp_path):
    import pytest

    from proco_ray.config import ConfigError, load_config
    from proco_ray.engine.feeds import GeneratedFeed
    from proco_ray.launch.trainer import build_trainer

    overrides = [f"train.storage_path={tmp_path}", "train.num_workers=2", "train.use_gpu=true", "train.gpus_per_worker=0.5"]
    with pytest.raises(ConfigError, match="NCCL .* refuses to run: set train.dist_backend=gloo"):
        build_trainer(load_config(None, overrides), GeneratedFeed((8, 8), (2, 2)))


def collectives_worker(rank: int, port: int, out_dir: str):
    """The loop's and the methods' collectives on CPU tensors under a device-mapped group: the CPU side of what GPU
    workers get (`cpu:gloo,cuda:nccl`; its NCCL side cannot be created without GPUs)."""
    from proco_ray import distributed

    dist.init_process_group("cpu:gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        means = distributed.mean_over_ranks({"a": torch.tensor(float(rank)), "b": torch.tensor(2.0 * rank + 1)})
        confusion = distributed.all_reduce_sum(torch.full((2, 2), rank + 1, dtype=torch.long))
        torch.save({"means": means, "confusion": confusion, **run_steps(rank, WORLD)}, os.path.join(out_dir, f"c{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_the_collective_helpers_reduce_across_real_processes_of_a_device_mapped_group(tmp_path):
    mp.spawn(collectives_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = run_steps(0, 1)
    for rank in range(WORLD):
        state = torch.load(tmp_path / f"c{rank}.pt")
        assert state["means"] == {"a": 0.5, "b": 2.0}
        assert torch.equal(state["confusion"], torch.full((2, 2), 3))
        for key, value in single["recal"].items():
            torch.testing.assert_close(state["recal"][key], value)
