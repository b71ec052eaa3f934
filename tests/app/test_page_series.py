"""Series mode of the main page through AppTest. AppTest cannot drive the file uploader; the
page reads the open series from ``st.session_state["series_files"]`` ((name, bytes) pairs, where
an upload lands), so the tests put real files there. The stack viewer is a component: its
arguments (every slice, its answer, heatmap and outlines) are read from the page, and the slice
the reader rests on is put where the viewer reports it (``st.session_state["series_viewer"]``)."""

from __future__ import annotations

import io
import json
import random
import zipfile

import pytest
from conftest import PROJECT_ROOT
from streamlit.testing.v1 import AppTest

APP = str(PROJECT_ROOT / "app.py")


pytestmark = pytest.mark.usefixtures("shipped_models")


def run_series(files: list[tuple[str, bytes]], **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=240)
    at.session_state["open_mode"] = "A series"
    at.session_state["series_files"] = files
    for k, v in state.items():
        at.session_state[k] = v
    return at.run()


def texts(at) -> str:
    return " | ".join(str(x.value) for kind in (at.subheader, at.error, at.warning, at.success,
                                                 at.info, at.caption, at.markdown) for x in kind)


def viewer_args(at, key: str = "series_viewer") -> dict:
    found = [e for e in at.main if getattr(e, "key", None) == key]
    if not found:  # side by side: inside columns
        found = [e for e in at.get("component_instance") if getattr(e, "key", None) == key]
    assert len(found) == 1, texts(at)
    return json.loads(found[0].proto.json_args)


def shuffled_names(files: list[bytes]) -> list[tuple[str, bytes]]:
    order = list(range(len(files)))
    random.Random(5).shuffle(order)
    return [(f"IMG{k:04d}", files[i]) for k, i in enumerate(order)]


def volunteer_files(data_dir, name: str) -> list[tuple[str, bytes]]:
    folder = data_dir / "dicom" / name
    if not folder.is_dir():
        pytest.skip(f"test data not found: {folder}")
    return [(f"{name}/{p.name}", p.read_bytes()) for p in sorted(folder.glob("*.dcm"))]


def test_series_mode_without_files_offers_the_upload():
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["open_mode"] = "A series"
    at.run()
    assert not at.exception
    assert any("Upload the slices of a series" in i.value for i in at.info)


def test_tumour_series_summary_viewer_and_strip(built_series):
    files = built_series.dicom()
    at = run_series(shuffled_names(files) + [("copy", files[3])])
    assert not at.exception, texts(at)
    assert any(e.value.lower().startswith("tumour suspected: meningioma") for e in at.error), texts(at)
    assert any("duplicate" in w.value for w in at.warning)
    assert any("mm³" in c.value for c in at.caption)  # 1 x 1 mm pixels, 5 mm slices: a volume
    assert [c.key for c in at.get("plotly_chart")] == ["series_strip"]
    args = viewer_args(at)
    data = args["data"]
    n = len(built_series.arrays)
    assert len(data["slices"]) == n and args["panels"] == 2
    assert data["start"] in built_series.tumour and data["most"] == data["start"]
    assert data["marks"]["run"] == [built_series.tumour.start, built_series.tumour.stop]
    assert data["position_unit"] == "mm"
    assert [s["position"] for s in data["slices"]] == sorted(s["position"] for s in data["slices"])
    # every slice is there, with its own answer; the run's slices carry the run class's map,
    # its region and the segmentation's outline; a normal slice only what drove "no tumour"
    run = data["slices"][data["start"]]
    assert run["answer"].startswith("Meningioma") and run["heat_class"] == "Meningioma"
    # one size per finding (issue 28.3): the segmentation's, as the report and the PACS give it,
    # never the heatmap region's beside it
    assert run["outline"] and run["region"] is None
    assert any(t.startswith("Yellow: tumour outline: area") and "(method: segmentation)" in t
               for t in run["notes"]), run["notes"]
    assert not any("Grad-CAM region" in t for t in run["notes"])
    normal = data["slices"][0]
    assert normal["answer"].startswith("No tumour") and normal["region"] is None
    assert any("not a lesion" in t for t in normal["notes"])
    # the verdict follows the slice the reader rests on (the viewer reports it on a pause)
    assert any(c.value.startswith(f"Your verdict on slice {data['start'] + 1} of {n}") for c in at.caption)
    at.session_state["series_viewer"] = {"key": data["key"], "slice": 2, "center": 1000.0,
                                         "width": 2000.0}
    at.run()
    assert not at.exception
    assert any(c.value.startswith(f"Your verdict on slice 3 of {n}") for c in at.caption), texts(at)
    # a slice reported for another series (before a switch) is not taken for this one
    at.session_state["series_viewer"] = {"key": "another", "slice": 4, "center": 1.0, "width": 2.0}
    at.run()
    assert any(c.value.startswith(f"Your verdict on slice {data['start'] + 1} of {n}")
               for c in at.caption), texts(at)
    # asked for: the strongest tumour-class evidence on the no-tumour slices, region and all
    at.toggle(key="series_strongest").set_value(True).run()
    normal = viewer_args(at)["data"]["slices"][0]
    assert normal["region"] is not None and normal["heat_class"].endswith("(asked for)")


def test_healthy_flair_series_is_not_validated_on_any_slice(data_dir):
    at = run_series(volunteer_files(data_dir, "volunteer2-axial-flair"))
    assert not at.exception, texts(at)
    assert any(w.value.startswith("Not validated for this series, so no answer: a FLAIR")
               for w in at.warning), texts(at)
    assert not at.error  # nothing red: no tumour
    assert any("**This series:** FLAIR" in c.value and "T1-weighted images, axial slices" in c.value
               for c in at.caption), texts(at)
    data = viewer_args(at)["data"]
    assert len(data["slices"]) == 30 and data["marks"]["run"] is None
    assert data["marks"]["withheld"] == list(range(30))
    for s in data["slices"]:
        assert s["answer"].startswith("Not validated for this scan, so no answer: a FLAIR")
        assert s["heat"] is None and s["region"] is None and s["outline"] is None
        assert s["probs"] == []  # a withheld answer shows no class probabilities
    # "show anyway": the maps, never a region
    at.toggle(key="series_anyway").set_value(True).run()
    data = viewer_args(at)["data"]
    assert all(s["heat"] and s["region"] is None for s in data["slices"])
    assert "mm³" not in texts(at) and "Tumour suspected:" not in texts(at)


def test_multiframe_with_short_pixel_data_gives_a_clear_message(data_dir):
    """A multi-frame DICOM whose pixel data is shorter than its header says: every frame says
    why it cannot be read, the summary says no slice could be read; no exception, no trace."""
    from dicom_factory import synthetic_dicom

    data = synthetic_dicom(rows=32, cols=32, frames=4, pixel_data=b"\x01\x00" * (32 * 32 * 2),
                           Modality="MR")
    at = run_series([("multi.dcm", data)])
    assert not at.exception, texts(at)
    assert any("no slice of this series could be read" in w.value for w in at.warning), texts(at)
    assert [e.value for e in at.error] == ["4 of 4 slices could not be read: The DICOM pixel data "
                                           "is damaged or does not match the image size it "
                                           "declares (rows, columns, bits)."], texts(at)
    slices = viewer_args(at)["data"]["slices"]
    assert len(slices) == 4
    for s in slices:
        assert s["answer"].startswith("Could not be read: ") and s["kind"] == "error"
        assert "unexpected error" not in s["answer"] and s["image"] is None
    assert "Traceback" not in texts(at)


def test_a_zip_of_two_series_offers_a_series_picker_and_side_by_side(built_series, data_dir):
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
    first = len(viewer_args(at)["data"]["slices"])
    picker.set_value(1).run()
    assert not at.exception
    second = len(viewer_args(at)["data"]["slices"])
    assert {first, second} == {6, 8}
    # side by side: each series with its own answer and its own viewer
    at.toggle(key="series_side").set_value(True).run()
    assert not at.exception, texts(at)
    viewers = [e for e in at.get("component_instance")]
    assert len(viewers) == 2
    sizes = sorted(len(json.loads(v.proto.json_args)["data"]["slices"]) for v in viewers)
    assert sizes == [6, 8]
    assert all(json.loads(v.proto.json_args)["panels"] == 1 for v in viewers)


def test_one_scan_mode_is_unchanged(data_dir):
    at = AppTest.from_file(APP, default_timeout=180)
    at.session_state["scan_bytes"] = (data_dir / "dicom" / "mprage-series" / "100.dcm").read_bytes()
    at.run()
    assert not at.exception
    assert not [e for e in at.main if getattr(e, "key", None) == "series_viewer"]
    assert any(a.value.startswith("**") and "calibrated probability" in a.value
               for kind in (at.success, at.warning, at.error) for a in kind)  # the verdict line
