"""The comparison page (pages/1_Compare_models.py) under streamlit's AppTest.

AppTest cannot drive a file_uploader, so the scan comes in the way the main page hands it over:
``st.session_state["scan_bytes"]``. Uses the shipped ``models/`` folder ($MEDCLS_MODELS
overrides); skips when it holds too few brain-mri packages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from apptest import COMPARE_PAGE, page_text, run_page
from conftest import model_packages, unsure_agreement_case


def run_compare(scan_bytes: bytes, models: list[str] | None = None):
    """The page on ``scan_bytes``, with ``models`` chosen (else its default choice)."""
    at = run_page(COMPARE_PAGE, scan_bytes)
    if models is not None:
        at.multiselect(key="cmp_models_brain-mri").set_value(models).run()
    return at


@pytest.mark.parametrize("n", [2, 3])
def test_page_compares_chosen_models(brain_test_jpeg, n):
    from medcls.models.package import read_card

    paths = [str(p) for p in model_packages("brain-mri", n)]
    names = [read_card(p)["name"] for p in paths]
    at = run_compare(brain_test_jpeg.read_bytes(), paths)
    assert not at.exception, [e.value for e in at.exception]
    assert at.multiselect(key="cmp_models_brain-mri").value == paths
    # one panel per chosen model, headed by its name
    headers = [h.value for h in at.subheader]
    for name in names:
        assert headers.count(name) == 1, headers
    assert len([h for h in headers if h in names]) == n
    # the agreement statement, as an agree message or a "Models disagree" flag
    statement = [e.value for e in (*at.success, *at.warning, *at.error)
                 if "models agree" in e.value or "Models disagree" in e.value
                 or "The models agree" in e.value or "models that answer agree" in e.value]
    assert len(statement) == 1, page_text(at)
    if "Models disagree" in statement[0]:
        assert "probability spread" in statement[0]
    # the per-model latency and the test-split table with one row per chosen model
    assert page_text(at).count("ms for this scan") == n
    table = next(d for d in at.dataframe if "accuracy" in d.value.columns)
    assert list(table.value["model"]) == names
    assert {"macro-F1", "ECE", "size (MB)", "ms this scan"} <= set(table.value.columns)
    assert (table.value["ms this scan"] > 0).all()


def test_page_unreadable_scan_shows_an_error():
    model_packages("brain-mri", 2)
    at = run_compare(b"this is a text file, not a scan\n" * 20)
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert errors and any("could not be" in e for e in errors), page_text(at)
    assert not at.dataframe  # nothing was compared


def test_page_flags_disagreement(brain_test_jpeg, monkeypatch):
    """Real models rarely disagree on a given scan, so the last model's probabilities are
    rotated by one class (same values, other top-1): the page must show the flag and spread."""
    import dataclasses

    import numpy as np

    import medcls.engine.compare as mc

    paths = [str(p) for p in model_packages("brain-mri", 2)]
    real_run = mc.run_model

    from medcls.engine.inference import Predictor
    from medcls.io.load import load_scan

    # the other models' answers on this scan, so the rotated one surely differs from them
    others = [Predictor.from_path(p).predict(load_scan(brain_test_jpeg)).index for p in paths[:-1]]

    def rotated(predictor, scan, method="gradcam"):
        res = real_run(predictor, scan, method)
        pred = res.explanation.prediction
        if Path(predictor.package.path).resolve() != Path(paths[-1]).resolve():
            return res
        # roll the probabilities until the top class differs from the other models' answers
        shift = next(k for k in range(1, len(pred.probabilities))
                     if (pred.index + k) % len(pred.probabilities) not in others)
        pred = dataclasses.replace(pred, probabilities=np.roll(pred.probabilities, shift))
        return dataclasses.replace(res, explanation=dataclasses.replace(res.explanation,
                                                                        prediction=pred))

    monkeypatch.setattr(mc, "run_model", rotated)
    at = run_compare(brain_test_jpeg.read_bytes(), paths)
    assert not at.exception, [e.value for e in at.exception]
    flag = [e.value for e in at.error if "Models disagree" in e.value]
    assert len(flag) == 1 and "probability spread" in flag[0], page_text(at)
    assert not any("models agree" in e.value for e in at.success)
    spread = next(m for m in at.metric if m.label == "Largest probability spread")
    assert spread.value != "0%"


def test_page_needs_two_models_of_the_task(brain_test_jpeg, tmp_path, monkeypatch):
    only = model_packages("brain-mri", 2)[0]
    (tmp_path / only.name).symlink_to(only, target_is_directory=True)
    monkeypatch.setenv("MEDCLS_MODELS", str(tmp_path))  # the model list is cached per folder
    at = run_compare(brain_test_jpeg.read_bytes())
    assert not at.exception, [e.value for e in at.exception]
    assert any("two or more models" in w.value for w in at.warning), page_text(at)
    assert not at.dataframe and not at.subheader


# ----------------------------------------------------------------------------- issue 14

def test_agreement_of_unsure_models_is_amber_and_figures_are_sourced(data_dir):
    """The issue's case: every brain model gives the same class, each below its own
    low-confidence threshold; the page must not show a green "agree". Then the engineer's
    figures: interval, caveat and source per figure, a confusion matrix per model."""
    from medcls.models.package import read_card

    paths = [str(p) for p in model_packages("brain-mri", 3)]
    path = unsure_agreement_case(data_dir, paths)
    if path is None:
        pytest.skip("no all-unsure agreement among the first test images")
    at = run_compare(path.read_bytes(), paths)
    assert not at.exception
    assert not any("agree" in e.value for e in at.success), page_text(at)
    assert any("every model is unsure" in w.value for w in at.warning), page_text(at)

    import pandas as pd

    figures = pd.concat([d.value for d in at.dataframe if "95% interval" in d.value.columns])
    cards = [read_card(p) for p in paths]
    assert set(figures["model"]) == {c["name"] for c in cards}
    default = figures[(figures["model"] == "brain-mri-default") & (figures["figure"] == "accuracy")]
    if len(default):
        assert "bench/results/accuracy.json" in default.iloc[0]["source"]
        assert "trained" in default.iloc[0]["source"]  # the card's date
        assert default.iloc[0]["95% interval"]
    recall = figures[figures["figure"] == "No tumour: recall"]
    assert len(recall) and (recall["caveat"].str.len() > 0).all()  # the caveat, beside its figure
    assert {"Glioma: precision", "Glioma: recall"} <= set(figures["figure"])
    keys = {c.key for c in at.get("plotly_chart")}
    assert all(f"cmp_confusion_{c['name']}" in keys for c in cards)


def test_one_answering_model_is_not_called_agreement(data_dir):
    """Issue 28 point 5: a chest radiograph shown to the brain models: the default and compact
    models withhold their answer (input gate), the seed CNN's gate lets it through. One answer is
    no agreement: the page must not say the models agree."""
    from medcls.engine.inference import Predictor
    from medcls.io.load import load_scan

    from conftest import shipped_package

    names = ["brain-mri-default", "brain-mri-seed-cnn"]
    paths = [str(shipped_package(n)) for n in names]
    xray = sorted((data_dir / "chest-xray" / "normal").glob("*.jpeg"))[0]
    scan = load_scan(xray)
    withheld = [Predictor.from_path(p).predict(scan).outside_training_distribution for p in paths]
    assert withheld == [True, False], "the library's answers changed: pick another radiograph"
    at = run_compare(xray.read_bytes(), paths)
    assert not at.exception, [e.value for e in at.exception]
    text = page_text(at)
    assert "agree" not in text.replace("nothing to agree", "").replace("no agreement", "").lower() \
        or "Only brain-mri-seed-cnn of 2 answers" in text
    assert "The models agree" not in text and "models that answer agree" not in text
    banner = [w.value for w in at.warning if w.value.startswith("Only ")]
    assert banner and "Only brain-mri-seed-cnn of 2 answers" in banner[0], text
    assert "no agreement to report" in banner[0]
    assert "Answer withheld:" in text  # the default model's panel says why
