"""The upload-and-view page (app.py) through Streamlit's AppTest. AppTest cannot drive the file
uploader; the page reads the open scan from ``st.session_state["scan_bytes"]`` (where an upload
lands), so the tests put real files there."""

from __future__ import annotations

import csv

import pytest

from apptest import page_text, run_page
from conftest import PROJECT_ROOT, require


@pytest.fixture(scope="module", autouse=True)
def _models():
    require(PROJECT_ROOT / "models" / "brain-mri-default")


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
    from medcls.inference import Predictor

    path = brain_file(data_dir)
    expected = Predictor.from_path(PROJECT_ROOT / "models" / "brain-mri-default").predict_file(path)
    at = run_page(scan_bytes=path.read_bytes())
    assert not at.exception, page_text(at)
    heads = [s.value for s in at.subheader]
    assert f"Prediction: {expected.label}" in heads or expected.outside_training_distribution
    assert any(h.startswith("Heatmap · Grad-CAM") for h in heads)
    assert len(at.get("plotly_chart")) == 1
    assert len(at.get("image")) == 2  # the scan and the heatmap overlay, side by side
    assert f"{expected.confidence:.0%}" in page_text(at)
    expanders = [e.label for e in at.expander]
    assert any("Model card" in e for e in expanders) and any("metadata" in e for e in expanders)
    assert any("Test split" in m.value for m in at.markdown)
    assert len(at.get("download_button")) == 2


def test_method_switch_recomputes_the_heatmap(data_dir):
    at = run_page(scan_bytes=brain_file(data_dir, "meningioma").read_bytes())
    at.selectbox(key="method").set_value("gradcam++").run()
    assert not at.exception
    assert any(s.value.startswith("Heatmap · Grad-CAM++") for s in at.subheader)
    at.selectbox(key="method").set_value("scorecam").run()
    assert any(s.value.startswith("Heatmap · Score-CAM") for s in at.subheader)


def test_dicom_gets_window_level_and_identifying_tags_only_on_request(data_dir):
    from medcls import identifying_attributes

    path = data_dir / "dicom" / "mprage-series" / "100.dcm"
    name = identifying_attributes(path)["PatientName"]
    at = run_page(scan_bytes=path.read_bytes())
    assert not at.exception, page_text(at)
    assert "Window preset" in [s.label for s in at.selectbox]
    assert {"Level (centre)", "Window (width)"} <= {s.label for s in at.slider}
    # a no-tumour (or withheld) answer shows no region and no area (a lesion would be read into
    # them); asked for explicitly, the strongest tumour-class region comes with its mm²
    from medcls.findings import is_finding_answer
    from medcls.inference import Predictor

    predictor = Predictor.from_path(PROJECT_ROOT / "models" / "brain-mri-default")
    captions = lambda: "\n".join(c for im in at.image for c in im.captions)  # noqa: E731
    if is_finding_answer(predictor.predict_file(path), predictor.card):
        assert any("mm²" in c.value for c in at.caption)
    else:
        assert not any("Region above" in c.value for c in at.caption)
        assert "no region" in captions()
        at.toggle(key="strongest_evidence").set_value(True).run()
        assert any("mm²" in c.value for c in at.caption)  # pixel spacing known: area in mm²
        assert "shown on request" in captions()
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
    assert any("withheld" in s.value for s in at.subheader)


def test_unreadable_file_gives_a_message_and_the_session_goes_on(data_dir):
    at = run_page(scan_bytes=b"just some text, not a scan")
    assert not at.exception
    assert any("not an image or DICOM" in e.value for e in at.error)
    at.session_state["scan_bytes"] = brain_file(data_dir).read_bytes()
    at.run()
    assert not at.exception and not at.error
    assert any(s.value.startswith("Prediction") for s in at.subheader)


def test_chest_task_predicts_chest_and_gates_brain_scans(data_dir):
    """The second task through the same page: the task picker switches to the chest model; a
    brain MRI sent to it triggers its input gate."""
    from medcls.inference import Predictor

    chest_model = require(PROJECT_ROOT / "models" / "chest-xray-default")
    with open(require(data_dir / "chest-xray" / "labels.csv"), newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["split"] == "test" and r["label"] == "pneumonia")
    path = data_dir / "chest-xray" / row["file"]
    expected = Predictor.from_path(chest_model).predict_file(path)
    at = run_page(scan_bytes=path.read_bytes())
    at.selectbox(key="model_task").set_value("chest-xray").run()
    assert not at.exception
    assert "chest-xray-default" in str(at.selectbox(key="model").value)
    assert f"Prediction: {expected.label}" in [s.value for s in at.subheader], page_text(at)
    at.session_state["scan_bytes"] = brain_file(data_dir).read_bytes()
    at.run()
    assert any("Outside what this model was trained on" in e.value for e in at.error), page_text(at)


def test_low_confidence_sentence_quotes_only_what_the_card_records(monkeypatch):
    """The figure behind the low-confidence threshold comes from the card; a card without it
    gets no invented figure."""
    import numpy as np

    import ui
    from medcls.card import ModelCard
    from medcls.inference import Prediction
    from medcls.package import read_card

    monkeypatch.syspath_prepend(str(PROJECT_ROOT))
    card = read_card(require(PROJECT_ROOT / "models" / "brain-mri-default"))
    pred = Prediction(card.classes, np.array([0.6, 0.2, 0.1, 0.1]), np.zeros(4), None, None,
                      card.low_confidence_threshold)
    kind, text = ui.confidence_statement(pred, card)
    assert kind == "warning" and "60%" in text and f"{card.low_confidence_threshold:.0%}" in text
    # the shipped card records the validation accuracy above its threshold: quoted from it
    assert f"were {card.low_confidence_val_accuracy:.0%} correct" in text
    bare = ModelCard.from_dict({k: v for k, v in card.to_dict().items()
                                if k not in ("low_confidence_val_accuracy", "selective")})
    kind, text = ui.confidence_statement(pred, bare)
    assert "correct" not in text  # a card without the figure gets no invented one
    recorded = ModelCard.from_dict(card.to_dict() | {"low_confidence_val_accuracy": 0.973})
    kind, text = ui.confidence_statement(pred, recorded)
    assert "validation predictions were 97% correct" in text
    # a scan outside the card's validated scope (the gate passed): the scope's reason, no gate figures
    import dataclasses

    note = "a sagittal slice: brain-mri-default was validated on normal anatomy in axial slices only"
    kind, text = ui.confidence_statement(dataclasses.replace(pred, scope_note=note), card)
    assert kind == "error" and note in text and "input-gate" not in text
