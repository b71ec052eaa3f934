"""The shipped models: cards reproduced on the fixed test split, sizes, the package contract
(the file path gives what training gives; an inconsistent package is refused)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SHIPPED, require, shipped_package

DATA_OF_TASK = {"brain-mri": "brain-mri", "chest-xray": "chest-xray"}


# ----------------------------------------------------------------------------- cards

@pytest.mark.parametrize("name", SHIPPED)
def test_card_figures_are_reproduced_on_the_test_split(name, predictors, data_dir):
    """evaluate on the full fixed test split gives exactly the card's figures."""
    from medcls.learning.evaluate import evaluate_model

    folder = shipped_package(name)
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
    from medcls.models.package import read_card

    card = read_card(shipped_package("brain-mri-default"))
    assert card["classes"] == ["glioma", "meningioma", "no_tumor", "pituitary"]
    assert card["metrics"]["test"]["n"] == 595
    assert "python -m medcls" in card["training"]["command"]
    assert any("not a diagnostic" in x.lower() for x in card["limits"])
    assert any("source" in x.lower() for x in card["limits"])
    assert (shipped_package("brain-mri-default") / "model.keras").stat().st_size < 20 * 2**20


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_are_small(name):
    assert (shipped_package(name) / "model.keras").stat().st_size < 20 * 2**20


# ----------------------------------------------------------------------------- contract

def test_spec_round_trip_and_file_inference_equals_training_path(predictors, data_dir):
    from medcls.io.preprocess import PreprocessSpec
    from medcls.learning.data import load_dataset, preprocess_records

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
    from medcls.core.errors import ModelPackageError
    from medcls.models.package import load_package

    src = shipped_package("brain-mri-default")
    bad = tmp_path / "m"
    shutil.copytree(src, bad)
    card = json.loads((bad / "card.json").read_text())

    (bad / "card.json").unlink()
    with pytest.raises(ModelPackageError, match="card"):
        load_package(bad)

    for change, match in (({"classes": card["classes"] + ["extra"]}, "class"),  # the outputs, or the class biases
                          ({"model_sha256": "0" * 64}, "hash"),
                          ({"input_size": card["input_size"] + 32,
                            "preprocessing": {**card["preprocessing"],
                                              "input_size": card["input_size"] + 32}}, "input"),
                          ({"cam_layer": "no_such_layer"}, "no_such_layer"),
                          ({"temperature": 0}, "temperature")):
        (bad / "card.json").write_text(json.dumps({**card, **change}))
        with pytest.raises(ModelPackageError, match=match):
            load_package(bad)
