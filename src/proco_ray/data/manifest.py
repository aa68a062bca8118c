"""The one schema of a prepared dataset's manifest.json: written by prepare, read by the pipeline, the
local feed, evaluate and predict.

manifest.json is written last and in one step: its presence means the shards are complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from proco_ray.config import Config, ConfigError
from proco_ray.data.sampling import check_batch_divides
from proco_ray.errors import DataError
from proco_ray.storage.s3 import join, read_bytes, write_bytes

MANIFEST = "manifest.json"
FORMAT = "proco-ray-shards/1"
COLUMNS = {"image": "encoded image bytes", "label": "int64 class index", "id": "string", "split": "string"}
LOCATION_COLUMN = {"location": "int64 index into locations (body site), -1 where unknown"}


@dataclass(frozen=True)
class Shard:
    path: str
    split: str
    rows: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """What `proco-ray prepare` wrote: classes, per-split per-class counts, image size and the shard list."""

    uri: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    image_size: int
    encoding: str
    shards: list[Shard]
    split: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    dataset: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    created_at: str = ""
    locations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The manifest.json document (everything but where it was read from)."""
        return {
            "format": FORMAT,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "dataset": self.dataset,
            "classes": self.classes,
            "image_size": self.image_size,
            "encoding": self.encoding,
            "columns": {**COLUMNS, **(LOCATION_COLUMN if self.locations else {})},
            **({"locations": self.locations} if self.locations else {}),
            "counts": self.counts,
            "split": self.split,
            "source": self.source,
            "options": self.options,
            "skipped": self.skipped,
            "shards": [asdict(shard) for shard in self.shards],
        }

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def splits(self) -> list[str]:
        return list(self.counts)

    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class in a split, ordered like `classes` (for LDAM/DRW/logit adjustment weights)."""
        counts = self.counts.get(split)
        if counts is None:
            raise DataError(f"split '{split}' is not in the manifest at {self.uri} (it has {self.splits})")
        return [int(counts.get(name, 0)) for name in self.classes]

    def num_rows(self, split: str) -> int:
        return sum(self.class_counts(split))

    def shards_of(self, split: str) -> list[Shard]:
        self.class_counts(split)
        return [s for s in self.shards if s.split == split]

    @classmethod
    def from_dict(cls, uri: str, raw: dict[str, Any]) -> Manifest:
        try:
            return cls(
                uri=uri,
                classes=list(raw["classes"]),
                counts=raw["counts"],
                image_size=int(raw["image_size"]),
                encoding=raw["encoding"],
                shards=[Shard(**s) for s in raw["shards"]],
                split=raw.get("split", {}),
                source=raw.get("source", {}),
                skipped=raw.get("skipped", []),
                dataset=raw.get("dataset", ""),
                options=raw.get("options", {}),
                created_by=raw.get("created_by", ""),
                created_at=raw.get("created_at", ""),
                locations=list(raw.get("locations", [])),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{MANIFEST} at {uri} is incomplete or malformed ({error!r})") from error


def read_manifest(uri: str) -> Manifest:
    """The manifest of a prepared dataset; its absence means the dataset is not (completely) prepared."""
    data = read_bytes(join(uri, MANIFEST))
    if data is None:
        raise DataError(f"no {MANIFEST} at {uri} (was it prepared with proco-ray prepare?)")
    try:
        raw = json.loads(data)
    except ValueError as error:
        raise DataError(f"{MANIFEST} at {uri} is not valid JSON ({error})") from error
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{MANIFEST} at {uri} is not a proco-ray manifest (format {raw.get('format')!r})")
    return Manifest.from_dict(uri, raw)


def check_manifest(config: Config, manifest: Manifest) -> None:
    """The data must hold every split the run reads, with the classes the config expects (Ray path and local feed)."""
    expected = config.data.num_classes
    if expected is not None and expected != manifest.num_classes:
        raise ConfigError(
            f"data.num_classes is {expected} but the dataset at {manifest.uri} has {manifest.num_classes} classes "
            f"({manifest.classes})"
        )
    if config.method.name == "mtl" and not manifest.locations:
        raise ConfigError(
            f"method mtl needs the body site of every image, and the dataset at {manifest.uri} has none: prepare "
            f"ISIC 2018 with HAM10000_metadata.csv (its `localization` column) beside the image folders"
        )
    for split in (config.data.train_split, config.data.val_split):
        if split not in manifest.splits:
            raise ConfigError(f"the dataset at {manifest.uri} has no '{split}' split (it has {manifest.splits})")
    global_batch = config.data.batch_size
    check_batch_divides(global_batch, config.train.num_workers)
    if manifest.num_rows(config.data.train_split) < global_batch:
        raise ConfigError(
            f"the '{config.data.train_split}' split has {manifest.num_rows(config.data.train_split)} images, "
            f"fewer than one batch of data.batch_size={global_batch}"
        )


def write_manifest(output_uri: str, manifest: Manifest) -> None:
    """Written last and in one step: its presence means the shards are complete."""
    write_bytes(join(output_uri, MANIFEST), (json.dumps(manifest.to_dict(), indent=2) + "\n").encode())
