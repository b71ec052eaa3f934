"""Side-by-side comparison of several models of one task on one scan.

:func:`compare` runs each predictor's ``explain`` on the scan (timed) and summarises:

- **agreement** (:func:`agreement`, a pure function over probability rows): whether every
  model gives the same top-1 class, and the *probability spread*, i.e. for each class the
  max - min of the calibrated probabilities across the models, and its maximum;
- **heatmap overlap** (:func:`medcls.models.measures.box_iou`, :func:`mask_iou`): for every pair of models the IoU
  of their heatmap regions' bounding boxes and of their thresholded heatmaps (each heatmap
  thresholded at its own region threshold x its peak, as :func:`medcls.models.saliency.heatmap_region`
  does), with the mean over the pairs.

:func:`run_model` and :func:`summarize` are the two halves of :func:`compare`, so a caller that
caches per-model results (the comparison page) only recomputes the models it has not run yet.

:func:`card_table` turns model cards into rows of their fixed-test-split figures.

Models in one comparison must answer the same task with the same class list; anything else
raises :class:`IncompatibleModelsError`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from medcls.core.errors import IncompatibleModelsError
from medcls.models.card import DEFAULT_REGION_THRESHOLD
from medcls.models.measures import box_iou

if TYPE_CHECKING:  # pragma: no cover
    from medcls.engine.inference import Explanation, Prediction, Predictor
    from medcls.io.scan import Scan

__all__ = [
    "Agreement", "Comparison", "IncompatibleModelsError", "ModelResult", "PairOverlap",
    "agreement", "box_iou", "card_table", "check_compatible", "compare", "heatmap_mask",
    "mask_iou", "run_model", "summarize",
]


# ----------------------------------------------------------------------------- agreement

@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement and probability spread of several models' calibrated probabilities."""

    classes: tuple[str, ...]
    probabilities: np.ndarray = field(repr=False)  # (n_models, n_classes)
    labels: tuple[str, ...]  # top-1 class of each model, in input order
    agree: bool  # every model's top-1 class is the same
    spread: dict[str, float]  # per class: max - min probability across the models
    max_spread: float  # the largest per-class spread
    max_spread_class: str  # the class with the largest spread

    @property
    def disagree(self) -> bool:
        return not self.agree

    @property
    def label(self) -> str | None:
        """The shared top-1 class when the models agree, else ``None``."""
        return self.labels[0] if self.agree else None

    @property
    def votes(self) -> dict[str, int]:
        """How many models name each class as top-1 (classes with no vote left out), in the
        order of the class list."""
        return {c: self.labels.count(c) for c in self.classes if c in self.labels}


def _shared_classes(classes: Sequence[str] | Sequence[Sequence[str]], n_rows: int) -> tuple[str, ...]:
    """One class list, from a shared list or one list per model (which must all be equal)."""
    items = list(classes)
    if items and all(not isinstance(c, str) for c in items):
        lists = [tuple(c) for c in items]
        if len(lists) != n_rows:
            raise IncompatibleModelsError(f"{len(lists)} class lists given for {n_rows} models.")
        first = lists[0]
        for other in lists[1:]:
            if other != first:
                raise IncompatibleModelsError(
                    "The models do not share the class list "
                    f"({', '.join(first)} vs {', '.join(other)}); only models of the same task "
                    "with the same classes can be compared.")
        return first
    if not all(isinstance(c, str) for c in items):
        raise ValueError("classes must be a list of class names or one such list per model.")
    return tuple(items)


def agreement(prob_rows, classes: Sequence[str] | Sequence[Sequence[str]]) -> Agreement:
    """Agreement of ``prob_rows`` (one row of class probabilities per model).

    ``classes`` is the shared class list, or one class list per row (all equal, else
    :class:`IncompatibleModelsError`). Top-1 is ``argmax`` (the first class on a tie)."""
    probs = np.asarray(prob_rows, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] < 1:
        raise ValueError("prob_rows must be a non-empty 2-D array: one row per model.")
    names = _shared_classes(classes, probs.shape[0])
    if probs.shape[1] != len(names):
        raise IncompatibleModelsError(f"Each probability row needs {len(names)} values (one per "
                                      f"class), got {probs.shape[1]}.")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probabilities must be finite.")
    top = probs.argmax(axis=1)
    labels = tuple(names[i] for i in top)
    per_class = probs.max(axis=0) - probs.min(axis=0)
    k = int(np.argmax(per_class))
    return Agreement(classes=names, probabilities=probs, labels=labels,
                     agree=len(set(labels)) == 1,
                     spread={c: float(s) for c, s in zip(names, per_class)},
                     max_spread=float(per_class[k]), max_spread_class=names[k])


def check_compatible(cards: Sequence[dict[str, Any]]) -> tuple[str, tuple[str, ...]]:
    """(task, classes) shared by every card; :class:`IncompatibleModelsError` otherwise."""
    if not cards:
        raise IncompatibleModelsError("No models to compare.")
    task, classes = cards[0]["task"], tuple(cards[0]["classes"])
    for card in cards[1:]:
        if card["task"] != task:
            raise IncompatibleModelsError(
                f"Model {card['name']!r} answers task {card['task']!r}, not {task!r}; only models "
                "of the same task can be compared.")
        if tuple(card["classes"]) != classes:
            raise IncompatibleModelsError(
                f"Model {card['name']!r} has classes ({', '.join(card['classes'])}), not "
                f"({', '.join(classes)}); only models with the same class list can be compared.")
    return task, classes


# ----------------------------------------------------------------------------- overlap

def heatmap_mask(heatmap: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels at or above ``threshold`` x the heatmap's peak (all False for an empty heatmap)."""
    hm = np.asarray(heatmap, np.float32)
    peak = float(hm.max()) if hm.size else 0.0
    if peak <= 0:
        return np.zeros(hm.shape, bool)
    return hm >= threshold * peak


def mask_iou(a: np.ndarray, b: np.ndarray) -> float | None:
    """IoU of two boolean masks of the same shape; ``None`` when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = int(np.count_nonzero(a | b))
    return None if union == 0 else int(np.count_nonzero(a & b)) / union


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# ----------------------------------------------------------------------------- comparison

@dataclass(frozen=True)
class ModelResult:
    """One model's answer for the scan: its explanation (prediction, heatmap, region) and the
    time ``explain`` took (decode excluded: preprocess, forward, saliency)."""

    name: str
    card: dict[str, Any] = field(repr=False)
    explanation: "Explanation" = field(repr=False)
    ms: float

    @property
    def prediction(self) -> "Prediction":
        return self.explanation.prediction

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.prediction.classes)

    @property
    def region_threshold(self) -> float:
        region = self.explanation.region
        return float(region.threshold) if region is not None else float(
            self.card.get("region_threshold", DEFAULT_REGION_THRESHOLD))


@dataclass(frozen=True)
class PairOverlap:
    """Overlap of two models' heatmaps (indices into ``Comparison.results``)."""

    i: int
    j: int
    names: tuple[str, str]
    box_iou: float | None  # IoU of the region bounding boxes
    mask_iou: float | None  # IoU of the thresholded heatmaps


@dataclass(frozen=True)
class Comparison:
    method: str
    results: tuple[ModelResult, ...]
    agreement: Agreement
    pairs: tuple[PairOverlap, ...]
    mean_box_iou: float | None  # over the pairs where it is defined
    mean_mask_iou: float | None

    @property
    def agree(self) -> bool:
        return self.agreement.agree

    @property
    def disagree(self) -> bool:
        return self.agreement.disagree

    @property
    def probability_spread(self) -> dict[str, float]:
        return self.agreement.spread

    @property
    def max_spread(self) -> float:
        return self.agreement.max_spread

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.results)

    @property
    def latencies_ms(self) -> dict[str, float]:
        return {r.name: r.ms for r in self.results}


def run_model(predictor: "Predictor", scan: "Scan", method: str = "gradcam") -> ModelResult:
    """One model's timed explanation of the scan (``time.perf_counter`` around ``explain``)."""
    t0 = time.perf_counter()
    explanation = predictor.explain(scan, method)
    ms = (time.perf_counter() - t0) * 1000.0
    return ModelResult(name=predictor.card["name"], card=predictor.card,
                       explanation=explanation, ms=ms)


def summarize(results: Sequence[ModelResult], method: str | None = None) -> Comparison:
    """Agreement, spread and pairwise heatmap overlap of per-model results on one scan."""
    results = tuple(results)
    if len(results) < 2:
        raise IncompatibleModelsError("Pick two or more models to compare.")
    check_compatible([r.card for r in results])
    agr = agreement([r.prediction.probabilities for r in results], [r.classes for r in results])
    masks = [heatmap_mask(r.explanation.heatmap, r.region_threshold) for r in results]
    pairs = []
    for i, j in itertools.combinations(range(len(results)), 2):
        ri, rj = results[i], results[j]
        bi = ri.explanation.region.box if ri.explanation.region is not None else None
        bj = rj.explanation.region.box if rj.explanation.region is not None else None
        pairs.append(PairOverlap(i, j, (ri.name, rj.name), box_iou(bi, bj),
                                 mask_iou(masks[i], masks[j])))
    return Comparison(method=method or results[0].explanation.method, results=results,
                      agreement=agr, pairs=tuple(pairs),
                      mean_box_iou=_mean(p.box_iou for p in pairs),
                      mean_mask_iou=_mean(p.mask_iou for p in pairs))


def compare(predictors: Sequence["Predictor"], scan: "Scan", method: str = "gradcam") -> Comparison:
    """Run every predictor's ``explain`` on ``scan`` (timed) and compare the answers.

    The predictors must share the task and the class list (checked before anything runs)."""
    predictors = list(predictors)
    if len(predictors) < 2:
        raise IncompatibleModelsError("Pick two or more models to compare.")
    check_compatible([p.card for p in predictors])
    return summarize([run_model(p, scan, method) for p in predictors], method)


# ----------------------------------------------------------------------------- cards

def card_table(cards: Sequence[dict[str, Any]], split: str = "test") -> list[dict[str, Any]]:
    """One row per card with its figures on the fixed ``split`` (missing figures are None):
    model, architecture, n, accuracy, macro_f1, ``recall <class>`` per class, ece, roc_auc,
    size_mb (from ``size_bytes``), parameters and ms_per_scan (the card's
    ``speed.single_scan_ms_median``, if the card has one)."""
    classes = list(dict.fromkeys(c for card in cards for c in card.get("classes", [])))
    rows = []
    for card in cards:
        m = card.get("metrics", {}).get(split, {}) or {}
        per_class = m.get("per_class", {}) or {}
        size = card.get("size_bytes")
        row = {"model": card.get("name"), "architecture": card.get("architecture"),
               "n": m.get("n"), "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1")}
        for c in classes:
            row[f"recall {c}"] = (per_class.get(c) or {}).get("recall")
        row.update({"ece": m.get("ece"), "roc_auc": m.get("roc_auc"),
                    "size_mb": None if size is None else size / 1e6,
                    "parameters": card.get("parameters"),
                    "ms_per_scan": (card.get("speed") or {}).get("single_scan_ms_median")})
        rows.append(row)
    return rows
