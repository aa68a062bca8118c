"""`proco-ray demo`: the main job on embedded defaults, end to end on one machine.

Local S3 (SeaweedFS) up -> prepare a long-tailed dataset into it -> ProCo on a
local Ray with 2 CPU workers (TorchTrainer, Ray Data) -> evaluate the best
checkpoint on the test split -> predict the source images with it (Ray Data batch
inference) and export it as a program that loads without this package -> print the metrics and
where everything is.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from proco_ray.config import load_config
from proco_ray.data.prepare import PrepareOptions, prepare
from proco_ray.data.synthetic import long_tailed_counts, write_image_folder
from proco_ray.evaluation.evaluate import claim_evaluation_output, evaluate_checkpoint, write_evaluation
from proco_ray.evaluation.report import markdown_table, per_class_rows
from proco_ray.inference.export import export
from proco_ray.inference.predict import predict
from proco_ray.launch.cluster import connect_or_start_ray
from proco_ray.launch.run_claim import claimed
from proco_ray.launch.trainer import fit_or_explain, summarise
from proco_ray.method.registry import resolved
from proco_ray.metric_keys import HEADLINE
from proco_ray.runs import SUMMARY_FILE, RunFolder
from proco_ray.storage.seaweedfs import DEFAULT_DIR, LocalS3Server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="cpu-small.yaml",
        help="YAML file or a shipped config's name (proco_ray/configs; default cpu-small.yaml)",
    )
    parser.add_argument(
        "--source",
        help="a dataset as downloaded (ISIC 2018, APTOS 2019, MedMNIST npz, ImageFolder); default: a generated long-tailed one",
    )
    parser.add_argument("--storage-dir", default=str(DEFAULT_DIR), help="where the local S3 server keeps its data")
    parser.add_argument("--run-dir", default="runs", help="where runs (checkpoints, TensorBoard logs) go")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.epochs=5")


def run(args: argparse.Namespace) -> int:
    config = resolved(load_config(args.config, [f"train.storage_path={Path(args.run_dir).resolve()}", *args.overrides]))
    server = LocalS3Server(args.storage_dir)
    was_running = server.running()
    endpoint = server.start()
    print(f"[1/5] local S3 at {endpoint.endpoint} (data in {server.data_dir})", flush=True)
    os.environ.update(endpoint.env())
    try:
        source = args.source
        if source is None:
            source = str(server.data_dir.parent / "demo-source")
            if not Path(source).is_dir():
                write_image_folder(source, long_tailed_counts(5, head=300, imbalance=20), image_size=48, seed=0)
        connect_or_start_ray(min_cpus=config.run_resources()["CPU"], join_existing=False)
        data_uri = f"s3://{endpoint.bucket}/demo/{Path(source).name}-{config.data.image_size}px"
        manifest = prepare(source, data_uri, PrepareOptions(image_size=config.data.image_size, overwrite=True))
        split_sizes = ", ".join(f"{split} {sum(per_class.values())}" for split, per_class in manifest["counts"].items())
        print(f"[2/5] prepared {source} into {data_uri} ({split_sizes} images)", flush=True)
        config.data.uri = data_uri
        config.data.num_classes = len(manifest["classes"])
        print(
            f"[3/5] training {config.method.name} ({config.method.sampling} batches, {config.data.augmentation} augmentation) "
            f"on {config.train.num_workers} workers for {config.optim.epochs} epochs",
            flush=True,
        )
        with claimed(config):
            summary = summarise(fit_or_explain(config), config)
        summary_file = RunFolder.of_config(config).write_file(SUMMARY_FILE, json.dumps(summary, indent=2, default=str).encode())
        print(f"[4/5] evaluating {summary['best_checkpoint']} on the test split", flush=True)
        metrics = evaluate_checkpoint(summary["best_checkpoint"], data_uri, config.data.test_split)
        out = str(Path(summary["run"]) / "evaluation")
        write_evaluation(metrics, claim_evaluation_output(out, overwrite=True), "test split")
        print(markdown_table(per_class_rows(metrics)))
        print("test split: " + ", ".join(f"{name} {metrics[name]:.4f}" for name in HEADLINE))
        predictions = Path(summary["run"]) / "predictions"
        predicted = predict(summary["best_checkpoint"], source, str(predictions), overwrite=True, csv=True)
        exported = export(summary["best_checkpoint"], str(Path(summary["run"]) / "exported"), overwrite=True)
        print(
            f"[5/5] predicted {predicted['predicted']} images of {source} ({predicted['unreadable']} unreadable) "
            "and exported the classifier",
            flush=True,
        )
        print(f"summary: {summary_file}")
        print(f"evaluation (metrics.json, per-class tables, confusion matrix, reliability diagram): {out}")
        print(f"predictions: {', '.join(predicted['written'])}")
        print(f"exported model (loads with torch alone): {', '.join(exported['written'])}")
        print(f"TensorBoard: tensorboard --logdir {summary['tensorboard']}")
    finally:
        if not was_running:
            server.stop()
    return 0
