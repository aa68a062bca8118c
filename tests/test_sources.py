"""Source readers and split functions: pure, no Ray."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from proco_ray.data.sources import (
    HAM10000_LOCATIONS,
    ISIC_CLASSES,
    match_labels,
    parse_groups,
    parse_locations,
    parse_onehot,
    read_source,
)
from proco_ray.data.splits import make_split, paper_split, split_counts
from proco_ray.errors import DataError

HEADER = ["image", *ISIC_CLASSES]


def onehot(label: int) -> list[str]:
    return [f"{float(i == label):.1f}" for i in range(7)]


# --------------------------------------------------------------------------- label tables


def test_parse_onehot_reads_class_indices():
    rows = [["ISIC_1", *onehot(0)], ["ISIC_2", *onehot(6)]]
    assert parse_onehot(HEADER, rows, ISIC_CLASSES, "gt.csv") == {"ISIC_1": 0, "ISIC_2": 6}


def test_parse_onehot_lists_every_row_that_is_not_one_hot():
    rows = [
        ["ISIC_ok", *onehot(1)],
        ["ISIC_two", "1.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"],
        ["ISIC_none", *["0.0"] * 7],
        ["ISIC_half", "0.5", "0.5", "0.0", "0.0", "0.0", "0.0", "0.0"],
        ["ISIC_short", "1.0"],
    ]
    with pytest.raises(DataError, match="4 row.*not exactly one-hot") as info:
        parse_onehot(HEADER, rows, ISIC_CLASSES, "gt.csv")
    for name in ("ISIC_two", "ISIC_none", "ISIC_half", "ISIC_short"):
        assert name in str(info.value)
    assert "ISIC_ok" not in str(info.value)


def test_parse_onehot_names_unknown_class_columns():
    header = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASCULAR"]
    with pytest.raises(DataError, match="unknown class names: \\['VASCULAR'\\]"):
        parse_onehot(header, [], ISIC_CLASSES, "gt.csv")


def test_match_labels_lists_orphans_on_both_sides():
    images = {"a": "dir/a.jpg", "b": "dir/b.jpg"}
    with pytest.raises(DataError) as info:
        match_labels(images, {"a": 0, "c": 1}, "src")
    text = str(info.value)
    assert "1 image(s) without a label" in text and "dir/b.jpg" in text
    assert "1 label(s) without an image" in text and "c" in text


def test_parse_groups_reads_ham_metadata_and_generic_tables():
    ham = parse_groups(["lesion_id", "image_id", "dx"], [["HAM_1", "ISIC_1", "nv"], ["HAM_1", "ISIC_2", "nv"]], "m")
    assert ham == {"ISIC_1": "HAM_1", "ISIC_2": "HAM_1"}
    assert parse_groups(["id", "group"], [["x", "p1"]], "g") == {"x": "p1"}
    with pytest.raises(DataError, match="group column"):
        parse_groups(["id", "something"], [], "g")


def test_parse_locations_maps_ham10000_sites_and_names_a_bad_row():
    header = ["lesion_id", "image_id", "dx", "localization"]
    rows = [
        ["HAM_1", "ISIC_1", "nv", "back"],
        ["HAM_2", "ISIC_2", "mel", "unknown"],
        ["HAM_3", "ISIC_3", "nv", "upper extremity"],
    ]
    assert parse_locations(header, rows, "m") == {
        "ISIC_1": HAM10000_LOCATIONS.index("back"),
        "ISIC_2": -1,
        "ISIC_3": HAM10000_LOCATIONS.index("upper extremity"),
    }
    assert parse_locations(["image_id", "lesion_id"], rows, "m") == {}
    with pytest.raises(DataError, match="row 3: ISIC_9 localization 'elbow'"):
        parse_locations(header, rows[:1] + [["HAM_9", "ISIC_9", "nv", "elbow"]], "m")


# --------------------------------------------------------------------------- readers


def test_isic_reader_counts_splits_and_lesions(tmp_path, datagen):
    root = datagen.isic(tmp_path / "isic", val_counts=[1] * 7)
    source = read_source(str(root))
    assert source.kind == "isic2018" and source.classes == ISIC_CLASSES
    train = [r for r in source.records if r.official_split == "train"]
    assert Counter(r.label for r in train) == Counter(dict(enumerate([8, 20, 6, 5, 7, 4, 4])))
    assert sum(r.official_split == "val" for r in source.records) == 7
    assert all(r.group and r.group.startswith("HAM_") for r in source.records)
    assert source.group_source == "HAM10000_metadata.csv"
    assert source.locations == list(HAM10000_LOCATIONS)
    sites = {r.id: r.location for r in source.records}
    assert sites["ISIC_T10000"] == HAM10000_LOCATIONS.index("back") and sites["ISIC_T10002"] == -1


def test_isic_image_without_label_and_label_without_image(tmp_path, datagen):
    root = datagen.isic(tmp_path / "isic")
    image_dir = root / "ISIC2018_Task3_Training_Input"
    (image_dir / "ISIC_extra.jpg").write_bytes(datagen.image_bytes(0, 99))
    (image_dir / "ISIC_T00000.jpg").unlink()
    with pytest.raises(DataError) as info:
        read_source(str(root))
    assert "ISIC_extra.jpg" in str(info.value) and "without a label" in str(info.value)
    assert "ISIC_T00000" in str(info.value) and "without an image" in str(info.value)


def test_isic_class_with_no_image(tmp_path, datagen):
    root = datagen.isic(tmp_path / "isic", counts=[3, 3, 3, 3, 3, 3, 0])
    with pytest.raises(DataError, match="class\\(es\\) with no image: \\['VASC'\\]"):
        read_source(str(root))


def test_isic_input_folder_without_ground_truth(tmp_path, datagen):
    root = datagen.isic(tmp_path / "isic")
    (root / "ISIC2018_Task3_Training_GroundTruth.csv").unlink()
    with pytest.raises(DataError, match="no ISIC2018_Task3_Training_GroundTruth.csv"):
        read_source(str(root))


def test_aptos_reader_and_unknown_grade(tmp_path, datagen):
    root = datagen.aptos(tmp_path / "aptos")
    source = read_source(str(root))
    assert source.kind == "aptos2019" and source.class_counts() == [10] * 5
    with open(root / "train.csv", "a") as handle:
        handle.write("ffff,7\n")
    with pytest.raises(DataError, match="(?s)unknown class.*ffff has diagnosis '7'"):
        read_source(str(root))


def test_medmnist_reader_any_subset_of_splits(tmp_path, datagen):
    path = datagen.medmnist(tmp_path / "retinamnist_trainval.npz", {"train": 20, "val": 10})
    source = read_source(str(path))
    assert source.kind == "medmnist" and source.classes == ["0", "1", "2", "3", "4"]
    assert Counter(r.official_split for r in source.records) == {"train": 20, "val": 10}
    gray = read_source(str(datagen.medmnist(tmp_path / "dermamnist.npz", classes=7, channels=1)))
    assert gray.classes[0].startswith("actinic") and len(gray.classes) == 7


def test_a_folder_holding_a_medmnist_npz_says_to_pass_the_file(tmp_path, datagen):
    """Issue 26.7: the folder answered "no images in class folders", which hid the .npz beside it."""
    datagen.medmnist(tmp_path / "retinamnist" / "retinamnist_28.npz", {"train": 20, "val": 10})
    folder = tmp_path / "retinamnist"
    with pytest.raises(DataError) as refused:
        read_source(str(folder))
    assert str(refused.value) == (
        f"{folder}: no images in class folders, but 1 MedMNIST .npz archive(s): retinamnist_28.npz; "
        f"pass the file itself, e.g. proco-ray prepare {folder / 'retinamnist_28.npz'} OUTPUT"
    )


def test_medmnist_rejects_bad_arrays(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "a.npz", train_images=images, train_labels=np.zeros((3, 1), np.uint8))
    with pytest.raises(DataError, match="4 train images but 3 train labels"):
        read_source(str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", train_images=images)
    with pytest.raises(DataError, match="train_images but no train_labels"):
        read_source(str(tmp_path / "b.npz"))
    np.savez(tmp_path / "dermamnist.npz", train_images=images, train_labels=np.array([[0], [1], [9], [2]], np.uint8))
    with pytest.raises(DataError, match="(?s)outside the 7 classes.*train\\[2\\] = 9"):
        read_source(str(tmp_path / "dermamnist.npz"))
    np.savez(tmp_path / "c.npz", train_images=images, train_labels=np.zeros((4, 3), np.uint8))
    with pytest.raises(DataError, match="multi-label"):
        read_source(str(tmp_path / "c.npz"))


def test_imagefolder_reader_classes_and_errors(tmp_path, datagen):
    root = datagen.imagefolder(tmp_path / "folder")
    source = read_source(str(root))
    assert source.kind == "imagefolder" and source.classes == ["benign", "malignant", "other"]
    assert source.class_counts() == [9, 5, 4]
    with pytest.raises(DataError, match="unknown class names \\['other'\\]"):
        read_source(str(root), classes=["benign", "malignant"])
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="no image: \\['empty'\\]"):
        read_source(str(root))


def test_fingerprint_is_stable_and_tracks_labels(tmp_path, datagen):
    root = datagen.imagefolder(tmp_path / "folder")
    first = read_source(str(root)).fingerprint
    assert read_source(str(root)).fingerprint == first
    (root / "other" / "img000.jpeg").rename(root / "malignant" / "moved.jpeg")
    assert read_source(str(root)).fingerprint != first


def test_real_isic_sample_reads(shared_data):
    source = read_source(str(shared_data / "isic2018"))
    assert len(source.records) == 5984
    assert dict(zip(source.classes, source.class_counts())) == {
        "MEL": 491,
        "NV": 4323,
        "BCC": 264,
        "AKIEC": 183,
        "BKL": 583,
        "DF": 60,
        "VASC": 80,
    }
    assert all(r.group for r in source.records)


# --------------------------------------------------------------------------- splits


LONG_TAIL = [0] * 400 + [1] * 120 + [2] * 50 + [3] * 20 + [4] * 7


def test_paper_split_is_stratified_7_3_with_val_from_train():
    splits = paper_split(LONG_TAIL, seed=0)
    counts = split_counts(splits, LONG_TAIL, ["a", "b", "c", "d", "e"])
    for i, name in enumerate("abcde"):
        total = LONG_TAIL.count(i)
        assert abs(counts["test"][name] - 0.3 * total) <= 1
        assert abs(counts["val"][name] - 0.07 * total) <= 1
        assert counts["train"][name] + counts["val"][name] + counts["test"][name] == total


def test_paper_split_same_seed_same_split():
    assert paper_split(LONG_TAIL, seed=3) == paper_split(LONG_TAIL, seed=3)
    assert paper_split(LONG_TAIL, seed=3) != paper_split(LONG_TAIL, seed=4)


def test_test_split_does_not_depend_on_val_fraction():
    a = paper_split(LONG_TAIL, seed=1, val_fraction=0.1)
    b = paper_split(LONG_TAIL, seed=1, val_fraction=0.2)
    assert [s == "test" for s in a] == [s == "test" for s in b]


def test_group_aware_split_keeps_each_group_on_one_side():
    rng = np.random.default_rng(0)
    groups = [f"lesion{i // 3 + 1000 * label}" for i, label in enumerate(LONG_TAIL)]
    groups = [g if rng.random() > 0.3 else f"single{i}" for i, g in enumerate(groups)]
    splits = paper_split(LONG_TAIL, groups, seed=0)
    sides = defaultdict(set)
    for group, split in zip(groups, splits):
        sides[group].add(split)
    assert all(len(s) == 1 for s in sides.values())
    counts = split_counts(splits, LONG_TAIL, list("abcde"))
    for i, name in enumerate("abcde"):
        assert abs(counts["test"][name] - 0.3 * LONG_TAIL.count(i)) <= 3


def test_official_and_test_modes():
    labels, official = [0, 1, 0], ["train", "val", "test"]
    kwargs = dict(seed=0, test_fraction=0.3, val_fraction=0.1)
    assert make_split("official", labels, None, official, **kwargs) == official
    assert make_split("test", labels, None, official, **kwargs) == ["test"] * 3
    with pytest.raises(DataError, match="no official split"):
        make_split("official", labels, None, [None] * 3, **kwargs)
    with pytest.raises(DataError, match="unknown split mode"):
        make_split("random", labels, None, official, **kwargs)


@pytest.mark.parametrize("stray", [5, 9])
def test_medmnist_stray_label_is_an_error_naming_the_row_whatever_the_file_is_called(tmp_path, stray):
    """Issue 11.6: a single 5 became a sixth class; a 9 gave a misleading 'class(es) with no image'."""
    labels = (np.arange(40) % 5).astype(np.uint8)
    labels[17] = stray
    images = np.zeros((40, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "my_fundus_set.npz", train_images=images, train_labels=labels.reshape(-1, 1))
    with pytest.raises(DataError, match=rf"(?s)stray label\(s\) \[{stray}\].*0\.\.4.*train\[17\] = {stray}"):
        read_source(str(tmp_path / "my_fundus_set.npz"))
    declared = (
        read_source(str(tmp_path / "my_fundus_set.npz"), classes=[str(i) for i in range(stray + 1)]) if stray == 5 else None
    )
    assert declared is None or declared.classes == ["0", "1", "2", "3", "4", "5"]  # declared classes are taken as given
