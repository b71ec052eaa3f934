"""The PACS page in a real browser against a real Orthanc: search, run, send.

A copy of the MPRAGE series (new UIDs, its own patient id, the sample name kept) is stored by
STOW-RS; the app server gets the PACS settings through its environment."""

from __future__ import annotations

import copy
import re

import pydicom
import pytest
from appserver import OUTPUT, run_pacs_study
from conftest import require
from pydicom.uid import generate_uid

pytestmark = pytest.mark.browser
TIMEOUT = 180_000  # ms: the first run loads TensorFlow and the model
PATIENT = "MEDCLS-BROWSER-1"


@pytest.fixture(scope="module")
def study(orthanc, data_dir):
    from medcls.integrations.pacs.client import PacsClient

    study, series = generate_uid(), generate_uid()
    datasets = []
    for path in sorted(require(data_dir / "dicom" / "mprage-series").glob("*.dcm"))[8:16]:
        ds = copy.deepcopy(pydicom.dcmread(path))
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = PATIENT, study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(ds)
    PacsClient(orthanc.settings()).store(datasets)
    return study


@pytest.fixture(scope="module")
def pacs_app(app_server, orthanc):
    """The app pointed at the test Orthanc."""
    return app_server(**orthanc.env())


def test_pacs_page_search_run_send(pacs_app, study, orthanc, chromium):
    from medcls.integrations.pacs.client import PacsClient

    page = chromium.new_page(viewport={"width": 1500, "height": 2200})
    run_pacs_study(page, pacs_app.url, PATIENT, TIMEOUT)
    # the series view's summary box and strip (the same answer as the main page's)
    page.locator('[data-testid="stAlert"]').filter(has_text=re.compile(
        "Tumour suspected|No tumour seen|Cannot answer")).first.wait_for(timeout=TIMEOUT)
    page.locator(".js-plotly-plot").first.wait_for(timeout=TIMEOUT)
    page.get_by_text("Rule: Tumour suspected when at least").first.wait_for(timeout=TIMEOUT)
    page.get_by_role("button", name="Send results to PACS").click()
    page.get_by_text("Stored 2 object(s) in 2 new series.").wait_for(timeout=TIMEOUT)
    code = page.locator('[data-testid="stCode"]').first
    code.wait_for(timeout=TIMEOUT)
    page.wait_for_timeout(1500)  # let the chart and image paint before the screenshot
    page.screenshot(path=str(OUTPUT / "pacs.png"), full_page=True)
    assert "Traceback" not in page.inner_text("body")
    shown = code.inner_text()

    # the UIDs shown are the PACS's: the new SR and SC series are in the study
    results = [s for s in PacsClient(orthanc.settings()).search_series(study)
               if s.modality in ("SR", "OT")]
    assert len(results) == 2 and all(s.series_uid in shown for s in results)

    # a second run of the same study: recognised, nothing sent again
    page.get_by_role("button", name="Run").click()
    page.get_by_text("already in the PACS for this study").wait_for(timeout=TIMEOUT)
    assert page.get_by_role("button", name="Send results to PACS").count() == 0
    page.close()
    assert len([s for s in PacsClient(orthanc.settings()).search_series(study)
                if s.modality == "SR"]) == 1
    log = pacs_app.log_path.read_text()
    assert not [v for v in ("Doe^John", "Doe", PATIENT, study, "20180501", "YA_lab") if v in log]
