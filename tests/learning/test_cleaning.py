"""Tests of medcls.learning.cleaning on a small dataset built from real brain MRI JPEGs, on synthetic
label tables, and on the shipped brain-mri split."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import PROJECT_ROOT

from medcls.cli.main import main
from medcls.learning.cleaning import DuplicateGroup, clean_dataset, grouped_split, near_pairs, write_split_csv
from medcls.learning.data import Record, load_dataset

_DATA_SETTING = Path(os.environ.get("MEDCLS_DATA", "../shared/data"))
DATA = _DATA_SETTING if _DATA_SETTING.is_absolute() else PROJECT_ROOT / _DATA_SETTING
BRAIN = DATA / "brain-mri"

IMAGES_PER_CLASS = 5


@pytest.fixture(scope="module")
def brain_rows() -> list[dict[str, str]]:
    labels = BRAIN / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"brain-mri data not found at {BRAIN} (set MEDCLS_DATA to the data folder)")
    with labels.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _pick_originals(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """IMAGES_PER_CLASS images per class, each from a different dataset group (so none is a
    copy of another), spread evenly over the class."""
    picked = []
    for label in sorted({r["label"] for r in rows}):
        first_of_group: dict[str, dict[str, str]] = {}
        for r in rows:
            if r["label"] == label:
                first_of_group.setdefault(r["group"], r)
        candidates = list(first_of_group.values())
        step = len(candidates) // IMAGES_PER_CLASS
        picked.extend(candidates[i * step] for i in range(IMAGES_PER_CLASS))
    return picked


@pytest.fixture(scope="module")
def dirty(tmp_path_factory, brain_rows):
    """A labels.csv dataset of 20 real images plus one exact copy with another label, one
    re-encoded and shrunk copy in another split, an empty file and a text file."""
    root = tmp_path_factory.mktemp("dirty")
    originals = _pick_originals(brain_rows)
    table = []
    for i, row in enumerate(originals):
        dest = root / row["file"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(BRAIN / row["file"], dest)
        table.append((row["file"], row["label"], ("train", "train", "train", "val", "test")[i % 5]))
    first_of_label: dict[str, str] = {}
    for file, label, _ in table:
        first_of_label.setdefault(label, file)
    exact_source, near_source = first_of_label["glioma"], first_of_label["pituitary"]
    split_of = {file: split for file, _, split in table}
    assert split_of[exact_source] == split_of[near_source] == "train"

    exact_copy = "meningioma/copy_of_glioma.jpg"
    shutil.copyfile(root / exact_source, root / exact_copy)
    table.append((exact_copy, "meningioma", "train"))

    near_copy = "pituitary/reencoded.jpg"
    image = cv2.imread(str(root / near_source), cv2.IMREAD_GRAYSCALE)
    smaller = cv2.resize(image, (image.shape[1] * 9 // 10, image.shape[0] * 9 // 10),
                         interpolation=cv2.INTER_AREA)
    assert cv2.imwrite(str(root / near_copy), smaller, [cv2.IMWRITE_JPEG_QUALITY, 60])
    table.append((near_copy, "pituitary", "test"))

    (root / "glioma" / "empty.jpg").write_bytes(b"")
    (root / "no_tumor" / "notes.txt").write_text("not an image\n")
    table += [("glioma/empty.jpg", "glioma", "train"), ("no_tumor/notes.txt", "no_tumor", "val")]

    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "split"])
        writer.writerows(table)
    return {"root": root, "n": len(table), "exact": {exact_source, exact_copy},
            "near": {near_source, near_copy}}


@pytest.fixture(scope="module")
def report(dirty):
    return clean_dataset(dirty["root"], near_threshold=6, workers=2)


def _ref_sets(groups: list[DuplicateGroup]) -> list[set[str]]:
    return [set(g.refs) for g in groups]


def test_finds_unreadable_files_with_their_reasons(report, dirty):
    assert report.n_records == dirty["n"] == 24
    found = {u.ref: u for u in report.unreadable}
    assert set(found) == {"glioma/empty.jpg", "no_tumor/notes.txt"}
    assert {u.error for u in found.values()} == {"UnreadableScanError"}
    assert "empty" in found["glioma/empty.jpg"].message
    assert "not an image" in found["no_tumor/notes.txt"].message
    assert report.n_readable == 22


def test_finds_exactly_the_planted_duplicates(report, dirty):
    assert _ref_sets(report.exact_groups) == [dirty["exact"]]
    assert report.exact_groups[0].byte_identical
    assert len(report.near_pairs) == 1
    pair = report.near_pairs[0]
    assert {pair.first.ref, pair.second.ref} == dirty["near"]
    assert 0 <= pair.distance <= 6
    assert sorted(map(sorted, _ref_sets(report.groups))) == sorted(
        [sorted(dirty["exact"]), sorted(dirty["near"])])
    assert _ref_sets(report.near_groups) == [dirty["near"]]


def test_flags_conflicting_labels_and_split_leaks(report, dirty):
    assert _ref_sets(report.conflicting_label_groups) == [dirty["exact"]]
    assert report.conflicting_label_groups[0].labels == ["glioma", "meningioma"]
    assert _ref_sets(report.cross_split_groups) == [dirty["near"]]
    assert report.cross_split_groups[0].splits == ["test", "train"]


def test_a_threshold_below_the_distance_drops_the_near_pair(report, dirty):
    distance = report.near_pairs[0].distance
    if distance == 0:
        pytest.skip("the re-encoded copy hashed identically; nothing to separate")
    strict = clean_dataset(dirty["root"], near_threshold=distance - 1)
    assert strict.near_pairs == []
    assert _ref_sets(strict.groups) == [dirty["exact"]]


def test_report_serialises_with_complete_counts(report, dirty):
    data = json.loads(json.dumps(report.to_dict()))
    assert data["counts"] == {
        "records": 24, "readable": 22, "unreadable": 2, "exact_duplicate_sets": 1,
        "exact_duplicate_files": 2, "exact_duplicate_extra_copies": 1,
        "near_duplicate_pairs": 1, "near_duplicate_groups": 1, "duplicate_groups": 2,
        "files_in_duplicate_groups": 4, "conflicting_label_groups": 1, "cross_split_groups": 1,
    }
    assert len(report.to_dict(max_examples=1)["unreadable"]) == 1
    text = report.to_markdown()
    assert "| unreadable files | 2 |" in text
    for ref in dirty["exact"] | dirty["near"] | {"glioma/empty.jpg"}:
        assert f"`{ref}`" in text


def test_near_pairs_match_brute_force():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, size=(40, 32), dtype=np.uint8)
    hashes = np.concatenate([base, base ^ (rng.random((40, 32)) < 0.01).astype(np.uint8)])
    bits = np.unpackbits(hashes, axis=1)
    expected = {(i, j, int((bits[i] != bits[j]).sum()))
                for i in range(len(bits)) for j in range(i + 1, len(bits))
                if (bits[i] != bits[j]).sum() <= 5}
    assert expected  # the perturbed copies give some pairs
    assert set(near_pairs(hashes, 5, block=7)) == expected


def _assert_groups_stay_together(records: list[Record], groups: list[set[str]]) -> None:
    split_of = {r.ref: r.split for r in records}
    for group in groups:
        assert len({split_of[ref] for ref in group if ref in split_of}) == 1, group


def test_grouped_split_keeps_duplicates_together(report, dirty):
    dataset = load_dataset(dirty["root"])
    readable = [r for r in dataset.records if r.ref not in report.unreadable_refs]
    for seed in range(5):
        split = grouped_split(readable, seed=seed, keep_together=report.keep_together())
        assert [r.ref for r in split] == [r.ref for r in readable]
        assert {r.split for r in split} == {"train", "val", "test"}
        _assert_groups_stay_together(split, [dirty["exact"], dirty["near"]])
        group_of = {r.ref: r.group for r in split}
        assert len({group_of[ref] for ref in dirty["exact"]}) == 1
        assert Counter(r.split for r in split)["train"] >= len(split) // 2


def _synthetic_records(seed: int = 0) -> list[Record]:
    """1000 records in groups of 1-5, three imbalanced labels (60/30/10 %)."""
    rng = random.Random(seed)
    records: list[Record] = []
    g = 0
    while len(records) < 1000:
        label = rng.choices(["a", "b", "c"], weights=[6, 3, 1])[0]
        for _ in range(rng.randint(1, 5)):
            records.append(Record(ref=f"{label}/{len(records)}.png", label=label, group=f"p{g}"))
        g += 1
    return records


def test_grouped_split_honours_fractions_labels_and_groups():
    records = _synthetic_records()
    # Join two patients into one group through keep_together, as a duplicate would.
    linked = {records[0].ref, records[-1].ref}
    split = grouped_split(records, fractions=(0.7, 0.15, 0.15), seed=1, keep_together=[linked])
    sizes = Counter(r.split for r in split)
    for name, target in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        assert abs(sizes[name] / len(split) - target) < 0.03, sizes
        for label in "abc":
            in_label = [r for r in split if r.label == label]
            share = sum(r.split == name for r in in_label) / len(in_label)
            assert abs(share - target) < 0.06, (label, name, share)
    by_group = defaultdict(set)
    for original, new in zip(records, split):
        by_group[original.group].add(new.split)
    assert all(len(splits) == 1 for splits in by_group.values())
    _assert_groups_stay_together(split, [linked])
    assert split[0].group == split[-1].group


def test_grouped_split_is_reproducible_and_seeded():
    records = _synthetic_records()
    first = [r.split for r in grouped_split(records, seed=0)]
    assert first == [r.split for r in grouped_split(records, seed=0)]
    assert first != [r.split for r in grouped_split(records, seed=1)]


def test_grouped_split_rejects_bad_fractions():
    with pytest.raises(ValueError):
        grouped_split(_synthetic_records(), fractions=(0.7, 0.2, 0.2))


def test_cli_writes_reports_and_split(dirty, tmp_path, capsys):
    out = tmp_path / "report"
    split_csv = tmp_path / "split.csv"
    code = main(["clean", str(dirty["root"]), "--out", str(out), "--write-split", str(split_csv)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| unreadable files | 2 |" in printed
    assert json.loads((out / "cleaning.json").read_text())["counts"]["cross_split_groups"] == 1
    assert (out / "cleaning.md").read_text().startswith("# Dataset cleaning")
    with split_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["file", "label", "split", "group"]
    assert len(rows) == 22  # the two unreadable files are left out
    written = [Record(ref=r["file"], label=r["label"], split=r["split"]) for r in rows]
    _assert_groups_stay_together(written, [dirty["exact"], dirty["near"]])


def test_cli_missing_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["clean", str(tmp_path / "nowhere")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: No dataset folder") and "\n" not in err


def test_write_split_csv_round_trips(tmp_path):
    records = grouped_split(_synthetic_records(), seed=0)
    path = write_split_csv(records, tmp_path / "labels.csv")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["file"], r["label"], r["split"], r["group"]) for r in rows] == [
        (r.ref, r.label, r.split, r.group) for r in records]


def test_shipped_brain_split_has_no_exact_duplicate_across_splits(brain_rows):
    splits_of_content: dict[str, set[str]] = defaultdict(set)
    splits_of_group: dict[str, set[str]] = defaultdict(set)
    for row in brain_rows:
        splits_of_content[row["sha256"]].add(row["split"])
        splits_of_group[row["group"]].add(row["split"])
    assert len(splits_of_content) < len(brain_rows)  # it does hold exact copies ...
    leaking = {sha: s for sha, s in splits_of_content.items() if len(s) > 1}
    assert leaking == {}  # ... but none crosses splits
    assert {g: s for g, s in splits_of_group.items() if len(s) > 1} == {}
