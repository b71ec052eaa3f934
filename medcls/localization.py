"""Measuring heatmaps: do they point at the tumour, and are they faithful to the model?

Localisation against a ground-truth box (x0, y0, x1, y1 in the heatmap's pixel grid):
- :func:`pointing_hit`: the heatmap's maximum lies inside the box (grown by a margin);
- :func:`energy_in_box`: the share of heatmap mass inside the box;
- :func:`box_iou`: intersection over union of two boxes.

Faithfulness (Petsiuk et al., RISE, 2018): :func:`deletion_insertion` removes (deletion) or
reveals (insertion) pixels in the heatmap's order and tracks the target class probability;
the area under each curve is reported. Lower deletion and higher insertion AUC mean the
heatmap ranks pixels by what the model really uses; compare with a random heatmap.
"""

from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

Box = Sequence[float]


def normalised_box_to_pixels(xc: float, yc: float, w: float, h: float,
                             shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """A (centre x, centre y, width, height) box in [0, 1] units to pixel corners on ``shape``."""
    H, W = shape
    return ((xc - w / 2) * W, (yc - h / 2) * H, (xc + w / 2) * W, (yc + h / 2) * H)


def pointing_hit(heatmap: np.ndarray, box: Box, margin: float = 0.0) -> bool:
    """True when the heatmap's maximum (pixel centre) lies in ``box`` grown by ``margin`` x the
    image size on each side."""
    hm = np.asarray(heatmap)
    H, W = hm.shape
    py, px = np.unravel_index(int(np.argmax(hm)), hm.shape)
    x0, y0, x1, y1 = box
    mx, my = margin * W, margin * H
    cx, cy = px + 0.5, py + 0.5
    return bool(x0 - mx <= cx <= x1 + mx and y0 - my <= cy <= y1 + my)


def box_mask(shape: tuple[int, int], box: Box) -> np.ndarray:
    H, W = shape
    x0, y0, x1, y1 = box
    m = np.zeros(shape, bool)
    m[max(0, int(np.floor(y0))):min(H, int(np.ceil(y1))), max(0, int(np.floor(x0))):min(W, int(np.ceil(x1)))] = True
    return m


def energy_in_box(heatmap: np.ndarray, box: Box) -> float:
    """Share of the (non-negative) heatmap mass inside the box; 0 for an empty heatmap."""
    hm = np.clip(np.asarray(heatmap, np.float64), 0, None)
    total = hm.sum()
    if total <= 0:
        return 0.0
    return float(hm[box_mask(hm.shape, box)].sum() / total)


def box_iou(a: Box | None, b: Box | None) -> float | None:
    """IoU of two ``(x0, y0, x1, y1)`` boxes (ends exclusive, as ``Region.box``).

    ``None`` when it is undefined: either box is missing, or both are empty. A caller that
    scores a missing region as a miss says so (``box_iou(...) or 0.0``)."""
    if a is None or b is None:
        return None
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    area_a = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0)
    area_b = max(0.0, bx1 - bx0) * max(0.0, by1 - by0)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = area_a + area_b - inter
    return None if union <= 0 else inter / union


def auc(curve: Sequence[float]) -> float:
    """Area under a curve sampled at equal steps over [0, 1] (trapezoid rule)."""
    y = np.asarray(curve, np.float64)
    if len(y) < 2:
        return float(y.mean()) if len(y) else 0.0
    return float(((y[:-1] + y[1:]) / 2).mean())


def deletion_insertion(predict_proba: Callable[[np.ndarray], np.ndarray], image: np.ndarray,
                       heatmap: np.ndarray, class_index: int, steps: int = 25,
                       blur_sigma: float = 10.0) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Deletion and insertion AUC for one image (S, S, C) and its heatmap (S, S).

    Deletion replaces the top-k pixels by black (the background of the preprocessed image);
    insertion starts from a heavily blurred copy and restores the top-k original pixels.
    ``predict_proba`` maps a batch (N, S, S, C) to class probabilities. All ``steps + 1``
    images of both curves go through the model as one batch.
    """
    img = np.asarray(image, np.float32)
    S = img.shape[0]
    order = np.argsort(-np.asarray(heatmap, np.float64).ravel(), kind="stable")
    counts = np.linspace(0, S * S, steps + 1).round().astype(int)
    blurred = cv2.GaussianBlur(img, (0, 0), blur_sigma)
    if blurred.ndim == 2:
        blurred = blurred[..., None]
    flat_img = img.reshape(S * S, -1)
    flat_blur = blurred.reshape(S * S, -1)
    deleted, inserted = [], []
    for k in counts:
        top = order[:k]
        d = flat_img.copy()
        d[top] = 0.0
        ins = flat_blur.copy()
        ins[top] = flat_img[top]
        deleted.append(d.reshape(img.shape))
        inserted.append(ins.reshape(img.shape))
    probs = predict_proba(np.stack(deleted + inserted))[:, class_index]
    del_curve, ins_curve = probs[:steps + 1], probs[steps + 1:]
    return auc(del_curve), auc(ins_curve), del_curve, ins_curve


def fit_region_threshold(predictor, dataset, records, method: str = "gradcam",
                         grid: Sequence[float] = tuple(np.round(np.arange(0.2, 0.81, 0.05), 2))) -> dict:
    """The heatmap-region threshold (fraction of the peak) that maximises the mean IoU of the
    region box with the tumour box on ``records`` (use the validation split). Returns the
    threshold with the mean IoU at every candidate."""
    from .saliency import heatmap_region

    heatmaps, boxes = [], []
    for rec in records:
        if rec.box is None:
            continue
        scan = dataset.scan(rec)
        heatmaps.append(predictor.explain(scan, method).heatmap)
        boxes.append(normalised_box_to_pixels(*rec.box, scan.shape))
    if not heatmaps:
        raise ValueError("no records with tumour boxes")
    scores = {}
    for t in grid:
        ious = []
        for hm, box in zip(heatmaps, boxes):
            region = heatmap_region(hm, float(t))
            ious.append(box_iou(region.box if region is not None else None, box) or 0.0)
        scores[float(t)] = float(np.mean(ious))
    best = max(scores, key=scores.get)
    return {"threshold": best, "mean_iou": scores[best], "n": len(heatmaps), "method": method,
            "candidates": scores}


def store_region_threshold(model_dir, data, split: str = "val", records=None) -> dict:
    """Fit the region threshold of a model package on ``split`` of ``data`` and write it into the
    package's card (``region_threshold``, with how it was fitted). The model file is unchanged."""
    from .data import load_dataset
    from .inference import Predictor
    from .package import update_card

    predictor = Predictor.from_path(model_dir)
    dataset = load_dataset(data, classes=predictor.classes)
    fit = fit_region_threshold(predictor, dataset, dataset.split(split) if records is None else records)
    update_card(model_dir, {
        "region_threshold": fit["threshold"],
        "region_threshold_fit": {k: fit[k] for k in ("mean_iou", "n", "method")} | {
            "split": split, "criterion": "mean IoU of the Grad-CAM region box with the tumour box"}})
    return fit
