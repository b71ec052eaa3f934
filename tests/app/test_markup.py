"""No markup from DICOM or PACS text (ui.common.plain), in Chromium with a request listener: a
DICOM whose Modality, Study and Series Description hold a markdown image and link pointing at
a local "canary" server is opened in series mode and from the PACS page (the main page refuses
a Modality that is not the model's before showing it);
the browser never asks the canary for anything, no link to it is clickable, and the text is
shown as written. (Before, the image was fetched with the app's address as Referer and the link
read "result verified".)"""

from __future__ import annotations

import copy
import http.server
import io
import re
import threading

import pydicom
import pytest
from appserver import run_pacs_study
from conftest import require
from pydicom.uid import generate_uid

from ui.common import plain

pytestmark = pytest.mark.browser
TIMEOUT = 180_000
PATIENT = "MEDCLS-MARKUP-1"


@pytest.fixture(scope="module")
def canary():
    """A local HTTP server that counts every request it gets (it should get none)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def hostile_series(canary, data_dir):
    """Three MPRAGE slices whose text attributes are markdown pointing at the canary."""
    url, _ = canary
    study, series = generate_uid(), generate_uid()
    out = []
    for path in sorted(require(data_dir / "dicom" / "mprage-series").glob("*.dcm"))[10:13]:
        ds = copy.deepcopy(pydicom.dcmread(path))
        ds.Modality = f"![m]({url}/modality.png)"
        ds.StudyDescription = f"![s]({url}/study.png) [result verified]({url}/study-link)"
        ds.SeriesDescription = f"[result verified]({url}/series-link) <img src={url}/img.png>"
        ds.PatientID = PATIENT
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def test_plain_escapes_markup():
    text = "![x](http://e.test/a.png) [ok](http://e.test) :red[x] $x$ <b>x</b> a_b*c*\n"
    escaped = plain(text)
    assert "](" not in escaped and "<b>" not in escaped and ":red[" not in escaped
    assert re.sub(r"\\(.)", r"\1", escaped).replace("\u200b", "") == text.replace("\n", " ")
    assert "://" not in escaped.replace("\\", "")  # no bare URL left for the autolinker


def _watch(page, url: str) -> list[str]:
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if r.url.startswith(url) else None)
    return asked


def _no_markup(page, url: str, asked: list[str], hits: list[str]) -> None:
    page.wait_for_timeout(1500)  # let any image load start
    found = page.locator(f'a[href^="{url}"], img[src^="{url}"]')
    assert found.count() == 0, [found.nth(i).evaluate("e => e.parentElement.outerHTML")
                                for i in range(found.count())]
    assert asked == [] and hits == [], (asked, hits)
    assert "Traceback" not in page.inner_text("body")


def test_series_mode_shows_dicom_text_as_text(app_server, chromium, canary, hostile_series,
                                             tmp_path):
    url, hits = canary
    srv = app_server()
    folder = tmp_path / "series"
    folder.mkdir()
    for i, data in enumerate(hostile_series):
        (folder / f"slice{i}.dcm").write_bytes(data)
    page = chromium.new_page(viewport={"width": 1400, "height": 2000})
    asked = _watch(page, url)
    page.goto(srv.url, timeout=TIMEOUT)
    page.get_by_text("A series", exact=True).click(timeout=TIMEOUT)
    page.get_by_text("A folder", exact=True).click(timeout=TIMEOUT)
    box = page.locator('[data-testid="stFileUploaderDropzoneInput"][webkitdirectory]').first
    box.wait_for(state="attached", timeout=TIMEOUT)
    box.set_input_files(str(folder))
    # the series' facts name its modality: shown as written
    page.get_by_text("![m](http:", exact=False).first.wait_for(timeout=TIMEOUT)
    _no_markup(page, url, asked, hits)
    page.close()


def test_pacs_page_shows_pacs_text_as_text(app_server, orthanc, chromium, canary,
                                           hostile_series):
    from medcls.integrations.pacs.client import PacsClient

    url, hits = canary
    PacsClient(orthanc.settings()).store([pydicom.dcmread(io.BytesIO(b)) for b in hostile_series])
    srv = app_server(**orthanc.env())
    page = chromium.new_page(viewport={"width": 1500, "height": 2200})
    asked = _watch(page, url)
    run_pacs_study(page, srv.url, PATIENT, TIMEOUT)
    # the study's description in the results' title, as written (a zero-width space breaks the
    # URL for the autolinker, so the text is matched up to it)
    page.get_by_role("heading").filter(has_text="Results:").filter(
        has_text="![s](http:").first.wait_for(timeout=TIMEOUT)
    _no_markup(page, url, asked, hits)
    page.close()
