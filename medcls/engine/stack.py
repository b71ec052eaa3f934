"""The stack viewer's data: a series (or one scan) packaged once for the browser, which then
scrolls, windows and measures it without asking the server again.

What is sent, per slice: the modality values as a 12-bit window-able rendering (a PNG whose red
channel holds the high 4 bits and green the low 8 bits of a code; ``value = offset + code *
step``, lossless for integer data spanning at most 4096 values, such as MR and CT), so window/level,
an ellipse's mean/SD and the ruler work in the browser in the scan's own units; the heatmap as an
8-bit grey PNG, only where the answer allows one; the outlines the region rule allows (the Grad-CAM
region, :func:`medcls.engine.findings.may_show_region`; the segmentation's tumour outline, which
:mod:`medcls.models.segmenter` gives for tumour answers only) as polygons; the slice's position
and its answer in the words of :mod:`medcls.engine.present`. Slices are sent at display size:
at most :data:`MAX_SIDE` pixels a side and :data:`PIXEL_BUDGET` pixels per viewer (a long series
is sent smaller, and the screen says so).

Also the words about how a series was acquired and what the model was validated on (the card's
``scope``), shown beside every series.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import cv2
import numpy as np

from medcls.core.errors import MedclsError
from medcls.engine import present
from medcls.engine.findings import may_show_region
from medcls.engine.series import SeriesAnswer, heatmap_class
from medcls.io.acquisition import SEQUENCE_NAMES, Acquisition, acquisition_of
from medcls.io.display import display_image
from medcls.io.scan import Scan
from medcls.models.saliency import Region, heatmap_region

#: Largest side of a slice as sent to the browser (pixels).
MAX_SIDE = 512
#: Pixels of all slices of one viewer (about a byte each as PNG): a longer series is sent smaller.
PIXEL_BUDGET = 8_000_000
#: The codes of the window-able rendering: 12 bits.
LEVELS = 4095
#: Slices whose heatmaps are computed in one pass.
HEAT_BATCH = 16

# ----------------------------------------------------------------------------- words

def acquisition_words(acq: Acquisition | None, modality: str | None = None) -> str:
    """How a series was acquired, as its own tags say: "FLAIR (T2 with fluid suppressed) ·
    axial"; what they do not say is named as unknown."""
    if acq is None:
        return "acquisition not recorded in the file"
    parts = []
    if modality == "MR" or acq.sequence is not None:
        parts.append(acq.sequence_text if acq.sequence else "sequence not recorded")
    parts.append((("oblique " if acq.oblique else "") + acq.plane) if acq.plane
                 else "plane not recorded")
    return " · ".join(parts)


def scope_words(card: Mapping) -> str:
    """What the model was validated on, from the card's ``scope``: "brain-mri-default was
    validated on T1-weighted images in axial slices; a DICOM series in another sequence or plane
    is not answered." (plain images carry neither and are judged by the input gate)."""
    scope = card.get("scope") or {}
    name = card.get("name", "This model")
    sequences, planes = scope.get("validated_sequences"), scope.get("validated_planes")
    if not sequences and not planes:
        return (f"{name}'s card names no validated sequences or planes: only its input check "
                "and confidence threshold judge a series.")
    what = " and ".join(SEQUENCE_NAMES.get(s, s) for s in sequences) + " images" if sequences \
        else "images of any sequence"
    where = f" in {' and '.join(planes)} slices" if planes else ""
    other = " or ".join(w for w, on in (("sequence", sequences), ("plane", planes)) if on)
    return (f"{name} was validated on {what}{where}; a DICOM series in another {other} (read "
            "from its own tags) is not answered.")


def scope_short(card: Mapping) -> str:
    """The validated scope in a few words: "T1-weighted images, axial slices"."""
    scope = card.get("scope") or {}
    sequences, planes = scope.get("validated_sequences"), scope.get("validated_planes")
    parts = []
    if sequences:
        parts.append(" and ".join(SEQUENCE_NAMES.get(s, s) for s in sequences) + " images")
    if planes:
        parts.append(" and ".join(planes) + " slices")
    return ", ".join(parts) if parts else "no sequence or plane named on its card"


def series_acquisition(series) -> Acquisition | None:
    """The acquisition of a series from its header (DICOM); None for plain images and NIfTI."""
    if series.kind != "dicom":
        return None
    return acquisition_of(series.metadata, series.modality)


# ----------------------------------------------------------------------------- encoding

@dataclass(frozen=True)
class Coding:
    """Codes 0..LEVELS of the 12-bit rendering and the modality values they stand for:
    ``value = offset + code * step``."""

    offset: float
    step: float

    def codes(self, values: np.ndarray) -> np.ndarray:
        return np.clip(np.rint((values - self.offset) / self.step), 0, LEVELS).astype(np.uint16)

    def values(self, codes: np.ndarray) -> np.ndarray:
        return self.offset + codes.astype(np.float64) * self.step


def coding_for(arrays: Sequence[np.ndarray]) -> Coding:
    """One coding for every slice (so one window means the same on each): exact (step 1) for
    integer values spanning at most 4096, else the range in 4096 steps."""
    lo = min(float(a.min()) for a in arrays)
    hi = max(float(a.max()) for a in arrays)
    integer = all(np.array_equal(a[::7, ::7], np.round(a[::7, ::7])) for a in arrays)
    if integer and hi - lo <= LEVELS:
        return Coding(math.floor(lo), 1.0)
    return Coding(lo, max(hi - lo, 1e-6) / LEVELS)


def _uri(img: np.ndarray, level: int = 3) -> str:
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, level])
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def codes_uri(codes: np.ndarray) -> str:
    """12-bit codes as an RGB PNG: red = code >> 8, green = code & 255, blue = 0."""
    c = np.asarray(codes, np.uint16)
    bgr = np.dstack([np.zeros_like(c, np.uint8), (c & 255).astype(np.uint8), (c >> 8).astype(np.uint8)])
    return _uri(bgr)


def decode_codes_png(data: bytes) -> np.ndarray:
    """The codes back from :func:`codes_uri`'s PNG bytes (what the browser does)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return (bgr[..., 2].astype(np.uint16) << 8) | bgr[..., 1].astype(np.uint16)


def gray_uri(img01: np.ndarray) -> str:
    return _uri(np.clip(np.rint(np.asarray(img01, np.float32) * 255), 0, 255).astype(np.uint8), 6)


def rgb_uri(img: np.ndarray) -> str:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)
    return _uri(cv2.cvtColor(a, cv2.COLOR_RGB2BGR))


def display_factor(shapes: Sequence[tuple[int, int]], budget: int = PIXEL_BUDGET,
                   max_side: int = MAX_SIDE) -> float:
    """The one scale (<= 1) of every slice of a viewer: no side over ``max_side``, all slices
    together within ``budget`` pixels."""
    if not shapes:
        return 1.0
    side = max(max(s) for s in shapes)
    total = sum(s[0] * s[1] for s in shapes)
    return float(min(1.0, max_side / side, math.sqrt(budget / total)))


def _resize(a: np.ndarray, f: float) -> np.ndarray:
    if f >= 1.0:
        return a
    h, w = a.shape[:2]
    return cv2.resize(a, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def _points(points, f: float) -> list[list[float]]:
    """Pixel indices (x, y) of the original as display coordinates (pixel centres)."""
    return [[round((x + 0.5) * f, 2), round((y + 0.5) * f, 2)] for x, y in points]


# ----------------------------------------------------------------------------- heatmaps

@dataclass(frozen=True)
class SliceHeat:
    """What the heatmap panel may show on one slice: the map of ``class_name`` and the region
    the region rule allows (None: the map only)."""

    class_name: str
    heatmap: np.ndarray
    region: Region | None
    asked: bool = False  # a class the user asked for, not the answer's


def series_heatmaps(predictor, answer: SeriesAnswer, method: str = "gradcam",
                    requested: bool = False, withheld_too: bool = False,
                    on_progress=None) -> dict[int, SliceHeat]:
    """The heatmap of every answered slice (of the class :func:`heatmap_class` names), in
    batches; withheld slices only when asked (``withheld_too``: "show anyway"), never with a
    region. Unreadable slices have none."""
    card = predictor.card
    todo = [i for i, s in enumerate(answer.slices) if s.prediction is not None
            and (withheld_too or not s.prediction.outside_training_distribution)]
    out: dict[int, SliceHeat] = {}
    for k in range(0, len(todo), HEAT_BATCH):
        chunk, pres, idx, scans = [], [], [], []
        for i in todo[k:k + HEAT_BATCH]:
            pred = answer.slices[i].prediction
            asked = requested and not pred.outside_training_distribution
            try:
                scan = answer.series.scan(i)
                pres.append(predictor.preprocess(scan))
            except Exception:  # noqa: BLE001 - it was read once; a second failure: no map
                continue
            ci = heatmap_class(answer, i, asked)
            chunk.append((i, asked, ci))
            idx.append(-1 if ci is None else ci)
            scans.append(scan)
        for (i, asked, ci), scan, cam in zip(chunk, scans, predictor.cam_engine().heatmaps(
                pres, method, np.asarray(idx, np.int32))):
            pred = answer.slices[i].prediction
            name = predictor.classes[cam.class_index]
            region = None
            # one size per finding: with a segmentation companion its outline and size (on the
            # run's slices, from the answer), never the heatmap region's; the heatmap region
            # without one, or asked for explicitly
            if may_show_region(pred, card, asked) and may_show_region(pred, card, class_name=name) \
                    and (asked or not card.get("segmentation")):
                region = heatmap_region(cam.heatmap, card.region_threshold, scan.pixel_spacing)
            out[i] = SliceHeat(name, cam.heatmap, region, asked=ci is not None and ci != pred.index)
        if on_progress is not None:
            on_progress(min(k + HEAT_BATCH, len(todo)), len(todo))
    return out


# ----------------------------------------------------------------------------- packaging

def window_presets(ref: Scan) -> list[list]:
    """[name, centre, width] of the default window (the file's, else percentiles) and the
    modality's presets, in modality values."""
    default = "File default" if ref.window_source == "dicom" else "Default (percentile 0.5-99.5)"
    presets = {default: (ref.window_center, ref.window_width), **ref.window_presets}
    return [[name, float(c), float(w)] for name, (c, w) in presets.items()]


def answer_words(pred, card, error: str | None = None) -> dict:
    """A slice's answer for the viewer: text, kind (success / warning / error) and the
    calibrated probabilities."""
    if pred is None:
        return {"answer": f"Could not be read: {error or 'unreadable slice'}", "kind": "error",
                "probs": []}
    v = present.verdict(pred, card)
    text = v.text
    if pred.scope_note:  # outside the validated scope: say which, as the series summary does
        text = f"Not validated for this scan, so no answer: {pred.scope_note}."
    names = present.class_names(card, pred.classes)
    probs = [[n, float(p), present.fmt_prob(p)] for n, p in zip(names, pred.probabilities)]
    return {"answer": text, "kind": v.kind, "probs": [] if pred.outside_training_distribution
            else probs}


def heat_words(pred, card, heat: SliceHeat | None, segmentation=None) -> list[str]:
    """The lines under a slice: what its heatmap shows and what is outlined, with one size per
    finding (:func:`medcls.engine.reading.measure_of`: its method named)."""
    from medcls.engine.reading import measure_of

    lines = []
    if pred is not None and heat is None:
        lines.append("Heatmap hidden: the answer is withheld." if pred.outside_training_distribution
                     else "No heatmap for this slice.")
    elif heat is not None:
        name = present.class_name(card, heat.class_name)
        if heat.region is not None:
            lines.append(f"Red: the regions that drove “{name}” most"
                         + (" (asked for)" if heat.asked else "")
                         + "; white outline: the Grad-CAM region above "
                         f"{heat.region.threshold:.0%} of the peak, green: its box: "
                         + measure_of(heat.region).text + ".")
        elif pred is not None and may_show_region(pred, card, class_name=heat.class_name):
            lines.append(f"Red: the image regions that drove “{name}” most.")
        else:
            lines.append(present.heatmap_meaning(pred, card, heat.class_name))
    if segmentation is not None:
        lines.append("Yellow: tumour outline: " + measure_of(segmentation).text + ".")
    return lines


def _slice_entry(values: np.ndarray | None, rgb: np.ndarray | None, scan: Scan | None,
                 coding: Coding | None, f: float, heat: SliceHeat | None, segmentation,
                 pred, card, error: str | None, position: float | None) -> dict:
    entry: dict = {"position": position, **answer_words(pred, card, error)}
    if scan is None:
        entry.update({"image": None, "w": 0, "h": 0, "spacing": None, "heat": None,
                      "region": None, "box": None, "outline": None, "notes": []})
        return entry
    img = _resize(values, f) if rgb is None else _resize(rgb, f)
    h, w = img.shape[:2]
    fy, fx = h / scan.shape[0], w / scan.shape[1]
    entry.update({
        "image": codes_uri(coding.codes(img)) if rgb is None else rgb_uri(img), "w": w, "h": h,
        "spacing": None if scan.pixel_spacing is None else
        [scan.pixel_spacing[0] / fy, scan.pixel_spacing[1] / fx],
        "heat": None if heat is None else gray_uri(_resize(heat.heatmap.astype(np.float32), f)),
        "heat_class": None if heat is None else present.class_name(card, heat.class_name)
        + (" (asked for)" if heat.asked else ""),
        "region": None, "box": None,
        "outline": None if segmentation is None else _points(segmentation.polygon, fx),
        "notes": heat_words(pred, card, heat, segmentation)})
    if heat is not None and heat.region is not None:
        x0, y0, x1, y1 = heat.region.box
        entry["region"] = _points(heat.region.polygon, fx)
        entry["box"] = [x0 * fx, y0 * fy, x1 * fx, y1 * fy]
    return entry


def _base(ref: Scan, coding: Coding | None, f: float, full_side: int,
          value_range: tuple[float, float] | None = None) -> dict:
    presets = window_presets(ref)
    rgb = coding is None
    return {"mode": "rgb" if rgb else "values", "range": None if rgb else value_range,
            "coding": None if rgb else [coding.offset, coding.step],
            "window": None if rgb else [presets[0][1], presets[0][2]],
            "presets": [] if rgb else presets, "invert": ref.photometric == "MONOCHROME1",
            "unit": "HU" if ref.modality == "CT" else "",
            "scale_note": "" if f >= 0.999 else
            f"shown at {round(full_side * f)} of {full_side} px to keep the page light; "
            "measurements use the pixel spacing of the pixels shown"}


def series_stack(answer: SeriesAnswer, heats: Mapping[int, SliceHeat], key: str,
                 budget: int = PIXEL_BUDGET, max_side: int = MAX_SIDE) -> dict:
    """The viewer's data for a whole series (see the module): every readable slice at one
    display scale, its answer, heatmap and outlines, and the marks of the scroll bar (the
    suspicious run, withheld and unreadable slices)."""
    series, card, sm = answer.series, answer.card, answer.summary
    scans: dict[int, Scan] = {}
    errors: dict[int, str] = {}
    for i, s in enumerate(answer.slices):
        try:
            scans[i] = series.scan(i)
        except MedclsError as exc:  # a slice that cannot be read is marked, with why
            errors[i] = s.error or str(exc)
        except Exception:  # noqa: BLE001 - its text may quote file values: not shown
            errors[i] = s.error or "The slice could not be read."
    color = any(s.is_color for s in scans.values())
    f = display_factor([s.shape for s in scans.values()], budget, max_side)
    coding = None if color or not scans else coding_for(
        [_resize(s.values, f) for s in scans.values()])
    ref = scans.get(len(series) // 2) or next(iter(scans.values()), None)
    slices = []
    for i, s in enumerate(answer.slices):
        scan = scans.get(i)
        rgb = display_image(scan) if scan is not None and color else None
        slices.append(_slice_entry(scan.values if scan is not None else None, rgb, scan, coding,
                                   f, heats.get(i), answer.segmentations.get(i), s.prediction,
                                   card, s.error or errors.get(i),
                                   series.position_of(i) if series.positions is not None else None))
    run = sm.run
    marks = {"run": None if run is None else [run.start, run.stop],
             "others": [[r.start, r.stop] for r in sm.other_runs],
             "withheld": [i for i, s in enumerate(answer.slices)
                          if s.prediction is not None and s.prediction.outside_training_distribution],
             "unread": [i for i, s in enumerate(answer.slices) if scans.get(i) is None
                        or s.prediction is None]}
    value_range = (min(float(s.values.min()) for s in scans.values()),
                   max(float(s.values.max()) for s in scans.values())) if scans else None
    base = _base(ref, coding, f, max(max(s.shape) for s in scans.values()), value_range) \
        if ref is not None \
        else {"mode": "values", "coding": [0, 1], "window": [0, 1], "presets": [],
              "invert": False, "unit": "", "scale_note": ""}
    return {**base, "key": key, "slices": slices, "marks": marks, "plane": series.plane,
            "spacing_mm": series.slice_spacing,
            "start": sm.most_suspicious if sm.most_suspicious is not None else len(series) // 2,
            "most": sm.most_suspicious,
            "position_unit": "mm" if series.positions is not None else None}


def scan_stack(scan: Scan, pred, card, heat: SliceHeat | None, segmentation, key: str,
               max_side: int = 1024) -> dict:
    """The viewer's data for one scan (the main page): one slice, its answer's heatmap (or
    None: hidden or withheld) and outlines, windowed in the browser."""
    color = scan.is_color
    f = display_factor([scan.shape], PIXEL_BUDGET, max_side)
    values = None if color else _resize(scan.values, f)
    coding = None if color else coding_for([values])
    entry = _slice_entry(scan.values if not color else None,
                         display_image(scan) if color else None, scan, coding, f, heat,
                         segmentation, pred, card, None, None)
    value_range = (float(scan.values.min()), float(scan.values.max()))
    return {**_base(scan, coding, f, max(scan.shape), value_range), "key": key, "slices": [entry],
            "marks": {"run": None, "others": [], "withheld": [], "unread": []}, "start": 0,
            "most": None,
            "position_unit": None}
