"""The answer for a whole series: every slice through the model in batches, and a study summary.

The aggregation rule (what :func:`summarise` implements, and the tests check):

1. A slice is *answered* when it decoded and the input gate accepts it (inside the training
   distribution).
2. A slice is *positive* when it is answered and P(finding) = 1 - P(no-finding class) is at least
   the card's ``low_confidence_threshold`` (the probability above which the model's validation
   answers were 99% right).
3. **Tumour suspected** when at least ``k`` = :data:`MIN_RUN` (3) consecutive slices are
   positive (every slice, for a series shorter than k). An unanswered slice breaks a run. The
   run reported is the longest (ties: the higher mean P(finding)); its class is the finding
   class with the highest mean probability over the run.
4. **Cannot answer** when no slice is answered, or most readable slices (more than half) are
   outside what the model was trained on.
5. Otherwise **no tumour seen on N answered slices** (positive slices that do not make a run are
   counted in the sentence: they are not a finding, but they are not hidden either).

The suspicious region's volume is the sum, over the run's slices, of the tumour's area on each
slice (mm²) times the slice spacing (mm); it is given only when the pixel spacing and the slice
spacing are known. The area is the segmentation's when the model's card names a segmentation
companion (a run slice where it finds no tumour adds 0), else the heatmap region's (the region of
the run's class, as on the main page: coarse). :attr:`SeriesAnswer.volume_method` names which.

The series' answer as one coded value (:func:`series_verdict`: what the PACS SR, the command line
and the audit trail carry; the series view shows the same summary):

- *suspected*: the run's class, with its mean calibrated probability over the run; "answered"
  when that mean reaches the card's threshold, else "low-confidence" (a tumour run whose class is
  uncertain); shown on the most suspicious slice;
- *not seen*: the no-finding class, with its mean calibrated probability over the answered
  slices; "answered" when that mean reaches the threshold and no slice is positive, else
  "low-confidence"; shown on the most suspicious slice;
- *cannot answer*: "withheld", no class, no slice.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Mapping, Sequence

import numpy as np

from medcls.engine.findings import finding_indices, finding_noun, finding_probability, normal_class
from medcls.engine.inference import Prediction, Predictor
from medcls.engine.present import class_name, fmt_prob
from medcls.io.series import Series
from medcls.models.saliency import Region

log = logging.getLogger(__name__)

#: k: consecutive positive slices needed for "suspected".
MIN_RUN = 3


class Outcome(str, Enum):
    SUSPECTED = "suspected"
    NOT_SEEN = "not_seen"
    CANNOT_ANSWER = "cannot_answer"


@dataclass(frozen=True)
class Run:
    """Consecutive positive slices ``start`` .. ``stop - 1`` (0-based, in series order)."""

    start: int
    stop: int
    class_index: int
    class_name: str
    mean_probabilities: tuple[float, ...]
    mean_p_finding: float

    @property
    def length(self) -> int:
        return self.stop - self.start

    def __contains__(self, i: int) -> bool:
        return self.start <= i < self.stop


@dataclass(frozen=True)
class StudySummary:
    outcome: Outcome
    text: str
    run: Run | None
    other_runs: tuple[Run, ...]
    n_slices: int
    n_readable: int
    n_answered: int
    n_outside: int
    n_positive: int
    most_suspicious: int | None  # slice index with the highest P(finding) among answered ones
    threshold: float
    min_run: int
    rule: str

    @property
    def class_name(self) -> str | None:
        return self.run.class_name if self.run is not None else None


def rule_text(threshold: float, min_run: int, noun: str = "tumour") -> str:
    return (f"{noun.capitalize()} suspected when at least {min_run} consecutive slices inside the "
            f"training distribution have P({noun}) ≥ {threshold:.1%} (the model's confidence "
            "threshold); the class is the one with the highest mean probability over that run. "
            "Cannot answer when most slices are outside the training distribution.")


def _runs(positive: np.ndarray) -> list[tuple[int, int]]:
    out, start = [], None
    for i, p in enumerate(list(positive) + [False]):
        if p and start is None:
            start = i
        elif not p and start is not None:
            out.append((start, i))
            start = None
    return out


def summarise(probabilities: np.ndarray, outside: Sequence[bool], card: Mapping,
              readable: Sequence[bool] | None = None, threshold: float | None = None,
              min_run: int = MIN_RUN, scope_notes: Sequence[str | None] | None = None) -> StudySummary:
    """The study summary from per-slice calibrated probabilities (N, C) in series order,
    the verdicts of the input gate and the card's scope (``outside``; ``scope_notes`` says why
    for the slices outside the validated scope) and which slices could be read (see the module's
    rule)."""
    probs = np.asarray(probabilities, dtype=float).reshape(len(outside), -1)
    n = len(probs)
    outside = np.asarray(outside, dtype=bool)
    readable = np.ones(n, bool) if readable is None else np.asarray(readable, dtype=bool)
    thr = float(card["low_confidence_threshold"] if threshold is None else threshold)
    noun = finding_noun(card)
    answered = readable & ~outside
    p_find = np.where(readable, finding_probability(np.nan_to_num(probs), card), 0.0)
    positive = answered & (p_find >= thr)
    k = max(1, min(int(min_run), n))
    n_read, n_ans, n_out = int(readable.sum()), int(answered.sum()), int((readable & outside).sum())
    most = int(np.argmax(np.where(answered, p_find, -1.0))) if n_ans else None
    classes = list(card["classes"])
    finding = finding_indices(card)

    def make_run(a: int, b: int) -> Run:
        mean = probs[a:b].mean(axis=0)
        ci = int(finding[int(np.argmax(mean[finding]))])
        return Run(a, b, ci, classes[ci], tuple(float(x) for x in mean),
                   float(p_find[a:b].mean()))

    runs = sorted((make_run(a, b) for a, b in _runs(positive) if b - a >= k),
                  key=lambda r: (-r.length, -r.mean_p_finding))
    common = dict(n_slices=n, n_readable=n_read, n_answered=n_ans, n_outside=n_out,
                  n_positive=int(positive.sum()), threshold=thr, min_run=k,
                  rule=rule_text(thr, k, noun))
    if n_read == 0:
        return StudySummary(Outcome.CANNOT_ANSWER, "Cannot answer: no slice of this series "
                            "could be read.", None, (), most_suspicious=None, **common)
    if n_ans == 0 or n_out > n_read / 2:
        notes = [note for note in (scope_notes or []) if note]
        if notes and len(notes) > n_out / 2:  # outside the validated scope, not just unusual
            note = max(set(notes), key=notes.count)
            return StudySummary(Outcome.CANNOT_ANSWER, f"Not validated for this series, so no "
                                f"answer: {note} ({len(notes)} of {n_read} slices).", None, (),
                                most_suspicious=most, **common)
        return StudySummary(Outcome.CANNOT_ANSWER,
                            f"Cannot answer: most slices are outside what the model was trained "
                            f"on ({n_out} of {n_read}).", None, (), most_suspicious=most, **common)
    if runs:
        run = runs[0]
        name = class_name(card, run.class_name)
        # one probability for what is said: the run class's mean, as the SR and the PACS carry it
        text = (f"{noun.capitalize()} suspected: {name} on {run.length} consecutive slices "
                f"({run.start + 1}–{run.stop}), mean P({name}) "
                f"{fmt_prob(run.mean_probabilities[run.class_index], 1)} over those slices.")
        if len(runs) > 1:
            text += f" {len(runs) - 1} further run(s) elsewhere."
        return StudySummary(Outcome.SUSPECTED, text, run, tuple(runs[1:]),
                            most_suspicious=run.start + int(np.argmax(p_find[run.start:run.stop])),
                            **common)
    text = f"No {noun} seen on {n_ans} answered slice(s)"
    notes = []
    if int(positive.sum()):
        notes.append(f"{int(positive.sum())} slice(s) above the threshold, fewer than {k} in a row")
    if n_out:
        notes.append(f"{n_out} outside the training distribution, not answered")
    if n - n_read:
        notes.append(f"{n - n_read} unreadable")
    text += (" (" + "; ".join(notes) + ")." if notes else ".")
    return StudySummary(Outcome.NOT_SEEN, text, None, (), most_suspicious=most, **common)


# ----------------------------------------------------------------------------- engine

@dataclass(frozen=True)
class SliceAnswer:
    index: int
    position: float
    prediction: Prediction | None
    error: str | None
    p_finding: float | None

    @property
    def answered(self) -> bool:
        return self.prediction is not None and not self.prediction.outside_training_distribution


@dataclass
class SeriesAnswer:
    series: Series
    slices: list[SliceAnswer]
    summary: StudySummary
    card: dict = field(repr=False)
    regions: dict[int, Region | None] = field(default_factory=dict, repr=False)
    # the run slices' segmentations (a model whose card names a segmentation companion)
    segmentations: dict[int, object | None] = field(default_factory=dict, repr=False)
    volume_mm3: float | None = None
    volume_note: str = ""
    volume_method: str | None = None  # SEGMENTATION or HEATMAP_REGION: what the areas came from
    elapsed_s: float = 0.0

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.card["classes"])

    def probabilities(self) -> np.ndarray:
        """(N, C) calibrated probabilities in series order (NaN rows for unreadable slices)."""
        c = len(self.classes)
        return np.stack([s.prediction.probabilities if s.prediction is not None
                         else np.full(c, np.nan) for s in self.slices]) if self.slices else \
            np.zeros((0, c))

    def as_record(self) -> dict:
        """One row of the by-series worklist (no UIDs, no patient tags)."""
        s, sm = self.series, self.summary
        run = sm.run
        return {
            "series": s.label, "series_key": s.key, "kind": s.kind, "plane": s.plane,
            "slices": len(s), "ordered_by": s.ordered_by,
            "slice_spacing_mm": s.slice_spacing, "outcome": sm.outcome.value,
            "summary": sm.text, "suspected_class": sm.class_name,
            "run_first_slice": run.start + 1 if run else None,
            "run_last_slice": run.stop if run else None,
            "run_mean_p_finding": run.mean_p_finding if run else None,
            "volume_mm3": self.volume_mm3, "volume_method": self.volume_method,
            "most_suspicious_slice": sm.most_suspicious + 1 if sm.most_suspicious is not None else None,
            "answered": sm.n_answered, "outside_distribution": sm.n_outside,
            "unreadable": sm.n_slices - sm.n_readable,
            "findings": "; ".join(f.kind.value for f in s.findings),
            "model": f"{self.card['name']} v{self.card['version']}",
        }

    def slice_records(self) -> list[dict]:
        """One row per slice, in series order."""
        out = []
        run = self.summary.run
        for a in self.slices:
            ref = self.series.slices[a.index]
            rec = {"series_key": self.series.key, "slice": a.index + 1,
                   "position_mm": a.position if self.series.positions is not None else None,
                   "file": ref.name, "frame": ref.frame + 1,
                   "predicted": a.prediction.label if a.prediction else None,
                   "confidence": a.prediction.confidence if a.prediction else None}
            for i, c in enumerate(self.classes):
                rec[f"p_{c}"] = float(a.prediction.probabilities[i]) if a.prediction else None
            rec.update({"p_finding": a.p_finding,
                        "outside_distribution": bool(a.prediction and
                                                     a.prediction.outside_training_distribution),
                        "in_suspicious_run": bool(run and a.index in run), "error": a.error})
            out.append(rec)
        return out


def answer_series(predictor: Predictor, series: Series, min_run: int = MIN_RUN,
                  method: str = "gradcam", batch_size: int | None = None, workers: int = 2,
                  on_progress: Callable[[int, int], None] | None = None) -> SeriesAnswer:
    """Every slice of ``series`` through ``predictor`` in batches (decoding on worker threads),
    the study summary, and the suspicious run's regions and volume."""
    t0 = time.perf_counter()
    card = predictor.card
    slices: list[SliceAnswer] = []
    n = len(series)
    for item in predictor.predict_stream(range(n), batch_size=batch_size, workers=workers,
                                         loader=series.scan):
        i = int(item.source)
        p = item.prediction
        pf = float(finding_probability(p.probabilities, card)) if p is not None else None
        slices.append(SliceAnswer(i, series.position_of(i), p, item.error, pf))
        if on_progress is not None and (len(slices) % 8 == 0 or len(slices) == n):
            on_progress(len(slices), n)
    c = len(card["classes"])
    probs = np.stack([s.prediction.probabilities if s.prediction is not None else np.zeros(c)
                      for s in slices]) if slices else np.zeros((0, c))
    summary = summarise(probs, [bool(s.prediction and s.prediction.outside_training_distribution)
                                for s in slices], card,
                        readable=[s.prediction is not None for s in slices], min_run=min_run,
                        scope_notes=[s.prediction.scope_note if s.prediction else None for s in slices])
    answer = SeriesAnswer(series, slices, summary, card)
    if summary.run is not None:
        _run_regions(predictor, answer, method)
    answer.elapsed_s = time.perf_counter() - t0
    log.info("series %s: %d slices, %s in %.2f s", series.key, n, summary.outcome.value,
             answer.elapsed_s)
    return answer


#: How a size was measured (named wherever a size is given: series view, reports, SR, audit).
SEGMENTATION, HEATMAP_REGION = "segmentation", "Grad-CAM region"


def _run_regions(predictor: Predictor, answer: SeriesAnswer, method: str) -> None:
    """The tumour's area on each of the run's slices and the volume they span: from the
    segmentation companion when the card names one, else from the run class's heatmap regions."""
    if predictor.segmenter is not None:
        _run_segmentations(predictor, answer)
        return
    run, series = answer.summary.run, answer.series
    areas = []
    for i in range(run.start, run.stop):
        try:
            e = predictor.explain(series.scan(i), method, class_index=run.class_index)
        except Exception as exc:  # noqa: BLE001 - a slice without a region: no volume
            log.debug("no region for slice %d: %s", i, type(exc).__name__)
            answer.regions[i] = None
            areas.append(UNMEASURED)
            continue
        answer.regions[i] = e.region
        areas.append(e.region.area_mm2 if e.region is not None else 0.0)
    _set_volume(answer, areas, HEATMAP_REGION, f"{len(areas)} slice region areas",
                f"{HEATMAP_REGION}, coarse")


UNMEASURED = float("nan")  # a run slice whose measurement failed: no volume over the run


def _set_volume(answer: SeriesAnswer, areas: list[float | None], method: str, what: str,
                method_text: str) -> None:
    """Volume = sum of the run slices' areas (mm², None when a slice has no mm, ``UNMEASURED``
    when its measurement failed) × slice spacing, or the reason there is none."""
    spacing = answer.series.slice_spacing
    failed = sum(1 for a in areas if a is not None and math.isnan(a))
    if failed:
        answer.volume_note = f"{failed} of {len(areas)} run slices could not be measured, so no volume"
    elif not areas or any(a is None for a in areas):
        answer.volume_note = "no pixel spacing in these files, so no volume"
    elif not spacing:
        answer.volume_note = "no slice spacing in these files, so no volume"
    else:
        answer.volume_mm3 = float(sum(areas) * spacing)
        answer.volume_method = method
        answer.volume_note = f"sum of {what} × {spacing:.2f} mm slice spacing (method: {method_text})"


def _run_segmentations(predictor: Predictor, answer: SeriesAnswer) -> None:
    """Segmentation of each run slice; volume = sum of the mask areas × slice spacing (a slice
    where the segmentation finds nothing adds 0)."""
    run, series = answer.summary.run, answer.series
    areas: list[float | None] = []
    for i in range(run.start, run.stop):
        try:
            seg = predictor.outline(series.scan(i), answer.slices[i].prediction)
        except Exception as exc:  # noqa: BLE001 - a slice that cannot be segmented: no volume
            log.debug("no segmentation for slice %d: %s", i, type(exc).__name__)
            answer.segmentations[i] = None
            areas.append(UNMEASURED)
            continue
        answer.segmentations[i] = seg
        areas.append(0.0 if seg is None else seg.area_mm2)
    name = getattr(predictor.segmenter, "name", "")
    found = sum(1 for i in range(run.start, run.stop) if answer.segmentations.get(i) is not None)
    _set_volume(answer, areas, SEGMENTATION,
                f"{len(areas)} slice segmentation areas ({found} with a tumour mask)",
                f"{SEGMENTATION}{f', {name}' if name else ''}")


# ----------------------------------------------------------------------------- one coded answer

ANSWERED, LOW_CONFIDENCE, WITHHELD = "answered", "low-confidence", "withheld"


@dataclass(frozen=True)
class SeriesVerdict:
    """The series' answer as one coded value (see the module's rule): what the PACS SR, the
    command line and the audit trail carry."""

    outcome: Outcome
    label: str | None  # the run's class, the no-finding class, or None (cannot answer)
    probability: float | None  # mean calibrated probability of ``label`` (see the rule)
    state: str  # ANSWERED, LOW_CONFIDENCE or WITHHELD
    slice: int | None  # the slice that shows the answer (0-based, series order)
    text: str  # the study summary's sentence

    @property
    def is_finding(self) -> bool:
        """A tumour answer: the only kind that carries a region (outline, area, diameter)."""
        return self.outcome == Outcome.SUSPECTED


def series_verdict(answer: SeriesAnswer) -> SeriesVerdict:
    """The coded answer of a series (class, probability, state, slice) by the module's rule."""
    sm, card = answer.summary, answer.card
    thr = sm.threshold
    if sm.outcome == Outcome.SUSPECTED:
        run = sm.run
        p = float(run.mean_probabilities[run.class_index])
        return SeriesVerdict(sm.outcome, run.class_name, p,
                             ANSWERED if p >= thr else LOW_CONFIDENCE, sm.most_suspicious, sm.text)
    if sm.outcome == Outcome.NOT_SEEN:
        normal = normal_class(card)
        ci = list(card["classes"]).index(normal)
        answered = [s.prediction.probabilities[ci] for s in answer.slices if s.answered]
        p = float(np.mean(answered))
        state = ANSWERED if p >= thr and sm.n_positive == 0 else LOW_CONFIDENCE
        return SeriesVerdict(sm.outcome, normal, p, state, sm.most_suspicious, sm.text)
    return SeriesVerdict(sm.outcome, None, None, WITHHELD, None, sm.text)


# ----------------------------------------------------------------------------- worklists

def review_by_series(predictor: Predictor, sources, min_run: int = MIN_RUN,
                     on_series: Callable[["SeriesAnswer"], None] | None = None):
    """Gather ``sources`` (the batch review's folder, upload or zip readers) into series and
    answer each: (study, answers in study order)."""
    from medcls.io.gather import gather

    study = gather(sources)
    answers = []
    for s in study.series:
        answers.append(answer_series(predictor, s, min_run=min_run))
        if on_series is not None:
            on_series(answers[-1])
    return study, answers


def write_records_csv(records: Sequence[dict], out) -> None:
    """Records as CSV (a path or a text stream); every cell through
    :func:`medcls.core.csvsafe.escape_cell` (no text runs as a spreadsheet formula)."""
    import contextlib
    import csv
    from pathlib import Path

    from medcls.core.csvsafe import atomic_output, escape_header, escape_row

    own = isinstance(out, (str, Path))
    with atomic_output(out, newline="") if own else contextlib.nullcontext(out) as fh:
        fields = list(records[0]) if records else ["series", "outcome", "summary"]
        w = csv.DictWriter(fh, fieldnames=escape_header(fields))
        w.writeheader()
        for rec in records:
            w.writerow(escape_row(rec))


def heatmap_class(answer: SeriesAnswer, i: int, requested: bool = False) -> int | None:
    """Which class the heatmap of slice ``i`` explains: the run's class on a slice of the
    suspicious run; on a no-finding answer, the strongest finding class when the user asked for
    it (``requested``); else None (the slice's own answer)."""
    from medcls.engine.findings import is_finding_answer, strongest_finding_class

    run, pred = answer.summary.run, answer.slices[i].prediction
    if run is not None and i in run:
        return run.class_index
    if requested and pred is not None and not is_finding_answer(pred, answer.card):
        return strongest_finding_class(pred.probabilities, answer.card)
    return None


def slice_explanation(predictor: Predictor, answer: SeriesAnswer, i: int, method: str = "gradcam",
                      requested: bool = False):
    """The heatmap of slice ``i`` for :func:`heatmap_class`."""
    return predictor.explain(answer.series.scan(i), method,
                             class_index=heatmap_class(answer, i, requested))
