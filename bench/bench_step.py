"""Step cost of ProCo against CE and a plain two-view MoCo step, the cost of its extra parts as the
queue grows, and the time spent synchronising the queue and recalibration across workers.

    .venv/bin/python bench/bench_step.py                       # CPU, small sizes
    .venv/bin/python bench/bench_step.py --device cuda --arch resnet50 --image-size 224 --batch-sizes 64 128

Prints three markdown tables. Runs without Ray; the sync table uses real gloo
(or NCCL on CUDA) processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from proco_ray.config import MethodConfig, ModelConfig
from proco_ray.evaluation.report import markdown_table
from proco_ray.method.losses import PrototypeRecalibration, adversarial_negatives, adversarial_positives, proto_loss
from proco_ray.method.proco import ProCo
from proco_ray.method.queue import SampleQueue
from proco_ray.method.registry import create_method, stages_for
from proco_ray.storage.seaweedfs import free_port


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds per call of `step`."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_syncs(step: Callable[[], None], device: torch.device) -> str:
    """Host synchronisations in one step, counted by CUDA's sync debug mode ('-' where there is no CUDA)."""
    if device.type != "cuda":
        return "-"
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return str(sum("synchroniz" in str(w.message) for w in caught))


def moco_infonce_loss(method: ProCo, model, batch) -> torch.Tensor:
    """MoCo v2's own step (positive q.k, negatives from the queue) on the same network: the reference cost."""
    out = model(batch["view_q"], batch["view_k"])
    keys, labels, preds = SampleQueue.gather(out["k"], batch["label"], out["key_preds"])
    queue_feats = method.queue.contents()[0].clone()
    positive = (out["q"] * out["k"]).sum(1, keepdim=True)
    logits = torch.cat([positive, out["q"] @ queue_feats.T], dim=1) / method.cfg.tau
    loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
    method.queue.enqueue(keys, labels, preds)
    return loss


def step_table(args: argparse.Namespace, device: torch.device) -> list[dict]:
    model_cfg = ModelConfig(arch=args.arch, small_input=args.image_size <= 64, feat_dim=128, hidden_dim=2048, batch_norm="plain")
    variants = {
        "CE": dict(name="ce"),
        "MoCo two-view (InfoNCE)": dict(name="proco_paper"),
        "ProCo, proto-loss only": dict(name="proco_paper", proto_instances=False, recalibration=False),
        "ProCo full (gamma 20, recal.)": dict(name="proco_paper", proto_instances=True, recalibration=True),
    }
    rows = []
    for batch_size in args.batch_sizes:
        for queue_size in args.queue_sizes:
            g = torch.Generator().manual_seed(0)
            images = torch.randn(batch_size, 3, args.image_size, args.image_size, generator=g)
            batch = {
                "view_q": images.to(device),
                "view_k": (images + 0.1).to(device),
                "label": torch.randint(0, args.classes, (batch_size,), generator=g).to(device),
            }
            row = {"batch": batch_size, "queue M": queue_size}
            syncs: list[str] = []
            for label, overrides in variants.items():
                torch.manual_seed(0)
                cfg = MethodConfig(queue_size=queue_size, gamma=20, **overrides)
                method = create_method(cfg, model_cfg, args.classes, [1] * args.classes).to(device)
                model = method.build_model().to(device)
                stage = stages_for(cfg, 10)[0]
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                if isinstance(method, ProCo):
                    method.queue.enqueue(
                        F.normalize(torch.randn(queue_size, 128, device=device), dim=1),
                        torch.randint(0, args.classes, (queue_size,), device=device),
                        torch.randint(0, args.classes, (queue_size,), device=device),
                    )
                use_moco = label.startswith("MoCo")

                def step() -> None:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        if use_moco:
                            loss = moco_infonce_loss(method, model, batch)
                        else:
                            loss = method.training_loss(model, batch, 0, stage).loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

                seconds = time_steps(step, device, args.warmup, args.steps)
                row[label] = batch_size / seconds
                syncs.append(host_syncs(step, device))
            row["host syncs per step"] = "/".join(syncs)
            rows.append(row)
    for row in rows:
        moco, full, ce = row["MoCo two-view (InfoNCE)"], row["ProCo full (gamma 20, recal.)"], row["CE"]
        row["ProCo/MoCo time"] = moco / full
        row["ProCo/CE time"] = ce / full
        for key in list(row):
            if isinstance(row[key], float) and "time" not in key:
                row[key] = f"{row[key]:.1f} img/s"
    return rows


def proco_parts_table(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Proto-instances + recalibration + proto-loss alone, on feature tensors, as the contrast set grows."""
    rows = []
    batch, dim, gamma = args.batch_sizes[-1], 128, 20
    for bank_size in args.bank_sizes:
        g = torch.Generator(device=device).manual_seed(0)
        q = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=1)
        bank = F.normalize(torch.randn(bank_size, dim, device=device, generator=g), dim=1)
        bank_labels = torch.randint(0, args.classes, (bank_size,), device=device, generator=g)
        bank_preds = torch.randint(0, args.classes, (bank_size,), device=device, generator=g)
        labels = torch.randint(0, args.classes, (batch,), device=device, generator=g)
        protos = torch.randn(args.classes, dim, device=device, generator=g)
        logits = torch.randn(batch, args.classes, device=device, generator=g)
        eps = torch.rand(batch, gamma, device=device, generator=g) * 0.4
        recal = PrototypeRecalibration(args.classes).to(device)

        def parts() -> None:
            neg, neg_mask = adversarial_negatives(q, bank, bank_labels, labels, protos, gamma, eps)
            pos, pos_mask = adversarial_positives(q, bank, bank_labels, bank_preds, labels, protos, gamma, eps)
            recal.update(logits, labels)
            contrast = q @ bank.T
            same = labels[:, None] == bank_labels[None]
            proto_loss(
                torch.cat([contrast, torch.einsum("bk,bgk->bg", q, pos)], 1),
                torch.cat([contrast, torch.einsum("bk,bgk->bg", q, neg)], 1),
                torch.cat([same, pos_mask], 1),
                torch.cat([~same, neg_mask], 1),
            ).mean()

        seconds = time_steps(parts, device, args.warmup, args.steps)
        rows.append(
            {
                "batch B": batch,
                "contrast set M": bank_size,
                "ms per step": seconds * 1e3,
                "ns per B x M": seconds * 1e9 / (batch * bank_size),
            }
        )
    return rows


def _sync_worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    backend = "nccl" if args.device == "cuda" else "gloo"
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    batch = args.batch_sizes[-1] // world
    queue = SampleQueue(args.queue_sizes[-1], 128).to(device)
    recal = PrototypeRecalibration(args.classes).to(device)
    keys = F.normalize(torch.randn(batch, 128, device=device), dim=1)
    labels = torch.randint(0, args.classes, (batch,), device=device)
    logits = torch.randn(batch, args.classes, device=device)

    def sync() -> None:
        queue.enqueue(*SampleQueue.gather(keys, labels, labels))
        recal.update(logits, labels)

    seconds = time_steps(sync, device, args.warmup, args.steps)
    if rank == 0:
        results[world] = seconds
    dist.destroy_process_group()


def sync_table(args: argparse.Namespace) -> list[dict]:
    manager = mp.Manager()
    results = manager.dict()
    for world in (1, 2):
        mp.spawn(_sync_worker, args=(world, free_port(), args, results), nprocs=world, join=True)
    return [
        {
            "workers": w,
            "global batch": args.batch_sizes[-1],
            "queue M": args.queue_sizes[-1],
            "sync ms per step": results[w] * 1e3,
        }
        for w in (1, 2)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--queue-sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--bank-sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip-sync", action="store_true", help="leave out the multi-process sync table")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} "
        f"{'' if device.type == 'cuda' else 'CPU threads'}), {args.arch}, {args.image_size} px\n"
    )
    print("## Training step throughput\n")
    print(markdown_table(step_table(args, device)))
    print("## ProCo's extra parts alone (proto-instances, recalibration, proto-loss)\n")
    print(markdown_table(proco_parts_table(args, device)))
    if not args.skip_sync:
        print("## Queue + recalibration synchronisation\n")
        print(markdown_table(sync_table(args)))


if __name__ == "__main__":
    main()
