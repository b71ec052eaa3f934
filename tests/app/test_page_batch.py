"""The batch review page (pages/2_Batch_review.py) driven through Streamlit's AppTest.

A tmp folder is the allowed scan root (MEDCLS_SCAN_ROOT); the review is started with the
folder text input and button, and the table and summary are checked against the files put
there. AppTest cannot drive st.file_uploader: the upload path is tested on the library
(tests/test_review.py::test_uploaded_folder_files_and_zip).
"""

from __future__ import annotations

import pytest
from conftest import PROJECT_ROOT, require

from ui import models

PAGE = PROJECT_ROOT / "pages" / "2_Batch_review.py"
TIMEOUT = 120


@pytest.fixture
def page(monkeypatch, tmp_path, brain_model_dir, data_dir):
    """An AppTest of the page with a scan root of 2 JPEGs + 1 text file + 1 DICOM (in a series
    subfolder) under ``study/``, and one JPEG outside the study folder."""
    from streamlit.testing.v1 import AppTest

    brain = require(data_dir / "brain-mri")
    jpegs = sorted((brain / "glioma").glob("*.jpg"))[-2:]
    dicom = require(data_dir / "dicom" / "mprage-series" / "100.dcm")
    root = tmp_path / "scans"
    (root / "study" / "series").mkdir(parents=True)
    for i, src in enumerate(jpegs):
        (root / "study" / f"img_{i}.jpg").write_bytes(src.read_bytes())
    (root / "study" / "readme.txt").write_text("not a scan")
    (root / "study" / "series" / "100.dcm").write_bytes(dicom.read_bytes())
    (root / "other.jpg").write_bytes(jpegs[0].read_bytes())
    (tmp_path / "outside").mkdir()

    monkeypatch.setenv("MEDCLS_SCAN_ROOT", str(root))
    monkeypatch.setenv("MEDCLS_MODELS", str(brain_model_dir.parent))
    monkeypatch.syspath_prepend(str(PROJECT_ROOT))  # the page imports ui from the app folder
    at = AppTest.from_file(str(PAGE), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def _metric(at, label: str) -> str:
    values = [m.value for m in at.metric if m.label == label]
    assert values, f"no metric {label!r}: {[m.label for m in at.metric]}"
    return values[0]


def _review(at, folder: str):
    at.text_input(key="batch_folder").input(folder)
    at.button(key="batch_start_folder").click()
    at.run()
    assert not at.exception, at.exception
    return at


def test_page_starts_with_an_invitation(page):
    assert not page.error
    assert any("start the review" in i.value for i in page.info)
    assert page.text_input(key="batch_folder").value == "."


def test_page_shows_the_scan_folder_by_name_not_its_server_path(page, tmp_path):
    """The scan root's absolute path tells anyone how the server is laid out: only its name."""
    shown = [e.value for kind in ("caption", "markdown", "info", "warning", "error")
             for e in getattr(page, kind)]
    assert any("`scans`" in text for text in shown), shown
    assert not [text for text in shown if str(tmp_path) in text]


def test_server_folder_review(page):
    at = _review(page, "study")
    assert not at.error, [e.value for e in at.error]
    job = at.session_state["batch_job"]
    assert job.state == "done"

    assert _metric(at, "Scans") == "4"
    assert _metric(at, "Unreadable") == "1"
    classes = job.classes
    from medcls.engine.present import class_name

    assert sum(int(_metric(at, class_name(job.card, c))) for c in classes) == 3
    assert int(_metric(at, "Needs attention")) >= 1

    table = at.dataframe[0].value
    assert len(table) == 4
    assert sorted(table["file"]) == ["img_0.jpg", "img_1.jpg", "readme.txt", "series/100.dcm"]
    for c in classes:
        assert f"p_{c}" in table.columns
    bad = table[table["file"] == "readme.txt"].iloc[0]
    assert isinstance(bad["error"], str) and bad["error"]
    good = table[table["error"].isna()]
    assert len(good) == 3 and set(good["predicted"]) <= set(classes)
    assert (good[[f"p_{c}" for c in classes]].sum(axis=1) - 1).abs().max() < 1e-5
    dcm = table[table["file"] == "series/100.dcm"].iloc[0]
    assert dcm["series_number"] == 3 and dcm["instance_number"] == 100
    assert any("4 of 4 scans" in c.value for c in at.caption)

    # the "needs attention only" filter keeps the unreadable file and the flagged ones
    at.toggle(key="batch_attention").set_value(True).run()
    assert not at.exception
    flagged = at.dataframe[0].value
    assert "readme.txt" in set(flagged["file"])
    assert len(flagged) == int(_metric(at, "Needs attention"))
    # a rerun does not recompute: the same job is still there
    assert at.session_state["batch_job"].id == job.id


def test_whole_root_by_default(page):
    at = _review(page, ".")
    assert _metric(at, "Scans") == "5"  # other.jpg + the study folder


@pytest.mark.parametrize("folder", ["..", "../outside", "study/../..", "/etc", "nope"])
def test_paths_outside_the_root_are_refused_and_the_page_keeps_working(page, folder):
    at = _review(page, folder)
    assert at.error, "no refusal message"
    assert any("allowed scan folder" in e.value for e in at.error)
    assert "batch_job" not in at.session_state
    # the page still works: a folder inside the root is reviewed next
    at = _review(at, "study/series")
    assert not at.error
    assert _metric(at, "Scans") == "1"
    assert at.dataframe[0].value["file"].tolist() == ["100.dcm"]


def test_refusal_keeps_earlier_results(page):
    at = _review(page, "study")
    job_id = at.session_state["batch_job"].id
    at = _review(at, "../outside")
    assert any("outside" in e.value for e in at.error)
    assert at.session_state["batch_job"].id == job_id
    assert len(at.dataframe[0].value) == 4


def test_missing_scan_root_is_explained(page, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDCLS_SCAN_ROOT", str(tmp_path / "missing"))
    page.run()
    assert not page.exception
    assert any("scan folder does not exist" in w.value for w in page.warning)
    assert page.button(key="batch_start_folder").disabled


def _select(at, file: str):
    """Select the table row of ``file`` (AppTest writes dataframe selections via session state)."""
    table = at.dataframe[0]
    position = table.value["file"].tolist().index(file)
    at.session_state[table.key] = {"selection": {"rows": [position], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, at.exception
    return at


def test_selected_row_shows_image_heatmap_and_report(page):
    at = _review(page, "study")
    at = _select(at, "series/100.dcm")
    assert any(h.value.replace("\\", "") == "Selected: series/100.dcm" for h in at.subheader)
    assert not at.error
    labels = [b.label for b in at.get("download_button")]
    assert any(label.startswith("Report for this scan (PDF)") for label in labels), labels
    charts = {c.key for c in at.get("plotly_chart")}
    assert {"batch_viewer", "batch_probs"} <= charts  # the linked viewer (scan + overlay), the bars
    # an unreadable row says why, without an image
    at = _select(at, "readme.txt")
    assert any("could not be read" in e.value for e in at.error)


def test_stop_keeps_the_rows_done(page):
    """What Stop's callback leads to: a running job whose stop was requested is closed as
    stopped on the next run, keeping its rows (AppTest runs a whole review in one run(), so a
    new job over the same sources is started by hand and advanced by one batch; the job
    itself is tested in tests/test_review.py)."""
    from medcls.engine.review import ReviewJob

    at = _review(page, "study")
    done = at.session_state["batch_job"]
    job = ReviewJob(_predictor(done.model_path), done.sources, done.origin, done.model_path,
                    batch_size=1)
    job.advance(0)  # one batch of one scan
    assert job.running and len(job.rows) == 1
    job.request_stop()  # what the Stop button's on_click does
    at.session_state["batch_job"] = job
    at.run()
    assert not at.exception, at.exception
    assert job.state == "stopped"
    assert any("3 scans were not reviewed" in w.value for w in at.warning)
    assert _metric(at, "Scans") == "1"
    assert len(at.dataframe[0].value) == 1
    assert not at.button(key="batch_start_folder").disabled


def _predictor(path):
    return models.load_predictor(path)  # the page's cached predictor: no second load


def test_scan_root_from_secrets(page, monkeypatch):
    """Without MEDCLS_SCAN_ROOT the page reads ``scan_root`` from st.secrets."""
    import os

    root = os.environ["MEDCLS_SCAN_ROOT"]
    monkeypatch.delenv("MEDCLS_SCAN_ROOT")
    page.secrets["scan_root"] = root
    at = _review(page, "study")
    assert not at.error
    assert _metric(at, "Scans") == "4"


def test_group_by_series(page, data_dir):
    """A folder with 6 MPRAGE slices (names in reverse order): one series row with its summary;
    slice rows on request, in body order, without patient tags."""
    import os
    from pathlib import Path

    mri = Path(os.environ["MEDCLS_SCAN_ROOT"]) / "mri"
    mri.mkdir()
    files = sorted((data_dir / "dicom" / "mprage-series").glob("*.dcm"))[:6]
    for k, f in enumerate(reversed(files)):
        (mri / f"x{k}.dcm").write_bytes(f.read_bytes())
    at = _review(page, "mri")
    at.toggle(key="batch_by_series").set_value(True).run()
    assert not at.exception, at.exception
    series = at.dataframe[0].value
    assert list(series["slices"]) == [6] and series["ordered_by"].iloc[0] == "position"
    assert series["summary"].iloc[0].startswith(("Tumour suspected", "No tumour seen",
                                                 "Cannot answer"))
    at.toggle(key="batch_series_slices").set_value(True).run()
    slices = at.dataframe[1].value
    assert list(slices["slice"]) == [1, 2, 3, 4, 5, 6] and "Doe" not in slices.to_csv()


# ----------------------------------------------------------------------------- issue 14

def test_worklist_in_triage_order_kept_when_filters_change(page):
    at = _review(page, "study")
    table = at.dataframe[0].value
    attention = table["needs_attention"].tolist()
    assert attention == sorted(attention, reverse=True)  # needs attention first
    assert table.iloc[0]["file"] == "readme.txt"  # the unreadable row, saying why in place
    assert table.iloc[0]["answer"].startswith("unreadable: ")
    assert "None" not in table["answer"].astype(str).tolist()
    calm = table[~table["needs_attention"]]["confidence"].tolist()
    assert calm == sorted(calm)  # then rising confidence
    # a filter keeps the order; another order is a choice of its own, kept too
    at.text_input(key="batch_name").input("img").run()
    assert at.dataframe[0].value["file"].tolist() == [f for f in table["file"] if "img" in f]
    at.selectbox(key="batch_sort").set_value("file").run()
    at.text_input(key="batch_name").input("").run()
    assert at.dataframe[0].value["file"].tolist() == sorted(table["file"])
    assert at.selectbox(key="batch_sort").value == "file"


def test_viewer_steps_through_the_rows_shown(page):
    at = _review(page, "study")
    files = at.dataframe[0].value["file"].tolist()
    at = _select(at, files[1])
    assert any(h.value.replace("\\", "") == f"Selected: {files[1]}" for h in at.subheader)
    assert any(a.value.startswith("**") and ("calibrated probability" in a.value or "withheld" in a.value)
               for kind in (at.success, at.warning, at.error) for a in kind)  # the verdict line
    at.button(key="batch_next").click().run()
    assert any(h.value.replace("\\", "") == f"Selected: {files[2]}" for h in at.subheader), [h.value for h in at.subheader]
    at.button(key="batch_prev").click().run()
    at.button(key="batch_prev").click().run()
    assert any(h.value.replace("\\", "") == f"Selected: {files[0]}" for h in at.subheader)
    assert at.button(key="batch_prev").disabled
    assert any("could not be read" in e.value for e in at.error)  # readme.txt, first in triage
