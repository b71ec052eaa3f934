"""The one answer object: what MedCLS says about a scan or a series, from which the verdict line,
the report, the worklist CSV row, the class tiles, the DICOM SR and the audit row are all derived.

A :class:`Reading` is built once (:func:`read`) from a prediction (:class:`~medcls.engine.inference.Prediction`),
a worklist row (:class:`~medcls.engine.review.ReviewRow`) or a series' coded answer
(:func:`medcls.engine.series.series_verdict`), with the answering model's card and, for a finding,
the region that was measured. It holds:

- the **class given** (``label``, its human ``name``) or, for a withheld answer, no class and
  the **reason** (the card's scope, else the input gate; a series: why it cannot be answered);
- **one probability** (``probability``: the calibrated probability of the class given; for a
  series, the class's mean over the slices its rule names), said with its ``probability_method``;
- the **state** (confident / uncertain / withheld);
- the **measure** of a finding's region (:class:`Measure`: method, area, longest diameter), kept
  only where :func:`medcls.engine.findings.may_show_region` allows one: never for the normal class or
  a withheld answer.

Every place that says something about the answer says it from these fields through the same
functions (:attr:`Reading.headline`, :meth:`Reading.record`, :func:`tally`), so the screen, the
report, the CSV, the SR and the audit trail cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterable

from medcls.engine.findings import is_finding_answer, may_show_region, normal_class
from medcls.engine.present import CONFIDENT, UNCERTAIN, WITHHELD, class_name, fmt_prob, withheld_reason
from medcls.engine.series import HEATMAP_REGION, SEGMENTATION

#: The tile and CSV word for answers that give no class.
WITHHELD_NAME = "Withheld"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Measure:
    """A finding's region size, with how it was measured: "segmentation" (the segmentation
    companion's mask) or "Grad-CAM region" (the heatmap above a fraction of its peak: coarse)."""

    method: str
    area_mm2: float | None
    diameter_mm: float | None = None
    area_px: int | None = None

    @property
    def text(self) -> str:
        """"area 425 mm², longest diameter 23.1 mm (method: segmentation)"."""
        if self.area_mm2 is not None:
            size = f"area {self.area_mm2:.0f} mm²"
            if self.diameter_mm is not None:
                size += f", longest diameter {self.diameter_mm:.1f} mm"
        elif self.area_px is not None:
            size = f"area {self.area_px} px (no pixel spacing, so no mm²)"
        else:
            size = "size not measured"
        coarse = "; coarse, not a lesion boundary" if self.method == HEATMAP_REGION else ""
        return f"{size} (method: {self.method}{coarse})"


def measure_of(region, method: str | None = None) -> Measure | None:
    """The :class:`Measure` of a region: a segmentation (:class:`medcls.models.segmenter.Segmentation`),
    a PACS result's ``Roi`` (its own method) or a heatmap region
    (:class:`medcls.models.saliency.Region`); ``None`` for no region."""
    if region is None:
        return None
    if isinstance(region, Measure):
        return region
    if method is None:
        method = getattr(region, "method", None)
        if method not in (SEGMENTATION, HEATMAP_REGION):  # a Segmentation names its model
            method = SEGMENTATION if hasattr(region, "diameter_px") and hasattr(region, "confidence") \
                else HEATMAP_REGION
    area, diameter = getattr(region, "area_mm2", None), getattr(region, "diameter_mm", None)
    px = getattr(region, "area_px", None)
    return Measure(method, None if area is None else float(area),
                   None if diameter is None else float(diameter),
                   None if px is None else int(px))


@dataclass(frozen=True)
class Reading:
    """What MedCLS says about one scan (or one series): see the module's docstring."""

    state: str  # CONFIDENT, UNCERTAIN or WITHHELD
    label: str | None  # the class given; None when withheld
    name: str  # its human name, or "Withheld"
    probability: float | None  # the one probability of the class given; None when withheld
    reason: str | None  # why withheld (the end of "Answer withheld: ..."); None when given
    top_label: str | None  # the model's top class, kept for the record even when withheld
    probabilities: dict[str, float] = field(default_factory=dict)
    measure: Measure | None = None  # a finding's region size (never for normal or withheld)
    probability_method: str = "calibrated probability"
    model: str = ""  # "name vversion"
    model_sha256: str = ""
    is_finding: bool = False  # a finding class given (not the normal class, not withheld)

    @property
    def withheld(self) -> bool:
        return self.state == WITHHELD

    @property
    def probability_text(self) -> str:
        return "" if self.probability is None else fmt_prob(self.probability, 1)

    @property
    def headline(self) -> str:
        """The answer in one line, as the screen, the report and the summary PDF say it."""
        if self.withheld:
            return f"Answer withheld: {self.reason}, so no class is given."
        return f"{self.name} · {self.probability_text} {self.probability_method} · {self.state}"

    def record(self) -> dict:
        """The answer's columns of a CSV row (the same words and numbers as the screen)."""
        m = self.measure
        return {"answer": self.name, "state": self.state,
                "probability": None if self.probability is None else round(self.probability, 4),
                "withheld_reason": self.reason,
                "region_method": m.method if m else None,
                "region_area_mm2": None if m is None or m.area_mm2 is None else round(m.area_mm2, 1),
                "region_diameter_mm": None if m is None or m.diameter_mm is None else round(m.diameter_mm, 1)}


def _state(outside: bool, low: bool) -> str:
    return WITHHELD if outside else (UNCERTAIN if low else CONFIDENT)


def _model(card: Mapping | None) -> tuple[str, str]:
    if not card or "name" not in card:
        return "", ""
    return f"{card['name']} v{card.get('version', '?')}", str(card.get("model_sha256", ""))


def read_prediction(pred, card: Mapping, region=None, region_method: str | None = None,
                    class_shown: str | None = None) -> Reading:
    """The reading of a prediction. ``region`` (a segmentation, a PACS Roi or a heatmap region)
    is measured only where the region rule allows it for the map of ``class_shown`` (default:
    the answer's class)."""
    state = _state(pred.outside_training_distribution, pred.low_confidence)
    withheld = state == WITHHELD
    finding = is_finding_answer(pred, card)
    keep = region is not None and may_show_region(pred, card, class_name=class_shown)
    model, sha = _model(card)
    return Reading(
        state=state, label=None if withheld else pred.label,
        name=WITHHELD_NAME if withheld else class_name(card, pred.label),
        probability=None if withheld else float(pred.confidence),
        reason=withheld_reason(pred) if withheld else None, top_label=pred.label,
        probabilities={c: float(p) for c, p in zip(pred.classes, pred.probabilities)},
        measure=measure_of(region, region_method) if keep else None,
        model=model, model_sha256=sha, is_finding=finding)


def read_row(row, card: Mapping) -> Reading:
    """The reading of a worklist row (:class:`medcls.engine.review.ReviewRow`); an unreadable row
    reads as withheld with the reason it could not be read."""
    model, sha = _model(card)
    if row.error is not None or row.predicted is None:
        return Reading(WITHHELD, None, UNREADABLE.capitalize(), None,
                       f"the file could not be read ({row.error or 'unreadable'})", None,
                       model=model, model_sha256=sha)
    state = _state(row.outside_distribution, row.low_confidence)
    withheld = state == WITHHELD
    return Reading(
        state=state, label=None if withheld else row.predicted,
        name=WITHHELD_NAME if withheld else class_name(card, row.predicted),
        probability=None if withheld else float(row.confidence),
        reason=withheld_reason(row) if withheld else None, top_label=row.predicted,
        probabilities=dict(row.probabilities), model=model, model_sha256=sha,
        is_finding=not withheld and row.predicted != normal_class(card))


def read_series(answer, measure: Measure | object | None = None) -> Reading:
    """The reading of a series (:class:`medcls.engine.series.SeriesAnswer`), by
    :func:`medcls.engine.series.series_verdict`: the run's class with its mean probability over
    the run, the normal class with its mean over the answered slices, or withheld with the
    summary's reason. ``measure``: the region measured on the slice that shows a finding
    (default: that slice's segmentation, when the model has a segmentation companion)."""
    from medcls.engine.series import ANSWERED, series_verdict

    v = series_verdict(answer)
    card = answer.card
    model, sha = _model(card)
    if v.label is None:
        reason = series_reason(v.text)
        return Reading(WITHHELD, None, WITHHELD_NAME, None, reason, None, model=model,
                       model_sha256=sha)
    if measure is None and v.is_finding and v.slice is not None:
        measure = answer.segmentations.get(v.slice)
    run = answer.summary.run
    how = (f"mean calibrated probability over slices {run.start + 1}–{run.stop}" if v.is_finding
           else "mean calibrated probability over the answered slices")
    return Reading(CONFIDENT if v.state == ANSWERED else UNCERTAIN, v.label,
                   class_name(card, v.label), float(v.probability), None, v.label,
                   measure=measure_of(measure) if v.is_finding else None, probability_method=how,
                   model=model, model_sha256=sha, is_finding=v.is_finding)


NOT_VALIDATED = "Not validated for this series, so no answer: "
CANNOT = "Cannot answer: "


def series_reason(text: str) -> str:
    """The reason part of a withheld series' summary sentence (see :func:`medcls.engine.series.summarise`)."""
    text = text.rstrip(".")
    if text.startswith(NOT_VALIDATED):
        return f"not validated for this series ({text[len(NOT_VALIDATED):]})"
    if text.startswith(CANNOT):
        return text[len(CANNOT):]
    return text


def read(answer, card: Mapping | None = None, region=None, region_method: str | None = None) -> Reading:
    """A :class:`Reading` of a prediction, a worklist row or a series answer (see above)."""
    if isinstance(answer, Reading):
        return answer
    if hasattr(answer, "summary") and hasattr(answer, "slices"):
        return read_series(answer, region)
    if hasattr(answer, "outside_training_distribution"):
        return read_prediction(answer, card, region, region_method)
    return read_row(answer, card)


# ----------------------------------------------------------------------------- many readings

def tally(readings: Iterable[Reading], classes: Iterable[str]) -> dict:
    """The class tiles and summary counts of a worklist: per class only the answers that give
    it; withheld and unreadable answers counted apart (never as a class)."""
    readings = list(readings)
    per_class = {c: sum(r.label == c for r in readings) for c in classes}
    unreadable = sum(r.top_label is None for r in readings)
    return {"total": len(readings), "per_class": per_class,
            "withheld": sum(r.withheld and r.top_label is not None for r in readings),
            "unreadable": unreadable, "uncertain": sum(r.state == UNCERTAIN for r in readings)}


def probability_or_blank(value: float | None) -> str:
    """A probability for a table cell: the one formatter, blank for none."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt_prob(value, 1)
