"""`proco-ray predict`: a checkpoint's class probabilities for new images, as Ray Data batch inference.

Read and decode in CPU tasks, the model in a pool of actors that load the checkpoint once (a GPU each
when the cluster has GPUs), the small results gathered and written as Parquet (and CSV on request).
Images get exactly the preprocessing of the checkpoint's training data: prepare's squash to
image_size x image_size and its encoding, then, on the model's device, the evaluation view. Unreadable images are listed in
unreadable.csv with the reason and do not stop the run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from proco_ray.data.augment import eval_view
from proco_ray.data.decode import decode_image
from proco_ray.data.manifest import read_manifest
from proco_ray.data.pipeline import execute_counted, load_split
from proco_ray.data.prepare import reencode
from proco_ray.data.sources import IMAGE_EXTENSIONS, is_image_file
from proco_ray.errors import DataError, image_problem
from proco_ray.storage.s3 import (
    ClaimedOutput,
    claim_output,
    join,
    list_files,
    output_marker,
    resolve,
    storage_errors,
)

PREDICTIONS = "predictions.parquet"
UNREADABLE = "unreadable.csv"


@dataclass(frozen=True)
class Preprocessing:
    """What prepare did to the checkpoint's training images, so new images get the same."""

    image_size: int
    encoding: str | None  # None: the training manifest was not readable; no re-encoding (lossless)
    quality: int


def preprocessing_of(state: dict[str, Any]) -> Preprocessing:
    config = state["config"]
    size = int(config["data"]["image_size"])
    try:
        options = read_manifest(config["data"]["uri"]).options
    except Exception:  # the training data may live where this machine cannot reach it
        options = {}
    return Preprocessing(size, options.get("encoding"), int(options.get("quality", 95)))


def preprocess_batch(
    batch: dict[str, np.ndarray], *, filesystem: pafs.FileSystem | None, prep: Preprocessing, stored_encoding: str | None
) -> dict[str, np.ndarray]:
    """Paths (or, with `stored_encoding`, a prepared split's stored images) -> image uint8 [B, H, W, 3] at the
    training size, path and error text.

    A file that cannot be decoded gets zeros and its error; a file that cannot be read fails the task
    (storage trouble is not a bad image).
    """
    size = prep.image_size
    encoding = prep.encoding or "png"
    images, errors = [], []
    for i, path in enumerate(batch["path"]):
        if stored_encoding is not None:
            data = batch["data"][i]
        else:
            with filesystem.open_input_stream(path) as stream:
                data = stream.read()
        try:
            if stored_encoding is not None:
                images.append(decode_image(data, stored_encoding, size))
            else:
                images.append(decode_image(reencode(data, size, encoding, prep.quality), encoding, size))
            errors.append("")
        except Exception as error:  # any failure to decode the bytes read means a bad image
            images.append(None)
            errors.append(f"{path.rsplit('/', 1)[-1]}: {image_problem(error)}")
    pixels = np.zeros((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        if image is not None:
            pixels[i] = image
    return {"path": np.asarray(batch["path"], dtype=object), "image": pixels, "error": np.asarray(errors, dtype=object)}


class Predictor:
    """A Ray Data actor: loads the checkpoint once, returns class probabilities for each readable image."""

    def __init__(self, state: Any, tta: bool, temperature: float = 1.0) -> None:
        """`state`: the loaded checkpoint, or an object ref to it (the driver reads the checkpoint once, so
        the actors need no access to where it is stored)."""
        import ray

        from proco_ray.runs import restore_model

        if isinstance(state, ray.ObjectRef):
            state = ray.get(state)
        self.class_names = list(state["class_names"])
        self.image_size = int(state["config"]["data"]["image_size"])
        self.method, self.model, self.device = restore_model(state)
        self.tta = tta
        self.temperature = temperature

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax of the method's logits / T; with TTA the mean over the image and its two flips."""
        views = [images, images.flip(-1), images.flip(-2)] if self.tta else [images]
        logits = [self.method.predict(self.model, v).float() / self.temperature for v in views]
        return torch.stack([z.softmax(dim=1) for z in logits]).mean(0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        readable = batch["error"] == ""
        probs = np.full((len(readable), len(self.class_names)), np.nan, dtype=np.float32)
        if readable.any():
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][readable])).to(self.device)
            probs[readable] = self.probabilities(eval_view(images, self.image_size)).cpu().numpy()
        predicted = np.asarray(
            [self.class_names[int(k)] if ok else "" for k, ok in zip(np.nan_to_num(probs).argmax(1), readable)], dtype=object
        )
        out = {"path": batch["path"], "predicted": predicted, "error": batch["error"]}
        out.update({f"prob_{name}": probs[:, c] for c, name in enumerate(self.class_names)})
        return out


def list_images(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """Every image file under a folder or s3:// prefix (recursively), sorted."""
    fs, root = resolve(uri)
    with storage_errors(uri):
        files = sorted(f.path for f in list_files(fs, root) if is_image_file(f.path))
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {uri}")
    return fs, files


def claim_predict_output(uri: str, overwrite: bool) -> ClaimedOutput:
    """Refuse an output holding files unless --overwrite and they are a previous predict's own."""
    marker = join(resolve(uri)[1], output_marker("predict"))
    return claim_output(
        uri, overwrite, "predict", lambda names: "an earlier predict's predictions" if marker in names else "files"
    )


def predict(
    checkpoint_uri: str,
    input_uri: str,
    output_uri: str,
    *,
    split: str | None = None,
    batch_size: int = 64,
    tta: bool = False,
    overwrite: bool = False,
    csv: bool = False,
    actors: int | None = None,
    calibrated: bool = False,
) -> dict[str, Any]:
    """Predict every image of `input_uri` (a folder or prefix of images, or a prepared dataset's `split`)."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.block import BlockAccessor
    from ray.util.annotations import RayDeprecationWarning

    from proco_ray.runs import best_checkpoint, read_checkpoint

    checkpoint_uri = best_checkpoint(checkpoint_uri)
    state = read_checkpoint(checkpoint_uri)
    prep = preprocessing_of(state)
    class_names = list(state["class_names"])
    temperature = 1.0
    if calibrated:
        from proco_ray.runs import TEMPERATURE_FILE, saved_temperature

        temperature = saved_temperature(checkpoint_uri)
        if temperature is None:
            raise DataError(f"no {TEMPERATURE_FILE} in {checkpoint_uri}: fit one with proco-ray evaluate --calibrate")
    if split is not None:
        manifest = read_manifest(input_uri)
        if split not in manifest.splits:
            raise DataError(f"{input_uri}: no split '{split}' (it has {sorted(manifest.splits)})")
        if manifest.image_size != prep.image_size:
            raise DataError(
                f"{input_uri} holds {manifest.image_size} px images, the checkpoint was trained at {prep.image_size} px"
            )
        tables = load_split(input_uri, manifest.shards_of(split), manifest.num_classes)
        rows = pa.concat_tables(tables).select(["id", "image"]).rename_columns(["path", "data"])
        source, fs, count = ray.data.from_arrow(rows), None, rows.num_rows
        stored_encoding = manifest.encoding
    else:
        fs, paths = list_images(input_uri)
        stored_encoding = None
        source, count = (
            ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, math.ceil(len(paths) / 256))),
            len(paths),
        )
    output = claim_predict_output(output_uri, overwrite)
    out_fs, out_path = output.fs, output.path
    gpus = ray.cluster_resources().get("GPU", 0)
    pool = actors or (int(gpus) if gpus else 1)
    with warnings.catch_warnings():
        # Ray 2.60 sets an actor pool's restart policy only through `ray_remote_args`, which it calls deprecated.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning)
        predicted = source.map_batches(
            preprocess_batch, batch_size=batch_size, fn_kwargs=dict(filesystem=fs, prep=prep, stored_encoding=stored_encoding)
        ).map_batches(
            Predictor,
            fn_constructor_kwargs=dict(
                state=ray.put({k: state[k] for k in ("config", "class_names", "model")}), tta=tta, temperature=temperature
            ),
            batch_size=batch_size,
            compute=ActorPoolStrategy(size=pool),
            num_gpus=1 if gpus else 0,
            # Ray Data restarts its actors forever by default, and each (re)start reads its constructor arguments
            # (the weights) from the object store, which Ray cannot rebuild: Ray warns of it on every run. Predict
            # writes nothing until every image is done, so a lost predictor fails the prediction with its error
            # and the same command reruns it.
            max_restarts=0,
        )
    blocks = ray.get(execute_counted(predicted, "predicting", count))
    table = pa.concat_tables([BlockAccessor.for_block(block).to_arrow() for block in blocks]).sort_by("path")
    if table.num_rows != count:
        raise DataError(f"predicted {table.num_rows} of {count} images from {input_uri}")
    unreadable = table.filter(pc.not_equal(table["error"], "")).select(["path", "error"])
    predictions = table.filter(pc.equal(table["error"], "")).drop_columns(["error"])
    output.replace_earlier()
    with storage_errors(output_uri):
        with out_fs.open_output_stream(join(out_path, PREDICTIONS)) as stream:
            pq.write_table(predictions, stream)
        written = [join(output_uri, PREDICTIONS)]
        if csv:
            with out_fs.open_output_stream(join(out_path, "predictions.csv")) as stream:
                pacsv.write_csv(predictions, stream)
            written.append(join(output_uri, "predictions.csv"))
        if unreadable.num_rows:
            with out_fs.open_output_stream(join(out_path, UNREADABLE)) as stream:
                pacsv.write_csv(unreadable, stream)
            written.append(join(output_uri, UNREADABLE))
    return {
        "checkpoint": checkpoint_uri,
        "input": input_uri,
        "classes": class_names,
        "predicted": predictions.num_rows,
        "unreadable": unreadable.num_rows,
        "tta": tta,
        "temperature": temperature,
        "preprocessing": {"image_size": prep.image_size, "encoding": prep.encoding or "none (lossless)"},
        "written": written,
    }
