"""Datasets as users download them, read into one validated list of labelled records.

Readers only list files and parse label tables; image bytes are read later, by
the Ray workers of `proco_ray.data.prepare`. Every inconsistency (an image without a
label, a label without an image, a row that is not one-hot, an unknown class, a
class with no image) is a DataError that lists the offending items.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow.fs as pafs

from proco_ray.errors import DataError
from proco_ray.storage.s3 import join, list_files, resolve, storage_errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
ISIC_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
ISIC_SPLIT_NAMES = {"Training": "train", "Validation": "val", "Test": "test"}
APTOS_CLASSES = ["No DR", "Mild", "Moderate", "Severe", "Proliferative DR"]
MEDMNIST_CLASSES = {
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "breastmnist": ["malignant", "normal, benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
}
KINDS = ("isic2018", "aptos2019", "medmnist", "imagefolder")
LIST_LIMIT = 100
# HAM10000's body sites (metadata column `localization`, 'unknown' aside): MTL's auxiliary task.
HAM10000_LOCATIONS = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
)


@dataclass(frozen=True)
class Record:
    """One labelled image: a file (path) or a row of an in-memory array (array_split, index)."""

    id: str
    label: int
    path: str = ""
    array_split: str = ""
    index: int = -1
    official_split: str | None = None
    group: str | None = None
    location: int = -1


@dataclass
class Source:
    """A validated dataset: its classes, one record per image, and a fingerprint of what was read."""

    kind: str
    uri: str
    classes: list[str]
    records: list[Record]
    fingerprint: str
    filesystem: pafs.FileSystem
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    group_source: str | None = None
    locations: list[str] = field(default_factory=list)

    def class_counts(self) -> list[int]:
        counts = Counter(r.label for r in self.records)
        return [counts.get(i, 0) for i in range(len(self.classes))]


# --------------------------------------------------------------------------- pure helpers


def listing(items: Sequence[str], limit: int = LIST_LIMIT) -> str:
    """Items one per line, with a count of those left out past `limit`."""
    shown = "\n".join(f"  {item}" for item in items[:limit])
    more = len(items) - limit
    return shown + (f"\n  ... and {more} more" if more > 0 else "")


def fingerprint(entries: Iterable[tuple[str, int, int]], classes: Sequence[str]) -> str:
    """sha256 over the class names and the sorted (relative path, size, label) of every image."""
    digest = hashlib.sha256("\n".join(classes).encode())
    for rel, size, label in sorted(entries):
        digest.update(f"\n{rel}\t{size}\t{label}".encode())
    return "sha256:" + digest.hexdigest()


def parse_onehot(header: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str], where: str) -> dict[str, int]:
    """ISIC ground truth (`image,MEL,NV,...` with 0/1 values) to {image id: class index}."""
    columns = [c.strip() for c in header[1:]]
    unknown = [c for c in columns if c not in classes]
    missing = [c for c in classes if c not in columns]
    if unknown or missing:
        raise DataError(
            f"{where}: class columns {columns} do not match the ISIC 2018 classes {list(classes)}"
            + (f"; unknown class names: {unknown}" if unknown else "")
            + (f"; missing: {missing}" if missing else "")
        )
    order = [classes.index(c) for c in columns]
    labels: dict[str, int] = {}
    bad: list[str] = []
    for line, row in enumerate(rows, start=2):
        if not row or not row[0].strip():
            continue
        try:
            values = [float(v) for v in row[1:]]
        except ValueError:
            values = []
        hot = [i for i, v in enumerate(values) if v == 1.0]
        if len(values) != len(columns) or len(hot) != 1 or any(v not in (0.0, 1.0) for v in values):
            bad.append(f"line {line}: {','.join(row)}")
            continue
        labels[row[0].strip()] = order[hot[0]]
    if bad:
        raise DataError(f"{where}: {len(bad)} row(s) are not exactly one-hot:\n{listing(bad)}")
    return labels


def match_labels(images: Mapping[str, str], labels: Mapping[str, int], where: str) -> None:
    """Every image has a label and every label an image, or a DataError listing both kinds of orphan."""
    unlabelled = sorted(set(images) - set(labels))
    missing = sorted(set(labels) - set(images))
    problems = []
    if unlabelled:
        problems.append(f"{len(unlabelled)} image(s) without a label:\n{listing([images[i] for i in unlabelled])}")
    if missing:
        problems.append(f"{len(missing)} label(s) without an image:\n{listing(missing)}")
    if problems:
        raise DataError(f"{where}: " + "\n".join(problems))


def check_classes_present(classes: Sequence[str], labels: Iterable[int], where: str) -> None:
    counts = Counter(labels)
    empty = [name for i, name in enumerate(classes) if counts.get(i, 0) == 0]
    if empty:
        raise DataError(f"{where}: class(es) with no image: {empty}")


def parse_groups(header: Sequence[str], rows: Iterable[Sequence[str]], where: str) -> dict[str, str]:
    """{image id: lesion or patient id} from HAM10000 metadata or a generic `id,group` CSV."""
    names = [h.strip() for h in header]
    id_col = next((names.index(c) for c in ("image_id", "image", "id", "id_code") if c in names), None)
    group_col = next((names.index(c) for c in ("lesion_id", "patient_id", "group") if c in names), None)
    if id_col is None or group_col is None:
        raise DataError(
            f"{where}: a group table needs an image column (image_id, image, id or id_code) and a group "
            f"column (lesion_id, patient_id or group); found {names}"
        )
    return {row[id_col].strip(): row[group_col].strip() for row in rows if len(row) > max(id_col, group_col)}


def parse_locations(header: Sequence[str], rows: Iterable[Sequence[str]], where: str) -> dict[str, int]:
    """{image id: index into HAM10000_LOCATIONS} from HAM10000 metadata's `localization` column; `unknown`
    (or empty) is -1. {} when the table has no such column. A site outside the vocabulary is an error."""
    names = [h.strip() for h in header]
    if "localization" not in names or "image_id" not in names:
        return {}
    id_col, site_col = names.index("image_id"), names.index("localization")
    locations, unknown = {}, []
    for number, row in enumerate(rows, 2):
        if len(row) <= max(id_col, site_col):
            continue
        site = row[site_col].strip()
        if site in ("", "unknown"):
            locations[row[id_col].strip()] = -1
        elif site in HAM10000_LOCATIONS:
            locations[row[id_col].strip()] = HAM10000_LOCATIONS.index(site)
        else:
            unknown.append(f"row {number}: {row[id_col].strip()} localization '{site}'")
    if unknown:
        raise DataError(
            f"{where}: body location(s) outside HAM10000's {len(HAM10000_LOCATIONS)} sites {list(HAM10000_LOCATIONS)} "
            f"(or 'unknown'):\n{listing(unknown)}"
        )
    return locations


# --------------------------------------------------------------------------- file access


def _read_csv(fs: pafs.FileSystem, path: str) -> tuple[list[str], list[list[str]]]:
    with fs.open_input_stream(path) as stream:
        text = stream.read().decode("utf-8-sig")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty CSV file")
    return header, [row for row in reader if row]


def read_groups(uri: str) -> dict[str, str]:
    fs, path = resolve(uri)
    with storage_errors(uri):
        header, rows = _read_csv(fs, path)
    return parse_groups(header, rows, uri)


def is_image_file(path: str) -> bool:
    """An image by its suffix (IMAGE_EXTENSIONS), hidden files (macOS's ._ twins) left out."""
    name = posixpath.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _rel(path: str, root: str) -> str:
    return posixpath.relpath(path, root)


# --------------------------------------------------------------------------- readers


def read_isic2018(fs: pafs.FileSystem, root: str, uri: str, groups: Mapping[str, str] | None = None) -> Source:
    """ISIC 2018 Task 3: *_Input folders of JPEGs, *_GroundTruth.csv one-hot tables; HAM10000 metadata gives lesions."""
    files = list_files(fs, root)
    records: list[Record] = []
    entries: list[tuple[str, int, int]] = []
    for folder, split in ISIC_SPLIT_NAMES.items():
        input_dir = f"ISIC2018_Task3_{folder}_Input"
        images = {_stem(f.path): f for f in files if is_image_file(f.path) and f"/{input_dir}/" in f"/{_rel(f.path, root)}"}
        csv_name = f"ISIC2018_Task3_{folder}_GroundTruth.csv"
        csvs = [f.path for f in files if posixpath.basename(f.path) == csv_name]
        if not images and not csvs:
            continue
        if not csvs:
            raise DataError(f"{uri}: {input_dir}/ has {len(images)} images but no {csv_name} with their labels")
        header, rows = _read_csv(fs, csvs[0])
        labels = parse_onehot(header, rows, ISIC_CLASSES, csvs[0])
        match_labels({k: _rel(v.path, root) for k, v in images.items()}, labels, uri)
        for image_id in sorted(images):
            info = images[image_id]
            records.append(Record(image_id, labels[image_id], path=info.path, official_split=split))
            entries.append((_rel(info.path, root), info.size, labels[image_id]))
    if not records:
        raise DataError(f"{uri}: no ISIC2018_Task3_*_Input folder with images found")
    group_source, locations = None, {}
    metadata = [f.path for f in files if posixpath.basename(f.path) == "HAM10000_metadata.csv"]
    if metadata:
        header, rows = _read_csv(fs, metadata[0])
        locations = parse_locations(header, rows, metadata[0])
        if groups is None:
            groups, group_source = parse_groups(header, rows, metadata[0]), _rel(metadata[0], root)
    if groups is not None:
        group_source = group_source or "groups table"
        records = [replace(r, group=groups.get(r.id)) for r in records]
    if locations:
        records = [replace(r, location=locations.get(r.id, -1)) for r in records]
    check_classes_present(ISIC_CLASSES, (r.label for r in records), uri)
    return Source(
        "isic2018",
        uri,
        list(ISIC_CLASSES),
        records,
        fingerprint(entries, ISIC_CLASSES),
        fs,
        group_source=group_source,
        locations=list(HAM10000_LOCATIONS) if locations else [],
    )


def read_aptos2019(fs: pafs.FileSystem, root: str, uri: str, groups: Mapping[str, str] | None = None) -> Source:
    """APTOS 2019: train_images/<id_code>.png with train.csv (id_code, diagnosis 0-4)."""
    files = list_files(fs, root)
    csv_path = posixpath.join(root, "train.csv")
    if not any(f.path == csv_path for f in files):
        raise DataError(f"{uri}: no train.csv (APTOS 2019 layout: train.csv and train_images/)")
    header, rows = _read_csv(fs, csv_path)
    names = [h.strip() for h in header]
    if "id_code" not in names or "diagnosis" not in names:
        raise DataError(f"{csv_path}: expected columns id_code,diagnosis; found {names}")
    id_col, dx_col = names.index("id_code"), names.index("diagnosis")
    labels: dict[str, int] = {}
    unknown: list[str] = []
    for line, row in enumerate(rows, start=2):
        value = row[dx_col].strip()
        if value not in {str(i) for i in range(len(APTOS_CLASSES))}:
            unknown.append(f"line {line}: {row[id_col]} has diagnosis {value!r}")
            continue
        labels[row[id_col].strip()] = int(value)
    if unknown:
        raise DataError(f"{csv_path}: unknown class (diagnosis must be 0-4) in {len(unknown)} row(s):\n{listing(unknown)}")
    image_dir = posixpath.join(root, "train_images") + "/"
    images = {_stem(f.path): f for f in files if f.path.startswith(image_dir) and is_image_file(f.path)}
    match_labels({k: _rel(v.path, root) for k, v in images.items()}, labels, uri)
    records = [
        Record(i, labels[i], path=images[i].path, official_split="train", group=(groups or {}).get(i)) for i in sorted(images)
    ]
    check_classes_present(APTOS_CLASSES, labels.values(), uri)
    entries = [(_rel(images[i].path, root), images[i].size, labels[i]) for i in images]
    return Source(
        "aptos2019",
        uri,
        list(APTOS_CLASSES),
        records,
        fingerprint(entries, APTOS_CLASSES),
        fs,
        group_source="groups table" if groups else None,
    )


MIN_INFERRED_CLASS_IMAGES = 2


def medmnist_classes(name: str, labels: Mapping[str, np.ndarray], classes: Sequence[str] | None, uri: str) -> list[str]:
    """Declared classes (--classes), a known MedMNIST file's, or inferred as 0..K-1 from the labels.

    An inferred class set must be contiguous and every class must hold at least
    MIN_INFERRED_CLASS_IMAGES images: a label that breaks that (a 9 where the file has 0-4, or a single
    5) is a stray label, an error naming its split and row, not a new class.
    """
    if classes:
        return list(classes)
    if name in MEDMNIST_CLASSES:
        return list(MEDMNIST_CLASSES[name])
    counts = Counter(int(v) for y in labels.values() for v in y)
    if not counts:
        return []
    top = max(counts)
    gap = next((c for c in range(top + 1) if c not in counts), None)
    stray = {v for v, n in counts.items() if v < 0 or n < MIN_INFERRED_CLASS_IMAGES or (gap is not None and v > gap)}
    if stray:
        rows = [f"{s}[{i}] = {v}" for s, y in labels.items() for i, v in enumerate(y) if int(v) in stray]
        kept = sorted(set(counts) - stray)
        raise DataError(
            f"{uri}: stray label(s) {sorted(stray)}: the file's classes look like {kept[0] if kept else 0}..{kept[-1] if kept else -1}, "
            f"and inferred classes must be 0..K-1 with at least {MIN_INFERRED_CLASS_IMAGES} images each. Fix these rows, "
            f"or pass --classes to declare the classes if the labels are right:\n{listing(rows)}"
        )
    return [str(i) for i in range(top + 1)]


def read_medmnist(
    fs: pafs.FileSystem, path: str, uri: str, groups: Mapping[str, str] | None = None, classes: Sequence[str] | None = None
) -> Source:
    """MedMNIST npz: {train,val,test}_{images,labels}, any subset of the splits; labels [N,1]."""
    digest = hashlib.sha256()
    with fs.open_input_file(path) as handle:
        data = handle.read()
    digest.update(data)
    try:
        npz = np.load(io.BytesIO(data))
        arrays = {k: npz[k] for k in npz.files}
    except Exception as error:  # numpy raises several types for a damaged archive
        raise DataError(f"{uri}: not a readable npz file ({error})") from error
    name = posixpath.basename(path).split("_")[0].split(".")[0].lower()
    images, labels = {}, {}
    for split in SPLITS:
        has_images, has_labels = f"{split}_images" in arrays, f"{split}_labels" in arrays
        if has_images != has_labels:
            raise DataError(
                f"{uri}: has {split}_{'images' if has_images else 'labels'} but no {split}_{'labels' if has_images else 'images'}"
            )
        if not has_images:
            continue
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if y.ndim == 2 and y.shape[1] != 1:
            raise DataError(f"{uri}: {split}_labels has shape {y.shape}: multi-label data is not supported")
        y = y.reshape(-1).astype(np.int64)
        if len(x) != len(y):
            raise DataError(
                f"{uri}: {len(x)} {split} images but {len(y)} {split} labels (images without a label or labels without an image)"
            )
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
            raise DataError(f"{uri}: {split}_images must be uint8 [N,H,W] or [N,H,W,3], got {x.dtype} {x.shape}")
        images[split], labels[split] = x, y
    if not images:
        raise DataError(f"{uri}: no {{train,val,test}}_images arrays (keys: {sorted(arrays)})")
    names = medmnist_classes(name, labels, classes, uri)
    unknown = [f"{s}[{i}] = {v}" for s, y in labels.items() for i, v in enumerate(y) if not 0 <= v < len(names)]
    if unknown:
        raise DataError(f"{uri}: label(s) outside the {len(names)} classes {names}:\n{listing(unknown)}")
    records = [
        Record(f"{s}_{i:06d}", int(v), array_split=s, index=i, official_split=s, group=(groups or {}).get(f"{s}_{i:06d}"))
        for s in images
        for i, v in enumerate(labels[s])
    ]
    check_classes_present(names, (r.label for r in records), uri)
    digest.update("\n".join(names).encode())
    return Source(
        "medmnist",
        uri,
        names,
        records,
        "sha256:" + digest.hexdigest(),
        fs,
        arrays=images,
        group_source="groups table" if groups else None,
    )


def read_imagefolder(
    fs: pafs.FileSystem, root: str, uri: str, groups: Mapping[str, str] | None = None, classes: Sequence[str] | None = None
) -> Source:
    """One folder per class (torchvision ImageFolder layout); image ids are paths relative to the root."""
    selector = pafs.FileSelector(root, recursive=True)
    infos = fs.get_file_info(selector)
    folders = sorted(_rel(i.path, root) for i in infos if i.type == pafs.FileType.Directory and "/" not in _rel(i.path, root))
    folders = [f for f in folders if not f.startswith(".")]
    names = list(classes) if classes else folders
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DataError(f"{uri}: folder(s) of unknown class names {unknown}; expected classes {names}")
    records, entries = [], []
    for info in infos:
        rel = _rel(info.path, root)
        if info.type != pafs.FileType.File or "/" not in rel or not is_image_file(rel):
            continue
        label = names.index(rel.split("/", 1)[0])
        records.append(Record(rel, label, path=info.path, group=(groups or {}).get(rel)))
        entries.append((rel, info.size, label))
    if not records:
        archives = sorted(_rel(i.path, root) for i in infos if i.type == pafs.FileType.File and i.path.endswith(".npz"))
        if archives:
            raise DataError(
                f"{uri}: no images in class folders, but {len(archives)} MedMNIST .npz archive(s): {', '.join(archives)}; "
                f"pass the file itself, e.g. proco-ray prepare {join(uri, archives[0])} OUTPUT"
            )
        raise DataError(f"{uri}: no images in class folders (layout: root/<class>/<image>.jpg)")
    records.sort(key=lambda r: r.id)
    check_classes_present(names, (r.label for r in records), uri)
    return Source(
        "imagefolder", uri, names, records, fingerprint(entries, names), fs, group_source="groups table" if groups else None
    )


def detect_kind(fs: pafs.FileSystem, path: str) -> str:
    """Guess the layout from the files: an .npz file, ISIC folders, APTOS train.csv, or class folders."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"source {path} does not exist")
    if info.type == pafs.FileType.File:
        if path.endswith(".npz"):
            return "medmnist"
        raise DataError(f"source {path} is a file but not a MedMNIST .npz")
    top = {posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path))}
    if any(re.match(r"ISIC2018_Task3_\w+_(Input|GroundTruth)", name) for name in top):
        return "isic2018"
    if "train.csv" in top and "train_images" in top:
        return "aptos2019"
    return "imagefolder"


def read_source(uri: str, kind: str = "auto", *, groups: str | None = None, classes: Sequence[str] | None = None) -> Source:
    """Read and validate a dataset at a local path or s3:// URI; `groups` is a CSV of image id -> lesion/patient."""
    fs, path = resolve(uri)
    with storage_errors(uri):
        kind = detect_kind(fs, path) if kind == "auto" else kind
        if kind not in KINDS:
            raise DataError(f"unknown source format '{kind}'; choose one of {list(KINDS)}")
        table = read_groups(groups) if groups else None
        if kind == "isic2018":
            return read_isic2018(fs, path, uri, table)
        if kind == "aptos2019":
            return read_aptos2019(fs, path, uri, table)
        if kind == "medmnist":
            return read_medmnist(fs, path, uri, table, classes)
        return read_imagefolder(fs, path, uri, table, classes)
