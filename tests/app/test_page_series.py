"""Series mode of the main page through AppTest. AppTest cannot drive the file uploader; the
page reads the open series from ``st.session_state["series_files"]`` ((name, bytes) pairs, where
an upload lands), so the tests put real files there."""

from __future__ import annotations

import io
import random
import zipfile

import pytest
from conftest import PROJECT_ROOT
from streamlit.testing.v1 import AppTest

APP = str(PROJECT_ROOT / "app.py")


pytestmark = pytest.mark.usefixtures("shipped_models")


def run_series(files: list[tuple[str, bytes]]) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=240)
    at.session_state["open_mode"] = "A series"
    at.session_state["series_files"] = files
    return at.run()


def texts(at) -> str:
    return " | ".join(str(x.value) for kind in (at.subheader, at.error, at.warning, at.success,
                                                 at.info, at.caption, at.markdown) for x in kind)


def shuffled_names(files: list[bytes]) -> list[tuple[str, bytes]]:
    order = list(range(len(files)))
    random.Random(5).shuffle(order)
    return [(f"IMG{k:04d}", files[i]) for k, i in enumerate(order)]


def test_series_mode_without_files_offers_the_upload():
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["open_mode"] = "A series"
    at.run()
    assert not at.exception
    assert any("Upload the slices of a series" in i.value for i in at.info)


def test_tumour_series_summary_strip_and_jump(built_series):
    files = built_series.dicom()
    at = run_series(shuffled_names(files) + [("copy", files[3])])
    assert not at.exception, texts(at)
    assert any(e.value.startswith("Tumour suspected: Meningioma") for e in at.error), texts(at)
    assert any("duplicate" in w.value for w in at.warning)
    assert any("mm³" in c.value for c in at.caption)  # 1 x 1 mm pixels, 5 mm slices: a volume
    # the strip, the linked viewer (slice and heatmap: shared zoom/pan) and the probabilities
    assert [c.key for c in at.get("plotly_chart")] == ["series_strip", "series_viewer", "series_probs"]
    slider = at.slider(key="series_slice")
    assert slider.value == 1 and slider.max == len(built_series.arrays)
    at.button(key="series_jump").click().run()
    assert not at.exception
    shown = at.slider(key="series_slice").value - 1
    assert shown in built_series.tumour
    assert any(s.value.startswith(f"Slice {shown + 1} of") for s in at.subheader)
    # one size per finding (issue 28.3): the segmentation's, as the report and the PACS give it,
    # never the heatmap region's beside it
    assert any(c.value.startswith("Tumour outline: area") and "mm²" in c.value
               and "(method: segmentation)" in c.value for c in at.caption), texts(at)
    assert not any("Region above" in c.value for c in at.caption)
    # keyboard-steppable slice buttons (k / j): one slice on, one back
    at.button(key="series_next").click().run()
    assert at.slider(key="series_slice").value == shown + 2
    at.button(key="series_prev").click().run()
    assert at.slider(key="series_slice").value == shown + 1
    # a normal slice: no region, the heatmap's meaning instead, and the explicit request
    at.slider(key="series_slice").set_value(1).run()
    assert not any("Region above" in c.value for c in at.caption)
    assert any("not a lesion" in c.value for c in at.caption)
    assert at.button(key="series_prev").disabled
    at.toggle(key="series_strongest").set_value(True).run()
    assert any("Region above" in c.value for c in at.caption), texts(at)


def test_a_zip_of_two_series_offers_a_series_picker(built_series, data_dir):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in shuffled_names(built_series.dicom()[:6]):
            zf.writestr(f"study/a/{name}", data)
        for p in sorted((data_dir / "dicom" / "mprage-series").glob("*.dcm"))[:8]:
            zf.writestr(f"study/b/{p.name}", p.read_bytes())
    at = run_series([("study.zip", buf.getvalue())])
    assert not at.exception, texts(at)
    picker = at.selectbox(key="series_choice")
    assert len(picker.options) == 2
    assert any("2 series" in i.value for i in at.info)
    picker.set_value(1).run()
    assert not at.exception
    assert at.slider(key="series_slice").max in (6, 8)


def test_one_scan_mode_is_unchanged(data_dir):
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["scan_bytes"] = (data_dir / "dicom" / "mprage-series" / "100.dcm").read_bytes()
    at.run()
    assert not at.exception
    assert not [s for s in at.slider if s.key == "series_slice"]
    assert any(a.value.startswith("**") and "calibrated probability" in a.value
               for kind in (at.success, at.warning, at.error) for a in kind)  # the verdict line
