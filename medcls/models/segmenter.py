"""The tumour segmentation companion at inference: where exactly and how large.

A companion package (``models/brain-mri-seg/``: ``model.keras`` + ``card.json``) that a
classifier's card names with ``"segmentation": "<folder>"``. :class:`Segmenter` gives
probabilities on the grid (averaged with the mirror image's when the card says
``flip_average``), mapped back to the original image (crop and padding undone), thresholded;
outline, area, longest diameter, confidence. Training is :mod:`medcls.learning.segmentation`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medcls.core.errors import ModelPackageError
from medcls.io.preprocess import Geometry, Preprocessed, PreprocessSpec, preprocess
from medcls.io.scan import Scan
from medcls.models.card import normal_class
from medcls.models.measures import longest_diameter
from medcls.models.package import CARD_FILE, COMPANION_SCHEMAS, MODEL_FILE, file_sha256

SEG_SCHEMA = COMPANION_SCHEMAS[0]  # "medcls.seg-card/1"
SEG_KEY = "segmentation"  # the classifier card's key naming its companion folder
FLIP_KEY = "flip_average"  # card: average the probabilities of the image and its mirror image


def grid_to_original(grid: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Probabilities on the model grid -> the original image (linear; 0 outside the crop)."""
    return geometry.to_original(np.asarray(grid, np.float32), interpolation=cv2.INTER_LINEAR)


def read_seg_card(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, ValueError):
        raise ModelPackageError(f"Segmentation package {folder.name!r} has no readable "
                                f"{CARD_FILE}.") from None
    if card.get("schema") != SEG_SCHEMA:
        raise ModelPackageError(f"{folder.name!r} is not a segmentation package.")
    for key in ("input_size", "preprocessing", "threshold", "postprocess", "model_sha256"):
        if key not in card:
            raise ModelPackageError(f"The card of {folder.name!r} lacks {key}.")
    return card


@dataclass(frozen=True)
class Segmentation:
    """A tumour mask on the original image, with what a clinician reads off it."""

    mask: np.ndarray = field(repr=False)  # (H, W) bool, original geometry
    probability: np.ndarray = field(repr=False)  # (H, W) float32
    polygon: list[tuple[int, int]]  # outline, (x, y)
    area_px: int
    area_mm2: float | None
    diameter_px: float
    diameter_mm: float | None
    confidence: float  # mean probability inside the mask
    method: str = "U-Net segmentation"

    def as_dict(self) -> dict:
        return {"method": self.method, "area_px": self.area_px, "area_mm2": self.area_mm2,
                "longest_diameter_px": self.diameter_px, "longest_diameter_mm": self.diameter_mm,
                "confidence": self.confidence}


class Segmenter:
    """A loaded companion package: one compiled forward pass, probabilities mapped back."""

    def __init__(self, folder: str | Path, verify_hash: bool = True):
        import keras
        import tensorflow as tf

        self.folder = Path(folder)
        self.card = read_seg_card(self.folder)
        path = self.folder / MODEL_FILE
        if verify_hash and (not path.is_file() or file_sha256(path) != self.card["model_sha256"]):
            raise ModelPackageError(f"Segmentation package {self.folder.name!r}: {MODEL_FILE} is "
                                    "missing or does not match its card.")
        try:
            self.model = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelPackageError(f"Segmentation package {self.folder.name!r} could not be "
                                    f"loaded ({type(exc).__name__}).") from None
        self.spec = PreprocessSpec.from_dict(self.card["preprocessing"])
        s = self.spec.input_size
        self.threshold = float(self.card["threshold"])
        self.flip_average = bool(self.card.get(FLIP_KEY, False))

        def forward(x):
            if not self.flip_average:
                return self.model(x, training=False)
            # the image and its mirror image in one batch; the mirrored answer mirrored back
            both = self.model(tf.concat([x, x[:, :, ::-1]], 0), training=False)
            n = tf.shape(x)[0]
            return (both[:n] + both[n:][:, :, ::-1]) / 2.0

        self._forward = tf.function(forward, input_signature=[tf.TensorSpec([None, s, s, 3], tf.float32)])

    @classmethod
    def from_path(cls, folder: str | Path) -> "Segmenter":
        return cls(folder)

    @property
    def name(self) -> str:
        return self.card["name"]

    def warmup(self) -> "Segmenter":
        self._forward(np.zeros((1, self.spec.input_size, self.spec.input_size, 3), np.float32))
        return self

    def probability_grid(self, x: np.ndarray) -> np.ndarray:
        """Tumour probabilities (N, S, S) of preprocessed images (N, S, S, 3)."""
        return self._forward(np.asarray(x, np.float32)).numpy()[..., 0]

    def probability(self, pre: Preprocessed) -> np.ndarray:
        """Probability on the original image (H, W): inside the head only, crop/padding undone."""
        grid = self.probability_grid(pre.array[None])[0]
        if pre.mask.any():
            grid = grid * pre.mask
        return grid_to_original(grid, pre.geometry)

    def segment(self, scan: Scan, pre: Preprocessed | None = None) -> Segmentation | None:
        """The tumour's mask and measures on ``scan``; ``None`` when nothing reaches the
        threshold. ``pre`` may be this model's own preprocessing of the scan."""
        if pre is None or pre.geometry.input_size != self.spec.input_size:
            pre = preprocess(scan, self.spec)
        prob = self.probability(pre)
        return measure(prob, self.threshold, self.card["postprocess"], scan.pixel_spacing,
                       method=f"segmentation ({self.name})")


def postprocess(mask: np.ndarray, mode: str) -> np.ndarray:
    """``largest``: the largest connected region only; ``all``: the mask as is."""
    if mode == "all" or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def measure(prob: np.ndarray, threshold: float, post: str = "largest",
            pixel_spacing: tuple[float, float] | None = None,
            method: str = "U-Net segmentation") -> Segmentation | None:
    """Threshold a probability map and read off outline, area, longest diameter, confidence."""
    mask = postprocess(prob >= threshold, post)
    if not mask.any():
        return None
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    polygon = [(int(p[0][0]), int(p[0][1])) for p in contour]
    area = int(mask.sum())
    d_px = longest_diameter(mask)
    d_mm = longest_diameter(mask, pixel_spacing) if pixel_spacing else None
    mm2 = float(area * pixel_spacing[0] * pixel_spacing[1]) if pixel_spacing else None
    return Segmentation(mask=mask, probability=prob.astype(np.float32), polygon=polygon,
                        area_px=area, area_mm2=mm2, diameter_px=d_px, diameter_mm=d_mm,
                        confidence=float(prob[mask].mean()), method=method)


def outline_for(prediction, segmenter: Segmenter | None, scan: Scan,
                pre: Preprocessed | None = None, *, card) -> Segmentation | None:
    """What a clinician sees as the tumour's outline: the segmentation, for a finding answer
    only. An answer of the card's normal class (:func:`medcls.models.card.normal_class`, whatever
    it is called), a withheld one (outside the training distribution) or a model without a
    segmentation companion gives ``None``: no outline is drawn."""
    if segmenter is None or prediction is None or prediction.outside_training_distribution \
            or prediction.label == normal_class(card):
        return None
    return segmenter.segment(scan, pre)


def companion_segmenter(classifier_dir: str | Path, card: dict | None = None) -> Segmenter | None:
    """The segmentation package a classifier's card names (``"segmentation": "<folder>"``,
    relative to the models folder, i.e. the classifier folder's parent); ``None`` when the card
    names none. A named but broken companion raises :class:`ModelPackageError`."""
    classifier_dir = Path(classifier_dir)
    if card is None:
        card = json.loads((classifier_dir / CARD_FILE).read_text())
    name = card.get(SEG_KEY)
    if not name:
        return None
    folder = (classifier_dir.parent / name).resolve()
    if not folder.is_dir():
        raise ModelPackageError(f"Model {card.get('name')!r} names the segmentation package "
                                f"{name!r}, which is not in the models folder.")
    return Segmenter(folder)


def size_text(seg: Segmentation) -> str:
    """Area, longest diameter and confidence in words, in mm where the pixel spacing is known."""
    if seg.area_mm2 is not None and seg.diameter_mm is not None:
        size = f"area {seg.area_mm2:.0f} mm², longest diameter {seg.diameter_mm:.1f} mm"
    else:
        size = (f"area {seg.area_px} px, longest diameter {seg.diameter_px:.0f} px "
                "(no pixel spacing in this file, so no mm)")
    return f"{size}; segmentation confidence {seg.confidence:.0%} (mean probability inside the outline)"
