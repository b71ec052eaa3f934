"""The one preprocessing contract shared by training and inference.

A :class:`PreprocessSpec` is a small, JSON-serialisable description that a model
card carries; :func:`preprocess` applies it to one scan and :func:`preprocess_batch`
to many (same code, same result). Steps, in order:

1. display conversion: the scan's default window (the DICOM file's own VOI, or
   percentile clipping for plain images), MONOCHROME1 inverted;
2. grayscale;
3. crop to the head/body: the largest foreground region after a morphological
   opening, so black borders, burned-in text and rulers fall away;
4. optional denoising (OpenCV non-local means or bilateral filter);
5. intensity normalisation inside the foreground (min-max to [0, 1] or z-score),
   optional CLAHE;
6. resize keeping the aspect ratio, padded to a square of the model's input size;
7. the model's channel count.

The returned :class:`Geometry` maps model-grid coordinates back to the original
image, so a heatmap can be laid over what the user uploaded.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from medcls.io.display import display_image
from medcls.io.load import load_scan
from medcls.io.scan import Scan

cv2.setNumThreads(1)  # parallelism comes from the data pipeline's workers, not inside OpenCV


NORMALIZATIONS = ("minmax", "zscore", "fixed")


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input. Stored in the model card as a dict."""

    input_size: int = 224
    channels: int = 3
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    crop: bool = True
    crop_margin: float = 0.04
    denoise: str | None = None  # None, "nlmeans" or "bilateral"
    denoise_strength: float = 5.0
    # "minmax": per-image foreground percentiles to [0, 1]; "zscore": per-image foreground mean 0,
    # sd 1; "fixed": one scale for every image (the full 8/16-bit range of a raster, a DICOM file's
    # own window), so absolute intensity is kept (echogenicity in ultrasound)
    normalize: str = "minmax"
    clahe: bool = False
    clahe_clip: float = 2.0
    version: int = 1

    def __post_init__(self) -> None:
        if self.input_size < 8:
            raise ValueError("input_size must be at least 8")
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        if self.denoise not in (None, "nlmeans", "bilateral"):
            raise ValueError("denoise must be None, 'nlmeans' or 'bilateral'")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(map(repr, NORMALIZATIONS))}")
        object.__setattr__(self, "clip_percentiles", tuple(float(p) for p in self.clip_percentiles))

    @property
    def unit_range(self) -> bool:
        """Whether model inputs lie in [0, 1] (background 0)."""
        return self.normalize in ("minmax", "fixed")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clip_percentiles"] = list(self.clip_percentiles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Geometry:
    """Where the model's square input came from in the original image."""

    original_shape: tuple[int, int]  # (H, W) of the scan
    crop_box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in original pixels
    scaled_size: tuple[int, int]  # (w, h) of the crop after resizing
    pad: tuple[int, int]  # (left, top) padding in the model grid
    input_size: int

    def to_original(self, grid: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """Map an (S, S) array on the model grid onto the original (H, W) image; zero outside the crop."""
        grid = np.asarray(grid, dtype=np.float32)
        if grid.shape[:2] != (self.input_size, self.input_size):
            grid = cv2.resize(grid, (self.input_size, self.input_size), interpolation=interpolation)
        left, top = self.pad
        w, h = self.scaled_size
        inner = grid[top:top + h, left:left + w]
        x0, y0, x1, y1 = self.crop_box
        out = np.zeros(self.original_shape, dtype=np.float32)
        out[y0:y1, x0:x1] = cv2.resize(inner, (x1 - x0, y1 - y0), interpolation=interpolation)
        return out

    def box_to_original(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A box (x0, y0, x1, y1) on the model grid, in original pixel coordinates."""
        left, top = self.pad
        w, h = self.scaled_size
        x0c, y0c, x1c, y1c = self.crop_box
        sx, sy = (x1c - x0c) / w, (y1c - y0c) / h
        x0, y0, x1, y1 = box
        return (x0c + (x0 - left) * sx, y0c + (y0 - top) * sy,
                x0c + (x1 - left) * sx, y0c + (y1 - top) * sy)

    def box_to_grid(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A box (x0, y0, x1, y1) in original pixels, on the model grid."""
        left, top = self.pad
        w, h = self.scaled_size
        x0c, y0c, x1c, y1c = self.crop_box
        sx, sy = w / (x1c - x0c), h / (y1c - y0c)
        x0, y0, x1, y1 = box
        return (left + (x0 - x0c) * sx, top + (y0 - y0c) * sy,
                left + (x1 - x0c) * sx, top + (y1 - y0c) * sy)


@dataclass(frozen=True)
class Preprocessed:
    """The model input for one scan, with its geometry and foreground mask."""

    array: np.ndarray  # (S, S, C) float32
    geometry: Geometry
    mask: np.ndarray = field(repr=False)  # (S, S) bool: foreground (head/body) on the model grid


# ----------------------------------------------------------------------------- steps

def to_gray01(scan: Scan, fixed: bool = False) -> np.ndarray:
    """Steps 1-2: the scan's default display conversion, as one grayscale channel in [0, 1].
    ``fixed``: the same scale for every image instead of per-image percentiles (8/16-bit rasters
    over their full range; a DICOM window stored in the file; percentiles only as the fallback)."""
    if fixed and scan.source_format != "dicom" and scan.bits_stored in (8, 16):
        full = float(2 ** scan.bits_stored - 1)
        img = display_image(scan, center=full / 2, width=full)
    else:
        img = display_image(scan)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(img, dtype=np.float32)


def foreground_mask(gray01: np.ndarray) -> np.ndarray:
    """The largest foreground region (head/body), robust to borders, text and rulers.

    Otsu's threshold on a blurred 8-bit copy (halved, so dark tissue stays in),
    a morphological opening that cuts thin bridges to labels and rulers, then the
    largest connected component with its holes filled.
    """
    h, w = gray01.shape
    u8 = np.clip(gray01 * 255.0, 0, 255).astype(np.uint8)
    k = max(3, (min(h, w) // 100) | 1)
    blur = cv2.GaussianBlur(u8, (k, k), 0)
    otsu, _ = cv2.threshold(blur, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(8.0, 0.5 * float(otsu))
    fg = (blur > thr).astype(np.uint8)
    ko = max(3, (min(h, w) // 60) | 1)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ko, ko)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return np.ones_like(gray01, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    comp = (labels == largest).astype(np.uint8)
    # fill holes: flood the background from the border, what is not reached is inside
    contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(comp)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


def crop_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the mask with a relative margin; the whole image if the
    foreground is implausibly small (under 2% of the image)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) < 0.02 * h * w:
        return 0, 0, w, h
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    mx, my = int(round(margin * (x1 - x0))), int(round(margin * (y1 - y0)))
    return max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)


def _denoise(img01: np.ndarray, method: str | None, strength: float) -> np.ndarray:
    if method is None:
        return img01
    u8 = np.clip(img01 * 255.0, 0, 255).astype(np.uint8)
    if method == "nlmeans":
        out = cv2.fastNlMeansDenoising(u8, None, h=float(strength), templateWindowSize=7,
                                       searchWindowSize=21)
    else:
        out = cv2.bilateralFilter(u8, d=5, sigmaColor=float(strength) * 5, sigmaSpace=5)
    return out.astype(np.float32) / 255.0


def _normalize(img01: np.ndarray, mask: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    fg = img01[mask] if mask.any() else img01.ravel()
    if spec.normalize == "fixed":
        out = np.clip(img01, 0.0, 1.0)
    elif spec.normalize == "minmax":
        lo = float(np.percentile(img01, spec.clip_percentiles[0]))
        hi = float(np.percentile(fg, spec.clip_percentiles[1]))
        if hi <= lo:
            lo, hi = float(img01.min()), float(img01.max())
        out = np.clip((img01 - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    else:
        mean, std = float(fg.mean()), float(fg.std())
        out = (img01 - mean) / max(std, 1e-6)
        out = np.where(mask, out, (0.0 - mean) / max(std, 1e-6))
    out = out.astype(np.float32)
    if spec.clahe and spec.unit_range:
        clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(8, 8))
        out = clahe.apply(np.clip(out * 255.0, 0, 255).astype(np.uint8)).astype(np.float32) / 255.0
    return out


def _resize_pad(img: np.ndarray, size: int, pad_value: float,
                interpolation: int | None = None) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    if interpolation is None:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(img, (nw, nh), interpolation=interpolation)
    left, top = (size - nw) // 2, (size - nh) // 2
    out = np.full((size, size), pad_value, dtype=img.dtype)
    out[top:top + nh, left:left + nw] = resized
    return out, (nw, nh), (left, top)


# ----------------------------------------------------------------------------- pipeline

def preprocess(scan: Scan, spec: PreprocessSpec) -> Preprocessed:
    """Apply the spec to one scan: the model input, its geometry and foreground mask."""
    gray = to_gray01(scan, fixed=spec.normalize == "fixed")
    h, w = gray.shape
    mask_full = foreground_mask(gray) if spec.crop or spec.normalize else np.ones_like(gray, bool)
    box = crop_box(mask_full, spec.crop_margin) if spec.crop else (0, 0, w, h)
    x0, y0, x1, y1 = box
    img = gray[y0:y1, x0:x1]
    mask = mask_full[y0:y1, x0:x1]
    img = _denoise(img, spec.denoise, spec.denoise_strength)
    img = _normalize(img, mask, spec)
    background = 0.0 if spec.unit_range else float(img[~mask].mean()) if (~mask).any() else 0.0
    arr, scaled, pad = _resize_pad(img, spec.input_size, background)
    if spec.unit_range:  # area/linear resampling in float32 can round to 1.0000001
        arr = np.clip(arr, 0.0, 1.0)
    m, _, _ = _resize_pad(mask.astype(np.uint8), spec.input_size, 0, cv2.INTER_NEAREST)
    if spec.channels == 3:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    else:
        arr = arr[:, :, None]
    geometry = Geometry(original_shape=(h, w), crop_box=(x0, y0, x1, y1), scaled_size=scaled,
                        pad=pad, input_size=spec.input_size)
    return Preprocessed(array=np.ascontiguousarray(arr, dtype=np.float32), geometry=geometry,
                        mask=m.astype(bool))


def preprocess_file(source, spec: PreprocessSpec) -> Preprocessed:
    """Load a path or bytes with :func:`medcls.io.load.load_scan` and preprocess it."""
    return preprocess(load_scan(source), spec)


def preprocess_batch(scans: Iterable[Scan], spec: PreprocessSpec, workers: int = 2) -> list[Preprocessed]:
    """:func:`preprocess` over many scans in a thread pool (OpenCV releases the GIL).
    Identical to calling :func:`preprocess` on each."""
    scans = list(scans)
    if workers <= 1 or len(scans) <= 1:
        return [preprocess(s, spec) for s in scans]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: preprocess(s, spec), scans))


def stack(items: Sequence[Preprocessed]) -> np.ndarray:
    """The batch tensor (N, S, S, C) of preprocessed items."""
    return np.stack([p.array for p in items]).astype(np.float32)
