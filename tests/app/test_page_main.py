"""The upload-and-view page (app.py) through Streamlit's AppTest. AppTest cannot drive the file
uploader; the page reads the open scan from ``st.session_state["scan_bytes"]`` (where an upload
lands), so the tests put real files there."""

from __future__ import annotations

import csv

import pytest
from apptest import chart_json, page_text, run_page, verdict
from conftest import PROJECT_ROOT, require

from ui import models, viewer

pytestmark = pytest.mark.usefixtures("shipped_models")


def viewer_args(at, key: str = "main_viewer") -> dict:
    """The arguments the page gave the stack viewer (the component :mod:`ui.stack`): its data
    (one slice: image, heatmap, outlines, answer), titles and switches."""
    import json

    found = [e for e in at.main if getattr(e, "key", None) == key]
    assert len(found) == 1, [getattr(e, "key", None) for e in at.main]
    return json.loads(found[0].proto.json_args)


def heat_title(at) -> str:
    """The heatmap panel's title as the viewer draws it ("Heatmap hidden" without a map)."""
    args = viewer_args(at)
    s = args["data"]["slices"][0]
    if not s["heat"] or not args["show_heat"]:
        return "Heatmap hidden"
    return f"{args['titles'][1]} · {s['heat_class']}"


def brain_file(data_dir, label="glioma"):
    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["split"] == "test" and r["label"] == label)
    return data_dir / "brain-mri" / row["file"]


def test_page_without_a_scan_offers_the_upload():
    at = run_page()
    assert not at.exception
    assert any("Upload a scan" in i.value for i in at.info)
    labels = [s.label for s in at.selectbox]
    assert {"Task", "Model", "Heatmap method"} <= set(labels)
    assert [s.label for s in at.slider] == ["Overlay opacity"]
    model = next(s for s in at.selectbox if s.label == "Model")
    assert any("brain-mri-default" in str(o) for o in model.options)


def test_brain_jpeg_prediction_heatmap_and_card(data_dir):
    from medcls.engine.inference import Predictor

    path = brain_file(data_dir)
    expected = Predictor.from_path(PROJECT_ROOT / "models" / "brain-mri-default").predict_file(path)
    at = run_page(scan_bytes=path.read_bytes())
    assert not at.exception, page_text(at)
    from medcls.engine import present

    card = at_card(PROJECT_ROOT / "models" / "brain-mri-default")
    assert verdict(at) == f"**{present.verdict(expected, card).text}**"
    args = viewer_args(at)  # the scan and the heatmap overlay, side by side
    assert args["panels"] == 2 and args["titles"][1] == "Grad-CAM"
    assert args["data"]["slices"][0]["heat"].startswith("data:image/png;base64,")
    assert {c.key for c in at.get("plotly_chart")} == {"probs"}
    assert present.fmt_prob(expected.confidence) in page_text(at)
    expanders = [e.label for e in at.expander]
    assert any("Model card" in e for e in expanders) and any("metadata" in e for e in expanders)
    assert any("Test split" in m.value for m in at.markdown)
    assert len(at.get("download_button")) == 2


def test_method_switch_recomputes_the_heatmap(data_dir):
    at = run_page(scan_bytes=brain_file(data_dir, "meningioma").read_bytes())
    at.selectbox(key="method").set_value("gradcam++").run()
    assert not at.exception
    assert heat_title(at).startswith("Grad-CAM++ · ")
    at.selectbox(key="method").set_value("scorecam").run()
    assert heat_title(at).startswith("Score-CAM")


def test_dicom_gets_window_level_and_identifying_tags_only_on_request(data_dir):
    from medcls import identifying_attributes

    path = data_dir / "dicom" / "mprage-series" / "100.dcm"
    name = identifying_attributes(path)["PatientName"]
    at = run_page(scan_bytes=path.read_bytes())
    assert not at.exception, page_text(at)
    data = viewer_args(at)["data"]  # window/level in the browser: the values, the presets
    assert data["mode"] == "values" and data["coding"] == [data["coding"][0], 1.0]
    assert [p[0] for p in data["presets"]][0] == "File default" or data["presets"]
    assert data["slices"][0]["spacing"] == [1.0, 1.0]  # the ruler's mm
    assert not {"Level (centre)", "Window (width)"} & {s.label for s in at.slider}
    # a no-tumour (or withheld) answer shows no region and no area (a lesion would be read into
    # them); asked for explicitly, the strongest tumour-class region comes with its mm²
    from medcls.engine.findings import is_finding_answer
    from medcls.engine.inference import Predictor

    predictor = Predictor.from_path(PROJECT_ROOT / "models" / "brain-mri-default")
    pred = predictor.predict_file(path)
    if is_finding_answer(pred, predictor.card):
        assert any("mm²" in c.value for c in at.caption)
    else:
        assert not any("Region above" in c.value or "mm²" in c.value for c in at.caption)
        if not pred.outside_training_distribution:
            assert any("no region" in c.value for c in at.caption), page_text(at)
            # asked for: the strongest tumour class's (or, when uncertain, the runner-up's) map
            next(b for b in at.button if "runner-up" in b.label or "strongest" in b.label).click().run()
            assert any("mm²" in c.value for c in at.caption)  # pixel spacing known: area in mm²
            assert "asked for" in heat_title(at)
    assert name not in str([j.value for j in at.json])
    at.toggle(key="show_phi").set_value(True).run()
    assert name in str([j.value for j in at.json])
    at.toggle(key="show_phi").set_value(False).run()
    assert name not in str([j.value for j in at.json])


def test_chest_radiograph_to_the_brain_model_triggers_the_input_gate(data_dir):
    with open(require(data_dir / "chest-xray" / "labels.csv"), newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["split"] == "test")
    at = run_page(scan_bytes=(data_dir / "chest-xray" / row["file"]).read_bytes())
    assert not at.exception
    assert any("Outside what this model was trained on" in e.value for e in at.error), page_text(at)
    assert "withheld" in verdict(at)


def test_unreadable_file_gives_a_message_and_the_session_goes_on(data_dir):
    at = run_page(scan_bytes=b"just some text, not a scan")
    assert not at.exception
    assert any("not an image or DICOM" in e.value for e in at.error)
    at.session_state["scan_bytes"] = brain_file(data_dir).read_bytes()
    at.run()
    assert not at.exception and not at.error
    assert "calibrated probability" in verdict(at)


def test_chest_task_predicts_chest_and_gates_brain_scans(data_dir):
    """The second task through the same page: the task picker switches to the chest model; a
    brain MRI sent to it triggers its input gate."""
    from medcls.engine.inference import Predictor

    chest_model = require(PROJECT_ROOT / "models" / "chest-xray-default")
    with open(require(data_dir / "chest-xray" / "labels.csv"), newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["split"] == "test" and r["label"] == "pneumonia")
    path = data_dir / "chest-xray" / row["file"]
    expected = Predictor.from_path(chest_model).predict_file(path)
    at = run_page(scan_bytes=path.read_bytes())
    at.selectbox(key="model_task").set_value("chest-xray").run()
    assert not at.exception
    assert "chest-xray-default" in str(at.selectbox(key="model").value)
    from medcls.engine import present

    assert verdict(at) == f"**{present.verdict(expected, at_card(chest_model)).text}**", page_text(at)
    at.session_state["scan_bytes"] = brain_file(data_dir).read_bytes()
    at.run()
    assert any("Outside what this model was trained on" in e.value for e in at.error), page_text(at)


def test_low_confidence_sentence_quotes_only_what_the_card_records(monkeypatch):
    """The figure behind the low-confidence threshold comes from the card; a card without it
    gets no invented figure."""
    import numpy as np

    from medcls.engine.inference import Prediction
    from medcls.models.card import ModelCard
    from medcls.models.package import read_card

    monkeypatch.syspath_prepend(str(PROJECT_ROOT))
    card = read_card(require(PROJECT_ROOT / "models" / "brain-mri-default"))
    pred = Prediction(card.classes, np.array([0.6, 0.2, 0.1, 0.1]), np.zeros(4), None, None,
                      card.low_confidence_threshold)
    kind, text = viewer.confidence_statement(pred, card)
    assert kind == "warning" and "60%" in text and f"{card.low_confidence_threshold:.0%}" in text
    # the shipped card records the validation accuracy above its threshold: quoted from it
    assert f"were right {card.low_confidence_val_accuracy:.0%} of the time on validation" in text
    bare = ModelCard.from_dict({k: v for k, v in card.to_dict().items()
                                if k not in ("low_confidence_val_accuracy", "selective")})
    kind, text = viewer.confidence_statement(pred, bare)
    assert "were right" not in text  # a card without the figure gets no invented one
    assert "gives no validation accuracy" in text
    recorded = ModelCard.from_dict(card.to_dict() | {"low_confidence_val_accuracy": 0.973})
    kind, text = viewer.confidence_statement(pred, recorded)
    assert "were right 97% of the time on validation" in text
    # a scan outside the card's validated scope (the gate passed): the scope's reason, no gate figures
    import dataclasses

    note = "a sagittal slice: brain-mri-default was validated on normal anatomy in axial slices only"
    kind, text = viewer.confidence_statement(dataclasses.replace(pred, scope_note=note), card)
    assert kind == "error" and note in text and "input-gate" not in text


# ----------------------------------------------------------------------------- issue 14

def at_card(folder):
    import json

    return json.loads((folder / "card.json").read_text())


def test_verdict_comes_first_under_the_uploader(data_dir):
    at = run_page(scan_bytes=brain_file(data_dir).read_bytes())
    assert not at.exception
    kinds = [type(e).__name__ for e in at.main]
    first_alert = next(i for i, e in enumerate(at.main) if kinds[i] in ("Success", "Warning", "Error"))
    first_image = next(i for i, e in enumerate(at.main) if getattr(e, "key", None) == "main_viewer")
    first_chart = next(i for i, e in enumerate(at.main) if e in at.get("plotly_chart"))
    assert first_alert < first_image < first_chart  # the answer, the images, then the bars
    assert verdict(at).endswith(("confident**", "uncertain**", "class.**"))


def test_no_100_percent_anywhere_on_a_near_certain_answer(data_dir, brain_predictor):
    """A test image the model gives > 99.5%: every text and the bars say ">99%", never 100%."""
    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"][100:300]
    path = next((p for p in (data_dir / "brain-mri" / r["file"] for r in rows)
                 if (q := brain_predictor.predict_file(p)).confidence > 0.995
                 and not q.outside_training_distribution), None)
    if path is None:
        pytest.skip("no near-certain answer among these test images")
    at = run_page(scan_bytes=path.read_bytes())
    assert ">99%" in verdict(at)
    bars = chart_json(at, "probs")
    assert "100%" not in page_text(at) and "100%" not in bars and "100.0%" not in bars
    assert '">99.' in bars or '"99.' in bars  # the bar: the same formatter, one decimal


def test_withheld_answer_is_greyed_hidden_and_points_to_the_right_task(data_dir):
    with open(require(data_dir / "chest-xray" / "labels.csv"), newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["split"] == "test")
    at = run_page(scan_bytes=(data_dir / "chest-xray" / row["file"]).read_bytes())
    assert not at.exception
    v = verdict(at)
    assert "withheld" in v and "%" not in v
    bars = chart_json(at, "probs")
    assert "#d62728" not in bars and "#c8c8c8" in bars  # no red "answer" bar: all grey
    assert heat_title(at) == "Heatmap hidden"
    assert any("Heatmap hidden: the answer is withheld" in c.value for c in at.caption)
    assert not any("Region above" in c.value or "mm²" in c.value for c in at.caption)
    assert not any("Tumour outline" in c.value for c in at.caption)
    assert any("chest radiograph: switch to the chest-xray task" in i.value for i in at.info), page_text(at)
    at.toggle(key="main_anyway").set_value(True).run()  # "show anyway"
    assert heat_title(at).startswith("Grad-CAM · ")
    assert viewer_args(at)["data"]["slices"][0]["region"] is None
    assert not any("Region above" in c.value for c in at.caption)  # still no lesion region


def test_no_tumour_answer_shows_no_region_outline_or_area(data_dir, brain_predictor):
    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test" and r["label"] == "no_tumor"]
    path = next(p for p in (data_dir / "brain-mri" / r["file"] for r in rows[:40])
                if (q := brain_predictor.predict_file(p)).label == "no_tumor"
                and not q.outside_training_distribution)
    at = run_page(scan_bytes=path.read_bytes())
    assert "No tumour" in verdict(at)
    assert not any("Region above" in c.value or "mm²" in c.value or "Tumour outline" in c.value
                   for c in at.caption)
    assert "hottest region" not in page_text(at)


def test_uncertain_answer_offers_the_runner_up_map(data_dir, brain_predictor):
    from medcls.engine import present

    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"][:80]
    found = next(((p, q) for p in (data_dir / "brain-mri" / r["file"] for r in rows)
                  if (q := brain_predictor.predict_file(p)).low_confidence
                  and not q.outside_training_distribution), None)
    if found is None:
        pytest.skip("no uncertain answer among these test images")
    path, q = found
    second = present.class_name(None, q.classes[present.runner_up(q)])
    at = run_page(scan_bytes=path.read_bytes())
    assert "uncertain" in verdict(at)
    button = next(b for b in at.button if "runner-up" in b.label)
    assert second in button.label
    button.click().run()
    assert not at.exception
    assert heat_title(at) == f"Grad-CAM · {second} (asked for)"
    assert "uncertain" in verdict(at)  # the answer itself does not change


def test_overlay_toggle_window_level_once_and_background_loading(data_dir):
    at = run_page(scan_bytes=(data_dir / "dicom" / "mprage-series" / "100.dcm").read_bytes())
    # one viewer for both images (one window, one zoom and pan), set in the browser
    assert viewer_args(at)["panels"] == 2 and "Level (centre)" not in [s.label for s in at.slider]
    at.toggle(key="show_overlay").set_value(False).run()
    assert heat_title(at) == "Heatmap hidden"
    from medcls.models.package import list_packages

    others = [str(p) for p, c in list_packages(PROJECT_ROOT / "models")
              if c["task"] == "chest-xray" and c["name"].endswith("-default")]
    if others:  # after the first answer the other task's default model loads in the background
        assert others[0] in models._PRELOAD or others[0] in models._LOADED
        if others[0] in models._PRELOAD:
            models._PRELOAD[others[0]].result()


def test_model_labels_fit_and_class_names_are_readable(data_dir):
    at = run_page(scan_bytes=brain_file(data_dir).read_bytes())
    model = at.selectbox(key="model")
    assert all(len(str(o)) <= 24 for o in model.options), model.options  # fits a 15rem sidebar
    assert "no_tumor" not in chart_json(at, "probs") and "No tumour" in chart_json(at, "probs")


def test_a_flair_slice_is_withheld_and_its_acquisition_shown(data_dir):
    """Issue 28, point 1 on the main page: one slice of a healthy volunteer's FLAIR series is
    outside the validated scope (T1): withheld with why, no heatmap, and the page says what the
    scan is (from its own tags) beside what the model was validated on."""
    path = require(data_dir / "dicom" / "volunteer2-axial-flair" / "015.dcm")
    at = run_page(scan_bytes=path.read_bytes())
    assert not at.exception, page_text(at)
    assert "withheld" in verdict(at) and "%" not in verdict(at)
    assert any("a FLAIR (T2 with fluid suppressed) image" in e.value for e in at.error), page_text(at)
    assert any("**this scan:** FLAIR (T2 with fluid suppressed) · axial" in c.value.replace("\\", "")
               and "was validated on:** T1-weighted images, axial slices" in c.value
               for c in at.caption), page_text(at)
    assert heat_title(at) == "Heatmap hidden"
    assert viewer_args(at)["data"]["slices"][0]["spacing"] == [0.71875, 0.71875]
