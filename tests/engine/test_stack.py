"""The stack viewer's data (medcls.engine.stack): what is sent to the browser for a series and a
scan, on real files: the 12-bit rendering gives the modality values back exactly, the payload
stays within its budget, withheld slices carry no heatmap (and never a region), the run's slices
carry the run class's map and outlines, and the words about acquisition and scope come from the
files' own tags and the card."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from medcls.engine import stack
from medcls.engine.series import answer_series
from medcls.io.gather import gather
from medcls.io.load import load_scan
from medcls.io.sources import bytes_source


def series_of(folder):
    files = sorted(folder.glob("*.dcm"))
    if not files:
        pytest.skip(f"test data not found: {folder}")
    return gather([bytes_source(f.name, f.read_bytes()) for f in files]).series[0]


def png_bytes(uri: str) -> bytes:
    assert uri.startswith("data:image/png;base64,")
    return base64.b64decode(uri.split(",", 1)[1])


def test_twelve_bit_rendering_gives_the_values_back_exactly(data_dir):
    scan = load_scan(data_dir / "dicom" / "mprage-series" / "100.dcm")
    coding = stack.coding_for([scan.values])
    assert coding.step == 1.0  # integer MR values spanning < 4096: lossless
    codes = stack.decode_codes_png(png_bytes(stack.codes_uri(coding.codes(scan.values))))
    assert np.array_equal(coding.values(codes), scan.values.astype(np.float64))
    # a float range is coded in 4096 steps: within half a step
    wide = scan.values.astype(np.float32) * 3.3 - 1000.5
    coding = stack.coding_for([wide])
    back = coding.values(stack.decode_codes_png(png_bytes(stack.codes_uri(coding.codes(wide)))))
    assert np.abs(back - wide).max() <= coding.step / 2 + 1e-6


def test_display_factor_keeps_a_long_series_within_its_budget():
    assert stack.display_factor([(256, 256)] * 30) == 1.0
    assert stack.display_factor([(1024, 1024)]) == 0.5  # MAX_SIDE
    f = stack.display_factor([(512, 512)] * 200)
    assert 200 * (512 * f) ** 2 <= stack.PIXEL_BUDGET * 1.001


def test_scope_and_acquisition_words(data_dir, predictors):
    card = predictors("brain-mri-default").card
    words = stack.scope_words(card)
    assert "validated on T1-weighted images in axial slices" in words
    assert stack.scope_short(card) == "T1-weighted images, axial slices"
    flair = series_of(data_dir / "dicom" / "volunteer2-axial-flair")
    assert stack.acquisition_words(stack.series_acquisition(flair), flair.modality) == \
        "FLAIR (T2 with fluid suppressed) · axial"
    sag = series_of(data_dir / "dicom" / "volunteer2-sagittal-t1")
    assert stack.acquisition_words(stack.series_acquisition(sag), sag.modality) == "T1-weighted · sagittal"
    assert stack.acquisition_words(None) == "acquisition not recorded in the file"


def test_a_flair_series_is_sent_withheld_without_heatmaps(data_dir, predictors):
    predictor = predictors("brain-mri-default")
    series = series_of(data_dir / "dicom" / "volunteer2-axial-flair")
    answer = answer_series(predictor, series)
    assert stack.series_heatmaps(predictor, answer) == {}  # withheld: no map unless asked
    anyway = stack.series_heatmaps(predictor, answer, withheld_too=True)
    assert len(anyway) == 30 and all(h.region is None for h in anyway.values())
    payload = stack.series_stack(answer, anyway, key=series.key)
    assert payload["marks"]["withheld"] == list(range(30)) and payload["marks"]["run"] is None
    assert all(s["answer"].startswith("Not validated for this scan") for s in payload["slices"])
    assert all(s["region"] is None and s["outline"] is None for s in payload["slices"])
    # the spacing the ruler uses is the file's (the FLAIR is sent at full size)
    assert payload["scale_note"] == ""
    assert payload["slices"][0]["spacing"] == pytest.approx([0.71875, 0.71875])
    assert len(json.dumps(payload)) < 1.4 * stack.PIXEL_BUDGET  # bounded


def test_the_run_slices_carry_the_run_class_map_and_outlines(built_series, predictors):
    predictor = predictors("brain-mri-default")
    files = built_series.dicom()
    series = gather([bytes_source(f"s{i}", d) for i, d in enumerate(files)]).series[0]
    answer = answer_series(predictor, series)
    heats = stack.series_heatmaps(predictor, answer)
    run = answer.summary.run
    assert run is not None
    assert predictor.card.get("segmentation")  # the default model has a segmentation companion
    for i in range(len(series)):
        pred = answer.slices[i].prediction
        if i in run:  # the run class's map; one size per finding: the segmentation's, not the map's
            assert heats[i].class_name == run.class_name and heats[i].region is None
        elif pred.label == "no_tumor":
            assert heats[i].region is None  # a no-tumour answer: no lesion region
    payload = stack.series_stack(answer, heats, key=series.key)
    assert payload["start"] in built_series.tumour
    entry = payload["slices"][payload["start"]]
    assert entry["outline"] and entry["region"] is None
    # polygons are in the pixels sent: inside the slice
    assert all(0 <= x <= entry["w"] and 0 <= y <= entry["h"] for x, y in entry["outline"])
    seg = answer.segmentations[payload["start"]]
    assert f"Yellow: tumour outline: area {seg.area_mm2:.0f} mm²" in " ".join(entry["notes"])
    assert "(method: segmentation)" in " ".join(entry["notes"])
    assert "Grad-CAM region" not in " ".join(entry["notes"])
    # asked for: the strongest tumour class on a no-tumour slice, named as asked
    asked = stack.series_heatmaps(predictor, answer, requested=True)
    normal = next(i for i, s in enumerate(answer.slices) if s.prediction.label == "no_tumor")
    assert asked[normal].asked and asked[normal].region is not None
    words = " ".join(stack.heat_words(answer.slices[normal].prediction, predictor.card, asked[normal]))
    assert "(asked for)" in words and "Grad-CAM region" in words  # its size, its method named
    region = stack.series_stack(answer, asked, key="a")["slices"][normal]
    assert region["region"] and len(region["box"]) == 4


def test_one_scan_payload(data_dir, predictors):
    predictor = predictors("brain-mri-default")
    scan = load_scan(data_dir / "dicom" / "mprage-series" / "100.dcm")
    pred = predictor.predict(scan)
    payload = stack.scan_stack(scan, pred, predictor.card, None, None, key="k")
    assert len(payload["slices"]) == 1 and payload["mode"] == "values"
    assert payload["window"] == [scan.window_center, scan.window_width]
    assert payload["slices"][0]["heat"] is None and payload["slices"][0]["spacing"] == [1.0, 1.0]
    jpeg = next(p for p in (data_dir / "brain-mri").rglob("*.jpg"))
    scan = load_scan(jpeg)
    payload = stack.scan_stack(scan, predictor.predict(scan), predictor.card, None, None, key="j")
    assert payload["mode"] in ("values", "rgb") and payload["slices"][0]["image"]


def test_an_explained_answer_carries_the_scope_too(data_dir, predictors):
    """The main page shows ``Predictor.explain``'s prediction: a FLAIR slice is withheld there as
    in ``predict`` (issue 28: it read "No tumour · 96% · confident")."""
    predictor = predictors("brain-mri-default")
    scan = load_scan(data_dir / "dicom" / "volunteer2-axial-flair" / "015.dcm")
    explained = predictor.explain(scan).prediction
    assert explained.scope_note == predictor.predict(scan).scope_note
    assert explained.outside_training_distribution and "FLAIR" in explained.scope_note
