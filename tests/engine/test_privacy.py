"""Patient data never leaves the screen: no identifying DICOM value in logs, warnings, error
messages, reports (PNG/PDF), review CSVs or any file; uploads are decoded in memory.

The mprage series (../shared/data/dicom/mprage-series, SOURCE.md) carries sample patient tags
(name Doe^John, id 0123, birth date, institution, operator...). The values searched for are
what :func:`medcls.identifying_attributes` reads from those very files, so the checks follow
the data rather than a hand-written list; a positive control shows each search can find what
it looks for.
"""

from __future__ import annotations

import builtins
import csv
import io
import logging
import os
import re
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import pdf_text, require
from dicom_factory import to_bytes

from medcls import identifying_attributes, load_scan
from medcls.core.errors import MedclsError
from medcls.engine.inference import Prediction
from medcls.engine.report import render_report
from medcls.engine.review import ReviewRow, write_csv
from medcls.io.display import display_image
from medcls.io.preprocess import PreprocessSpec, preprocess

CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")
CARD = {"name": "privacy-test-model", "version": "1.0", "architecture": "test",
        "training": {"date": "2025-01-01"}, "task": "brain-mri",
        "metrics": {"test": {"accuracy": 0.9, "macro_f1": 0.85, "n": 100}}}


# ----------------------------------------------------------------------------- needles

@pytest.fixture(scope="module")
def needles(mprage_files: list[Path]) -> dict[str, str]:
    """Identifying value -> the attribute it comes from, over every file of the series.

    Values under 4 characters (sex "M", study id "1", weight "67") are left out: they occur in
    any text, so finding them proves nothing. Person names are also searched for by component
    ("Doe", "John"), since a name may be printed reordered or without the "^"."""
    found: dict[str, str] = {}
    for f in mprage_files:
        for keyword, value in identifying_attributes(f).items():
            value = value.strip()
            parts = [value]
            if keyword.endswith("Name") and "^" in value:
                parts += [p.strip() for p in value.split("^") if p.strip()]
            for p in parts:
                if len(p) >= 4 or (keyword.endswith("Name") and len(p) >= 3 and p != value):
                    found.setdefault(p, keyword)
    # the files carry the sample patient's tags: the checks below can fail
    assert {"Doe^John", "Doe", "John", "0123"} <= set(found), sorted(found)
    assert any(re.fullmatch(r"\d{8}", n) for n in found), "no date among the needles"
    return found


def _numeric(needle: str) -> bool:
    return re.fullmatch(r"[0-9.]+", needle) is not None


def leaks(text: str, needles: dict[str, str]) -> list[str]:
    """The needles found in ``text``. Numbers (ids, dates, sizes) count only as whole numbers:
    "0123" must not match inside "0.0123", nor "1.86" inside "11.863" (a gate score)."""
    out = []
    for n, keyword in needles.items():
        if _numeric(n):
            hit = re.search(r"(?<![0-9.])" + re.escape(n) + r"(?![0-9])", text) is not None
        else:
            hit = n in text
        if hit:
            out.append(f"{keyword}={n!r}")
    return sorted(out)


def raw_leaks(data: bytes, needles: dict[str, str]) -> list[str]:
    """Needles in the raw bytes of a binary file. Short numbers (under 8 digits) are left to the
    text checks: a PDF's cross-reference offsets and compressed streams hold any short digit run
    by chance."""
    out = []
    for n, keyword in needles.items():
        if _numeric(n) and len(n) < 8:
            continue
        for enc in {n.encode("utf-8"), n.encode("utf-16-be"), n.encode("utf-16-le")}:
            if enc in data:
                out.append(f"{keyword}={n!r}")
                break
    return sorted(out)


# ----------------------------------------------------------------------------- file text

def png_text(png: bytes) -> str:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG: where metadata would be written."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return "\n".join(f"{k}: {v}" for k, v in {**im.info, **getattr(im, "text", {})}.items())


def test_text_extraction_finds_what_it_looks_for(needles: dict[str, str]) -> None:
    """Positive control of the searches below: a report whose model name is the patient's name
    (never the case in medcls; made up here) is caught in the PDF text and the CSV."""
    card = {**CARD, "name": "Doe^John 0123"}
    pred = _prediction()
    pdf = render_report(np.zeros((16, 16), np.float32), None, pred, card, "0" * 64, fmt="pdf")
    text = pdf_text(pdf)
    assert "Glioma ·" in text and "privacy-test-model" not in text
    assert {"PatientName='Doe^John'", "PatientID='0123'"} <= set(leaks(text, needles))
    buf = io.StringIO()
    write_csv([ReviewRow("Doe^John.dcm", "glioma", 0.7, {}, False, False, None, None)], CLASSES, buf)
    assert "PatientName='Doe^John'" in leaks(buf.getvalue(), needles)
    assert not leaks("gate 11.8634, p 0.0123", needles)  # numbers inside numbers are no leak


# ----------------------------------------------------------------------------- helpers

def _prediction(probs=(0.7, 0.1, 0.1, 0.1), gate: float | None = 3.2) -> Prediction:
    p = np.asarray(probs, dtype=np.float64)
    return Prediction(CLASSES, p, np.log(p), gate, 10.0, 0.6)


def _corrupted_copies(raw: bytes, seed: int) -> list[bytes]:
    """Truncations at several points and byte flips in header and pixel data."""
    rng = np.random.default_rng(seed)
    out = [raw[: int(f * len(raw))] for f in (0.01, 0.1, 0.3, 0.6, 0.9, 0.999)]
    pix = raw.rfind(b"\xe0\x7f\x10\x00")
    for region in ((132, pix), (pix, pix + 12), (pix, len(raw)), (0, len(raw))):
        data = bytearray(raw)
        for i in rng.integers(region[0], region[1], 12):
            data[i] ^= int(rng.integers(1, 256))
        out.append(bytes(data))
    ds = pydicom.dcmread(io.BytesIO(raw))
    del ds.PixelData
    out.append(to_bytes(ds, file_format=False))
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.Rows = 300
    out.append(to_bytes(ds, file_format=False))
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.BitsAllocated = 8
    out.append(to_bytes(ds, file_format=False))
    return out



def _exception_text(exc: BaseException) -> str:
    """What a person or a log could see of an exception: message, repr, and the traceback a
    ``log.exception`` would print (chained causes included, unless suppressed)."""
    return "\n".join([str(exc), repr(exc), "".join(traceback.format_exception(exc))])


# ----------------------------------------------------------------------------- the pipeline

def test_no_identifying_value_leaves_the_pipeline(mprage_files, needles, tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []  # everything a person or a log file could see
    files: dict[str, bytes] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scans = []
        for f in mprage_files:
            scan = load_scan(f)
            scans.append(scan)
            seen += [repr(scan), str(scan), str(scan.metadata), str(scan.window_presets)]
            pre = preprocess(scan, PreprocessSpec())
            seen.append(repr(pre))
        # bytes, as an upload arrives, and a file object
        seen.append(repr(load_scan(mprage_files[0].read_bytes())))
        with open(mprage_files[1], "rb") as fh:
            seen.append(repr(load_scan(fh)))

        # reports without a model: a constructed prediction, no heatmap
        scan = scans[len(scans) // 2]
        image = display_image(scan)
        for fmt in ("png", "pdf"):
            files[f"report.{fmt}"] = render_report(image, None, _prediction(), CARD, scan.sha256,
                                                   fmt=fmt)
        # a review CSV of the series, with one unreadable file
        rows = [ReviewRow(f.name, "glioma", 0.7, dict(zip(CLASSES, (0.7, 0.1, 0.1, 0.1))), False,
                          False, 3.2, None, s.modality, s.metadata.get("SeriesNumber"),
                          s.metadata.get("InstanceNumber")) for f, s in zip(mprage_files, scans)]

        # corrupted copies: the error messages (and, when one still loads, the scan)
        errors: list[str] = []
        for k, f in enumerate(mprage_files[:3]):
            for bad in _corrupted_copies(f.read_bytes(), seed=k):
                try:
                    s = load_scan(bad)
                    seen += [repr(s), str(s.metadata)]
                    preprocess(s, PreprocessSpec())
                except MedclsError as exc:
                    errors.append(_exception_text(exc))
                    rows.append(ReviewRow(f"corrupt-{k}.dcm", None, None, {}, False, False, None,
                                          str(exc)))
        assert len(errors) >= 3 * 8, "the corrupted copies should mostly be refused"
        seen += errors
        csv_path = tmp_path / "review.csv"
        write_csv(rows, CLASSES, csv_path)
        files["review.csv"] = csv_path.read_bytes()

    assert any("loaded" in r.getMessage() for r in caplog.records), \
        "no DEBUG record was captured: the log check would be vacuous"
    out, err = capfd.readouterr()
    texts = {"logs": "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}"
                               for r in caplog.records),
             "warnings": "\n".join(f"{w.category.__name__}: {w.message}" for w in caught),
             "stdout/stderr": out + err,
             "messages, reprs and metadata": "\n".join(seen),
             "report.png text": png_text(files["report.png"]),
             "report.pdf text": pdf_text(files["report.pdf"]),
             "review.csv": files["review.csv"].decode("utf-8")}
    assert "Glioma ·" in texts["report.pdf text"]  # the PDF text was really read
    assert len(list(csv.DictReader(io.StringIO(texts["review.csv"])))) == len(rows)
    for where, text in texts.items():
        assert not leaks(text, needles), (where, leaks(text, needles))
    for name, data in files.items():
        assert not raw_leaks(data, needles), (name, raw_leaks(data, needles))
    # nothing else was written next to the CSV
    assert sorted(p.name for p in tmp_path.iterdir()) == ["review.csv"]


def test_damaged_reports_hold_no_identifying_value(mprage_files, needles, caplog) -> None:
    """A damaged report (truncated, bytes flipped) holds nothing, and uploaded by mistake as a
    scan, its error message and the logs hold nothing either."""
    caplog.set_level(logging.DEBUG)
    scan = load_scan(mprage_files[0])
    pdf = render_report(display_image(scan), None, _prediction(), CARD, scan.sha256, fmt="pdf")
    png = render_report(display_image(scan), None, _prediction(), CARD, scan.sha256, fmt="png")
    rng = np.random.default_rng(3)
    for data in (pdf, png):
        flipped = bytearray(data)
        for i in rng.integers(0, len(data), 50):
            flipped[i] ^= 0xFF
        for variant in (data[: len(data) // 2], bytes(flipped)):
            assert not raw_leaks(variant, needles)
            try:
                load_scan(variant)  # a report uploaded as a scan: refused or shown, never leaking
            except MedclsError as exc:
                assert not leaks(_exception_text(exc), needles)
    assert not leaks(caplog.text, needles)


# ----------------------------------------------------------------------------- a real model

def test_real_model_report_and_review_hold_no_identifying_value(mprage_files, needles, data_dir,
                                                                brain_predictor, tmp_path, caplog):
    """With the brain-MRI model package (skipped without one): Grad-CAM + report of a series
    slice, and a batch review of the series folder written to CSV."""
    from medcls.engine.review import run_review
    from medcls.io.sources import folder_sources

    caplog.set_level(logging.DEBUG)
    scan = load_scan(mprage_files[12])
    explanation = brain_predictor.explain(scan, "gradcam")
    image = display_image(scan)
    produced = {fmt: render_report(image, explanation, explanation.prediction, brain_predictor.card,
                                   scan.sha256, fmt=fmt, method_label="Grad-CAM")
                for fmt in ("png", "pdf")}
    root = mprage_files[0].parent.parent
    sources = folder_sources(root, "mprage-series")[:8]
    rows = list(run_review(brain_predictor, sources, batch_size=4, workers=1))
    assert len(rows) == 8 and all(r.error is None for r in rows)
    write_csv(rows, brain_predictor.classes, tmp_path / "review.csv")
    csv_text = (tmp_path / "review.csv").read_text()

    shown = pdf_text(produced["pdf"])  # the answer's line was really read
    assert "calibrated probability" in shown or "Answer withheld" in shown
    for name, data in produced.items():
        assert not raw_leaks(data, needles), (name, raw_leaks(data, needles))
    assert not leaks(pdf_text(produced["pdf"]), needles)
    assert not leaks(png_text(produced["png"]), needles)
    assert not leaks(csv_text, needles), leaks(csv_text, needles)
    assert not leaks(caplog.text, needles)


# ----------------------------------------------------------------------------- in memory

class _WriteGuard:
    """Fails on any attempt to open a file for writing or to create a temporary file."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.attempts: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def guarded_open(file, mode="r", *args, **kwargs):
            if isinstance(mode, str) and any(c in mode for c in "wax+"):
                self.attempts.append(f"open({file!r}, {mode!r})")
                raise AssertionError(f"a file was opened for writing: {file!r}")
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(path, flags, *args, **kwargs):
            if flags & self.WRITE_FLAGS:
                self.attempts.append(f"os.open({path!r}, {flags:#o})")
                raise AssertionError(f"a file was opened for writing: {path!r}")
            return real_os_open(path, flags, *args, **kwargs)

        def refuse(name):
            def f(*args, **kwargs):
                self.attempts.append(f"tempfile.{name}")
                raise AssertionError(f"tempfile.{name} was called")
            return f

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)
        monkeypatch.setattr(os, "open", guarded_os_open)
        for name in ("NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile", "mkstemp",
                     "mkdtemp", "TemporaryDirectory"):
            monkeypatch.setattr(tempfile, name, refuse(name))


@pytest.mark.parametrize("rel", ["dicom/mprage-series/100.dcm", "dicom/transfer-syntaxes/1.dcm",
                                 "dicom/transfer-syntaxes/4.dcm", "dicom/transfer-syntaxes/9.dcm",
                                 "brain-mri/glioma"])
def test_uploads_are_decoded_in_memory(data_dir: Path, rel: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """load_scan(bytes) + preprocess writes no file (4.dcm: RLE, 9.dcm: JPEG 2000, both through
    native decoders; a JPEG through OpenCV). The temporary folder (for Python and, by TMPDIR,
    for native code) and the working folder are private and empty, so another test process
    writing into the shared /tmp cannot hide or fake a write."""
    path = require(data_dir / rel)
    if path.is_dir():
        path = sorted(path.glob("*.jpg"))[0]
    data = path.read_bytes()
    expected = preprocess(load_scan(data), PreprocessSpec()).array  # imports done before the guard
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir()
    cwd.mkdir()
    with monkeypatch.context() as m:
        m.setenv("TMPDIR", str(tmp))
        m.setattr(tempfile, "tempdir", str(tmp))
        m.chdir(cwd)
        _decode_under_guard(data, expected, tmp)


def _decode_under_guard(data: bytes, expected, tmp: Path) -> None:
    monkeypatch = pytest.MonkeyPatch()
    before = {p.name for p in tmp.iterdir()}
    cwd_before = {p.name for p in Path.cwd().iterdir()}

    guard = _WriteGuard(monkeypatch)
    try:
        pre = preprocess(load_scan(data), PreprocessSpec())
    finally:
        monkeypatch.undo()

    assert not guard.attempts, guard.attempts
    assert np.array_equal(pre.array, expected)
    new_tmp = {p.name for p in tmp.iterdir()} - before
    assert not new_tmp, f"new files in {tmp}: {sorted(new_tmp)}"
    assert {p.name for p in Path.cwd().iterdir()} - cwd_before == set()


def test_write_guard_catches_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: the guard above really sees the usual ways of writing a file."""
    guard = _WriteGuard(monkeypatch)
    for write in (lambda: open(tmp_path / "a", "wb"), lambda: (tmp_path / "b").write_bytes(b"x"),
                  lambda: tempfile.NamedTemporaryFile(), lambda: tempfile.mkstemp(),
                  lambda: os.open(tmp_path / "c", os.O_CREAT | os.O_WRONLY)):
        with pytest.raises(AssertionError):
            write()
    monkeypatch.undo()
    assert len(guard.attempts) == 5
    assert not list(tmp_path.iterdir())


def test_series_summary_report_and_logs_hold_no_identifying_value(mprage_files, needles,
                                                                   brain_predictor, caplog,
                                                                   capfd) -> None:
    """The whole MPRAGE series through the series path: the study, its labels and findings, the
    summary, the by-series and slice CSVs, the series report (PNG and PDF) and every log line."""
    from medcls.engine.report import ClinicianVerdict, render_series_report
    from medcls.engine.series import answer_series, slice_explanation, write_records_csv
    from medcls.io.gather import gather
    from medcls.io.sources import bytes_source

    caplog.set_level(logging.DEBUG)
    study = gather([bytes_source(f"slice-{i}", f.read_bytes()) for i, f in enumerate(mprage_files)])
    answer = answer_series(brain_predictor, study.series[0])
    i = answer.summary.most_suspicious
    scan = answer.series.scan(i)
    explanation = slice_explanation(brain_predictor, answer, i)
    buf = io.StringIO()
    write_records_csv([answer.as_record()], buf)
    write_records_csv(answer.slice_records(), buf)
    texts = [repr(study.series), answer.series.label, str(answer.series.metadata),
             answer.summary.text, str([f.message for f in study.all_findings]), buf.getvalue()]
    assert "Series 3 · MR" in answer.series.label  # the texts searched are the real ones
    for fmt in ("png", "pdf"):
        said = ClinicianVerdict("disagree", "reader@hospital.test", "2026-12-07 08:40 UTC",
                                "meningioma", "reviewed by hand", on="slice 3 of 24")
        data = render_series_report(answer, display_image(scan), explanation, i, fmt=fmt,
                                    clinician=said)
        assert not raw_leaks(data, needles), fmt
        texts.append(pdf_text(data) if fmt == "pdf" else png_text(data))
    pdf = texts[-1]  # the text the PDF shows, then its raw bytes
    assert "MedCLS series report" in pdf and answer.summary.text[:14] in pdf, pdf[:2000]
    # the reader's verdict, on the slice it was given on, in the series report
    assert "Clinician's verdict: Disagree (correct class: Meningioma) on slice 3 of 24, recorded " \
           "by reader@hospital.test" in " ".join(pdf.split()), pdf[:3000]
    out, err = capfd.readouterr()
    texts += [caplog.text, out, err]
    assert not leaks("\n".join(texts), needles)


# ----------------------------------------------------------------------------- PACS audit

def test_pacs_audit_holds_no_patient_data_only_instance_uids(mprage_files, needles, orthanc,
                                                              brain_predictor, tmp_path, caplog):
    """The MPRAGE series from a real Orthanc, reviewed and written to the audit store: one row
    per answered instance keyed by its SOP Instance UID (not patient data: the PACS holds it),
    and no other identifying value (the sample's name, ID, birth date, study date ...) in any
    table or in the database file's bytes."""
    import sqlalchemy as sa

    from medcls.integrations.audit import store as audit
    from medcls.integrations.audit.store import AuditStore
    from medcls.integrations.pacs.client import PacsClient
    from medcls.integrations.pacs.review import record_review, review_study

    caplog.set_level(logging.DEBUG)
    client = PacsClient(orthanc.settings())
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in mprage_files]
    study_uid = str(headers[0].StudyInstanceUID)
    if not client.search_studies(patient_id=str(headers[0].PatientID)):  # not stored yet
        client.store([pydicom.dcmread(f) for f in mprage_files])
    review = review_study(client, brain_predictor, study_uid)
    path = tmp_path / "audit.sqlite"
    store = AuditStore(f"sqlite:///{path}")
    ids = record_review(store, review, brain_predictor, "clin@hospital.test")
    with store.engine.connect() as c:
        text = repr([list(row) for t in audit.metadata.sorted_tables for row in c.execute(sa.select(t))])
    store.dispose()
    sops = {str(h.SOPInstanceUID) for h in headers}
    rows = AuditStore(f"sqlite:///{path}").rows("answers")
    from medcls.integrations.pacs.review import audit_key  # UIDs embed the exam's date-time

    assert len(ids) == len(rows) == 24 and {r["sop_instance_uid"] for r in rows} == {
        audit_key(u) for u in sops}
    assert not any(u in text for u in sops)
    others = {n: k for n, k in needles.items() if k != "SOPInstanceUID"}
    assert {"PatientName", "PatientID", "PatientBirthDate"} <= set(others.values())
    assert not leaks(text, others), leaks(text, others)
    data = b"".join(p.read_bytes() for p in tmp_path.glob("audit.sqlite*"))
    for uid in sops:  # the instance UIDs (the allowed key) embed the acquisition date: not a leak
        data = data.replace(uid.encode(), b"")
    assert not raw_leaks(data, others), raw_leaks(data, others)
    assert "Doe" not in text and not re.search(r"(?<![\d.])0123(?![\d.])", text)
    assert not leaks(caplog.text, needles)
