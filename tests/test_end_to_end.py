"""The whole path: a prepared dataset in real S3 -> Ray Data -> TorchTrainer (2 gloo workers) -> evaluate."""

import json
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from proco_ray.cli import main
from proco_ray.config import ConfigError, load_config
from proco_ray.data.manifest import read_manifest
from proco_ray.data.prepare import PrepareOptions, prepare
from proco_ray.data.synthetic import write_image_folder
from proco_ray.errors import DataError
from proco_ray.inference.export import export
from proco_ray.launch.trainer import build_trainer, fit, summarise
from proco_ray.runs import SUMMARY_FILE, RunFolder, best_checkpoint
from proco_ray.storage.s3 import join, read_bytes, resolve

TINY = Path(__file__).parent / "tiny.yaml"
OVERRIDES = ["data.batch_size=8", "data.eval_batch_size=32", "method.queue_size=32", "train.num_workers=2"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_image_folder(root / "source", [40, 16, 8], image_size=16)
    return root


@pytest.mark.slow
def test_train_on_s3_data_then_evaluate(ray_local, s3_env, prepared, tmp_path):
    uri = "s3://proco-e2e/tiny"
    prepare(str(prepared / "source"), uri, PrepareOptions(image_size=16, overwrite=True))
    runs = "s3://proco-e2e/runs"
    config = load_config(
        TINY, OVERRIDES + [f"data.uri={uri}", f"train.storage_path={runs}", "train.name=e2e", "method.name=ce_resample"]
    )
    temp_before = set(Path(tempfile.gettempdir()).glob("proco-tb-*"))
    summary = summarise(fit(config), config)
    assert summary["metrics"]["epoch"] == 2 and "test/macro_f1" in summary["metrics"]
    # issue 11.8: every path written is usable as the next command's input; 11.9: no temp folder left behind
    assert summary["best_checkpoint"].startswith(runs + "/e2e/") and summary["run"].startswith(runs)
    assert set(Path(tempfile.gettempdir()).glob("proco-tb-*")) == temp_before
    fs, path = resolve(summary["tensorboard"])
    assert any(info.size for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    out = f"{runs}/e2e-evaluation"  # evaluate writes to S3 as well as to a folder
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                summary["run"],  # issue 26.2: a run folder stands for its best checkpoint (here from Ray Train's snapshot)
                "--data",
                uri,
                "--split",
                "test",
                "--out",
                out,
                "--calibrate",
            ]
        )
        == 0
    )
    metrics = json.loads(read_bytes(join(out, "metrics.json")))
    assert metrics["checkpoint"] == summary["best_checkpoint"]
    assert sum(metrics["support"]) == read_manifest(uri).num_rows("test")
    assert metrics["class_names"] == ["class_0", "class_1", "class_2"]
    assert len(read_bytes(join(out, "confusion_matrix.png"))) > 1000 and len(read_bytes(join(out, "reliability.png"))) > 1000
    assert read_bytes(join(out, "per_class.csv")).decode().startswith("class,support,precision,recall,f1,roc_auc")
    assert read_bytes(join(out, "per_class.md")).decode().startswith("| class | support |")
    assert set(metrics["roc_auc"]) == set(metrics["class_names"]) and 0 <= metrics["ece"] <= 1
    assert metrics["temperature"] > 0 and metrics["calibrated_on"] == "val" and 0 <= metrics["ece_calibrated"] <= 1
    predictions = tmp_path / "predictions"
    args = [
        "predict",
        "--checkpoint",
        summary["run"],
        "--input",
        str(prepared / "source"),
        "--output",
        str(predictions),
    ]
    assert main([*args, "--calibrated"]) == 0  # the temperature evaluate saved beside the checkpoint on S3
    assert pq.read_table(predictions / "predictions.parquet").num_rows == 64
    RunFolder.of_config(config).write_file(SUMMARY_FILE, json.dumps(summary).encode())
    assert best_checkpoint(summary["run"]) == summary["best_checkpoint"]
    exported = export(summary["run"] + "/", str(tmp_path / "exported"))
    assert exported["checkpoint"] == summary["best_checkpoint"] and exported["temperature"] == metrics["temperature"]


def test_bad_data_settings_are_refused_before_training(ray_local, prepared, tmp_path):
    local_uri = str(tmp_path / "prepared")
    prepare(str(prepared / "source"), local_uri, PrepareOptions(image_size=16))
    with pytest.raises(DataError, match="no manifest.json"):
        build_trainer(load_config(TINY, OVERRIDES + [f"data.uri={tmp_path / 'nothing'}"]))
    with pytest.raises(ConfigError, match="data.num_classes is 7 but the dataset .* has 3 classes"):
        build_trainer(load_config(TINY, OVERRIDES + [f"data.uri={local_uri}", "data.num_classes=7"]))
    with pytest.raises(ConfigError, match="no 'holdout' split"):
        build_trainer(load_config(TINY, OVERRIDES + [f"data.uri={local_uri}", "data.val_split=holdout"]))
