"""Values and display: finite modality values, default windows and presets, and the scan as a
doctor expects to see it (window/level applied, MONOCHROME1 inverted).
"""

from __future__ import annotations

import numpy as np

from medcls.core.errors import UnreadableScanError
from medcls.io.scan import Scan

#: Modality values are clamped to +-this: far beyond any real scan, and small enough that
#: windowing arithmetic in float32 cannot overflow to inf (and inf - inf to NaN).
VALUE_LIMIT = 1e30


def finite_values(values: np.ndarray) -> np.ndarray:
    """``values`` (float32) with NaN/inf replaced by the finite extremes and clamped to
    +-VALUE_LIMIT, so windows and model inputs stay finite. A float image (TIFF, DICOM float
    pixel data) may hold NaN for masked pixels; a broken rescale may give inf. Refused when not
    one value is finite: there is no image to show."""
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            raise UnreadableScanError("The image holds no valid pixel values (all are "
                                      "not-a-number or infinite).")
        lo, hi = float(values[finite].min()), float(values[finite].max())
        values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    if values.size and (float(values.min()) < -VALUE_LIMIT or float(values.max()) > VALUE_LIMIT):
        values = np.clip(values, -VALUE_LIMIT, VALUE_LIMIT)
    return np.ascontiguousarray(values, dtype=np.float32)


def is_gray(rgb: np.ndarray) -> bool:
    """True when the three channels are (nearly) equal: a grayscale image stored as colour."""
    # float64: an int16 cast wrapped uint16 values above 32767 (and NaN of float images)
    sample = rgb[:: max(1, rgb.shape[0] // 64), :: max(1, rgb.shape[1] // 64)].astype(np.float64)
    return bool(np.abs(sample[..., 0] - sample[..., 1]).max() <= 2
                and np.abs(sample[..., 1] - sample[..., 2]).max() <= 2)


def percentile_window(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    gray = values if values.ndim == 2 else values.mean(axis=2)
    sample = gray[:: max(1, gray.shape[0] // 256), :: max(1, gray.shape[1] // 256)]
    p_lo, p_hi = (float(p) for p in np.percentile(sample.astype(np.float64), [lo, hi]))
    if p_hi <= p_lo:
        p_lo, p_hi = float(gray.min()), float(gray.max())
    width = max(float(p_hi - p_lo), 1e-6)
    return float(p_lo + width / 2), width


_MODALITY_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "CT": {"Brain": (40, 80), "Subdural": (75, 215), "Stroke": (40, 40), "Bone": (400, 1800),
           "Lung": (-600, 1500), "Soft tissue": (50, 400), "Liver": (30, 150)},
}


def window_presets(modality: str, values: np.ndarray) -> dict[str, tuple[float, float]]:
    presets = dict(_MODALITY_PRESETS.get(modality, {}))
    gray = values if values.ndim == 2 else values.mean(axis=2)
    for name, (lo, hi) in {"Full range": (0.0, 100.0), "Percentile 1-99": (1.0, 99.0),
                           "Percentile 0.5-99.5": (0.5, 99.5)}.items():
        c, w = percentile_window(gray, lo, hi)
        presets[name] = (c, w)
    return presets


def display_image(scan: Scan, center: float | None = None, width: float | None = None) -> np.ndarray:
    """The scan as a doctor expects to see it, as float32 in [0, 1].

    Applies the window (``center``/``width``; default: the file's own VOI or
    percentiles) to the modality values and inverts MONOCHROME1 so that, for
    example, bone is bright on a computed radiograph. Colour images are returned
    as (H, W, 3) scaled to [0, 1]; grayscale as (H, W).
    """
    if center is None and width is None and scan._voi_lut_display is not None:
        out = scan._voi_lut_display.astype(np.float32)
    else:
        c = scan.window_center if center is None else float(center)
        w = scan.window_width if width is None else float(width)
        w = max(w, 1e-6)
        lo = c - w / 2
        out = np.clip((scan.values - lo) / w, 0.0, 1.0).astype(np.float32)
    if scan.photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def to_uint8(img01: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] to uint8 for display and export."""
    return np.clip(np.rint(img01 * 255.0), 0, 255).astype(np.uint8)
