"""`proco-ray predict` (Ray Data batch inference on a folder of images and on a prepared split, on a local Ray),
`proco-ray export` (a program that loads without this package and predicts what predict does) and the outputs
of `proco-ray evaluate`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from terminal import RAY_NOISE, run_in_terminal, screen_lines

from proco_ray.cli import main
from proco_ray.config import load_config
from proco_ray.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_view, to_unit
from proco_ray.data.decode import decode_image
from proco_ray.data.prepare import PrepareOptions, prepare, reencode
from proco_ray.engine.checkpoint import save_checkpoint
from proco_ray.errors import DataError
from proco_ray.inference.export import export, export_program, inference_module
from proco_ray.inference.predict import predict, preprocessing_of
from proco_ray.method.registry import create_method
from proco_ray.runs import best_checkpoint, read_checkpoint, restore_model

TINY = Path(__file__).parent / "tiny.yaml"
SIZE = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory, datagen, ray_local) -> dict[str, Path]:
    """A prepared dataset, the raw folder it came from with one corrupt file added, and a ProCo checkpoint."""
    root = tmp_path_factory.mktemp("predict")
    source = datagen.imagefolder(root / "folder", {"common": 12, "rare": 6, "scarce": 4})
    prepare(str(source), str(root / "prepared"), PrepareOptions(image_size=SIZE, split="test"))
    images = root / "images"
    shutil.copytree(source, images)
    (images / "rare" / "broken.jpg").write_bytes(b"not a jpeg at all")
    config = load_config(TINY, [f"data.uri={root / 'prepared'}", f"data.image_size={SIZE}"])
    method = create_method(config.method, config.model, 3, [1, 1, 1])
    model = method.build_model()
    save_checkpoint(
        root / "checkpoint",
        {
            "config": config.to_dict(),
            "class_names": ["common", "rare", "scarce"],
            "model": model.state_dict(),
            "method": method.state_dict(),
            "epoch": 1,
            "global_step": 1,
        },
    )
    return {"images": images, "prepared": root / "prepared", "checkpoint": root / "checkpoint", "root": root}


def test_predicts_every_readable_image_and_lists_the_unreadable(trained):
    out = trained["root"] / "out"
    summary = predict(str(trained["checkpoint"]), str(trained["images"]), str(out), batch_size=5, csv=True)
    assert (summary["predicted"], summary["unreadable"]) == (22, 1)
    table = pq.read_table(out / "predictions.parquet")
    assert table.num_rows == 22 and set(table.column_names) == {"path", "predicted", "prob_common", "prob_rare", "prob_scarce"}
    probs = np.stack([table[f"prob_{c}"].to_numpy() for c in ("common", "rare", "scarce")], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert table["predicted"].to_pylist() == [["common", "rare", "scarce"][k] for k in probs.argmax(1)]
    unreadable = pacsv.read_csv(out / "unreadable.csv").to_pylist()
    assert len(unreadable) == 1 and unreadable[0]["path"].endswith("rare/broken.jpg")
    # issue 26.7: the file and the problem, not PIL's memory address of the buffer it read
    assert unreadable[0]["error"] == "broken.jpg: not an image format PIL can read (unknown format, or a damaged or empty file)"
    assert (out / "predictions.csv").is_file()
    with pytest.raises(DataError, match="already holds .* pass --overwrite"):
        predict(str(trained["checkpoint"]), str(trained["images"]), str(out))
    again = predict(str(trained["checkpoint"]), str(trained["images"]), str(out), overwrite=True, tta=True)
    assert again["predicted"] == 22 and not (out / "predictions.csv").exists()


def test_raw_images_get_exactly_the_preprocessing_of_the_prepared_data(trained):
    """Predicting the raw folder equals predicting the prepared split made from it (same resize and encoding)."""
    raw = predict(str(trained["checkpoint"]), str(trained["images"]), str(trained["root"] / "raw"))
    split = predict(str(trained["checkpoint"]), str(trained["prepared"]), str(trained["root"] / "split"), split="test")
    assert raw["predicted"] == split["predicted"] == 22
    by_id = {row["path"]: row for row in pq.read_table(trained["root"] / "split" / "predictions.parquet").to_pylist()}
    for row in pq.read_table(trained["root"] / "raw" / "predictions.parquet").to_pylist():
        match = by_id[next(i for i in by_id if row["path"].endswith("/" + i))]
        for c in ("common", "rare", "scarce"):
            assert row[f"prob_{c}"] == pytest.approx(match[f"prob_{c}"], abs=1e-5)


def test_cli_refuses_a_foreign_output_and_an_input_without_images(trained, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    args = ["predict", "--checkpoint", str(trained["checkpoint"]), "--input", str(trained["images"])]
    assert main([*args, "--output", str(foreign), "--overwrite"]) == 1
    assert "did not write" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["predict", "--checkpoint", str(trained["checkpoint"]), "--input", str(empty), "--output", str(tmp_path / "o")]) == 1
    )
    assert "no image files" in capsys.readouterr().err


# Loads the exported program with torch alone: any import of proco_ray fails in this process.
LOAD_WITHOUT_PACKAGE = """
import sys
import numpy as np
import torch

class NoProcoRay:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'proco_ray':
            raise ImportError('proco_ray is blocked here: the export must not need it')

sys.meta_path.insert(0, NoProcoRay())
program = torch.export.load(sys.argv[1]).module()
images = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], torch.softmax(program(images) / float(sys.argv[4]), dim=1).numpy())
"""


def stored_images(paths: list[Path], state: dict) -> torch.Tensor:
    """Image files as prepare stores them for the checkpoint's data (squash and encoding), decoded: uint8 [B, H, W, 3]."""
    prep = preprocessing_of(state)
    return torch.from_numpy(
        np.stack(
            [
                decode_image(
                    reencode(p.read_bytes(), prep.image_size, prep.encoding, prep.quality), prep.encoding, prep.image_size
                )
                for p in paths
            ]
        )
    )


def unit_range_images(paths: list[Path], state: dict) -> np.ndarray:
    """The exported program's input as model.json describes it: prepare's squash and encoding at the training size
    (where the eval view is the identity), RGB in [0, 1]."""
    return to_unit(stored_images(paths, state)).numpy()


def test_exported_program_predicts_what_the_ray_path_predicts_without_the_package(trained, tmp_path):
    """predict's Ray Data path and the exported program, loaded in a process that cannot import proco_ray, give the
    same probabilities for the same image files (calibrated ones, with the temperature model.json carries)."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(trained["checkpoint"], checkpoint)
    (checkpoint / "temperature.json").write_text(json.dumps({"temperature": 1.7}))
    summary = export(str(checkpoint), str(tmp_path / "exported"))
    info = json.loads((tmp_path / "exported" / "model.json").read_text())
    assert summary["written"] == [str(tmp_path / "exported" / "model.pt2"), str(tmp_path / "exported" / "model.json")]
    assert info["class_names"] == ["common", "rare", "scarce"] and info["input"]["shape"] == ["batch", 3, SIZE, SIZE]
    assert (info["temperature"], info["calibrated"], info["method"]) == (1.7, True, "proco")
    assert info["config"]["data"]["image_size"] == SIZE and info["input"]["normalization"]["applied"] == "inside the program"

    predict(str(checkpoint), str(trained["images"]), str(tmp_path / "ray"), calibrated=True)
    rows = pq.read_table(tmp_path / "ray" / "predictions.parquet").to_pylist()
    paths = [Path(row["path"]) for row in rows]
    np.save(tmp_path / "images.npy", unit_range_images(paths, read_checkpoint(str(checkpoint))))
    subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_PACKAGE,
            str(tmp_path / "exported" / "model.pt2"),
            str(tmp_path / "images.npy"),
            str(tmp_path / "probs.npy"),
            str(info["temperature"]),
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=300,
    )
    exported = np.load(tmp_path / "probs.npy")
    ray_path = np.asarray([[row[f"prob_{c}"] for c in info["class_names"]] for row in rows])
    assert exported.shape == (22, 3) and exported.std(axis=0).max() > 1e-4  # the images get different probabilities
    np.testing.assert_allclose(exported, ray_path, atol=1e-5)


@pytest.mark.parametrize("method_name", ["proco", "ce", "ldam_drw", "cl_resample"])
def test_exported_program_equals_the_checkpoints_classifier(method_name):
    """Every network kind exports to a program whose logits are the method's test-time logits, for any batch size."""
    config = load_config(TINY, [f"method.name={method_name}"])
    method = create_method(config.method, config.model, 3, [5, 2, 1])
    model = method.build_model().eval()
    state = {"config": config.to_dict(), "class_names": ["a", "b", "c"], "model": model.state_dict()}
    program = export_program(inference_module(state), SIZE).module()
    _, restored, _ = restore_model(state, device=torch.device("cpu"))
    unit = torch.rand(7, 3, SIZE, SIZE)
    normalised = (unit - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = method.predict(restored, normalised)
        for batch in (1, 7):
            torch.testing.assert_close(program(unit[:batch]), expected[:batch], atol=1e-5, rtol=1e-4)


def test_export_on_real_isic_images_equals_the_checkpoint(trained, shared_data, tmp_path):
    """On real dermoscopy images (ISIC 2018), the exported program's probabilities equal the checkpoint's."""
    images = sorted((shared_data / "isic2018" / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:12]
    state = read_checkpoint(str(trained["checkpoint"]))
    export(str(trained["checkpoint"]), str(tmp_path / "exported"))
    program = torch.export.load(str(tmp_path / "exported" / "model.pt2")).module()
    method, model, _ = restore_model(state, device=torch.device("cpu"))
    unit = unit_range_images(images, state)
    normalised = eval_view(stored_images(images, state), preprocessing_of(state).image_size)
    with torch.no_grad():
        expected = method.predict(model, normalised).softmax(1)
        exported = program(torch.from_numpy(unit)).softmax(1)
    assert exported.shape == (len(images), 3)
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-4)


def test_a_run_folder_stands_for_its_best_checkpoint(trained, tmp_path, capsys):
    """Issue 26.2: --checkpoint RUN_FOLDER takes the checkpoint summary.json calls best, found by name inside the
    folder (a run folder that was moved still works); a folder without checkpoints is a one-line error."""
    run = tmp_path / "moved-run"
    best = run / "checkpoint_2026-01-01_00-00-02.000000"
    shutil.copytree(trained["checkpoint"], best)
    shutil.copytree(trained["checkpoint"], run / "checkpoint_2026-01-01_00-00-01.000000")
    summary = {"best_checkpoint": f"/elsewhere/old-run/{best.name}", "run": "/elsewhere/old-run"}
    (run / "summary.json").write_text(json.dumps(summary))
    assert best_checkpoint(str(run)) == str(best) and best_checkpoint(str(best)) == str(best)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "model.json").read_text())["checkpoint"] == str(best)
    shutil.rmtree(best)
    assert main(["predict", "--checkpoint", str(run), "--input", str(trained["images"]), "--output", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"proco-ray predict: error: run folder {run} holds no checkpoint") and len(err.splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_evaluate_refuses_an_occupied_output_before_evaluating_and_replaces_only_its_own(trained, tmp_path, capsys):
    args = ["evaluate", "--checkpoint", str(trained["checkpoint"]), "--data", str(trained["prepared"])]
    out = tmp_path / "evaluation"
    assert main([*args, "--out", str(out)]) == 0
    written = {"metrics.json", "per_class.csv", "per_class.md", "confusion_matrix.png", "reliability.png", ".proco-ray-evaluate"}
    assert {p.name for p in out.iterdir()} == written
    first = json.loads((out / "metrics.json").read_text())
    assert sum(first["support"]) == 22 and first["split"] == "test"
    (out / "metrics.json").write_text("{}")
    missing = ["evaluate", "--checkpoint", str(tmp_path / "missing"), "--data", str(trained["prepared"])]
    assert main([*missing, "--out", str(out)]) == 1  # the output is checked first: no evaluation is wasted
    assert "already holds an earlier evaluation" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "{}"
    assert main([*missing, "--out", str(tmp_path / "unused")]) == 1 and not (tmp_path / "unused").exists()
    assert "no checkpoint.pt" in capsys.readouterr().err
    (out / "stale.txt").write_text("from the earlier evaluation's folder")
    assert main([*args, "--out", str(out), "--overwrite"]) == 0
    assert {p.name for p in out.iterdir()} == written and json.loads((out / "metrics.json").read_text()) == first
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main([*args, "--out", str(foreign), "--overwrite"]) == 1
    assert "did not write" in capsys.readouterr().err and [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_export_refuses_an_occupied_output_and_replaces_only_its_own(trained, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(trained["checkpoint"]), "--out", str(out)]) == 0
    assert main(["export", "--checkpoint", str(trained["checkpoint"]), "--out", str(out)]) == 1
    assert "already holds an exported model" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(trained["checkpoint"]), "--out", str(out), "--overwrite"]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(trained["checkpoint"]), "--out", str(foreign), "--overwrite"]) == 1
    assert "did not write" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    assert "no checkpoint.pt" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_in_a_terminal_predict_draws_a_bar_and_ends_with_a_short_summary(trained, tmp_path):
    """Issue 39: Ray's deprecation and core_worker lines, then a JSON dump."""
    args = ["predict", "--checkpoint", str(trained["checkpoint"]), "--input", str(trained["images"])]
    status, output = run_in_terminal([*args, "--output", str(tmp_path / "p")], timeout=180)
    lines = screen_lines(output)
    assert status == 0, output
    assert any("predicting" in line and "100%" in line and "23/23" in line for line in lines), output
    assert not [line for line in lines if any(noise in line for noise in RAY_NOISE)], output
    assert len(lines) <= 40 and lines[-1].startswith(f"wrote {tmp_path / 'p' / 'predictions.parquet'}"), output
    assert f"predicted 22 images of {trained['images']}; 1 unreadable" in lines, output
