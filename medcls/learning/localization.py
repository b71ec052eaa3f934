"""Measuring heatmaps: do they point at the tumour, and are they faithful to the model?

Localisation against a ground-truth box (x0, y0, x1, y1 in the heatmap's pixel grid):
- :func:`pointing_hit`: the heatmap's maximum lies inside the box (grown by a margin);
- :func:`energy_in_box`: the share of heatmap mass inside the box;
- :func:`box_iou`: intersection over union of two boxes.

Faithfulness (Petsiuk et al., RISE, 2018): :func:`deletion_insertion` removes (deletion) or
reveals (insertion) pixels in the heatmap's order and tracks the target class probability;
the area under each curve is reported. Lower deletion and higher insertion AUC mean the
heatmap ranks pixels by what the model really uses; compare with a random heatmap.

Zeroing pixels makes images the model never saw (black holes in a brain), so deletion scores
every heatmap worse than random. :func:`road` follows ROAD (Rong et al., ICML 2022): removed
pixels are *imputed* from their neighbours (noisy linear imputation: each removed pixel is the
weighted mean of its 8 neighbours, solved as one sparse linear system, plus a little noise), so
the removal itself leaks no shape; the class probability is read after removing the most
relevant (MoRF, lower is better) and the least relevant (LeRF, higher is better) pixels at
several percentiles.
"""

from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

from medcls.models.measures import box_iou

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


ROAD_PERCENTILES = (0.1, 0.3, 0.5, 0.7, 0.9)


_NEIGHBOURS = np.array([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], np.float32)


def noisy_linear_impute(image: np.ndarray, removed: np.ndarray, noise: float = 0.01,
                        rng: np.random.Generator | None = None, sweeps: int = 150,
                        exact: bool = False) -> np.ndarray:
    """ROAD's imputation: every removed pixel takes the weighted mean of its 8 neighbours
    (1/6 for the 4 direct, 1/12 for the diagonal ones; known pixels fixed), then Gaussian noise
    of sd ``noise`` is added to the removed pixels. ``image`` (S, S) or (S, S, C) with equal
    channels (gray: solved once); ``removed`` (S, S) bool.

    The linear system is solved iteratively, coarse to fine (:func:`_impute_cascade`: the
    solution at half the size starts the Jacobi sweeps at full size; OpenCV filters, tens of
    milliseconds per image). ``exact=True`` solves it with a sparse direct solver instead
    (seconds per image; the tests compare the two)."""
    img = np.asarray(image, np.float32)
    gray = img if img.ndim == 2 else img[..., 0]
    removed = np.asarray(removed, bool)
    if not removed.any():
        return img.copy()
    x = _impute_sparse(gray, removed) if exact else _impute_cascade(gray, removed, sweeps)
    rng = rng or np.random.default_rng(0)
    x = np.where(removed, x + rng.normal(0.0, noise, x.shape).astype(np.float32), x).astype(np.float32)
    return x if img.ndim == 2 else np.repeat(x[..., None], img.shape[-1], axis=-1)


def _impute_cascade(gray: np.ndarray, removed: np.ndarray, sweeps: int) -> np.ndarray:
    """Jacobi sweeps of the imputation equations, started from the solution at half the size
    (recursively; a cascadic multigrid), so large holes converge in a few hundred sweeps."""
    H, W = gray.shape
    known = (~removed).astype(np.float32)
    if min(H, W) > 24:
        h, w = (H + 1) // 2, (W + 1) // 2
        k_small = cv2.resize(known, (w, h), interpolation=cv2.INTER_AREA)
        v_small = cv2.resize(gray * known, (w, h), interpolation=cv2.INTER_AREA) / np.maximum(k_small, 1e-6)
        coarse = _impute_cascade(v_small.astype(np.float32), k_small < 0.5, sweeps)
        start = cv2.resize(coarse, (W, H), interpolation=cv2.INTER_LINEAR)
    else:
        start = np.full_like(gray, float(gray[~removed].mean()) if (~removed).any() else 0.0)
    weight = cv2.filter2D(np.ones_like(gray), -1, _NEIGHBOURS, borderType=cv2.BORDER_CONSTANT)
    x = np.where(removed, start, gray).astype(np.float32)
    for _ in range(sweeps):
        avg = cv2.filter2D(x, -1, _NEIGHBOURS, borderType=cv2.BORDER_CONSTANT) / weight
        x = np.where(removed, avg, gray)
    return x


def _impute_sparse(gray: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The same system solved directly (scipy SuperLU): the reference for the sweeps."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    H, W = gray.shape
    ys, xs = np.nonzero(removed)
    n = len(ys)
    idx = -np.ones((H, W), np.int64)
    idx[ys, xs] = np.arange(n)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.ones(n)]
    rhs, wsum = np.zeros(n), np.zeros(n)
    terms = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            w = float(_NEIGHBOURS[dy + 1, dx + 1])
            if not w:
                continue
            ny, nx = ys + dy, xs + dx
            inside = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
            wsum[inside] += w
            terms.append((ny, nx, inside, w))
    for ny, nx, inside, w in terms:
        unknown = inside.copy()
        unknown[inside] = removed[ny[inside], nx[inside]]
        known = inside & ~unknown
        rows.append(np.nonzero(unknown)[0])
        cols.append(idx[ny[unknown], nx[unknown]])
        vals.append(-w / wsum[unknown])
        rhs[known] += w * gray[ny[known], nx[known]] / wsum[known]
    A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)).tocsc()
    out = gray.astype(np.float64).copy()
    out[ys, xs] = spsolve(A, rhs)
    return out.astype(np.float32)


def road(predict_proba: Callable[[np.ndarray], np.ndarray], image: np.ndarray, heatmap: np.ndarray,
         class_index: int, percentiles: Sequence[float] = ROAD_PERCENTILES,
         noise: float = 0.01, seed: int = 0) -> dict:
    """ROAD for one image (S, S, C) and its heatmap (S, S): the class probability after removing
    (and imputing) the top (MoRF) and the bottom (LeRF) ``p`` of pixels by heatmap value, for
    each ``p``. Returns both curves and their means (MoRF lower, LeRF higher is better)."""
    img = np.asarray(image, np.float32)
    S = img.shape[0]
    order = np.argsort(-np.asarray(heatmap, np.float64).ravel(), kind="stable")
    rng = np.random.default_rng(seed)
    batch = []
    for most_relevant_first in (True, False):
        for p in percentiles:
            k = int(round(p * S * S))
            chosen = order[:k] if most_relevant_first else order[::-1][:k]
            removed = np.zeros(S * S, bool)
            removed[chosen] = True
            imp = noisy_linear_impute(img, removed.reshape(S, S), noise, rng)
            batch.append(np.clip(imp, img.min(), img.max()) if img.size else imp)
    probs = predict_proba(np.stack(batch))[:, class_index]
    m = len(percentiles)
    return {"percentiles": list(percentiles), "morf": probs[:m].tolist(), "lerf": probs[m:].tolist(),
            "morf_mean": float(np.mean(probs[:m])), "lerf_mean": float(np.mean(probs[m:]))}


def fit_region_threshold(predictor, dataset, records, method: str = "gradcam",
                         grid: Sequence[float] = tuple(np.round(np.arange(0.2, 0.81, 0.05), 2))) -> dict:
    """The heatmap-region threshold (fraction of the peak) that maximises the mean IoU of the
    region box with the tumour box on ``records`` (use the validation split). Returns the
    threshold with the mean IoU at every candidate."""
    from medcls.models.saliency import heatmap_region

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
    from medcls.engine.inference import Predictor
    from medcls.learning.data import load_dataset
    from medcls.models.package import update_card

    predictor = Predictor.from_path(model_dir)
    dataset = load_dataset(data, classes=predictor.classes)
    fit = fit_region_threshold(predictor, dataset, dataset.split(split) if records is None else records)
    update_card(model_dir, {
        "region_threshold": fit["threshold"],
        "region_threshold_fit": {k: fit[k] for k in ("mean_iou", "n", "method")} | {
            "split": split, "criterion": "mean IoU of the Grad-CAM region box with the tumour box"}})
    return fit
