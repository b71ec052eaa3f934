"""Calibration of the shipped default brain model: temperature scaling lowers the validation
ECE and is the NLL optimum; the input gate flags chest radiographs, not brain scans."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require

# ----------------------------------------------------------------------------- calibration

def test_temperature_scaling_lowers_validation_ece(predictors, data_dir):
    from medcls.learning.data import load_datasets, preprocess_records
    from medcls.models.calibration import expected_calibration_error, fit_calibration, probabilities

    p = predictors("brain-mri-default")
    # the validation splits of every folder the model was trained on ("a+b+c: ..." in the card)
    folders = p.card["training"]["data"].split(":")[0].split("+")
    ds = load_datasets([require(data_dir / f) for f in folders], classes=list(p.classes))
    recs = ds.split("val")
    x, kept = preprocess_records(ds, recs, p.spec)
    targets = ds.targets(recs)
    logits, _ = p.forward(x)
    single = targets.sum(1) == 1
    y = targets[single].argmax(1)
    before = expected_calibration_error(probabilities(logits[single], 1.0), y)
    bias = p.card.get("class_bias")
    after = expected_calibration_error(probabilities(logits[single], p.package.temperature, bias), y)
    assert after <= before
    # the stored calibration is what fit_calibration gives on these splits (partial labels
    # included): temperature alone, or with one bias per class when cross-validation prefers it
    fit = fit_calibration(logits, targets)
    assert fit["method"] == p.card["calibration"]["method"]
    assert fit["temperature"] == pytest.approx(p.package.temperature, rel=1e-3)
    if bias is not None:
        assert fit["class_bias"] == pytest.approx(list(bias), abs=1e-3)


def test_fit_temperature_softens_overconfident_logits():
    from medcls.models.calibration import expected_calibration_error, fit_temperature, probabilities

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(0, 1, (2000, 3))
    correct = rng.random(2000) < 0.7  # 70% accurate, but logits claim ~100%
    logits[np.arange(2000), np.where(correct, y, (y + 1) % 3)] += 8.0
    t = fit_temperature(logits, y)
    assert t > 2.0
    assert expected_calibration_error(probabilities(logits, t), y) < \
        expected_calibration_error(probabilities(logits, 1.0), y) / 3


# ----------------------------------------------------------------------------- input gate

def test_input_gate_flags_chest_radiographs_not_brain_scans(predictors, data_dir):
    from medcls.learning.data import load_dataset, preprocess_records

    p = predictors("brain-mri-default")
    brain = load_dataset(require(data_dir / "brain-mri"))
    chest = load_dataset(require(data_dir / "chest-xray"))
    b_recs = brain.split("test")[::6]
    c_recs = chest.split("test")[::6]
    xb, _ = preprocess_records(brain, b_recs, p.spec)
    xc, _ = preprocess_records(chest, c_recs, p.spec)
    false_alarm = np.mean([q.outside_training_distribution for q in p.predict_arrays(xb)])
    detected = np.mean([q.outside_training_distribution for q in p.predict_arrays(xc)])
    print(f"gate: chest detected {detected:.3f}, brain false alarms {false_alarm:.3f}")
    assert detected >= 0.9
    assert false_alarm <= 0.05


def test_calibration_adds_class_biases_only_when_cross_validation_says_so():
    """Logits trained under a balanced prior, read under another: one bias per class corrects
    the shift and is chosen; logits with no shift keep temperature alone."""
    from medcls.models.calibration import fit_calibration, nll, probabilities

    rng = np.random.default_rng(3)
    n, k = 3000, 3
    y = rng.choice(k, n, p=[0.7, 0.2, 0.1])  # the real prior
    clean = rng.normal(0, 1, (n, k)) + 2.0 * np.eye(k)[y]  # a balanced-prior model's logits
    shifted = fit_calibration(clean, y)
    assert shifted["method"] == "temperature+bias" and shifted["class_bias"][0] > shifted["class_bias"][2]
    p_bias = probabilities(clean, shifted["temperature"], shifted["class_bias"])
    assert nll(np.log(p_bias), y) < nll(clean, y, shifted["temperature"])
    y_flat = rng.choice(k, n)  # the prior the logits assume: nothing to correct
    flat = rng.normal(0, 1, (n, k)) + 2.0 * np.eye(k)[y_flat]
    assert fit_calibration(flat, y_flat)["method"] == "temperature"
