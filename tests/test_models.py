"""The shipped models: cards reproduced on the fixed test split, calibration, saliency against
the tf-keras-vis reference and against the tumour boxes, the package contract."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from conftest import PROJECT_ROOT, require

MODELS = PROJECT_ROOT / "models"
BRAIN_MODELS = ["brain-mri-default", "brain-mri-compact-cnn",
                "brain-mri-seed-cnn"]
SHIPPED = BRAIN_MODELS + ["chest-xray-default"]
DATA_OF_TASK = {"brain-mri": "brain-mri", "chest-xray": "chest-xray"}


def _package_dir(name):
    path = MODELS / name
    if not (path / "card.json").is_file():
        pytest.fail(f"shipped model {name} is missing from models/")
    return path


@pytest.fixture(scope="module")
def predictors():
    from medcls.inference import Predictor

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Predictor.from_path(_package_dir(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def brain_rows(data_dir):
    with open(require(data_dir / "brain-mri" / "labels.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- cards

@pytest.mark.parametrize("name", SHIPPED)
def test_card_figures_are_reproduced_on_the_test_split(name, predictors, data_dir):
    """evaluate on the full fixed test split gives exactly the card's figures."""
    from medcls.evaluate import evaluate_model

    folder = _package_dir(name)
    card = json.loads((folder / "card.json").read_text())
    data = require(data_dir / DATA_OF_TASK[card["task"]])
    report = evaluate_model(folder, data, split="test", bootstrap=0)
    stated = card["metrics"]["test"]
    assert report["n"] == stated["n"]
    assert report["confusion_matrix"] == stated["confusion_matrix"]
    for key in ("accuracy", "macro_f1"):
        assert report[key] == pytest.approx(stated[key], abs=1e-9), key
    for key in ("roc_auc", "ece"):
        assert report[key] == pytest.approx(stated[key], abs=2e-4), key
    for cls, m in stated["per_class"].items():
        assert report["per_class"][cls]["recall"] == pytest.approx(m["recall"], abs=1e-9)


def test_default_brain_model_card_is_complete():
    from medcls.package import read_card

    card = read_card(_package_dir("brain-mri-default"))
    assert card["classes"] == ["glioma", "meningioma", "no_tumor", "pituitary"]
    assert card["metrics"]["test"]["n"] == 595
    assert "python -m medcls" in card["training"]["command"]
    assert any("not a diagnostic" in x.lower() for x in card["limits"])
    assert any("source" in x.lower() for x in card["limits"])
    assert (_package_dir("brain-mri-default") / "model.keras").stat().st_size < 20 * 2**20


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_are_small(name):
    assert (_package_dir(name) / "model.keras").stat().st_size < 20 * 2**20


# ----------------------------------------------------------------------------- calibration

def test_temperature_scaling_lowers_validation_ece(predictors, data_dir):
    from medcls.calibration import expected_calibration_error, fit_temperature, probabilities
    from medcls.data import load_dataset, preprocess_records

    from medcls.data import load_datasets

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
    after = expected_calibration_error(probabilities(logits[single], p.package.temperature), y)
    assert after <= before
    # the stored temperature is the NLL optimum on these splits (partial labels included)
    assert fit_temperature(logits, targets) == pytest.approx(p.package.temperature, rel=1e-3)


def test_fit_temperature_softens_overconfident_logits():
    from medcls.calibration import expected_calibration_error, fit_temperature, probabilities

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 2000)
    logits = rng.normal(0, 1, (2000, 3))
    correct = rng.random(2000) < 0.7  # 70% accurate, but logits claim ~100%
    logits[np.arange(2000), np.where(correct, y, (y + 1) % 3)] += 8.0
    t = fit_temperature(logits, y)
    assert t > 2.0
    assert expected_calibration_error(probabilities(logits, t), y) < \
        expected_calibration_error(probabilities(logits, 1.0), y) / 3


# ----------------------------------------------------------------------------- contract

def test_spec_round_trip_and_file_inference_equals_training_path(predictors, data_dir, brain_rows):
    from medcls.data import load_dataset, preprocess_records
    from medcls.preprocess import PreprocessSpec

    p = predictors("brain-mri-default")
    spec = PreprocessSpec.from_dict(p.card["preprocessing"])
    assert spec.to_dict() == p.card["preprocessing"]
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    ds = load_dataset(require(data_dir / "brain-mri"), classes=p.classes)
    recs = [r for r in ds.split("test")][:12]
    x, _ = preprocess_records(ds, recs, spec)  # the training path
    from_training = p.predict_arrays(x)
    for rec, ref in zip(recs, from_training):
        from_file = p.predict_file(ds.path(rec))  # the app's path
        np.testing.assert_allclose(from_file.probabilities, ref.probabilities, atol=1e-5)


def test_loader_refuses_inconsistent_packages(tmp_path):
    from medcls.errors import ModelPackageError
    from medcls.package import load_package

    src = _package_dir("brain-mri-default")
    bad = tmp_path / "m"
    shutil.copytree(src, bad)
    card = json.loads((bad / "card.json").read_text())

    (bad / "card.json").unlink()
    with pytest.raises(ModelPackageError, match="card"):
        load_package(bad)

    for change, match in (({"classes": card["classes"] + ["extra"]}, "classes"),
                          ({"model_sha256": "0" * 64}, "hash"),
                          ({"input_size": card["input_size"] + 32,
                            "preprocessing": {**card["preprocessing"],
                                              "input_size": card["input_size"] + 32}}, "input"),
                          ({"cam_layer": "no_such_layer"}, "no_such_layer"),
                          ({"temperature": 0}, "temperature")):
        (bad / "card.json").write_text(json.dumps({**card, **change}))
        with pytest.raises(ModelPackageError, match=match):
            load_package(bad)


# ----------------------------------------------------------------------------- saliency

@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam"])
def test_compiled_cam_matches_tf_keras_vis(method, predictors, data_dir, brain_rows):
    from medcls.saliency import reference_cam
    from medcls.scan import load_scan

    p = predictors("brain-mri-default")
    rows = [r for r in brain_rows if r["split"] == "test" and r["box_w"]][:2]
    for r in rows:  # one scan at a time, as the app explains
        x = p.preprocess(load_scan(data_dir / "brain-mri" / r["file"])).array[None]
        cams, logits, _, target = p.cam_engine().cam(x, method)
        ref = reference_cam(p.model, x, target, p.card["cam_layer"], method).reshape(cams.shape)
        assert np.abs(cams - ref).max() < 1e-3
        assert cams.std() > 0.05  # not a constant map


POINTING_SAMPLE = 40


def test_gradcam_points_at_the_tumour(predictors, data_dir, brain_rows):
    """On a fixed sample of test tumour images, the Grad-CAM peak (in original image
    coordinates) lies inside the tumour box for most images."""
    from medcls.scan import load_scan

    p = predictors("brain-mri-default")
    rows = [r for r in brain_rows if r["split"] == "test" and r["box_w"]]
    rows = rows[:: max(1, len(rows) // POINTING_SAMPLE)][:POINTING_SAMPLE]
    hits = 0
    for r in rows:
        scan = load_scan(data_dir / "brain-mri" / r["file"])
        e = p.explain(scan, "gradcam")
        assert e.heatmap.shape == scan.shape
        assert e.heatmap.std() > 0.01
        h, w = scan.shape
        xc, yc, bw, bh = (float(r[k]) for k in ("box_xc", "box_yc", "box_w", "box_h"))
        py, px = np.unravel_index(np.argmax(e.heatmap), e.heatmap.shape)
        margin = 0.02  # of the image size, stated in the benchmark as well
        inside = (abs(px / w - xc) <= bw / 2 + margin) and (abs(py / h - yc) <= bh / 2 + margin)
        hits += inside
    rate = hits / len(rows)
    print(f"pointing game on {len(rows)} test tumour images: {rate:.3f}")
    assert rate >= POINTING_FLOOR


POINTING_FLOOR = 0.6


# ----------------------------------------------------------------------------- input gate

def test_input_gate_flags_chest_radiographs_not_brain_scans(predictors, data_dir):
    from medcls.data import load_dataset, preprocess_records

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


# ----------------------------------------------------------------------------- training smoke

def test_training_smoke_run_writes_a_loadable_package(tmp_path, data_dir):
    """A tiny run of the real training code: a valid package whose card matches the model."""
    from medcls.inference import Predictor
    from medcls.train import TrainConfig, train

    out = train(TrainConfig(data=str(require(data_dir / "brain-mri")), arch="seed-cnn",
                            out=str(tmp_path / "smoke"), epochs=1, batch_size=16, max_train=48,
                            input_size=64, cache_dir=None, patience=1), command="pytest smoke")
    p = Predictor.from_path(out)
    assert p.card["metrics"]["test"]["n"] == 24
    assert p.card["preprocessing"]["input_size"] == 64
    probs = p.predict_arrays(np.zeros((2, 64, 64, 3), np.float32))
    assert all(abs(q.probabilities.sum() - 1) < 1e-6 for q in probs)


def test_box_loss_rewards_a_class_map_peaking_inside_the_box():
    from medcls.train import box_energy_loss

    targets = np.zeros((3, 4, 4, 3), np.float32)
    targets[:2, ..., 1] = -1
    targets[:2, 1:3, 1:3, 1] = 1  # images 0 and 1: class 1 with a box; image 2: no box
    maps = np.zeros((3, 4, 4, 3), np.float32)
    maps[0, 1, 1, 1] = 10.0  # true class peaks inside the box
    maps[1, 3, 3, 1] = 10.0  # ... outside
    maps[1, 1, 1, 0] = 10.0  # another class inside does not help
    maps[2, 0, 0, 2] = 10.0
    loss = np.asarray(box_energy_loss(targets, maps))
    assert loss[0] < 0.01 and loss[1] > 5 and loss[2] == 0
    flat = np.asarray(box_energy_loss(targets, np.zeros_like(maps)))
    assert flat[0] == pytest.approx(-np.log(4 / 16), rel=1e-4)  # uniform map: 4 of 16 cells inside
