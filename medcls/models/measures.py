"""Measures of masks and regions: Dice, IoU, 95% Hausdorff distance and the longest diameter
(in mm where the pixel spacing is known).
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else float(2.0 * (pred & truth).sum() / denom)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    union = (pred | truth).sum()
    return 1.0 if union == 0 else float((pred & truth).sum() / union)


def boundary_points(mask: np.ndarray) -> np.ndarray:
    """(x, y) centres of the mask's boundary pixels (every outer contour, no simplification)."""
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return np.zeros((0, 2), np.float64)
    return np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64)


def longest_diameter(mask: np.ndarray, pixel_spacing: tuple[float, float] | None = None) -> float:
    """The longest distance between two boundary points of the mask (as radiologists measure a
    lesion's longest axis), between pixel centres; in mm with ``pixel_spacing`` (row, column),
    else in pixels. Over the convex hull's vertices: the farthest pair is always two of them."""
    pts = boundary_points(mask)
    if len(pts) < 2:
        return 0.0
    hull = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    if pixel_spacing:
        hull = hull * np.array([pixel_spacing[1], pixel_spacing[0]])
    diff = hull[:, None, :] - hull[None, :, :]
    return float(np.sqrt((diff ** 2).sum(-1)).max())


def hausdorff95(pred: np.ndarray, truth: np.ndarray, pixel_spacing: tuple[float, float] | None = None) -> float:
    """95th percentile of the symmetric boundary distances (pixels, or mm with spacing);
    ``nan`` when either mask is empty."""
    from scipy.ndimage import distance_transform_edt

    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() or not truth.any():
        return float("nan")
    sampling = pixel_spacing or (1.0, 1.0)

    def edge(m):
        return m & ~cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)

    ep, et = edge(pred), edge(truth)
    d_to_t = distance_transform_edt(~et, sampling=sampling)[ep]
    d_to_p = distance_transform_edt(~ep, sampling=sampling)[et]
    return float(np.percentile(np.concatenate([d_to_t, d_to_p]), 95))


Box = Sequence[float]  # (x0, y0, x1, y1), ends exclusive


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
