"""The audit trail through the pages (AppTest): every answer shown is recorded, the verdict
control stores the clinician's verdict, a locked or read-only database leaves the answer on
screen with a clear message, the Monitoring page reads the trail, and no identifying value
of the MPRAGE series (Doe^John, 0123, the birth date) reaches any table."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import sqlite3

import pytest
from audit_helpers import answer, read_only_db
from conftest import PROJECT_ROOT, require
from streamlit.testing.v1 import AppTest

from medcls.integrations.audit import store as audit
from medcls.integrations.audit.store import AuditStore
from medcls.io.dicom_tags import identifying_attributes

APP = str(PROJECT_ROOT / "app.py")
BATCH = str(PROJECT_ROOT / "pages" / "2_Batch_review.py")
MONITORING = str(PROJECT_ROOT / "pages" / "9_Monitoring.py")
COMPARE = str(PROJECT_ROOT / "pages" / "1_Compare_models.py")
TIMEOUT = 180


@pytest.fixture
def db(monkeypatch, tmp_path, brain_model_dir):
    """A fresh audit database for the page under test."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    monkeypatch.setenv("MEDCLS_DATABASE_URL", url)
    monkeypatch.setenv("MEDCLS_MODELS", str(brain_model_dir.parent))
    monkeypatch.syspath_prepend(str(PROJECT_ROOT))
    return url


def open_page(path: str, **state) -> AppTest:
    at = AppTest.from_file(path, default_timeout=TIMEOUT)
    for k, v in state.items():
        at.session_state[k] = v
    return at.run()


def texts(at) -> str:
    return " | ".join(str(x.value) for kind in (at.subheader, at.error, at.warning, at.success,
                                                 at.info, at.caption, at.markdown) for x in kind)


def brain_scan(data_dir, label="meningioma"):
    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["split"] == "test" and r["label"] == label)
    return data_dir / "brain-mri" / row["file"]


def verdict(at, choice: str, corrected: str | None = None, note: str = "") -> AppTest:
    at.radio(key=next(r.key for r in at.radio if r.key.endswith("_choice"))).set_value(choice)
    at.selectbox(key=next(s.key for s in at.selectbox if s.key.endswith("_class"))).set_value(corrected)
    if note:
        at.text_input(key=next(t.key for t in at.text_input if t.key.endswith("_note"))).input(note)
    next(b for b in at.button if b.label == "Save verdict").click()
    return at.run()


def verdict_line(at) -> str | None:
    """The page's one-line verdict (class and calibrated probability, or withheld)."""
    found = [a.value for kind in (at.success, at.warning, at.error) for a in kind
             if a.value.startswith("**") and ("calibrated probability" in a.value
                                               or "Answer withheld" in a.value)]
    return found[0] if found else None


def test_main_page_records_the_answer_and_the_verdict(db, data_dir, brain_model_dir):
    path = brain_scan(data_dir)
    data = path.read_bytes()
    at = open_page(APP, scan_bytes=data)
    assert not at.exception, texts(at)
    from medcls.engine.present import class_name

    rows = AuditStore(db).rows("answers")
    assert len(rows) == 1
    row = rows[0]
    assert class_name(None, row["predicted"]) in verdict_line(at) or row["withheld"]
    assert row["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert row["input_source"] == "upload" and row["input_path"] is None
    results = at.session_state["_results"]  # the page's own result (explanation first)
    assert len(results) == 1
    expl = next(iter(results.values()))[0]
    assert row["probabilities"] == pytest.approx(dict(zip(expl.prediction.classes,
                                                          map(float, expl.prediction.probabilities))))
    assert (row["user"], row["page"], row["heatmap_method"]) == ("local", "main", "gradcam")
    assert len(row["model_sha256"]) == 64
    # the tumour's size as shown: the segmentation's (a JPEG has no spacing, so no mm); none for
    # a no-tumour or withheld answer
    shown_tumour = row["predicted"] != "no_tumor" and not row["withheld"]
    assert row["region_method"] == ("segmentation" if shown_tumour else None)
    assert row["region_area_mm2"] is None and row["region_diameter_mm"] is None

    # a rerun (another widget) does not record the same answer again
    at.slider(key="alpha").set_value(0.6).run()
    assert len(AuditStore(db).rows("answers")) == 1

    # the verdict control starts with no choice: Save without one records nothing (issue 28.4)
    choice = next(r for r in at.radio if r.key.endswith("_choice"))
    assert choice.value is None and choice.index is None
    next(b for b in at.button if b.label == "Save verdict").click()
    at.run()
    assert any("Choose Agree, Disagree or Unsure first" in w.value for w in at.warning), texts(at)
    assert AuditStore(db).rows("verdicts") == []

    other = next(c for c in expl.prediction.classes if c != row["predicted"])
    at = verdict(at, "disagree", other, note="rim enhancement")
    assert not at.exception
    assert any("Verdict saved" in s.value for s in at.success), texts(at)
    v = AuditStore(db).rows("verdicts")
    assert [(x["answer_id"], x["verdict"], x["corrected_class"], x["note"], x["user"]) for x in v] \
        == [(row["id"], "disagree", other, "rim enhancement", "local")]
    # disagreeing without the class is refused with a message, nothing stored
    at = verdict(at, "disagree")
    assert any("needs the class" in e.value for e in at.error)
    assert len(AuditStore(db).rows("verdicts")) == 1


def test_main_page_audits_the_segmentation_size_of_a_dicom_tumour(db, tmp_path, data_dir):
    """A DICOM with pixel spacing: the audit row carries the segmentation's area and longest
    diameter in mm, the same figures the page shows; a no-tumour answer on the same page none."""
    import numpy as np
    from dicom_factory import mr_slice, to_bytes
    from PIL import Image

    gray = np.asarray(Image.open(brain_scan(data_dir, "meningioma")).convert("L"), np.uint16) * 16
    data = to_bytes(mr_slice(gray, position=(0.0, 0.0, 0.0), spacing=(0.49, 0.49)))
    at = open_page(APP, scan_bytes=data)
    assert not at.exception, texts(at)
    row = AuditStore(db).rows("answers")[0]
    if row["predicted"] == "no_tumor" or row["withheld"]:
        pytest.skip("the model did not answer a tumour on this slice")
    assert row["region_method"] == "segmentation"
    caption = next(c.value for c in at.caption if c.value.startswith("Tumour outline"))
    assert f"area {row['region_area_mm2']:.0f} mm²" in caption, caption
    assert f"longest diameter {row['region_diameter_mm']:.1f} mm" in caption, caption


def test_series_view_records_the_shown_slice_and_the_verdict(db, built_series):
    """Issue 20 on the series view: the shown slice's answer is recorded once (page "series",
    the slice's SHA-256), the same verdict control stores the clinician's verdict on it."""
    files = [(f"IM{k:04d}", data) for k, data in enumerate(built_series.dicom())]
    at = open_page(APP, open_mode="A series", series_files=files)
    assert not at.exception, texts(at)
    at.button(key="series_jump").click().run()  # the most suspicious slice: a tumour answer
    assert not at.exception, texts(at)
    rows = [r for r in AuditStore(db).rows("answers") if r["page"] == "series"]
    assert rows, texts(at)
    shown = at.slider(key="series_slice").value
    row = rows[-1]
    assert row["input_sha256"] == hashlib.sha256(files[shown - 1][1]).hexdigest()
    assert row["predicted"] == built_series.tumour_class and row["user"] == "local"
    n = len(rows)
    at.slider(key="alpha").set_value(0.6).run()  # a rerun records nothing new
    assert len([r for r in AuditStore(db).rows("answers") if r["page"] == "series"]) == n
    other = next(c for c in row["probabilities"] if c != row["predicted"])
    at = verdict(at, "disagree", other, note="series check")
    assert not at.exception
    assert any("Verdict saved" in s.value for s in at.success), texts(at)
    v = AuditStore(db).rows("verdicts")
    assert [(x["answer_id"], x["verdict"], x["corrected_class"], x["note"]) for x in v] \
        == [(row["id"], "disagree", other, "series check")]


def test_compare_page_records_each_model_answer(db, data_dir):
    data = brain_scan(data_dir, "glioma").read_bytes()
    at = open_page(COMPARE, scan_bytes=data)
    assert not at.exception, texts(at)
    shown = [m.value for m in at.markdown  # each model's verdict line
             if m.value.startswith("**Answer withheld")
             or (m.value.startswith("**") and m.value.endswith((" · confident", " · uncertain")))]
    rows = AuditStore(db).rows("answers")
    assert len(rows) == len(shown) >= 2
    assert {r["page"] for r in rows} == {"compare"}
    assert {r["input_sha256"] for r in rows} == {hashlib.sha256(data).hexdigest()}
    assert len({r["model_name"] for r in rows}) == len(rows)
    at.slider(key="cmp_alpha").set_value(0.3).run()  # a rerun records nothing new
    assert len(AuditStore(db).rows("answers")) == len(rows)


def test_a_locked_database_leaves_the_answer_on_screen(db, data_dir, monkeypatch):
    monkeypatch.setattr(audit, "BUSY_TIMEOUT_S", 0.5)
    AuditStore(db).rows("answers")  # the database exists
    holder = sqlite3.connect(db.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        at = open_page(APP, scan_bytes=brain_scan(data_dir).read_bytes())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert not at.exception
    assert verdict_line(at), texts(at)
    assert any("is locked by another program" in w.value for w in at.warning), texts(at)
    assert "cannot be recorded" in texts(at)
    assert {c.key for c in at.get("plotly_chart")} == {"viewer", "probs"}  # images and bars


def test_a_read_only_database_leaves_the_answer_on_screen(tmp_path, monkeypatch, data_dir,
                                                          brain_model_dir):
    url, undo = read_only_db(tmp_path)
    monkeypatch.setenv("MEDCLS_DATABASE_URL", url)
    monkeypatch.setenv("MEDCLS_MODELS", str(brain_model_dir.parent))
    try:
        at = open_page(APP, scan_bytes=brain_scan(data_dir, "pituitary").read_bytes())
    finally:
        undo()
    assert not at.exception
    assert verdict_line(at), texts(at)
    assert any(re.search("read-only|cannot be opened", w.value) for w in at.warning), texts(at)


def test_sign_in_configured_asks_for_it_first(db, data_dir):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.secrets["auth"] = {"redirect_uri": "http://127.0.0.1:1/oauth2callback",
                          "cookie_secret": "x" * 32, "client_id": "medcls",
                          "client_secret": "s", "server_metadata_url": "http://127.0.0.1:1/x"}
    at.session_state["scan_bytes"] = brain_scan(data_dir).read_bytes()
    at.run()
    assert not at.exception
    assert any("Sign in to use MedCLS" in i.value for i in at.info)
    assert [b.label for b in at.button] == ["Sign in"]
    assert not at.subheader and AuditStore(db).rows("answers") == []  # nothing was classified


def test_monitoring_page_reads_the_trail(db):
    store = AuditStore(db)
    ids = store.record_answers([answer(0, "glioma"), answer(1, "glioma", withheld=True),
                                answer(2, "meningioma", low_confidence=True)])
    store.record_verdict(ids[0], "c@h.test", "agree")
    store.record_verdict(ids[1], "c@h.test", "disagree", "pituitary", note="=1+1")
    at = open_page(MONITORING)
    assert not at.exception, texts(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Answers"] == "3" and metrics["With a verdict"] == "2"
    assert metrics["Agreement"] == "50%"
    dis = at.dataframe[-1].value
    assert dis["answer_id"].tolist() == [ids[1]] and dis["input_sha256"].tolist() == [f"{1:064x}"]
    assert len(at.get("plotly_chart")) == 3  # per day, drift, confusion matrix
    assert at.get("download_button")
    # the classes by the names the screen uses, a withheld answer as "Withheld" (issue 28.14)
    agreement = at.dataframe[0].value
    assert set(agreement["answer"]) == {"Glioma", "Withheld", "Meningioma"}
    assert dis["answer"].tolist() == ["Withheld"] and dis["clinician's class"].tolist() == ["Pituitary"]
    # the audit file by its name, never its server path
    where = [c.value for c in at.caption if c.value.startswith("Audit trail:")]
    assert where == ["Audit trail: SQLite file audit.sqlite"], where


def test_no_identifying_value_reaches_any_table(db, data_dir, tmp_path, monkeypatch):
    """The MPRAGE series carries a sample patient's tags. Classify it on the main page (with
    the tags shown on screen) and review it as a server folder, record verdicts and exports,
    then search every table's text and the database file's bytes for them."""
    series = sorted(require(data_dir / "dicom" / "mprage-series").glob("*.dcm"))
    needles = set()
    for f in series[:3]:
        for key, value in identifying_attributes(f).items():
            if key in ("PatientName", "PatientID", "PatientBirthDate") and value:
                needles |= {value, *value.split("^")}
    assert {"Doe^John", "0123"} <= needles and any(re.fullmatch(r"\d{8}", n) for n in needles)

    at = open_page(APP, scan_bytes=series[12].read_bytes(), show_phi=True)
    assert not at.exception
    assert "Doe^John" in str([j.value for j in at.json])  # shown on screen, on request
    at = verdict(at, "unsure", note="looked at it")
    at.session_state["scan_bytes"] = series[3].read_bytes()
    at.run()

    root = tmp_path / "scans"
    (root / "mprage").mkdir(parents=True)
    for f in series:
        (root / "mprage" / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("MEDCLS_SCAN_ROOT", str(root))
    bt = open_page(BATCH)
    bt.text_input(key="batch_folder").input("mprage")
    bt.button(key="batch_start_folder").click()
    bt.run()
    assert not bt.exception and bt.session_state["batch_job"].state == "done"
    # the worklist's verdict control: select a row, disagree
    table = bt.dataframe[0]
    bt.session_state[table.key] = {"selection": {"rows": [table.value["file"].tolist().index("105.dcm")],
                                                 "columns": [], "cells": []}}
    bt.run()
    predicted = next(r.predicted for r in bt.session_state["batch_job"].rows if r.file == "105.dcm")
    other = next(c for c in bt.session_state["batch_job"].classes if c != predicted)
    bt = verdict(bt, "disagree", other, note="worklist check")
    assert any("Verdict saved" in x.value for x in bt.success), texts(bt)

    store = AuditStore(db)
    answers = store.rows("answers")
    assert len(answers) == 2 + 24
    folder_rows = [a for a in answers if a["input_source"] == "server-folder"]
    assert sorted(a["input_path"] for a in folder_rows) == sorted(f"mprage/{f.name}" for f in series)
    v = store.rows("verdicts")[-1]
    judged = next(a for a in answers if a["id"] == v["answer_id"])
    assert (judged["input_path"], judged["page"], v["corrected_class"]) == ("mprage/105.dcm", "batch", other)
    text = " ".join(repr(store.rows(t)) for t in store.table_names())
    assert "looked at it" in text and "worklist check" in text  # the search sees the contents
    for n in needles:
        hit = re.search(r"(?<![0-9.])" + re.escape(n) + r"(?![0-9])", text) if n.isdigit() else n in text
        assert not hit, f"identifying value {n!r} in the audit tables"
    path = db.removeprefix("sqlite:///")
    raw = b"".join(open(p, "rb").read() for p in (path, path + "-wal") if os.path.exists(p))
    for n in needles:
        if not n.isdigit():  # short digit runs occur by chance in binary pages
            assert n.encode() not in raw
