"""Batch review engine (medcls.engine.review), without Streamlit: sources from a folder under an allowed
root, uploads and zips with bounds, the streamed rows, the summary and the CSV worklist.

The inputs are real files (brain MRI JPEGs of the test split, a DICOM of the mprage series)
plus files the tests damage themselves; expected values come from the data (labels.csv,
pydicom's own reading of the DICOM) and from the model's card, never from medcls's output.
"""

from __future__ import annotations

import csv
import io
import os
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import require

from medcls import identifying_attributes
from medcls.core.errors import ArchiveRejectedError, PathNotAllowedError
from medcls.engine.review import Progress, ReviewJob, run_review, summary, write_csv
from medcls.io.sources import Source, folder_sources, resolve_inside, upload_sources, zip_sources

N_JPEGS = 3


# ----------------------------------------------------------------------------- data

def _test_split_jpegs(data_dir: Path, n: int) -> list[tuple[Path, str]]:
    """The first test-split image of each class (then more), as (path, label)."""
    brain = require(data_dir / "brain-mri")
    by_class: dict[str, list[Path]] = {}
    with open(require(brain / "labels.csv"), newline="") as fh:
        for rec in csv.DictReader(fh):
            if rec["split"] == "test":
                by_class.setdefault(rec["label"], []).append(brain / rec["file"])
    picked: list[tuple[Path, str]] = []
    while len(picked) < n and any(by_class.values()):
        for label in sorted(by_class):
            if by_class[label] and len(picked) < n:
                picked.append((by_class[label].pop(0), label))
    return picked


@pytest.fixture(scope="module")
def dicom_file(data_dir) -> Path:
    return require(data_dir / "dicom" / "mprage-series" / "100.dcm")


@pytest.fixture(scope="module")
def scan_root(tmp_path_factory, data_dir, dicom_file) -> Path:
    """An allowed root: a few real JPEGs, a truncated JPEG, a text file, a zero-byte file and a
    DICOM in a series subfolder (7 files), plus files review must skip."""
    root = tmp_path_factory.mktemp("scans")
    jpegs = _test_split_jpegs(data_dir, N_JPEGS)
    assert len(jpegs) == N_JPEGS
    for i, (src, _) in enumerate(jpegs):
        (root / f"scan_{i}.jpg").write_bytes(src.read_bytes())
    whole = jpegs[0][0].read_bytes()
    (root / "corrupt.jpg").write_bytes(whole[: len(whole) // 2])  # cut short
    (root / "notes.txt").write_text("not a scan\n")
    (root / "empty.dcm").write_bytes(b"")
    (root / "series").mkdir()
    (root / "series" / dicom_file.name).write_bytes(dicom_file.read_bytes())
    # skipped: hidden files, DICOMDIR, labels.csv
    (root / ".hidden.jpg").write_bytes(whole)
    (root / "labels.csv").write_text("file,label\n")
    return root


EXPECTED_FILES = {"scan_0.jpg", "scan_1.jpg", "scan_2.jpg", "corrupt.jpg", "notes.txt",
                  "empty.dcm", "series/100.dcm"}
BAD_FILES = {"corrupt.jpg", "notes.txt", "empty.dcm"}


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A folder outside the allowed root, holding a file."""
    out = tmp_path_factory.mktemp("outside")
    (out / "secret.jpg").write_bytes(b"\xff\xd8\xff not really")
    return out


@pytest.fixture(scope="module")
def review(brain_predictor, scan_root):
    """Rows of the whole root, computed once for the module (small batches: several batches)."""
    sources = folder_sources(scan_root)
    progress: list[Progress] = []
    rows = list(run_review(brain_predictor, sources, batch_size=2, workers=2,
                           on_progress=progress.append))
    return sources, rows, progress


# ----------------------------------------------------------------------------- folder review

def test_folder_sources_lists_every_file_recursively(scan_root):
    names = [s.name for s in folder_sources(scan_root)]
    # sorted, a folder's own files before its subfolders; hidden files and labels.csv skipped
    assert names == ["corrupt.jpg", "empty.dcm", "notes.txt", "scan_0.jpg", "scan_1.jpg",
                     "scan_2.jpg", "series/100.dcm"]
    assert set(names) == EXPECTED_FILES


def test_every_file_gets_a_row_with_errors_for_bad_ones(review, brain_predictor):
    sources, rows, _ = review
    assert [r.file for r in rows] == [s.name for s in sources]  # one row each, input order
    by_file = {r.file: r for r in rows}
    for name in BAD_FILES:
        r = by_file[name]
        assert r.error, name
        assert r.predicted is None and r.probabilities == {} and r.needs_attention
        assert "unreadable" in r.flags
    assert "empty" in by_file["empty.dcm"].error.lower()
    classes = set(brain_predictor.classes)
    for name in EXPECTED_FILES - BAD_FILES:
        r = by_file[name]
        assert r.error is None, (name, r.error)
        assert r.predicted in classes
        assert set(r.probabilities) == classes
        assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 <= p <= 1.0 for p in r.probabilities.values())
        assert r.confidence == pytest.approx(max(r.probabilities.values()))
        assert r.probabilities[r.predicted] == pytest.approx(r.confidence)
        threshold = float(brain_predictor.card["low_confidence_threshold"])
        assert r.low_confidence == (r.confidence < threshold)


def test_dicom_row_carries_series_and_instance(review, dicom_file):
    _, rows, _ = review
    ds = pydicom.dcmread(dicom_file, stop_before_pixels=True)
    r = next(r for r in rows if r.file == "series/100.dcm")
    assert r.error is None
    assert r.series_number == int(ds.SeriesNumber)
    assert r.instance_number == int(ds.InstanceNumber)
    assert r.modality == ds.Modality == "MR"
    jpeg = next(r for r in rows if r.file == "scan_0.jpg")
    assert jpeg.series_number is None and jpeg.instance_number is None


def test_summary_counts(review, brain_predictor):
    _, rows, _ = review
    s = summary(rows, brain_predictor.classes)
    good = [r for r in rows if r.error is None]
    assert s["total"] == len(EXPECTED_FILES)
    assert s["unreadable"] == len(BAD_FILES)
    assert sum(s["per_class"].values()) == len(EXPECTED_FILES) - len(BAD_FILES)
    for c in brain_predictor.classes:
        assert s["per_class"][c] == sum(r.predicted == c for r in good)
    assert s["low_confidence"] == sum(r.low_confidence for r in good)
    assert s["outside_distribution"] == sum(r.outside_distribution for r in good)
    assert s["needs_attention"] >= len(BAD_FILES)


def test_progress_reaches_total(review):
    _, rows, progress = review
    assert progress, "on_progress was never called"
    assert progress[-1].done == progress[-1].total == len(rows)
    assert [p.done for p in progress] == sorted(p.done for p in progress)
    assert progress[-1].rate > 0 and progress[-1].remaining_s == 0


def test_csv_has_one_row_per_file_and_no_patient_tags(review, brain_predictor, dicom_file):
    _, rows, _ = review
    buf = io.StringIO()
    write_csv(rows, brain_predictor.classes, buf)
    text = buf.getvalue()
    parsed = list(csv.DictReader(io.StringIO(text)))
    header = next(csv.reader(io.StringIO(text)))
    for c in brain_predictor.classes:
        assert f"p_{c}" in header
    assert {"file", "predicted", "confidence", "error", "series_number",
            "instance_number"} <= set(header)
    assert len(parsed) == len(EXPECTED_FILES)
    assert {r["file"] for r in parsed} == EXPECTED_FILES
    for rec in parsed:
        if rec["file"] in BAD_FILES:
            assert rec["error"] and not rec["predicted"]
        else:
            probs = [float(rec[f"p_{c}"]) for c in brain_predictor.classes]
            assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    # none of the DICOM's identifying values: as a whole cell, or (long enough not to occur by
    # chance inside a number or a word) anywhere in the text
    phi = identifying_attributes(dicom_file)
    assert "PatientName" in phi and "StudyInstanceUID" in phi
    cells = {cell for row in csv.reader(io.StringIO(text)) for cell in row}
    for keyword, value in phi.items():
        value = value.strip()
        assert value not in cells, keyword
        numeric = value.replace(".", "").replace("^", "").isdigit()
        if len(value) >= 8 or (len(value) >= 4 and not numeric):
            assert value not in text, keyword


def test_csv_of_no_rows_has_the_header(brain_predictor):
    buf = io.StringIO()
    write_csv([], brain_predictor.classes, buf)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and all(f"p_{c}" in lines[0] for c in brain_predictor.classes)


def test_stop_ends_the_run_early(brain_predictor, scan_root):
    sources = folder_sources(scan_root)
    stop = threading.Event()
    rows = []
    for row in run_review(brain_predictor, sources, batch_size=1, workers=1, stop=stop):
        rows.append(row)
        stop.set()
    assert 1 <= len(rows) < len(sources)
    assert [r.file for r in rows] == [s.name for s in sources[: len(rows)]]


def test_closing_the_stream_early_is_clean(brain_predictor, scan_root):
    gen = run_review(brain_predictor, folder_sources(scan_root), batch_size=2, workers=2)
    first = next(gen)
    gen.close()
    assert first.file
    with pytest.raises(StopIteration):
        next(gen)


# ----------------------------------------------------------------------------- the job a page drives

def test_job_advances_in_chunks_then_finishes(brain_predictor, scan_root, review):
    _, rows, _ = review
    job = ReviewJob(brain_predictor, folder_sources(scan_root), "root", batch_size=2)
    batches: list[Progress] = []
    job.advance(0, on_batch=batches.append)  # one batch, then the deadline has passed
    assert job.running and len(job.rows) == 2 and [p.done for p in batches] == [2]
    assert job.progress.total == len(EXPECTED_FILES) and job.not_reviewed == len(EXPECTED_FILES) - 2
    job.advance(600)
    assert job.state == "done" and not job.running and job.error is None
    assert [r.as_record(job.classes) for r in job.rows] == [r.as_record(job.classes) for r in rows]
    assert job.summary() == summary(rows, brain_predictor.classes)
    elapsed = job.elapsed_s
    time.sleep(0.01)
    assert job.elapsed_s == elapsed  # frozen when the run ends


def test_job_stop_keeps_the_rows_done(brain_predictor, scan_root):
    job = ReviewJob(brain_predictor, folder_sources(scan_root), batch_size=1, workers=1)
    job.advance(0)
    job.request_stop()  # what a Stop button's callback does: only sets the Event
    assert job.running
    job.close_if_stopped()  # the next script run
    assert job.state == "stopped" and len(job.rows) == 1 and job.not_reviewed == len(EXPECTED_FILES) - 1
    job.advance(600)  # a stopped job does not move
    assert len(job.rows) == 1


def test_job_filter_records_and_csv(brain_predictor, scan_root):
    job = ReviewJob(brain_predictor, folder_sources(scan_root))
    job.advance(600)
    rows = job.rows
    every = list(range(len(rows)))
    assert job.filter() == every
    assert job.filter(attention_only=True) == [i for i, r in enumerate(rows) if r.needs_attention]
    assert {rows[i].file for i in job.filter(classes=["unreadable"])} == BAD_FILES
    label = next(r.predicted for r in rows if r.predicted)
    assert job.filter(classes=[label]) == [i for i, r in enumerate(rows) if r.predicted == label]
    assert [rows[i].file for i in job.filter(name_contains="SCAN_")] == [
        "scan_0.jpg", "scan_1.jpg", "scan_2.jpg"]
    picked = job.filter(classes=["unreadable"], name_contains=".dcm")
    assert [rows[i].file for i in picked] == ["empty.dcm"]
    assert [r["file"] for r in job.records(picked)] == ["empty.dcm"]
    lines = job.csv(picked).splitlines()
    assert len(lines) == 2 and lines[1].startswith("empty.dcm,")
    scan = job.load(every[-1])  # series/100.dcm reloaded from its source
    assert scan.source_format == "dicom"


# ----------------------------------------------------------------------------- allowed root

def test_paths_inside_the_root_are_allowed(scan_root):
    assert resolve_inside(scan_root, ".") == scan_root.resolve()
    assert resolve_inside(scan_root, "series") == (scan_root / "series").resolve()
    assert resolve_inside(scan_root, str(scan_root / "series")) == (scan_root / "series").resolve()
    assert [s.name for s in folder_sources(scan_root, "series")] == ["100.dcm"]
    assert [s.name for s in folder_sources(scan_root, "series/../series")] == ["100.dcm"]


@pytest.mark.parametrize("make_path", [
    lambda root, out: "..",
    lambda root, out: "../" + out.name,
    lambda root, out: "series/../../" + out.name,
    lambda root, out: str(out),  # an absolute path elsewhere
    lambda root, out: "/etc",
    lambda root, out: "does-not-exist",
    lambda root, out: "series\x00/..",  # a NUL byte cannot be resolved: refused, not a crash
])
def test_paths_outside_the_root_are_refused(scan_root, outside, make_path):
    with pytest.raises(PathNotAllowedError):
        folder_sources(scan_root, make_path(scan_root, outside))


def test_a_file_is_not_a_folder(scan_root):
    with pytest.raises(PathNotAllowedError):
        folder_sources(scan_root, "scan_0.jpg")


def test_symlinks_pointing_out_are_refused(tmp_path, outside):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.txt").write_text("x")
    try:
        os.symlink(outside, root / "link_dir", target_is_directory=True)
        os.symlink(outside / "secret.jpg", root / "link_file.jpg")
    except (OSError, NotImplementedError):
        pytest.skip("symlinks are not available here")
    with pytest.raises(PathNotAllowedError):
        folder_sources(root, "link_dir")
    with pytest.raises(PathNotAllowedError):
        resolve_inside(root, "link_file.jpg")
    # inside a reviewed folder, a file symlink pointing out is a refused row, never read
    sources = {s.name: s for s in folder_sources(root)}
    assert "link_dir" not in {n.split("/")[0] for n in sources if n != "link_dir"}
    with pytest.raises(PathNotAllowedError):
        sources["link_file.jpg"].read()
    assert sources["ok.txt"].read() == (root / "ok.txt").resolve()


def test_symlinked_file_row_says_refused(brain_predictor, tmp_path, outside):
    root = tmp_path / "root"
    root.mkdir()
    try:
        os.symlink(outside / "secret.jpg", root / "link_file.jpg")
    except (OSError, NotImplementedError):
        pytest.skip("symlinks are not available here")
    rows = list(run_review(brain_predictor, folder_sources(root)))
    assert len(rows) == 1 and rows[0].error and "outside" in rows[0].error


# ----------------------------------------------------------------------------- uploads and zips

class FakeUpload:
    """What st.file_uploader returns: a name (a relative path for folder uploads) and bytes."""

    def __init__(self, name: str, data: bytes):
        self.name = name
        self._data = data

    def getvalue(self) -> bytes:
        return self._data


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_uploaded_folder_files_and_zip(brain_predictor, scan_root, dicom_file):
    jpeg = (scan_root / "scan_0.jpg").read_bytes()
    archive = _zip({"a/scan.jpg": jpeg, "a/series/100.dcm": dicom_file.read_bytes(),
                    "a/broken.txt": b"hello", "__MACOSX/a/._scan.jpg": b"junk", "a/.DS_Store": b"x"})
    uploads = [FakeUpload("study/scan.jpg", jpeg), FakeUpload("study/notes.txt", b"text"),
               FakeUpload("batch.zip", archive)]
    sources = upload_sources(uploads)
    names = [s.name for s in sources]
    assert names == ["study/scan.jpg", "study/notes.txt", "batch.zip/a/scan.jpg",
                     "batch.zip/a/series/100.dcm", "batch.zip/a/broken.txt"]
    rows = {r.file: r for r in run_review(brain_predictor, sources, batch_size=2)}
    assert rows["study/scan.jpg"].error is None and rows["batch.zip/a/scan.jpg"].error is None
    assert rows["study/scan.jpg"].probabilities == pytest.approx(
        rows["batch.zip/a/scan.jpg"].probabilities, abs=1e-5)
    assert rows["study/notes.txt"].error and rows["batch.zip/a/broken.txt"].error
    assert rows["batch.zip/a/series/100.dcm"].instance_number == 100


@pytest.mark.parametrize("name", ["../evil.dcm", "a/../../evil.dcm", "/etc/evil.dcm",
                                  "C:/evil.dcm", "..\\evil.dcm"])
def test_zip_with_a_member_pointing_out_is_refused(name):
    data = _zip({"ok.dcm": b"x", name: b"y"})
    with pytest.raises(ArchiveRejectedError):
        zip_sources(data)
    with pytest.raises(ArchiveRejectedError):
        upload_sources([FakeUpload("upload.zip", data)])


def test_damaged_zip_is_refused():
    data = _zip({"a.jpg": b"x" * 1000})
    with pytest.raises(ArchiveRejectedError):
        zip_sources(data[: len(data) // 2])


def test_zip_bomb_is_refused_without_expanding():
    declared = 200 << 20  # 200 MB of zeros
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("bomb.dcm", "w", force_zip64=False) as fh:
            chunk = bytes(8 << 20)
            for _ in range(declared // len(chunk)):
                fh.write(chunk)
    data = buf.getvalue()
    assert len(data) < 2 << 20, len(data)  # a few hundred KB (deflate caps near 1000:1)
    assert zipfile.ZipFile(io.BytesIO(data)).getinfo("bomb.dcm").file_size == declared

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ArchiveRejectedError, match="(?i)zip bomb"):
            zip_sources(data)
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 20 << 20  # nothing near the 200 MB was allocated


def test_zip_bounds_on_members_and_total_size():
    many = _zip({f"f{i}.dcm": b"x" for i in range(30)}, zipfile.ZIP_STORED)
    with pytest.raises(ArchiveRejectedError):
        zip_sources(many, max_members=20)
    assert len(zip_sources(many, max_members=30)) == 30
    big = _zip({"a.dcm": os.urandom(4096), "b.dcm": os.urandom(4096)}, zipfile.ZIP_STORED)
    with pytest.raises(ArchiveRejectedError):
        zip_sources(big, max_total=6000)
    with pytest.raises(ArchiveRejectedError):
        zip_sources(big, max_member=4000)
    assert len(zip_sources(big)) == 2


def test_zip_member_read_is_bounded():
    src = zip_sources(_zip({"a.jpg": b"abc" * 100}))
    assert [s.name for s in src] == ["a.jpg"] and src[0].read() == b"abc" * 100
    assert isinstance(src[0], Source)


def test_outputs_are_numpy_free(review):
    """Rows hold plain floats (JSON/CSV friendly), not numpy scalars or arrays."""
    _, rows, _ = review
    for r in rows:
        for v in r.probabilities.values():
            assert type(v) is float
        assert not isinstance(r.confidence, np.ndarray)


def test_csv_quotes_names_that_spreadsheets_would_run_as_formulas():
    import io

    from medcls.engine.review import ReviewRow, write_csv

    buf = io.StringIO()
    write_csv([ReviewRow("=HYPERLINK(\"x\").dcm", None, None, {}, False, False, None, "bad")], ["a", "b"], buf)
    import csv

    row = next(csv.DictReader(io.StringIO(buf.getvalue())))
    assert row["file"] == "'=HYPERLINK(\"x\").dcm"
