"""What the pages say about an answer, decided once (engine layer, no streamlit).

The clinician reads a one-line verdict before anything else, so every number on screen goes
through one formatter and every sentence about confidence is built here from the model's card:

- :func:`fmt_prob` / :func:`fmt_pair`: probabilities as ">99%" / "<1%" instead of a rounded
  "100%", and two numbers that are compared (a gate distance and its threshold, a probability
  and the low-confidence threshold) with enough decimals to tell them apart;
- :func:`class_name`: human-readable class names (``class_names`` in the card, else
  ``no_tumor`` -> "No tumour");
- :func:`verdict`: class, calibrated probability and state (confident / uncertain / withheld);
- :func:`threshold_sentence` / :func:`gate_sentence`: what the thresholds mean, with the
  validation figures only when the card carries them (``selective``), never invented;
- :func:`agreement_state`: agreement of several models, amber when they agree but are unsure;
- :func:`triage_order` / :func:`worklist_record`: the batch worklist, needs-attention first;
- :func:`task_suggestion`: which other shipped model's input gate accepts a withheld scan;
- :func:`shows_region` / :func:`region_caption` / :func:`heatmap_meaning`: whether a lesion
  outline/area may be drawn (:func:`medcls.engine.findings.may_show_region`), and the words for it;
- :func:`withheld_reason`: why an answer is withheld, in one sentence;
- :func:`model_figures`: a card's test figures with their intervals, caveats and sources.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from medcls.engine.findings import finding_noun, is_finding_answer, may_show_region, normal_class

if TYPE_CHECKING:  # pragma: no cover
    from medcls.engine.inference import Prediction

CONFIDENT, UNCERTAIN, WITHHELD = "confident", "uncertain", "withheld"
MAX_DECIMALS = 4
SPELLING = {"tumor": "tumour", "tumors": "tumours"}


# ----------------------------------------------------------------------------- numbers

def fmt_prob(p: float, decimals: int = 0) -> str:
    """A probability in percent. Never "100%" or "0%" for a model's output: a value that would
    round to either is shown as ">99%" / "<1%" (with ``decimals``: ">99.9%", "<0.1%")."""
    p = float(p)
    if not math.isfinite(p):
        return "–"
    pct = p * 100
    step = 10.0 ** -decimals
    if float(f"{pct:.{decimals}f}") >= 100:
        return f">{100 - step:.{decimals}f}%"
    if float(f"{pct:.{decimals}f}") <= 0:
        return f"<{step:.{decimals}f}%"
    return f"{pct:.{decimals}f}%"


def _decimals_apart(a: float, b: float, scale: float, start: int) -> int:
    """Fewest decimals (from ``start``) at which a*scale and b*scale print differently."""
    for d in range(start, MAX_DECIMALS + 1):
        if f"{a * scale:.{d}f}" != f"{b * scale:.{d}f}":
            return d
    return MAX_DECIMALS


def fmt_pair(a: float, b: float, kind: str = "prob", min_decimals: int | None = None) -> tuple[str, str]:
    """``a`` and ``b`` formatted alike with enough decimals to tell them apart when they differ.
    ``kind`` "prob" (percent, via :func:`fmt_prob`) or "number" (plain, at least 1 decimal)."""
    if kind == "prob":
        d = _decimals_apart(a, b, 100, 0 if min_decimals is None else min_decimals)
        return fmt_prob(a, d), fmt_prob(b, d)
    d = _decimals_apart(a, b, 1, 1 if min_decimals is None else min_decimals)
    return f"{a:.{d}f}", f"{b:.{d}f}"


# ----------------------------------------------------------------------------- names

def class_name(card: dict | None, cls: str) -> str:
    """Human-readable name of ``cls``: the card's ``class_names`` mapping, else the identifier
    with spaces and British spelling ("no_tumor" -> "No tumour")."""
    names = (card if card is not None else {}).get("class_names") or {}
    if cls in names:
        return str(names[cls])
    words = [SPELLING.get(w.lower(), w) for w in str(cls).replace("_", " ").replace("-", " ").split()]
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def class_names(card: dict | None, classes: Iterable[str]) -> list[str]:
    return [class_name(card, c) for c in classes]


def is_normal_class(card: Mapping | None, cls: str) -> bool:
    """True for the card's "nothing found" class (:func:`medcls.models.card.normal_class`)."""
    return card is not None and cls == normal_class(card)


def task_noun(card: dict) -> str:
    """What the task's images are, from the card's task description ("Chest radiograph: ..."
    -> "chest radiograph")."""
    desc = str(card.get("task_description") or card.get("task", "scan"))
    noun = desc.split(":")[0].strip()
    return noun[:1].lower() + noun[1:] if noun[1:2].islower() else noun


# ----------------------------------------------------------------------------- one answer

def answer_state(pred: "Prediction") -> str:
    if pred.outside_training_distribution:
        return WITHHELD
    return UNCERTAIN if pred.low_confidence else CONFIDENT


@dataclass(frozen=True)
class Verdict:
    state: str  # confident / uncertain / withheld
    cls: str  # class identifier of the top class
    name: str  # its human-readable name
    probability: float
    probability_text: str
    text: str  # the one line under the uploader
    kind: str  # success / warning / error: how the page colours it

    @property
    def withheld(self) -> bool:
        return self.state == WITHHELD


GATE_REASON = "it does not look like the images the model was trained on (input gate)"


def withheld_reason(pred) -> str | None:
    """Why an answer is withheld, as the end of a sentence ("Answer withheld: ..."), or None
    for an answer that is given. The card's scope says it first (a FLAIR image for a T1 model),
    else the input gate. ``pred``: a Prediction, or a worklist row (``outside_distribution``,
    ``scope_note``)."""
    outside = getattr(pred, "outside_training_distribution", None)
    if outside is None:
        outside = bool(getattr(pred, "outside_distribution", False))
    if not outside:
        return None
    note = getattr(pred, "scope_note", None)
    if note and not getattr(pred, "gate_outside", False):
        return f"not validated for this scan ({note})"
    return GATE_REASON


def verdict(pred: "Prediction", card: dict | None = None) -> Verdict:
    """The one-line answer: class, calibrated probability, state."""
    state = answer_state(pred)
    name = class_name(card, pred.label)
    prob = fmt_prob(pred.confidence)
    if state == WITHHELD:
        text = f"Answer withheld: {withheld_reason(pred)}, so it gives no class."
        kind = "error"
    elif state == UNCERTAIN:
        text = f"{name} · {prob} calibrated probability · uncertain"
        kind = "warning"
    else:
        text = f"{name} · {prob} calibrated probability · confident"
        kind = "success"
    return Verdict(state, pred.label, name, pred.confidence, prob, text, kind)


def selective_figures(card: Mapping | None) -> dict | None:
    """The card's validation accuracy of the answers at or above the low-confidence threshold,
    as training records it: ``low_confidence_val_accuracy``, else ``selective`` (validation:
    ``accuracy_above_threshold``, ``coverage``, ``threshold``). ``None`` when absent or when
    measured at another threshold than the card's."""
    card = card if card is not None else {}
    sel = card.get("selective")
    sel = dict(sel) if isinstance(sel, Mapping) else {}
    if isinstance(sel.get("val"), Mapping):  # {"val": {...}, "test": {...}}
        sel = {"split": "val", **sel["val"]}
    acc = card.get("low_confidence_val_accuracy")
    if acc is None:
        acc = sel.get("accuracy_above_threshold")
    if acc is None:
        return None
    thr = sel.get("threshold")
    card_thr = card.get("low_confidence_threshold")
    if thr is not None and card_thr is not None and abs(float(thr) - float(card_thr)) > 1e-6:
        return None  # figures of another threshold do not describe this one
    return {"accuracy_above_threshold": float(acc), "coverage": sel.get("coverage"),
            "split": sel.get("split", "val")}


def threshold_sentence(pred: "Prediction", card: dict | None = None) -> str:
    """What the low-confidence threshold means for this answer, from the card's figures."""
    conf, thr = fmt_pair(pred.confidence, pred.low_confidence_threshold)
    side = "below" if pred.low_confidence else "above"
    sel = selective_figures(card)
    if sel is not None:
        split = "validation" if sel["split"] == "val" else f"the {sel['split']} split"
        return (f"Answers above {thr} were right {fmt_prob(sel['accuracy_above_threshold'])} of the time "
                f"on {split}; this one ({conf}) is {side} that.")
    return (f"This model treats answers below {thr} as uncertain; this one ({conf}) is {side} "
            "that. Its card gives no validation accuracy for the answers above it.")


def gate_sentence(pred: "Prediction") -> str:
    """The input gate's reading, both numbers told apart."""
    if pred.gate_score is None or pred.gate_threshold is None:
        return "This model has no input gate."
    score, thr = fmt_pair(pred.gate_score, pred.gate_threshold, kind="number")
    if pred.outside_training_distribution:
        return (f"Input-gate distance {score}, above the threshold {thr}: this scan does not "
                "look like the model's training images, so its answer is withheld.")
    return f"Input-gate distance {score}, within the threshold {thr}."


def confidence_statement(pred: "Prediction", card: dict | None = None) -> tuple[str, str]:
    """(kind, text): the state of the answer in plain words, thresholds explained."""
    v = verdict(pred, card)
    if v.withheld and pred.outside_scope and not pred.gate_outside:  # the gate passed: the scope's reason
        return "error", (f"Outside what this model was trained on: {pred.scope_note}, so its "
                         "answer is withheld and is not a finding.")
    if v.withheld:
        return "error", ("Outside what this model was trained on: its answer is withheld and is "
                         "not a finding. " + gate_sentence(pred))
    if v.state == UNCERTAIN:
        return "warning", f"Uncertain: {v.name} at {v.probability_text}. " + threshold_sentence(pred, card)
    return "success", f"Confident: {v.name} at {v.probability_text}. " + threshold_sentence(pred, card)


def shows_region(pred: "Prediction", cls: str, card: dict | None = None) -> bool:
    """Whether the heatmap of class ``cls`` may carry a lesion outline, box and area for this
    answer: :func:`medcls.engine.findings.may_show_region` (never for a withheld answer or the
    normal class's map)."""
    return card is not None and may_show_region(pred, card, class_name=cls)


def region_caption(region, method: str = "Grad-CAM region") -> str:
    """The one caption of a heatmap region, with its method named (it is coarse: what drove the
    class, not a lesion boundary)."""
    area = (f"{region.area_mm2:.0f} mm²" if region.area_mm2 is not None
            else f"{region.area_px} px (no pixel spacing in this file, so no mm²)")
    return (f"Region above {region.threshold:.0%} of the peak: area {area} (method: {method}; "
            "coarse, not a lesion boundary).")


def heatmap_meaning(pred: "Prediction", card: Mapping, cls: str) -> str:
    """One sentence on what the heatmap of class ``cls`` shows, for answers where no region is
    drawn (withheld, or the normal class)."""
    if pred.outside_training_distribution:
        return ("The answer is withheld (the scan is outside what the model was trained on), so "
                "no region is outlined; the heatmap only shows what the network reacted to.")
    shown = class_name(card, cls)
    if pred.label == normal_class(card):
        noun = finding_noun(card)
        return (f"The answer is “{class_name(card, pred.label)}”: the heatmap shows what "
                f"supported that answer, not a lesion, so no region or area is given. Ask for the "
                f"strongest {noun} evidence to see where a {noun} class looked.")
    if not is_finding_answer(pred, card) or cls == normal_class(card):
        return f"Red: the image regions that drove “{shown}” most (not a lesion)."
    return f"Red: the image regions that drove “{shown}” most."


def runner_up(pred: "Prediction") -> int:
    """Index of the second most probable class."""
    order = sorted(range(len(pred.probabilities)), key=lambda i: -float(pred.probabilities[i]))
    return order[1] if len(order) > 1 else order[0]


def explain_choices(pred: "Prediction") -> list[int]:
    """Class indices to offer for the heatmap: the answer, then the runner-up, then the rest by
    falling probability."""
    return sorted(range(len(pred.probabilities)), key=lambda i: -float(pred.probabilities[i]))


# ----------------------------------------------------------------------------- several models

@dataclass(frozen=True)
class AgreementState:
    state: str  # agree / agree_unsure / disagree / single (one model answers) / withheld
    kind: str  # success / warning / error
    text: str

    @property
    def plain_agreement(self) -> bool:
        return self.state == "agree"


def agreement_state(preds: Sequence["Prediction"], names: Sequence[str] | None = None,
                    card: dict | None = None) -> AgreementState:
    """How several models' answers relate. Plain (green) agreement only when every model gives
    the same class and is confident; the same class with any model unsure or withheld is amber;
    different classes are red."""
    n = len(preds)
    states = [answer_state(p) for p in preds]
    answered = [p for p, s in zip(preds, states) if s != WITHHELD]
    if not answered:
        return AgreementState("withheld", "error", f"All {n} models withhold their answer: the "
                              "scan does not look like their training images.")
    labels = {p.label for p in answered}
    n_withheld = n - len(answered)
    if len(answered) == 1:  # one answer is not an agreement
        i = next(i for i, s in enumerate(states) if s != WITHHELD)
        who = names[i] if names else "one model"
        said = f"{class_name(card, preds[i].label)}, {states[i]}"
        if n == 1:
            return AgreementState("single", "warning", f"Only {who} answered ({said}): there is "
                                  "nothing to compare it with.")
        return AgreementState("single", "warning", f"Only {who} of {n} answers ({said}); the "
                              f"other {n - 1} withhold theirs, so there is no agreement to "
                              "report.")
    if len(labels) > 1:
        votes = ", ".join(f"{class_name(card, c)} ({sum(p.label == c for p in answered)})"
                          for c in sorted(labels))
        return AgreementState("disagree", "error", f"Models disagree on this scan: {votes}. "
                              "Treat the result as uncertain and review the scan.")
    label = class_name(card, answered[0].label)
    unsure = sum(s == UNCERTAIN for s in states)
    if unsure == 0 and n_withheld == 0:
        return AgreementState("agree", "success", f"The {n} models agree: {label}, each confident.")
    if unsure == len(answered):
        who = "every model is unsure" if n_withheld == 0 else \
            f"every model that answers is unsure ({n_withheld} withheld)"
        return AgreementState("agree_unsure", "warning", f"The models agree on {label}, but {who}: "
                              "treat it as uncertain.")
    parts = [f"{unsure} of {n} unsure"] if unsure else []
    parts += [f"{n_withheld} of {n} withheld"] if n_withheld else []
    return AgreementState("agree_unsure", "warning", f"The models that answer agree on {label}, "
                          f"but {' and '.join(parts)}: treat it as uncertain.")


# ----------------------------------------------------------------------------- worklist

def triage_key(row) -> tuple:
    """Sort key of a review row: unreadable, then withheld, then uncertain, then the rest;
    within each, rising confidence."""
    if row.error is not None:
        rank = 0
    elif row.outside_distribution:
        rank = 1
    elif row.low_confidence:
        rank = 2
    else:
        rank = 3
    return rank, (row.confidence if row.confidence is not None else -1.0), row.file


SORTS = {
    "triage": ("Needs attention first, then rising confidence", triage_key),
    "confidence": ("Rising confidence", lambda r: (r.confidence if r.confidence is not None else -1.0, r.file)),
    "file": ("File name", lambda r: (r.file,)),
    "series": ("Series and instance", lambda r: (r.series_number if r.series_number is not None else 1 << 30,
                                                 r.instance_number if r.instance_number is not None else 1 << 30,
                                                 r.file)),
}


def triage_order(rows: Sequence, by: str = "triage") -> list[int]:
    """Positions of ``rows`` in the chosen order (default: needs attention first)."""
    key = SORTS[by][1]
    return sorted(range(len(rows)), key=lambda i: key(rows[i]))


def worklist_record(row, classes: Sequence[str], card: dict | None = None) -> dict:
    """A review row for the screen: the class by its name or "unreadable: reason", flags next
    to it, then the probabilities."""
    if row.error is not None:
        shown = f"unreadable: {row.error}"
    elif row.outside_distribution:
        shown = f"Withheld: {withheld_reason(row)}"
    else:
        shown = class_name(card, row.predicted)
    rec = {"file": row.file, "predicted": shown, "flags": row.flags,
           "confidence": row.confidence}
    rec.update({f"p_{c}": row.probabilities.get(c) for c in classes})
    return rec


# ----------------------------------------------------------------------------- other tasks

def task_suggestion(candidates: Iterable[tuple[dict, "Prediction"]]) -> str | None:
    """For a withheld answer: the first other model (card, its prediction on the same scan)
    whose input gate accepts the scan, as a sentence; ``None`` when none does."""
    for card, pred in candidates:
        if pred.gate_score is not None and not pred.outside_training_distribution:
            return (f"This looks like a {task_noun(card)}: switch to the {card['task']} task "
                    f"(model {card['name']}).")
    return None


# ----------------------------------------------------------------------------- engineer's view

@dataclass(frozen=True)
class Figure:
    """One test figure of a model with its interval, caveat and where it comes from."""

    model: str
    figure: str
    value: float | None
    ci: tuple[float, float] | None
    caveat: str
    source: str


def load_results(path: str | Path) -> dict | None:
    """A benchmark results JSON, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def caveats(card: dict) -> dict[str, str]:
    """Caveats per figure: the card's ``caveats`` mapping (figure or class -> text), plus any
    limit that names exactly one class (it qualifies that class's figures)."""
    out = {str(k): str(v) for k, v in (card.get("caveats") or {}).items()}
    for limit in card.get("limits", []):
        named = [c for c in card.get("classes", []) if c in limit]
        if len(named) == 1:  # a limit about one class qualifies that class's figures
            out.setdefault(named[0], limit)
    return out


def model_figures(card: dict, results: dict | None = None, results_file: str = "") -> list[Figure]:
    """Accuracy, macro-F1, ROC AUC, ECE and per-class precision/recall of ``card``'s test
    split, with the 95% interval from the benchmark ``results`` (bench/results/accuracy.json)
    when they hold this model, each with its source (card and training date, results file)."""
    test = card.get("metrics", {}).get("test", {}) or {}
    bench = ((results or {}).get("models") or {}).get(card["name"]) or {}
    ci = bench.get("ci95") or {}
    notes = caveats(card)
    date = (card.get("training") or {}).get("date", "date not recorded")
    card_src = f"card.json metrics.test (trained {date})"
    bench_src = (f"{results_file} ({(results or {}).get('date') or 'date not recorded in the file'})"
                 if bench else "")
    rows: list[Figure] = []

    def add(label, value, key, ci_key, caveat_key=None):
        bounds = ci.get(ci_key)
        rows.append(Figure(card["name"], label, value, tuple(bounds) if bounds else None,
                           notes.get(caveat_key or key, ""),
                           card_src + (f"; interval: {bench_src}" if bounds else "")))

    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("roc_auc", "ROC AUC"),
                       ("ece", "ECE")):
        add(label, test.get(key), key, key)
    for c, m in (test.get("per_class") or {}).items():
        name = class_name(card, c)
        add(f"{name}: precision", m.get("precision"), c, f"precision_{c}", c)
        add(f"{name}: recall", m.get("recall"), c, f"recall_{c}", c)
    return rows


def confusion(card: dict) -> tuple[list[str], list[list[int]]] | None:
    """(class names, matrix rows = true class) of the card's test split, or ``None``."""
    test = card.get("metrics", {}).get("test", {}) or {}
    matrix = test.get("confusion_matrix")
    if not matrix:
        return None
    return class_names(card, card["classes"]), [list(map(int, r)) for r in matrix]
