"""Drawing for people: a heatmap laid over the image, a region's outline and box, a tumour
segmentation's outline.

Used by the report (:mod:`medcls.engine.report`) and the pages; the maths that produce heatmaps and
regions stay in :mod:`medcls.models.saliency`.
"""

from __future__ import annotations

import cv2
import numpy as np

from medcls.models.saliency import Region


def overlay(image01: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4,
            colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """RGB uint8 overlay of a [0, 1] heatmap on a [0, 1] grayscale or RGB image."""
    img = np.asarray(image01, np.float32)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    heat = cv2.applyColorMap(np.clip(heatmap * 255, 0, 255).astype(np.uint8), colormap)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    weight = alpha * np.clip(heatmap, 0, 1)[..., None]  # transparent where the heatmap is cold
    out = img * (1 - weight) + heat * weight
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def draw_region(rgb: np.ndarray, region: Region | None, outline=(255, 255, 255),
                box=(0, 255, 0)) -> np.ndarray:
    """Draw a region's outline and bounding box on an RGB uint8 image (in place; returned)."""
    if region is None:
        return rgb
    thick = max(1, max(rgb.shape[:2]) // 256)
    pts = np.array(region.polygon, np.int32).reshape(-1, 1, 2)
    cv2.polylines(rgb, [pts], True, outline, thick)
    x0, y0, x1, y1 = region.box
    cv2.rectangle(rgb, (x0, y0), (x1 - 1, y1 - 1), box, thick)
    return rgb


def draw_outline(image: np.ndarray, segmentation,
                 color=(255, 215, 0)) -> np.ndarray:
    """The image (gray or RGB, [0, 1] float or uint8) as RGB uint8 with a segmentation's
    outline (:class:`medcls.models.segmenter.Segmentation`) drawn; unchanged (as RGB) without one."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(img.astype(np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgb = np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img[..., :3])
    if segmentation is not None:
        thick = max(1, max(rgb.shape[:2]) // 256)
        cv2.polylines(rgb, [np.array(segmentation.polygon, np.int32).reshape(-1, 1, 2)], True, color, thick)
    return rgb
