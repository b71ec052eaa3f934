"""medcls.engine.compare: agreement and probability spread on constructed probability rows (known
answers), box/mask IoU on constructed boxes and heatmaps, the class-list check, card rows; and
one real comparison of two shipped brain-MRI models on a real test-split brain MRI.

The real run uses the shipped ``models/`` folder ($MEDCLS_MODELS overrides) and skips when it
holds fewer than two brain-mri packages.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import PROJECT_ROOT, model_packages

from medcls.core.errors import IncompatibleModelsError, MedclsError
from medcls.engine.compare import (
    agreement,
    card_table,
    check_compatible,
    compare,
    heatmap_mask,
    mask_iou,
    summarize,
)

CLASSES = ["glioma", "meningioma", "no_tumor"]


# ----------------------------------------------------------------------------- agreement

def test_agree_case_with_exact_spread():
    # dyadic fractions: every difference is exact in binary floating point
    a = agreement([[0.75, 0.25, 0.0], [0.5, 0.25, 0.25]], CLASSES)
    assert a.agree and not a.disagree
    assert a.labels == ("glioma", "glioma") and a.label == "glioma"
    assert a.spread == {"glioma": 0.25, "meningioma": 0.0, "no_tumor": 0.25}
    assert a.max_spread == 0.25 and a.max_spread_class == "glioma"  # first class on a tie
    assert a.votes == {"glioma": 2}


def test_disagree_case_with_exact_spread():
    rows = [[0.75, 0.25, 0.0], [0.125, 0.875, 0.0], [0.5, 0.25, 0.25]]
    a = agreement(rows, CLASSES)
    assert a.disagree and not a.agree and a.label is None
    assert a.labels == ("glioma", "meningioma", "glioma")
    assert a.spread == {"glioma": 0.625, "meningioma": 0.625, "no_tumor": 0.25}
    assert a.max_spread == 0.625
    assert a.votes == {"glioma": 2, "meningioma": 1}


def test_identical_rows_have_zero_spread():
    a = agreement([[0.1, 0.2, 0.7]] * 4, CLASSES)
    assert a.agree and a.label == "no_tumor"
    assert a.max_spread == 0.0 and set(a.spread.values()) == {0.0}


def test_one_class_list_per_model_is_accepted_when_equal():
    a = agreement([[0.5, 0.5], [0.25, 0.75]], [["x", "y"], ["x", "y"]])
    assert a.classes == ("x", "y") and a.disagree and a.spread == {"x": 0.25, "y": 0.25}


def test_class_list_mismatch_raises():
    with pytest.raises(IncompatibleModelsError, match="class list"):
        agreement([[0.5, 0.5], [0.5, 0.5]], [["x", "y"], ["x", "z"]])
    with pytest.raises(IncompatibleModelsError):
        agreement([[0.5, 0.25, 0.25]], ["x", "y"])  # row longer than the class list
    card = {"name": "a", "task": "brain-mri", "classes": CLASSES}
    with pytest.raises(IncompatibleModelsError, match="classes"):
        check_compatible([card, {**card, "name": "b", "classes": CLASSES[::-1]}])
    with pytest.raises(IncompatibleModelsError, match="task"):
        check_compatible([card, {**card, "name": "c", "task": "chest-xray"}])
    assert issubclass(IncompatibleModelsError, MedclsError)
    assert issubclass(IncompatibleModelsError, ValueError)


def test_compare_refuses_mismatched_models_before_running_them():
    def never(*args, **kwargs):
        raise AssertionError("explain must not run for incompatible models")

    a = SimpleNamespace(card={"name": "a", "task": "t", "classes": ["x", "y"]}, explain=never)
    b = SimpleNamespace(card={"name": "b", "task": "t", "classes": ["x", "z"]}, explain=never)
    with pytest.raises(IncompatibleModelsError):
        compare([a, b], scan=None)
    with pytest.raises(IncompatibleModelsError, match="two or more"):
        compare([a], scan=None)


# ----------------------------------------------------------------------------- overlap

def test_mask_iou_of_thresholded_heatmaps():
    a = np.zeros((10, 10), np.float32)
    b = np.zeros((10, 10), np.float32)
    a[0:4, 0:5] = 1.0  # 20 px hot
    a[5:, 5:] = 0.25  # below half the peak: not in the mask
    b[2:6, 0:5] = 0.5  # 20 px, 10 shared with a
    ma, mb = heatmap_mask(a, 0.5), heatmap_mask(b, 0.5)
    assert ma.sum() == 20 and mb.sum() == 20
    assert mask_iou(ma, mb) == pytest.approx(10 / 30)
    assert mask_iou(ma, ma) == 1.0
    assert not heatmap_mask(np.zeros((4, 4)), 0.5).any()
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) is None


def _fake_result(name, probs, heatmap, box):
    """A ModelResult-shaped object without a network (summarize only reads these fields)."""
    from medcls.engine.compare import ModelResult

    pred = SimpleNamespace(probabilities=np.asarray(probs), classes=("x", "y"))
    region = SimpleNamespace(box=box, threshold=0.5)
    expl = SimpleNamespace(prediction=pred, heatmap=heatmap, region=region, method="gradcam")
    return ModelResult(name=name, card={"name": name, "task": "t", "classes": ["x", "y"]},
                       explanation=expl, ms=1.0)


def test_summarize_pairwise_overlap_on_constructed_results():
    hm1 = np.zeros((10, 10), np.float32)
    hm1[0:10, 0:10] = 1.0
    hm2 = np.zeros((10, 10), np.float32)
    hm2[0:10, 0:5] = 1.0
    r1 = _fake_result("m1", [0.75, 0.25], hm1, (0, 0, 10, 10))
    r2 = _fake_result("m2", [0.25, 0.75], hm2, (0, 0, 5, 10))
    r3 = _fake_result("m3", [0.5, 0.5], hm2, (20, 20, 30, 30))
    c = summarize([r1, r2, r3])
    assert c.disagree and c.agreement.labels == ("x", "y", "x")
    assert c.probability_spread == {"x": 0.5, "y": 0.5} and c.max_spread == 0.5
    assert [(p.i, p.j) for p in c.pairs] == [(0, 1), (0, 2), (1, 2)]
    assert [p.box_iou for p in c.pairs] == [0.5, 0.0, 0.0]
    assert [p.mask_iou for p in c.pairs] == [0.5, 0.5, 1.0]
    assert c.mean_box_iou == pytest.approx(1 / 6) and c.mean_mask_iou == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- cards

def test_card_table_reads_test_split_size_and_speed():
    base = {"name": "a", "architecture": "cnn", "classes": ["x", "y"], "parameters": 1000,
            "size_bytes": 2_500_000,
            "metrics": {"test": {"n": 10, "accuracy": 0.9, "macro_f1": 0.85, "ece": 0.05,
                                 "roc_auc": 0.95,
                                 "per_class": {"x": {"recall": 1.0}, "y": {"recall": 0.8}}},
                        "val": {"accuracy": 0.1}}}
    rows = card_table([base, {**base, "name": "b", "speed": {"single_scan_ms_median": 42.0},
                              "metrics": {}}])
    a, b = rows
    assert a["model"] == "a" and a["accuracy"] == 0.9 and a["macro_f1"] == 0.85
    assert a["recall x"] == 1.0 and a["recall y"] == 0.8
    assert a["ece"] == 0.05 and a["roc_auc"] == 0.95 and a["n"] == 10
    assert a["size_mb"] == 2.5 and a["parameters"] == 1000
    assert a["ms_per_scan"] is None  # no speed entry in the card
    assert b["ms_per_scan"] == 42.0 and b["accuracy"] is None and b["recall x"] is None


# ----------------------------------------------------------------------------- real run

def test_compare_two_shipped_models_on_a_real_brain_mri(brain_test_jpeg):
    from medcls.engine.inference import Predictor
    from medcls.io.load import load_scan

    paths = model_packages("brain-mri", 2)
    scan = load_scan(brain_test_jpeg)
    predictors = [Predictor.from_path(p) for p in paths]
    c = compare(predictors, scan, "gradcam")
    assert len(c.results) == 2
    assert [r.name for r in c.results] == [p.card["name"] for p in predictors]
    for r in c.results:
        assert r.ms > 0
        assert r.explanation.heatmap.shape == scan.shape
        assert np.isclose(r.prediction.probabilities.sum(), 1.0, atol=1e-5)
    labels = tuple(r.prediction.label for r in c.results)
    assert c.agreement.labels == labels and c.agree == (len(set(labels)) == 1)
    assert 0.0 <= c.max_spread <= 1.0
    assert len(c.pairs) == 1
    for value in (c.pairs[0].box_iou, c.pairs[0].mask_iou, c.mean_box_iou, c.mean_mask_iou):
        assert value is not None and 0.0 <= value <= 1.0


def test_shipped_cards_carry_measured_speed_for_the_table(tmp_path):
    """The comparison table's ms per scan comes from the cards, written by bench.speed; a card
    update never rewrites the model's identity (hash, size) or the contract."""
    import shutil

    from medcls.core.errors import ModelPackageError
    from medcls.models.package import list_packages, read_card, update_card

    shipped = list_packages(PROJECT_ROOT / "models")
    assert len(shipped) >= 4
    rows = card_table([card for _, card in shipped])
    for row in rows:
        assert row["ms_per_scan"] is not None and 1.0 < row["ms_per_scan"] < 1000.0, row["model"]
    folder = tmp_path / "pkg"
    folder.mkdir()
    shutil.copy(shipped[0][0] / "card.json", folder / "card.json")
    card = update_card(folder, {"speed": {"single_scan_ms_median": 12.5}})
    assert card["speed"]["single_scan_ms_median"] == 12.5 and read_card(folder)["speed"] == card["speed"]
    for field in ("model_sha256", "classes", "input_size"):
        with pytest.raises(ModelPackageError):
            update_card(folder, {field: 1})
    assert read_card(folder)["model_sha256"] == shipped[0][1]["model_sha256"]
