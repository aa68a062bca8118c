"""`proco-ray export`: a checkpoint's classifier as a program that loads with torch alone, plus its metadata.

The program (torch.export, `model.pt2`) holds only what prediction uses: the backbone, F and the
prototypes for ProCo, the backbone and classifier for the baselines; no key encoder, G head or queue.
It takes RGB images in [0, 1] (torchvision's ToTensor output) and applies the ImageNet normalisation
itself, so a user needs no constant from this package. `model.json` beside it says how images must be
sized, the class names, the temperature to divide the logits by, the training config and the
validation metrics of the exported epoch.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch
from torch import Tensor, nn

from proco_ray.data.augment import IMAGENET_MEAN, IMAGENET_STD
from proco_ray.data.decode import RAW
from proco_ray.metric_keys import VAL
from proco_ray.storage.s3 import claim_output, join, storage_errors, write_bytes

PROGRAM = "model.pt2"
METADATA = "model.json"
MAX_BATCH = 4096  # the largest batch the exported program accepts


class NormalisingClassifier(nn.Module):
    """Images in [0, 1] -> logits: the ImageNet normalisation of training, then the network."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.network((images - self.mean) / self.std)


def inference_module(state: dict[str, Any]) -> NormalisingClassifier:
    """The checkpoint's classifier on the CPU in eval mode, taking [0, 1] images."""
    from proco_ray.runs import restore_model

    _, model, _ = restore_model(state, device=torch.device("cpu"))
    return NormalisingClassifier(model.inference_network()).eval()


def export_program(module: nn.Module, image_size: int) -> torch.export.ExportedProgram:
    """torch.export of `module` for float32 [batch, 3, image_size, image_size] input, any batch of 1..MAX_BATCH."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.rand(2, 3, image_size, image_size)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})


def metadata(state: dict[str, Any], checkpoint_uri: str, temperature: float | None) -> dict[str, Any]:
    """What a user of the exported program needs to feed it and read its output."""
    from proco_ray.inference.predict import preprocessing_of

    prep = preprocessing_of(state)
    size = prep.image_size
    resize = f"squash to {size} x {size} (aspect not kept, bicubic)"
    if prep.encoding and prep.encoding != RAW:
        resize += f", then {prep.encoding}" + (f" quality {prep.quality}" if prep.encoding == "jpeg" else "") + " round trip"
    return {
        "program": PROGRAM,
        "format": f"torch.export ExportedProgram: with torch.no_grad(): torch.export.load('{PROGRAM}').module()(images)",
        "torch_version": torch.__version__,
        "class_names": list(state["class_names"]),
        "input": {
            "shape": ["batch", 3, size, size],
            "batch": [1, MAX_BATCH],
            "dtype": "float32",
            "channels": "RGB",
            "range": [0.0, 1.0],
            "preprocessing": f"{resize}, as the training data was prepared; then ToTensor",
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "applied": "inside the program"},
        },
        "output": "logits [batch, classes]; probabilities = softmax(logits / temperature)",
        "temperature": 1.0 if temperature is None else temperature,
        "calibrated": temperature is not None,
        "method": state["config"]["method"]["name"],
        "checkpoint": checkpoint_uri,
        "epoch": int(state["epoch"]),
        "validation": {k: v for k, v in state.get("metrics", {}).items() if k.startswith(f"{VAL}/")},
        "config": state["config"],
    }


def export(checkpoint_uri: str, out_uri: str, overwrite: bool = False) -> dict[str, Any]:
    """Write `model.pt2` and `model.json` for the checkpoint at `checkpoint_uri` into `out_uri` (local or s3://)."""
    from proco_ray.runs import best_checkpoint, read_checkpoint, saved_temperature

    checkpoint_uri = best_checkpoint(checkpoint_uri)
    state = read_checkpoint(checkpoint_uri)
    temperature = saved_temperature(checkpoint_uri)
    output = claim_output(out_uri, overwrite, "export", lambda names: "an exported model or other files")
    program = export_program(inference_module(state), int(state["config"]["data"]["image_size"]))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    info = metadata(state, checkpoint_uri, temperature)
    output.replace_earlier()
    with storage_errors(out_uri):
        write_bytes(join(out_uri, PROGRAM), buffer.getvalue())
        write_bytes(join(out_uri, METADATA), json.dumps(info, indent=2).encode())
    return {
        "checkpoint": checkpoint_uri,
        "classes": info["class_names"],
        "input": info["input"]["shape"],
        "temperature": info["temperature"],
        "written": [join(out_uri, PROGRAM), join(out_uri, METADATA)],
    }
