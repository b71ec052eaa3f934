"""How a site adaptation is measured on the site's own confirmed cases: grouped, label-stratified
folds (and which labels have too few cases to be checked), out-of-fold figures with bootstrap
intervals, and the rule that accepts a recipe only on a measured gain.

Every case is predicted once per repeat by a model adapted without it, so the gain over the
parent is measured on every confirmed case of a checked label, not on a small held-out part.
A label with fewer patients (groups) than folds cannot be held out in every fold: its cases are
always trained on and reported *not checked*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from medcls.core.errors import DatasetError
from medcls.learning.data import Record, negative_class

DEFAULT_FOLDS = 5
MIN_FOLDS = 3
CONFIDENCE = 0.95
REFERENCE_MARGIN = 0.02  # the largest accepted drop on the reference test split


class TooFewCasesError(DatasetError):
    """The local data cannot measure a gain: fewer than two labels with enough cases."""


@dataclass(frozen=True)
class FoldPlan:
    """Which held-out fold each confirmed case is in, per repeat (-1: always trained on)."""

    folds: int
    repeats: int
    assignment: np.ndarray  # (repeats, N)
    groups: np.ndarray  # (N,) index of each case's group (patient)
    checked: tuple[str, ...]  # local labels measured
    not_checked: dict  # label -> number of groups it has (fewer than ``folds``)

    @property
    def scored(self) -> np.ndarray:
        """(N,) bool: the cases whose held-out predictions are scored."""
        return self.assignment[0] >= 0

    def train_index(self, repeat: int, fold: int) -> np.ndarray:
        return np.flatnonzero(self.assignment[repeat] != fold)

    def held_out_index(self, repeat: int, fold: int) -> np.ndarray:
        return np.flatnonzero(self.assignment[repeat] == fold)


def plan_folds(records: Sequence[Record], folds: int = DEFAULT_FOLDS, repeats: int = 1,
               seed: int = 0) -> FoldPlan:
    """Folds over the groups (the ``group`` column: a patient on one side only; else each case
    alone), dealt per label so each fold holds about the same share of every label. A label
    with fewer groups than ``folds`` is trained on in every fold but not scored. Refuses
    (:class:`TooFewCasesError`) unless at least two labels can be checked. A group of mixed
    labels follows its first case's label."""
    if folds < MIN_FOLDS:
        raise TooFewCasesError(f"Cross-validation needs at least {MIN_FOLDS} folds.")
    group_of: dict[str, int] = {}
    groups = np.array([group_of.setdefault(r.group or f"#{i}", len(group_of)) for i, r in enumerate(records)])
    first_label: dict[int, str] = {}
    for g, r in zip(groups, records):
        first_label.setdefault(int(g), r.label)
    by_label: dict[str, list[int]] = {}
    for g, lab in first_label.items():
        by_label.setdefault(lab, []).append(g)
    checked = tuple(sorted(lab for lab, gs in by_label.items() if len(gs) >= folds))
    not_checked = {lab: len(gs) for lab, gs in sorted(by_label.items()) if len(gs) < folds}
    if len(checked) < 2:
        have = ", ".join(f"{lab}: {len(gs)}" for lab, gs in sorted(by_label.items())) or "none"
        raise TooFewCasesError(
            f"Too few confirmed cases to measure a gain ({have}). At least two labels need {folds} "
            f"cases each (separate patients when a 'group' column is given), one per cross-"
            "validation fold; rarer labels are then adapted on and reported as not checked.")
    assignment = np.full((repeats, len(records)), -1, np.int64)
    for rep in range(repeats):
        rng = np.random.default_rng([seed, rep])
        load = np.zeros(folds)
        for lab in checked:
            gs = np.array(sorted(by_label[lab]))
            rng.shuffle(gs)
            size = np.bincount(groups, minlength=len(first_label))[gs]
            per_label = np.zeros(folds)
            for g, n in zip(gs, size):  # the fold with the fewest cases of this label, then overall
                order = np.lexsort((rng.random(folds), load, per_label))
                k = int(order[0])
                assignment[rep, groups == g] = k
                per_label[k] += n
                load[k] += n
    scored_labels = set(checked)
    keep = np.array([r.label in scored_labels for r in records])
    assignment[:, ~keep] = -1  # a rare label's case inside a held-out group is not scored either
    return FoldPlan(folds=folds, repeats=repeats, assignment=assignment, groups=groups,
                    checked=checked, not_checked=not_checked)


def bootstrap_index(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, G) how often each group is drawn per resample (groups resampled with replacement)."""
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, (n_boot, n_groups))
    return np.stack([np.bincount(d, minlength=n_groups) for d in draws]) if n_groups else np.zeros((n_boot, 0))


def _weighted_means(values: np.ndarray, groups: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per resample, the mean of ``values`` over the drawn groups' cases."""
    n_groups = counts.shape[1]
    sums = np.bincount(groups, weights=values, minlength=n_groups)
    sizes = np.bincount(groups, minlength=n_groups).astype(float)
    den = counts @ sizes
    return np.where(den > 0, (counts @ sums) / np.where(den > 0, den, 1), np.nan)


def _interval(samples: np.ndarray, level: float = CONFIDENCE) -> list[float] | None:
    s = samples[np.isfinite(samples)]
    if not len(s):
        return None
    a = (1 - level) / 2
    return [float(np.quantile(s, a)), float(np.quantile(s, 1 - a))]


def case_figures(correct: np.ndarray, labels: Sequence[str], groups: np.ndarray | None = None,
                 tumour_vs_none: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy, recall per label and (given) tumour-vs-none accuracy of per-case scores in
    [0, 1] (a fraction when a case was predicted in several repeats), each with a 95% bootstrap
    interval over groups."""
    correct = np.asarray(correct, float)
    labels = np.asarray(labels)
    groups = np.arange(len(correct)) if groups is None else _dense(groups)
    counts = bootstrap_index(groups, n_boot, seed)
    out: dict = {"n": int(len(correct)),
                 "n_by_label": {lab: int((labels == lab).sum()) for lab in sorted(set(labels.tolist()))}}

    def add(key: str, values: np.ndarray, mask: np.ndarray | None = None):
        if mask is not None:
            values, g = values[mask], groups[mask]
            c = counts
        else:
            g, c = groups, counts
        out[key] = float(values.mean()) if len(values) else None
        out[key + "_ci95"] = _interval(_weighted_means(values, g, c)) if len(values) else None

    add("accuracy", correct)
    for lab in out["n_by_label"]:
        add(f"recall_{lab}", correct, labels == lab)
    if tumour_vs_none is not None:
        add("tumour_vs_none_accuracy", np.asarray(tumour_vs_none, float))
    return out


def gain_figures(adapted: np.ndarray, parent: np.ndarray, groups: np.ndarray, n_compared: int = 1,
                 n_boot: int = 2000, seed: int = 0) -> dict:
    """The paired gain in accuracy (adapted minus parent, per case) with its 95% bootstrap
    interval over groups, and the lower bound adjusted for choosing the best of ``n_compared``
    recipes (Bonferroni: the (1 - 0.05 / n) interval), which the acceptance rule uses."""
    diff = np.asarray(adapted, float) - np.asarray(parent, float)
    groups = _dense(groups)
    samples = _weighted_means(diff, groups, bootstrap_index(groups, n_boot, seed))
    adjusted = _interval(samples, 1 - (1 - CONFIDENCE) / max(1, n_compared))
    return {"accuracy_parent": float(np.mean(parent)), "accuracy": float(np.mean(adapted)),
            "gain": float(diff.mean()), "gain_ci95": _interval(samples),
            "gain_lower_adjusted": adjusted[0] if adjusted else None, "compared": int(n_compared)}


def _dense(groups) -> np.ndarray:
    _, inv = np.unique(np.asarray(groups), return_inverse=True)
    return inv.reshape(-1)


def predicted_scores(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Per case: right (the predicted class is one its label allows) and, for a task with a
    negative class, right about tumour-vs-none."""
    pred = np.asarray(probs).argmax(1)
    correct = (targets[np.arange(len(pred)), pred] > 0).astype(float)
    neg = negative_class(classes)
    if neg is None:
        return correct, None
    k = list(classes).index(neg)
    return correct, ((targets[:, k] > 0) == (pred == k)).astype(float)


def site_figures(probs: np.ndarray, targets: np.ndarray, labels: Sequence[str],
                 classes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Figures of one model on labelled cases (each case its own group)."""
    correct, tvn = predicted_scores(probs, targets, classes)
    return case_figures(correct, labels, None, tvn, n_boot, seed)


def recipe_reasons(gain: dict | None, reference_drop: float | None) -> list[str]:
    """Why a recipe's cross-validated result cannot be accepted (empty: it can): the gain's
    adjusted lower bound must be above zero and the reference test must not drop by more than
    :data:`REFERENCE_MARGIN`."""
    reasons = []
    if gain is not None:
        lo = gain["gain_lower_adjusted"]
        ci = gain["gain_ci95"]
        if lo is None or lo <= 0:
            reasons.append(f"no gain shown: {gain['gain']:+.3f} on the held-out local cases, 95% interval "
                           f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" + (
                               f" (lower bound {lo:+.3f} after allowing for {gain['compared']} recipes compared)"
                               if gain["compared"] > 1 and lo is not None else ""))
    if reference_drop is not None and reference_drop > REFERENCE_MARGIN:
        reasons.append(f"drops {reference_drop:.3f} on the reference test split (at most {REFERENCE_MARGIN} allowed)")
    return reasons
