"""Series mode in a real browser: headless Chromium against ``streamlit run app.py``.

- a folder of DICOM slices (the built tumour series, shuffled names, a duplicate) through the
  folder picker: the summary, the viewer opening on the most suspicious slice, the strip;
- a healthy volunteer's FLAIR series (../shared/data/dicom/volunteer2-axial-flair) at 1400x1000
  and 1024x768: "not validated", never a tumour, the scope on screen, the image in the first
  screen; 30 slices scrolled with the wheel and the arrow keys with no message to the server
  while scrolling (counted on the page's websocket and HTTP requests);
- window/level by right-drag and typed values, the ruler (within 1% of the length from the
  file's own PixelSpacing) and the ellipse's mean/SD (against the file's values);
- a second folder replaces the first; three series of one study side by side.

Screenshots go to test-output/ (series.png, series-flair*.png, series-side.png); with
MEDCLS_UPDATE_SCREENSHOTS=1 also to docs/screenshots/. The scroll timing is written to
test-output/series_scroll.json (the benchmark, bench/speed.py --app, measures it; it is not
asserted here)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time

import numpy as np
import pydicom
import pytest
from appserver import OUTPUT, PROJECT_ROOT

pytestmark = pytest.mark.browser
TIMEOUT = 240_000
LAPTOP = {"width": 1024, "height": 768}
DESKTOP = {"width": 1400, "height": 1000}
VOLUNTEER = ("volunteer2-axial-flair", "volunteer2-axial-t2gre", "volunteer2-sagittal-t1")


def shot(page, name: str, full_page: bool = False) -> None:
    page.wait_for_timeout(800)
    page.screenshot(path=str(OUTPUT / name), full_page=full_page)
    if os.environ.get("MEDCLS_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(OUTPUT / name, PROJECT_ROOT / "docs" / "screenshots" / name)


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


@pytest.fixture(scope="module")
def volunteer(data_dir):
    """The three series of the healthy volunteer (real DICOM, real name in the tags)."""
    folders = {name: data_dir / "dicom" / name for name in VOLUNTEER}
    for f in folders.values():
        if not f.is_dir():
            pytest.skip(f"test data not found: {f}")
    return folders


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory, volunteer):
    """One folder holding the volunteer's three series (copies, in a temporary folder)."""
    root = tmp_path_factory.mktemp("study") / "volunteer2"
    for name, src in volunteer.items():
        shutil.copytree(src, root / name)
    return root


def open_series_mode(page, url):
    page.goto(url, timeout=TIMEOUT)
    page.get_by_text("A series", exact=True).click(timeout=TIMEOUT)


def upload_folder(page, folder):
    """Pick ``folder`` in the series uploader (inside "Open another series" once one is open)."""
    other = page.get_by_text(re.compile(r"^Open another series"))
    if other.count():
        other.first.click()
    page.get_by_text("A folder", exact=True).last.click(timeout=TIMEOUT)
    box = page.locator('[data-testid="stFileUploaderDropzoneInput"][webkitdirectory]').first
    box.wait_for(state="attached", timeout=TIMEOUT)
    box.set_input_files(str(folder))


def stack_frame(page, nth: int = 0):
    """The n-th stack viewer's frame, once every slice is decoded in the browser."""
    page.locator('iframe[src*="medcls_stack"]').nth(nth).wait_for(timeout=TIMEOUT)
    frames = [f for f in page.frames if "medcls_stack" in f.url]
    deadline = time.monotonic() + TIMEOUT / 1000
    while len(frames) <= nth and time.monotonic() < deadline:
        page.wait_for_timeout(200)
        frames = [f for f in page.frames if "medcls_stack" in f.url]
    frame = frames[nth]
    frame.wait_for_function("() => window.medclsStack && window.medclsStack.state().n > 0 && "
                            "window.medclsStack.state().decoded === window.medclsStack.state().n",
                            timeout=TIMEOUT)
    return frame


def state(frame) -> dict:
    return frame.evaluate("window.medclsStack.state()")


def iframe_box(page, nth: int = 0) -> dict:
    return page.locator('iframe[src*="medcls_stack"]').nth(nth).bounding_box()


def to_page(page, frame, x: float, y: float, panel: int = 0, nth: int = 0) -> tuple[float, float]:
    """Image (display pixel) coordinates of the shown slice -> page coordinates."""
    cx, cy = frame.evaluate(f"window.medclsStack.toClient({x}, {y}, {panel})")
    box = iframe_box(page, nth)
    return box["x"] + cx, box["y"] + cy


def canvas_box(page, frame, nth: int = 0) -> dict:
    r = frame.locator("canvas.view").first.bounding_box()  # page coordinates
    return r


def settle(page) -> None:
    page.wait_for_function(
        "() => !/Running/.test(document.querySelector('[data-testid=\"stStatusWidget\"]')?.innerText || '')",
        timeout=TIMEOUT)


class Traffic:
    """Every websocket frame the page sends and every HTTP request it makes, with the time."""

    def __init__(self, page):
        self.sent: list[float] = []
        self.received: list[tuple[float, int]] = []
        self.requests: list[tuple[float, str]] = []

        def watch(ws):
            ws.on("framesent", lambda _: self.sent.append(time.monotonic()))
            ws.on("framereceived", lambda p: self.received.append((time.monotonic(), len(p))))

        page.on("websocket", watch)
        page.on("request", lambda r: self.requests.append((time.monotonic(), r.url)))

    def between(self, t0: float, t1: float) -> tuple[int, list[str]]:
        return (sum(1 for t in self.sent if t0 <= t <= t1),
                [u for t, u in self.requests if t0 <= t <= t1])


# ----------------------------------------------------------------------------- a tumour series

def test_series_folder_upload_viewer_and_strip(app_server, chromium, series_folder, built_series):
    server = app_server()
    page = chromium.new_page(viewport=DESKTOP)
    open_series_mode(page, server.url)
    upload_folder(page, series_folder)
    page.get_by_text(re.compile(r"^Tumour suspected: meningioma", re.I)).wait_for(timeout=TIMEOUT)
    page.get_by_text("duplicate slice").first.wait_for(timeout=TIMEOUT)
    frame = stack_frame(page)
    st = state(frame)
    assert st["n"] == len(built_series.arrays)
    assert st["slice"] in built_series.tumour  # it opens on the most suspicious slice
    info = frame.locator(".info").inner_text()
    assert f"Slice {st['slice'] + 1} of {st['n']}" in info
    assert "Meningioma" in info  # the run class's map, and the segmentation's size (one size)
    assert re.search(r"Yellow: tumour outline: area \d+ mm².*method: segmentation", info), info
    strip = page.locator(".js-plotly-plot").first
    strip.wait_for(timeout=TIMEOUT)
    assert strip.locator(".scatterlayer .trace").count() >= 4  # one line per class
    # a normal slice: no region, the heatmap's meaning instead
    frame.locator("#root").focus()
    frame.locator("#root").press("Home")
    info = frame.locator(".info").inner_text()
    assert "Slice 1 of" in info and "outline" not in info and "not a lesion" in info
    frame.locator("#root").press("m")  # back to the most suspicious slice
    assert state(frame)["slice"] in built_series.tumour
    settle(page)
    shot(page, "series.png")
    assert page.get_by_text("Traceback").count() == 0
    page.close()


# ----------------------------------------------------------------------------- a FLAIR series

@pytest.mark.parametrize("size", [DESKTOP, LAPTOP], ids=["1400x1000", "1024x768"])
def test_flair_series_is_not_validated_and_scrolls_in_the_browser(app_server, chromium, volunteer,
                                                                  size):
    server = app_server()
    page = chromium.new_page(viewport=size)
    traffic = Traffic(page)
    open_series_mode(page, server.url)
    upload_folder(page, volunteer["volunteer2-axial-flair"])
    summary = page.locator('[data-testid="stAlert"]').filter(has_text="Not validated for this series")
    summary.first.wait_for(timeout=TIMEOUT)
    assert "FLAIR" in summary.first.inner_text()
    main = page.locator('[data-testid="stMain"]')
    scope = page.locator('[data-testid="stCaptionContainer"]').filter(has_text="This series:")
    scope.first.wait_for(timeout=TIMEOUT)
    assert "FLAIR" in scope.first.inner_text() and "T1-weighted" in scope.first.inner_text()
    assert "axial" in scope.first.inner_text()
    frame = stack_frame(page)
    st = state(frame)
    assert st["n"] == 30
    # the image is in the first screen (point 12): at least 200 px of it
    canvas = canvas_box(page, frame)
    assert canvas["y"] + 200 <= size["height"], canvas
    text = main.inner_text()
    assert "Tumour suspected:" not in text and "mm³" not in text
    tags = pydicom.dcmread(next(volunteer["volunteer2-axial-flair"].glob("*.dcm")))
    for part in re.split(r"[\^ ]+", str(tags.PatientName)):  # the volunteer's name stays in the tags
        assert len(part) < 3 or part.lower() not in text.lower(), "a patient tag reached the screen"
    shot(page, "series-flair.png" if size == DESKTOP else "series-flair-1024.png")

    # every slice: withheld, "not validated", no heatmap, no region, no tumour
    frame.locator("#root").focus()
    frame.locator("#root").press("Home")
    box = canvas_box(page, frame)
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    settle(page)
    page.wait_for_timeout(1500)  # the viewer's idle report (if any) is over
    t0 = time.monotonic()
    answers = set()
    for k in range(29):
        page.mouse.wheel(0, 100)
        if k % 7 == 0:
            answers.add(frame.locator(".answer").inner_text())
    frame.wait_for_function("() => window.medclsStack.state().slice === 29", timeout=10_000)
    scrolled_s = time.monotonic() - t0
    for _ in range(29):
        frame.locator("#root").press("ArrowUp")
    frame.wait_for_function("() => window.medclsStack.state().slice === 0", timeout=10_000)
    t1 = time.monotonic()
    frames_sent, requests = traffic.between(t0, t1)
    assert frames_sent == 0 and requests == [], (frames_sent, requests)  # no round trip per slice
    assert all(a.startswith("Not validated for this scan") and "FLAIR" in a for a in answers), answers
    info = frame.locator(".info").inner_text()
    assert "Heatmap hidden" in info and "white outline" not in info
    # cine: space plays and pauses, in the browser too
    frame.locator("#root").press(" ")
    frame.wait_for_function("() => window.medclsStack.state().slice >= 3", timeout=10_000)
    frame.locator("#root").press(" ")
    assert not state(frame)["playing"]
    t1 = time.monotonic()
    frames_sent, requests = traffic.between(t0, t1)
    assert frames_sent == 0 and requests == [], (frames_sent, requests)
    if size == DESKTOP:
        (OUTPUT / "series_scroll.json").write_text(json.dumps(
            {"slices": 30, "wheel_30_slices_s": scrolled_s, "keys_30_slices_s": t1 - t0 - scrolled_s,
             "load_average_1min": os.getloadavg()[0]}))
    # once the reader pauses, the page learns the slice (one message, not one per slice); its
    # rerun does not send the series again (the browser keeps the message; only its hash comes)
    page.wait_for_timeout(3000)
    settle(page)
    assert len(traffic.sent) >= 1
    biggest = max(n for _, n in traffic.received)
    assert biggest > 1_000_000  # the series, once
    assert max(n for t, n in traffic.received if t > t1) < 100_000
    page.close()


def test_window_level_ruler_and_ellipse(app_server, chromium, volunteer):
    server = app_server()
    page = chromium.new_page(viewport=DESKTOP)
    traffic = Traffic(page)
    open_series_mode(page, server.url)
    upload_folder(page, volunteer["volunteer2-axial-flair"])
    frame = stack_frame(page)
    shown = state(frame)["slice"]
    files = sorted(volunteer["volunteer2-axial-flair"].glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    # the slice shown, found by its position along the normal (the viewer's order)
    order = sorted(datasets, key=lambda d: float(np.dot(
        np.cross(np.array(d.ImageOrientationPatient[:3], float), np.array(d.ImageOrientationPatient[3:], float)),
        np.array(d.ImagePositionPatient, float))))
    ds = order[shown]
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    values = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1)) + \
        float(getattr(ds, "RescaleIntercept", 0))
    settle(page)
    page.wait_for_timeout(1500)

    # window/level: right-drag, in the browser only
    before = state(frame)
    x, y = to_page(page, frame, 100, 120)
    t0 = time.monotonic()
    page.mouse.move(x, y)
    page.mouse.down(button="right")
    page.mouse.move(x + 80, y + 40, steps=8)
    page.mouse.up(button="right")
    after = state(frame)
    assert after["width"] > before["width"] and after["center"] > before["center"]
    assert traffic.between(t0, time.monotonic())[0] == 0
    # typed values
    frame.locator('input[title^="Level"]').fill("300")
    frame.locator('input[title^="Level"]').press("Enter")
    frame.locator('input[title^="Window width"]').fill("600")
    frame.locator('input[title^="Window width"]').press("Enter")
    st = state(frame)
    assert (st["center"], st["width"]) == (300, 600)

    # the ruler: 200 x 120 display pixels (the FLAIR is sent at full size)
    frame.get_by_role("button", name="Ruler").click()
    a, b = (40.0, 60.0), (240.0, 180.0)
    page.mouse.move(*to_page(page, frame, *a))
    page.mouse.down()
    page.mouse.move(*to_page(page, frame, *b), steps=6)
    page.mouse.up()
    measured = state(frame)["measures"][-1]
    (ax, ay), (bx, by) = measured["a"], measured["b"]
    expected = math.hypot((bx - ax) * col_mm, (by - ay) * row_mm)
    assert abs(expected - math.hypot(200 * col_mm, 120 * row_mm)) < 0.01 * expected
    shown_text = next(t for t in frame.evaluate("window.medclsStack.measureText()") if t.startswith("Ruler"))
    length = float(re.search(r"([\d.]+) mm", shown_text).group(1))
    assert abs(length - expected) <= 0.01 * expected, (length, expected)

    # the ellipse: mean and SD of the file's own values inside it
    frame.get_by_role("button", name="Ellipse").click()
    page.mouse.move(*to_page(page, frame, 90, 100))
    page.mouse.down()
    page.mouse.move(*to_page(page, frame, 170, 160), steps=6)
    page.mouse.up()
    e = state(frame)["measures"][-1]
    (ax, ay), (bx, by) = e["a"], e["b"]
    cx, cy, rx, ry = (ax + bx) / 2, (ay + by) / 2, abs(bx - ax) / 2, abs(by - ay) / 2
    yy, xx = np.mgrid[0:values.shape[0], 0:values.shape[1]]
    inside = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1
    text = next(t for t in frame.evaluate("window.medclsStack.measureText()") if t.startswith("Ellipse"))
    mean, sd = (float(v) for v in re.search(r"mean ([\d.]+), SD ([\d.]+)", text).groups())
    assert abs(mean - values[inside].mean()) <= 0.01 * values[inside].mean(), (text, values[inside].mean())
    assert abs(sd - values[inside].std()) <= 0.02 * values[inside].std() + 0.5, (text, values[inside].std())
    page.close()


# ----------------------------------------------------------------------------- several series

def test_a_second_folder_replaces_the_first(app_server, chromium, volunteer):
    server = app_server()
    page = chromium.new_page(viewport=DESKTOP)
    open_series_mode(page, server.url)
    upload_folder(page, volunteer["volunteer2-axial-flair"])
    page.get_by_text(re.compile("now open: 30 files from volunteer2-axial-flair")).wait_for(timeout=TIMEOUT)
    frame = stack_frame(page)
    frame.locator("#root").focus()
    frame.locator("#root").press("End")
    page.wait_for_timeout(1500)
    upload_folder(page, volunteer["volunteer2-sagittal-t1"])
    page.get_by_text(re.compile("now open: 29 files from volunteer2-sagittal-t1")).wait_for(timeout=TIMEOUT)
    page.get_by_text(re.compile(r"a sagittal slice")).first.wait_for(timeout=TIMEOUT)
    settle(page)
    assert page.get_by_text("Series side by side").count() == 0  # one series, not two
    assert page.get_by_role("combobox", name="Series").count() == 0
    frame = stack_frame(page)
    st = state(frame)
    assert st["n"] == 29 and st["slice"] < 29
    assert f"Slice {st['slice'] + 1} of 29" in frame.locator(".info").inner_text()
    page.close()


def test_three_series_side_by_side(app_server, chromium, study_folder):
    server = app_server()
    page = chromium.new_page(viewport={"width": 1400, "height": 1100})
    open_series_mode(page, server.url)
    upload_folder(page, study_folder)
    page.get_by_text("Side by side").first.wait_for(timeout=TIMEOUT)
    page.get_by_text("Side by side").first.click()
    frames = [stack_frame(page, k) for k in range(3)]
    alerts = page.locator('[data-testid="stAlert"]').filter(has_text="Not validated for this series")
    alerts.nth(2).wait_for(timeout=TIMEOUT)
    texts = [alerts.nth(k).inner_text() for k in range(3)]
    assert any("FLAIR" in t for t in texts) and any("T2*" in t for t in texts)
    assert any("sagittal" in t for t in texts)
    main = page.locator('[data-testid="stMain"]').inner_text()
    assert "Tumour suspected:" not in main
    settle(page)
    shot(page, "series-side.png")
    # the axial series scroll together (by position in mm); the sagittal one stays where it is
    planes = [f.evaluate("window.medclsStack.state().n") for f in frames]
    before = [state(f)["slice"] for f in frames]
    sagittal = planes.index(29)
    axial = [k for k in range(3) if k != sagittal]
    frames[axial[0]].locator("#root").focus()
    frames[axial[0]].locator("#root").press("End")
    frames[axial[1]].wait_for_function(f"() => window.medclsStack.state().slice !== {before[axial[1]]}",
                                       timeout=10_000)
    assert state(frames[sagittal])["slice"] == before[sagittal]
    page.close()


def test_multiframe_with_short_pixel_data_shows_its_message_not_a_trace(app_server, chromium,
                                                                        tmp_path):
    """The security review's item 8: a multi-frame DICOM whose pixel data is shorter than its
    header says gave Streamlit's generic error box and a traceback in the server log."""
    from dicom_factory import synthetic_dicom

    path = tmp_path / "multiframe.dcm"
    path.write_bytes(synthetic_dicom(rows=32, cols=32, frames=4,
                                     pixel_data=b"\x01\x00" * (32 * 32 * 2), Modality="MR"))
    server = app_server()
    log_before = server.log_path.read_text()
    page = chromium.new_page(viewport=DESKTOP)
    open_series_mode(page, server.url)
    page.get_by_text("Upload the slices of a series").first.wait_for(timeout=TIMEOUT)
    settle(page)
    box = page.locator('[data-testid="stFileUploaderDropzoneInput"]:not([webkitdirectory])').first
    box.wait_for(state="attached", timeout=TIMEOUT)
    box.set_input_files(str(path))
    page.get_by_text("4 of 4 slices could not be read: The DICOM pixel data is damaged").wait_for(
        timeout=TIMEOUT)
    settle(page)
    main = page.locator('[data-testid="stMain"]').inner_text()
    assert "unexpected error" not in main and "Traceback" not in main
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "Traceback" not in server.log_path.read_text()[len(log_before):]
    page.close()
