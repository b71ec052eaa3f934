"""Saliency of the shipped default brain model: the compiled CAM methods equal the tf-keras-vis
reference, and Grad-CAM points at the tumour boxes of the test split."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import split_rows

# ----------------------------------------------------------------------------- saliency

@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam"])
def test_compiled_cam_matches_tf_keras_vis(method, predictors, data_dir):
    from medcls.io.load import load_scan
    from medcls.models.saliency import reference_cam

    p = predictors("brain-mri-default")
    rows = [r for r in split_rows(data_dir, "brain-mri") if r["box_w"]][:2]
    for r in rows:  # one scan at a time, as the app explains
        x = p.preprocess(load_scan(data_dir / "brain-mri" / r["file"])).array[None]
        cams, logits, _, target = p.cam_engine().cam(x, method)
        ref = reference_cam(p.model, x, target, p.card["cam_layer"], method).reshape(cams.shape)
        assert np.abs(cams - ref).max() < 1e-3
        assert cams.std() > 0.05  # not a constant map


POINTING_SAMPLE = 40


def test_gradcam_points_at_the_tumour(predictors, data_dir):
    """On a fixed sample of test tumour images, the Grad-CAM peak (in original image
    coordinates) lies inside the tumour box for most images."""
    from medcls.io.load import load_scan

    p = predictors("brain-mri-default")
    rows = [r for r in split_rows(data_dir, "brain-mri") if r["box_w"]]
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
