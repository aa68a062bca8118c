"""`proco-ray predict`: Ray Data batch inference on a folder of images and on a prepared split, on a local Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from proco_ray.checkpoint import save_checkpoint
from proco_ray.cli import main
from proco_ray.config import load_config
from proco_ray.errors import DataError
from proco_ray.methods import build_method
from proco_ray.predict import predict
from proco_ray.prepare import PrepareOptions, prepare

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
    method = build_method(config.method, config.model, 3, [1, 1, 1])
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
    assert len(unreadable) == 1 and unreadable[0]["path"].endswith("rare/broken.jpg") and unreadable[0]["error"]
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
