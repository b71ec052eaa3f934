"""MedCLS results as DICOM objects for the PACS (highdicom), in new series of the source study.

- A Comprehensive 3D SR following TID 1500 (Measurement Report): one measurement group per
  classified series, with the model (name, version, SHA-256) as algorithm identification, the
  series' coded answer (:func:`medcls.engine.series.series_verdict`, the series view's rule:
  the class as a coded qualitative evaluation ("Finding"), its calibrated probability, the
  state: answered, low confidence, withheld) and, for a tumour answer only, the region as a
  planar ROI (a polygon on the slice that shows the answer) with its area (mm^2) and longest
  diameter (mm), each with its measurement method named ("segmentation" or "Grad-CAM region").
- A Secondary Capture per series: the heatmap overlay on that slice, with "RESEARCH USE - NOT
  FOR DIAGNOSIS" burned in and repeated in ImageComments and the series description.

Both carry ContentQualification RESEARCH. Patient and study attributes are copied from the
source instances by highdicom: these objects are the one place they are written.

The region comes from a ``roi_source`` (default :func:`default_roi`: the segmentation
companion's outline when the model's card names one, else the saliency region).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from medcls.engine.series import HEATMAP_REGION, SEGMENTATION

# highdicom's info lines name the source instances' UIDs: identifiers stay out of the logs.
logging.getLogger("highdicom").setLevel(logging.WARNING)

if TYPE_CHECKING:  # pragma: no cover
    from medcls.integrations.pacs.records import SeriesReview, StudyReview

RESEARCH_LABEL = "research use, not for diagnosis"
BANNER = "RESEARCH USE - NOT FOR DIAGNOSIS"
MANUFACTURER = "MedCLS"
SCHEME = "99MEDCLS"  # private coding scheme of MedCLS's class names and answer states
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902


@dataclass(frozen=True)
class Roi:
    """A planar region on the driving slice, in its pixel coordinates (column x, row y), with
    its size: area and longest diameter (mm where the pixel spacing is known)."""

    polygon: tuple[tuple[float, float], ...]
    area_mm2: float | None
    area_px: int
    source: str  # "heatmap" (saliency region) or "segmentation"
    diameter_mm: float | None = None
    diameter_px: float | None = None

    @property
    def method(self) -> str:
        """How the size was measured, as every result names it: "segmentation" or
        "Grad-CAM region"."""
        return SEGMENTATION if self.source == "segmentation" else HEATMAP_REGION


def polygon_diameter(polygon, pixel_spacing: tuple[float, float] | None = None) -> float:
    """The longest distance between two points of a polygon (pixels, or mm with the pixel
    spacing (row, column))."""
    pts = np.asarray(polygon, np.float64).reshape(-1, 2)
    if len(pts) < 2:
        return 0.0
    if pixel_spacing:
        pts = pts * np.array([pixel_spacing[1], pixel_spacing[0]])
    diff = pts[:, None, :] - pts[None, :, :]
    return float(np.sqrt((diff ** 2).sum(-1)).max())


def heatmap_roi(predictor, explanation, scan) -> Roi | None:
    """The saliency region of the explanation (``medcls.engine.inference.Explanation.region``)."""
    region = getattr(explanation, "region", None)
    if region is None or len(region.polygon) < 3:
        return None
    spacing = getattr(scan, "pixel_spacing", None)
    return Roi(tuple((float(x), float(y)) for x, y in region.polygon), region.area_mm2,
               int(region.area_px), "heatmap",
               polygon_diameter(region.polygon, spacing) if spacing else None,
               polygon_diameter(region.polygon))


def segmentation_roi(predictor, explanation, scan) -> Roi | None:
    """The tumour outline of the model's segmentation companion (``Predictor.outline``: for
    a tumour answer only), with the mask's area and longest diameter."""
    seg = predictor.outline(scan, explanation.prediction)
    if seg is None or len(seg.polygon) < 3:
        return None
    return Roi(tuple((float(x), float(y)) for x, y in seg.polygon), seg.area_mm2,
               int(seg.area_px), "segmentation", seg.diameter_mm, float(seg.diameter_px))


def default_roi(predictor, explanation, scan) -> Roi | None:
    """The segmentation outline when the model's card names a companion, else the heatmap
    region (never a mix: the SR's region always has one source)."""
    source = segmentation_roi if predictor.segmenter is not None else heatmap_roi
    return source(predictor, explanation, scan)


# ----------------------------------------------------------------------------- codes

def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value[:16], scheme_designator=SCHEME, meaning=meaning[:64])


def class_code(name: str, card=None):
    """A class as a code of MedCLS's scheme: the identifier, its human name as the meaning."""
    from medcls.engine.present import class_name

    return _code(name, class_name(card, name))


PREDICTED_CLASS = ("predicted-class", "Predicted class")
PROBABILITY = ("probability", "Calibrated probability of the predicted class")
STATE = ("answer-state", "MedCLS answer state")
STATES = {"answered": "Answered", "low-confidence": "Low confidence: uncertain",
          "withheld": "Withheld: no class given"}
WITHHELD_REASON = ("withheld-reason", "Why the answer is withheld")
#: Why a series' answer is withheld, coded (:func:`withheld_reason_code`).
REASONS = {"scope": "Not validated for this series (plane or sequence)",
           "gate": "Unlike the model's training images (input gate)",
           "unreadable": "No slice of the series could be read"}


def withheld_reason_code(reason: str | None) -> str:
    """The coded reason of a withheld series (the reading's reason in words, see
    :func:`medcls.engine.reading.read_series`)."""
    text = (reason or "").lower()
    if text.startswith("not validated"):
        return "scope"
    if "could be read" in text or "could not be read" in text:
        return "unreadable"
    return "gate"
#: The region's measurement method (TID 300 "Measurement Method"), by Roi.source.
METHODS = {"segmentation": ("segmentation", SEGMENTATION),
           "heatmap": ("gradcam-region", HEATMAP_REGION)}


def _coding_schemes():
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return [CodingSchemeIdentificationItem(designator=SCHEME, name="MedCLS class names and states",
                                           responsible_organization="MedCLS")]


def sr_series_description(model) -> str:
    """Found again by QIDO-RS: names the model version and its SHA-256 prefix."""
    return model.results_description


def algorithm_identification(model):
    from highdicom.sr import AlgorithmIdentification

    return AlgorithmIdentification(name=model.name[:64], version=model.version[:64],
                                   parameters=[f"sha256={model.sha256}"])


# Type 2 patient and study attributes (present, possibly empty) highdicom copies from the
# source; some archives leave them out.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _source(header):
    """A copy of a source header with its missing Type 2 attributes present and empty."""
    import copy

    out = copy.copy(header)
    for keyword in _TYPE2:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


# ----------------------------------------------------------------------------- SR

def _frames(header, frame: int | None) -> list[int] | None:
    """Referenced frame numbers (1-based) of a slice in a multi-frame instance, else None."""
    try:
        n = int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n = 1
    return [int(frame) + 1] if n > 1 and frame is not None else None


def _measurement_group(series_review: "SeriesReview", model, index: int):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from medcls.engine.reading import read_series

    verdict = series_review.verdict
    card = series_review.answer.card
    reading = read_series(series_review.answer)  # the one answer: class or withheld with why
    algo = algorithm_identification(model)
    qualitative = [hd.sr.QualitativeEvaluation(_code(*STATE), _code(verdict.state,
                                                                     STATES[verdict.state]))]
    measurements = []
    if reading.withheld:
        code = withheld_reason_code(reading.reason)
        qualitative.append(hd.sr.QualitativeEvaluation(_code(*WITHHELD_REASON),
                                                       _code(code, REASONS[code])))
    elif verdict.label is not None:
        qualitative.insert(0, hd.sr.QualitativeEvaluation(_code(*PREDICTED_CLASS),
                                                          class_code(verdict.label, card)))
        measurements.append(hd.sr.Measurement(_code(*PROBABILITY), float(reading.probability),
                                              codes.UCUM.NoUnits))
    tracking = hd.sr.TrackingIdentifier(uid=generate_uid(),
                                        identifier=f"series {series_review.series.number} #{index}")
    finding = (class_code(verdict.label, card) if not reading.withheld
               else _code(verdict.state, STATES[verdict.state]))
    header = series_review.driving_header
    roi = series_review.roi if verdict.is_finding else None  # a region is a tumour answer's only
    if header is not None and roi is not None:
        method = _code(*METHODS[roi.source])
        if roi.area_mm2 is not None:
            measurements.append(hd.sr.Measurement(codes.SCT.Area, float(roi.area_mm2),
                                                  codes.UCUM.SquareMillimeter, method=method))
        if roi.diameter_mm is not None:
            measurements.append(hd.sr.Measurement(codes.SCT.LongAxis, float(roi.diameter_mm),
                                                  codes.UCUM.Millimeter, method=method))
        points = np.array(roi.polygon + roi.polygon[:1], dtype=np.float32)  # closed polygon
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=points,
            source_image=hd.sr.SourceImageForRegion(
                str(header.SOPClassUID), str(header.SOPInstanceUID),
                _frames(header, series_review.driving_frame)))
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, referenced_region=region, finding_type=finding,
            algorithm_id=algo, measurements=measurements, qualitative_evaluations=qualitative)
    refs = [header] if header is not None else _unique(series_review.headers)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=finding, algorithm_id=algo,
        measurements=measurements or None, qualitative_evaluations=qualitative,
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(h.SOPClassUID),
                                                            str(h.SOPInstanceUID)) for h in refs])


def _unique(headers) -> list:
    """Headers with each SOP Instance UID once (first kept)."""
    seen, out = set(), []
    for h in headers:
        uid = str(h.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            out.append(h)
    return out


def build_sr(review: "StudyReview"):
    """The study's TID 1500 Comprehensive 3D SR (one measurement group per classified series)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    model = review.model
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[model.sha256]), name=model.name[:64],
            manufacturer_name=MANUFACTURER, model_name=f"{model.name} {model.version}"[:64]))
    groups = [_measurement_group(s, model, i + 1) for i, s in enumerate(review.answered)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups)
    evidence = [_source(h) for h in _unique(h for s in review.answered for h in s.headers)]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=model.name[:64],
        software_versions=model.version[:64], series_description=sr_series_description(model),
        content_qualification="RESEARCH", coding_schemes=_coding_schemes(),
        is_complete=True, is_final=False, is_verified=False)


# ----------------------------------------------------------------------------- SC

def overlay_capture(series_review: "SeriesReview", model, min_width: int = 512) -> np.ndarray:
    """RGB uint8: the driving slice with its heatmap and region, upscaled to at least
    ``min_width`` pixels for legible text, under a banner saying it is for research only."""
    import cv2

    from medcls.engine.render import overlay
    from medcls.io.display import display_image

    scan, expl = series_review.scan, series_review.explanation
    rgb = overlay(display_image(scan), expl.heatmap)
    roi = series_review.roi if series_review.verdict.is_finding else None
    if roi is not None:
        pts = np.round(np.array(roi.polygon)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(rgb, [pts], True, (255, 255, 255), max(1, max(rgb.shape[:2]) // 256))
    scale = max(1.0, min_width / rgb.shape[1])
    if scale > 1:
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                         interpolation=cv2.INTER_LINEAR)
    return _with_banner(rgb, [BANNER, banner_answer(series_review, model)])


def banner_answer(series_review: "SeriesReview", model) -> str:
    """The capture's second line: the model and the series' coded answer."""
    from medcls.engine.reading import read_series

    r = read_series(series_review.answer)  # the same words and number as the screen and the SR
    answer = f"{r.name} {r.probability_text}" if not r.withheld else "withheld, no class"
    return f"MedCLS {model.name} {model.version}: {answer} ({series_review.verdict.state})"


def _with_banner(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    import cv2

    w = rgb.shape[1]
    font = cv2.FONT_HERSHEY_SIMPLEX
    # the longest line fills ~94% of the width
    base, _ = cv2.getTextSize(max(lines, key=len), font, 1.0, 1)
    size = 0.94 * w / base[0]
    thick = max(1, round(size * 1.5))
    line_h = int(cv2.getTextSize("Ag", font, size, thick)[0][1] * 1.9) + 2
    banner = np.zeros((line_h * len(lines) + 6, w, 3), np.uint8)
    for i, text in enumerate(lines):
        colour = (255, 255, 0) if i == 0 else (255, 255, 255)
        cv2.putText(banner, text, (int(0.03 * w), line_h * (i + 1) - line_h // 4), font, size,
                    colour, thick, cv2.LINE_AA)
    return np.ascontiguousarray(np.vstack([banner, rgb]))


def _orientation(header) -> tuple[str, str]:
    """PatientOrientation (row, column directions) from ImageOrientationPatient: the dominant
    axis of each direction cosine. Without it, the usual axial display (L, P)."""
    try:
        iop = [float(v) for v in header.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return ("L", "P")
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def letter(v):
        axis = int(np.argmax(np.abs(v)))
        return letters[axis][0 if v[axis] > 0 else 1]

    return letter(iop[:3]), letter(iop[3:6])


def build_sc(series_review: "SeriesReview", model, series_uid: str, instance_number: int):
    """Secondary Capture of the heatmap overlay on the slice that drove the series' answer."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    header = series_review.driving_header
    pixels = overlay_capture(series_review, model)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_source(header), pixel_array=pixels, photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", patient_orientation=_orientation(header),
        series_instance_uid=series_uid,
        series_number=SC_SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=instance_number, manufacturer=MANUFACTURER,
        series_description=f"MedCLS heatmap, {RESEARCH_LABEL}", content_qualification="RESEARCH",
        manufacturer_model_name=model.name[:64], software_versions=model.version[:64])
    if "Laterality" not in sc:  # Type 2C: empty (unknown) unless the source says
        sc.Laterality = header.get("Laterality", "")
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = (f"MedCLS {model.name} {model.version} heatmap overlay: "
                        f"{RESEARCH_LABEL}.")
    sc.DerivationDescription = "Grad-CAM heatmap of the MedCLS answer overlaid on the source slice"
    src = Dataset()
    src.ReferencedSOPClassUID = header.SOPClassUID
    src.ReferencedSOPInstanceUID = header.SOPInstanceUID
    frames = _frames(header, series_review.driving_frame)
    if frames:
        src.ReferencedFrameNumber = frames[0]
    sc.SourceImageSequence = [src]
    return sc


def build_results(review: "StudyReview") -> list:
    """The SR of the study and one overlay capture per series with an answer."""
    from pydicom.uid import generate_uid

    objects = [build_sr(review)]
    sc_series = generate_uid()
    drivers = [s for s in review.answered if s.driving_header is not None]
    objects += [build_sc(s, review.model, sc_series, i + 1) for i, s in enumerate(drivers)]
    return objects


# ----------------------------------------------------------------------------- reading back

def read_sr(dataset) -> list[dict]:
    """What an SR written by :func:`build_sr` says, one dict per measurement group: class,
    probability, state, region area, algorithm, referenced instances (read with highdicom)."""
    import highdicom as hd

    sr = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    groups = list(sr.content.get_planar_roi_measurement_groups()) + \
        list(sr.content.get_image_measurement_groups())
    return [_read_group(g) for g in groups]


def _read_group(group) -> dict:
    from pydicom.sr.codedict import codes

    info: dict = {"class": None, "probability": None, "state": None, "withheld_reason": None,
                  "area_mm2": None,
                  "diameter_mm": None, "method": None, "algorithm": None,
                  "referenced_sop_instance_uids": [], "roi": False}
    for q in group.get_qualitative_evaluations():
        if q.name.value == PREDICTED_CLASS[0]:
            info["class"] = q.value.value
            info["class_meaning"] = q.value.meaning
        elif q.name.value == STATE[0][:16]:
            info["state"] = q.value.value
        elif q.name.value == WITHHELD_REASON[0][:16]:
            info["withheld_reason"] = q.value.meaning
    for m in group.get_measurements():
        if m.name.value == PROBABILITY[0][:16]:
            info["probability"] = float(m.value)
        elif m.name.value == codes.SCT.Area.value:
            info["area_mm2"] = float(m.value)
            info["area_unit"] = m.unit.value
            info["method"] = m.method.meaning if m.method is not None else None
        elif m.name.value == codes.SCT.LongAxis.value:
            info["diameter_mm"] = float(m.value)
            info["diameter_unit"] = m.unit.value
            info["diameter_method"] = m.method.meaning if m.method is not None else None
    root = group[0]
    algo = _algorithm(root)
    if algo:
        info["algorithm"] = algo
    roi = getattr(group, "roi", None)
    if roi is not None:
        info["roi"] = True
        info["polygon_points"] = int(len(roi.value))
    info["referenced_sop_instance_uids"] = _refs_of(root)
    return info


def _refs_of(item) -> list[str]:
    """Referenced SOP Instance UIDs anywhere below a content item."""
    found: list[str] = []

    def walk(ds):
        for elem in ds:
            if elem.keyword == "ReferencedSOPInstanceUID":
                found.append(str(elem.value))
            elif elem.VR == "SQ":
                for child in elem.value:
                    walk(child)

    walk(item)
    return list(dict.fromkeys(found))


def _algorithm(group) -> dict | None:
    """Algorithm name, version and parameters (TID 4019) of a group or its measurements."""
    names = {"111001": "name", "111003": "version", "111002": "parameters"}
    found: dict = {}

    def walk(ds):
        for item in getattr(ds, "ContentSequence", []):
            concept = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
            if concept in names and "TextValue" in item:
                key = names[concept]
                if key == "parameters":
                    found.setdefault(key, []).append(str(item.TextValue))
                else:
                    found.setdefault(key, str(item.TextValue))
            walk(item)

    walk(group)
    return found or None


def sr_outline(dataset, max_depth: int = 6) -> str:
    """The SR's content tree as indented text ("concept: value"), for people to read."""
    lines: list[str] = []

    def value(item) -> str:
        vt = item.get("ValueType", "")
        if vt == "CODE":
            return str(item.ConceptCodeSequence[0].CodeMeaning)
        if vt == "NUM":
            mv = item.MeasuredValueSequence[0]
            return f"{mv.NumericValue} {mv.MeasurementUnitsCodeSequence[0].CodeValue}"
        if vt in ("TEXT", "UIDREF"):
            return str(item.get("TextValue", item.get("UID", "")))
        if vt == "SCOORD":
            return f"{item.GraphicType} of {len(item.GraphicData) // 2} points"
        if vt == "IMAGE":
            return f"image {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID}"
        return ""

    def walk(ds, depth):
        for item in getattr(ds, "ContentSequence", []):
            name = (item.ConceptNameCodeSequence[0].CodeMeaning
                    if "ConceptNameCodeSequence" in item else item.get("ValueType", ""))
            lines.append(f"{'  ' * depth}{name}: {value(item)}".rstrip(": "))
            if depth < max_depth:
                walk(item, depth + 1)

    lines.append(str(dataset.ConceptNameCodeSequence[0].CodeMeaning))
    walk(dataset, 1)
    return "\n".join(lines)
