"""Localisation and faithfulness metrics (medcls.learning.localization) on constructed cases with known
answers, and quick smoke runs of the localisation benchmark (figures are not asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import PROJECT_ROOT, require

from medcls.learning.localization import (
    auc,
    box_iou,
    deletion_insertion,
    energy_in_box,
    normalised_box_to_pixels,
    pointing_hit,
)

BOX = (20, 30, 60, 50)  # x0, y0, x1, y1 on a 100x100 map


def delta(y, x, shape=(100, 100)):
    h = np.zeros(shape, np.float32)
    h[y, x] = 1.0
    return h


def test_delta_inside_the_box_scores_one_outside_zero():
    inside, outside = delta(40, 40), delta(90, 90)
    assert pointing_hit(inside, BOX) and not pointing_hit(outside, BOX)
    assert energy_in_box(inside, BOX) == 1.0
    assert energy_in_box(outside, BOX) == 0.0


def test_pointing_margin_and_energy_share():
    just_outside = delta(40, 61)  # pixel centre 61.5, one and a half pixels right of the box
    assert not pointing_hit(just_outside, BOX)
    assert pointing_hit(just_outside, BOX, margin=0.02)
    uniform = np.ones((100, 100))
    assert energy_in_box(uniform, BOX) == pytest.approx(40 * 20 / 10000)
    assert energy_in_box(np.zeros((100, 100)), BOX) == 0.0


def test_box_iou_known_values():
    assert box_iou(BOX, BOX) == 1.0
    assert box_iou(BOX, (70, 70, 90, 90)) == 0.0
    # (0,0,10,10) vs (5,0,15,10): intersection 50, union 150
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching: ends are exclusive
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 10, 10), (0, 0, 5, 10)) == 0.5
    # undefined, not zero: a missing box, or two empty ones
    assert box_iou(None, (0, 0, 1, 1)) is None and box_iou((0, 0, 1, 1), None) is None
    assert box_iou((3, 3, 3, 3), (5, 5, 5, 5)) is None
    assert box_iou((3, 3, 3, 3), (0, 0, 10, 10)) == 0.0


def test_normalised_box_to_pixels():
    assert normalised_box_to_pixels(0.5, 0.25, 0.2, 0.1, (200, 400)) == pytest.approx((160, 40, 240, 60))


def test_auc_of_constant_and_linear_curves():
    assert auc([1, 1, 1]) == 1.0
    assert auc(np.linspace(1, 0, 11)) == pytest.approx(0.5)


def test_deletion_insertion_rewards_a_faithful_heatmap():
    """A 'model' whose class probability is the mean brightness of a small bright square: a
    heatmap on the square must delete faster and insert faster than one elsewhere."""
    img = np.zeros((32, 32, 1), np.float32)
    img[4:12, 4:12] = 1.0

    def proba(batch):
        p = batch[:, 4:12, 4:12, 0].mean(axis=(1, 2))
        return np.stack([1 - p, p], axis=1)

    good = np.zeros((32, 32))
    good[4:12, 4:12] = 1.0
    bad = np.zeros((32, 32))
    bad[20:28, 20:28] = 1.0
    d_good, i_good, dc, ic = deletion_insertion(proba, img, good, 1, steps=16, blur_sigma=2)
    d_bad, i_bad, _, _ = deletion_insertion(proba, img, bad, 1, steps=16, blur_sigma=2)
    assert dc[0] == pytest.approx(1.0) and dc[-1] == pytest.approx(0.0)
    assert ic[-1] == pytest.approx(1.0)
    assert d_good < d_bad
    assert i_good > i_bad


def test_localization_benchmark_smoke(data_dir):
    """bench.localization's measure on three real test images: every key, values in range."""
    from bench.localization import measure, tumour_rows
    from medcls.engine.inference import Predictor

    model = require(PROJECT_ROOT / "models" / "brain-mri-default")
    predictor = Predictor.from_path(model)
    rows = tumour_rows(data_dir)[:3]
    m = measure(predictor, rows, data_dir, "gradcam")
    for key in ("pointing_game", "energy_in_box", "box_iou", "deletion_auc", "insertion_auc",
                "random_deletion_auc", "random_insertion_auc"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["n"] == 3


def test_results_files_have_the_documented_keys():
    """The committed results the README quotes carry the keys the issue lists."""
    results = PROJECT_ROOT / "bench" / "results"
    loc = json.loads(require(results / "localization.json").read_text())
    for per_model in loc["models"].values():
        for m in per_model.values():
            assert {"pointing_game", "energy_in_box", "box_iou", "deletion_auc", "insertion_auc"} <= set(m)
    speed = json.loads(require(results / "speed.json").read_text())
    assert {"single_scan_ms_median", "single_scan_ms_p95", "batch_scans_per_s", "naive_scans_per_s",
            "cold_start_s", "cpu_model"} <= set(speed)
    mm = json.loads(require(results / "medmnist.json").read_text())
    assert {"auc", "acc", "command"} <= set(mm["pneumoniamnist"]) and {"auc", "acc"} <= set(mm["breastmnist"])
