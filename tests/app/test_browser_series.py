"""Series mode in a real browser: headless Chromium against ``streamlit run app.py``. A folder of
DICOM slices (the built tumour series, shuffled names, a duplicate) is uploaded through the folder
picker; the summary, the strip and the jump to the most suspicious slice are checked. The
screenshot goes to test-output/series.png (README: docs/screenshots/series.png)."""

from __future__ import annotations

import random
import re

import pytest
from appserver import OUTPUT

pytestmark = pytest.mark.browser
TIMEOUT = 240_000


@pytest.fixture(scope="module")
def series_folder(tmp_path_factory, built_series):
    folder = tmp_path_factory.mktemp("upload") / "study"
    folder.mkdir()
    files = built_series.dicom()
    order = list(range(len(files)))
    random.Random(11).shuffle(order)
    for k, i in enumerate(order):
        (folder / f"IM{k:04d}").write_bytes(files[i])
    (folder / "IM9999").write_bytes(files[2])  # a duplicated slice
    return folder


def test_series_folder_upload_strip_and_jump(app_server, chromium, series_folder, built_series):
    server = app_server()
    page = chromium.new_page(viewport={"width": 1400, "height": 1900})
    page.goto(server.url, timeout=TIMEOUT)
    page.get_by_text("A series", exact=True).click(timeout=TIMEOUT)
    page.get_by_text("A folder", exact=True).click(timeout=TIMEOUT)
    box = page.locator('[data-testid="stFileUploaderDropzoneInput"][webkitdirectory]').first
    box.wait_for(state="attached", timeout=TIMEOUT)
    box.set_input_files(str(series_folder))
    page.get_by_text(re.compile(r"^Tumour suspected: Meningioma")).wait_for(timeout=TIMEOUT)
    page.get_by_text("duplicate slice").first.wait_for(timeout=TIMEOUT)
    strip = page.locator(".js-plotly-plot").first
    strip.wait_for(timeout=TIMEOUT)
    assert strip.locator(".scatterlayer .trace").count() >= 4  # one line per class
    assert strip.locator("path[style*='fill: rgb(214, 39, 40)']").count() >= 1 or \
        strip.locator(".shapelayer path").count() >= 2  # the shaded run (and the slice line)
    page.get_by_role("button", name="Jump to the most suspicious slice").click()
    heading = page.get_by_role("heading", name=re.compile(r"^Slice \d+ of 16"))
    heading.wait_for(timeout=TIMEOUT)
    page.wait_for_function("() => /Slice (7|8|9|10|11) of 16/.test(document.body.innerText)",
                           timeout=TIMEOUT)
    shown = int(re.search(r"Slice (\d+) of 16", heading.first.inner_text()).group(1)) - 1
    assert shown in built_series.tumour
    page.get_by_text(re.compile(r"^Tumour outline: area .*method: segmentation")).first.wait_for(timeout=TIMEOUT)
    page.locator(".js-plotly-plot").nth(2).wait_for(timeout=TIMEOUT)  # strip, viewer, bars
    page.wait_for_timeout(1500)
    page.screenshot(path=str(OUTPUT / "series.png"), full_page=True)
    assert page.get_by_text("Traceback").count() == 0
    page.close()
