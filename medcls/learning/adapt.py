"""Site adaptation: a shipped model adapted to one hospital's scanners from the cases its
clinicians confirmed, the recipe chosen on those cases, accepted only on a measured gain, and
kept beside its parent.

:func:`adapt` is the whole mechanism, top to bottom:

1. the confirmed cases (``labels.csv`` with ``file``, ``label``: a class of the model or the
   partial label ``tumor``; optional ``group`` = patient; or one folder per class) are dealt into
   grouped, label-stratified folds (:func:`medcls.learning.adapt_check.plan_folds`); a label with
   fewer patients than folds is adapted on but *not checked*;
2. every recipe (:data:`medcls.learning.adapt_recipes.RECIPES`: last blocks, mixed with the
   parent's reference data, longer, whole network, batch norm aligned on the site's scans) is
   cross-validated: per fold, the parent adapted on the other folds predicts the held-out cases,
   so every checked case is predicted by a model that never saw it; the gain over the parent on
   those cases is measured with a bootstrap interval, and each fold's model on a sample of the
   reference test split;
3. the recipe with the best gain whose interval (adjusted for the number of recipes compared)
   lies above zero, and whose fold models kept the reference test within
   :data:`~medcls.learning.adapt_check.REFERENCE_MARGIN`, wins; none: "no gain shown", nothing
   is trained further and no package is written (the parent stays);
4. the winner is trained on all the confirmed cases; temperature and low-confidence threshold
   are refitted on its out-of-fold predictions and a reference sample, the input gate on the
   site's unlabelled scans and the reference; the final model is measured on the whole
   reference test split (more than the margin lower: rejected);
5. a new package is written whose card names the parent (name, version, SHA-256), the local
   data's fingerprint, every recipe's figures, the choice, the labels not checked (also among
   the card's limits) and the verdict. :func:`~medcls.learning.site.set_site_default` refuses a
   rejected one; the parent is never touched.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medcls.core.errors import MedclsError, ModelPackageError
from medcls.learning.adapt_check import (
    DEFAULT_FOLDS,
    REFERENCE_MARGIN,
    TooFewCasesError,
    case_figures,
    gain_figures,
    plan_folds,
    predicted_scores,
    recipe_reasons,
)
from medcls.learning.adapt_recipes import (
    DEFAULT_RECIPES,
    RECIPES,
    FineTuner,
    Recipe,
    apply_recipe,
    batch_norm_layers,
    batch_norm_moments,
    forward,
    trainable_from,
)
from medcls.learning.data import Record, cached_arrays, load_datasets

log = logging.getLogger(__name__)

__all__ = ["AdaptConfig", "AdaptationRejectedError", "REFERENCE_MARGIN", "RECIPES", "Recipe",
           "TooFewCasesError", "adapt", "adapted_from", "is_adapted"]

SITE_SOURCE = "site"
MAX_UNLABELLED = 1000  # unlabelled scans used at most (drawn with the seed)


class AdaptationRejectedError(MedclsError):
    """An adapted model without a measured gain cannot become the site default."""


@dataclass
class AdaptConfig:
    model: str
    data: str
    out: str
    unlabelled: str | None = None  # a folder (or a list file) of the site's unlabelled scans
    scan_root: str | None = None  # the unlabelled folder must lie inside it (the app's scan folder)
    folds: int = DEFAULT_FOLDS
    repeats: int = 1
    seed: int = 0
    reference: list[str] = field(default_factory=list)  # the parent's training folders
    reference_test: int | None = None  # at most this many reference test cases (None: all)
    reference_cv: int = 150  # reference test cases each fold's model is measured on
    recipes: Sequence[str | Recipe] = DEFAULT_RECIPES
    epochs: int | None = None  # overrides every fine-tuning recipe's epochs
    name: str | None = None
    cache_dir: str | None = ".cache/medcls"
    workers: int = 2
    bootstrap: int = 2000

    def recipe_list(self) -> list[Recipe]:
        out = [RECIPES[r] if isinstance(r, str) else r for r in self.recipes]
        if self.epochs is not None:
            out = [replace(r, epochs=self.epochs) if r.epochs > 0 else r for r in out]
        return out


def adapt(cfg: AdaptConfig, command: str = "", on_progress: Callable[[str, float], None] | None = None) -> dict:
    """Adapt ``cfg.model`` to the site ``cfg.data``; return the adaptation record (also in the
    written package's card under ``adaptation``). Raises :class:`TooFewCasesError` before any
    training when the confirmed cases cannot measure a gain. The same seed gives the same
    figures: TensorFlow's op determinism is on during the run, and restored afterwards."""
    with _deterministic():
        return _adapt(cfg, command, on_progress or (lambda stage, frac: None))


@contextlib.contextmanager
def _deterministic():
    from tensorflow.python.framework import config as tf_config  # the public API cannot disable

    was = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if not was:
            tf_config.disable_op_determinism()


def _adapt(cfg: AdaptConfig, command: str, progress) -> dict:
    import keras

    from medcls.models.package import load_package, read_card

    t0 = time.time()
    keras.utils.set_random_seed(cfg.seed)
    check_out(cfg)
    classes = list(read_card(cfg.model).classes)
    local = load_datasets([cfg.data], classes=classes)
    local.records = [replace(r, source=SITE_SOURCE, split=None) for r in local.records]
    records = local.records
    plan = plan_folds(records, cfg.folds, cfg.repeats, cfg.seed)  # before anything slow
    recipes = cfg.recipe_list()
    parent = load_package(cfg.model)
    spec, arch, model = parent.card.spec, parent.card.architecture, parent.model
    progress("reading the local cases", 0.01)
    x_local = cached_arrays(local, records, spec, cfg.cache_dir, cfg.workers, as_gray=True)
    t_local = local.targets(records)
    labels = np.array([r.label for r in records])
    x_unl = unlabelled_arrays(cfg, spec) if cfg.unlabelled else np.zeros((0,) + x_local.shape[1:], np.float32)
    exclude = {local.path(r).resolve() for r in records if local.path(r)}
    ref = load_reference(cfg, classes, spec, recipes, exclude) if cfg.reference else None

    progress("measuring the parent", 0.04)
    parent_weights = model.get_weights()
    parent_correct, parent_tvn = predicted_scores(forward(model, x_local)[0], t_local, classes)
    if ref:
        ref["accuracy_before"] = accuracy(model, ref["x_test"], ref["t_test"])
        ref["cv_before"] = accuracy(model, ref["x_cv"], ref["t_cv"])
        if any(r.align_bn for r in recipes) and batch_norm_layers(model):
            ref["bn_moments"] = batch_norm_moments(model, ref["x_train"])

    scored = plan.scored
    runnable = [r for r in recipes if not skip_reason(r, ref, model)]
    results, oof_logits = [], {}
    n_fits = max(1, len(runnable) * plan.folds * plan.repeats + 1)
    done = 0
    for recipe in recipes:
        why = skip_reason(recipe, ref, model)
        if why:
            results.append(_recipe_entry(recipe, arch) | {"status": "skipped", "reasons": [why], "eligible": False})
            continue
        t1 = time.time()
        tuner = FineTuner(model, arch, recipe, cfg.seed)
        logits = np.zeros((plan.repeats, len(records), len(classes)))
        ref_cv = []
        for rep in range(plan.repeats):
            for k in range(plan.folds):
                progress(f"cross-validating {recipe.name} (fold {k + 1} of {plan.folds})", 0.05 + 0.8 * done / n_fits)
                keras.utils.set_random_seed(cfg.seed + 101 * rep + k)
                tr, held = plan.train_index(rep, k), plan.held_out_index(rep, k)
                apply_recipe(tuner, parent_weights, x_local[tr], t_local[tr],
                             np.concatenate([x_unl, x_local[tr]]), ref)
                logits[rep, held] = forward(model, x_local[held])[0]
                if ref:
                    ref_cv.append(accuracy(model, ref["x_cv"], ref["t_cv"]))
                done += 1
        oof_logits[recipe.name] = logits
        correct, tvn = _oof_scores(logits, t_local, classes)
        gain = gain_figures(correct[scored], parent_correct[scored], plan.groups[scored], len(runnable),
                            cfg.bootstrap, cfg.seed)
        drop = float(ref["cv_before"] - np.mean(ref_cv)) if ref else None
        reasons = recipe_reasons(gain, drop)
        results.append(_recipe_entry(recipe, arch) | {
            "status": "compared", "gain": gain, "eligible": not reasons, "reasons": reasons,
            "figures": case_figures(correct[scored], labels[scored], plan.groups[scored],
                                    None if tvn is None else tvn[scored], cfg.bootstrap, cfg.seed),
            "reference_cv": ({"cases": int(len(ref["x_cv"])), "accuracy_parent": ref["cv_before"],
                              "accuracy_folds": [round(a, 4) for a in ref_cv], "drop": drop} if ref else None),
            "duration_s": round(time.time() - t1, 1)})
        log.info("recipe %s: gain %+.3f %s, reference drop %s", recipe.name, gain["gain"], gain["gain_ci95"],
                 "n/a" if drop is None else f"{drop:.3f}")

    eligible = [r for r in results if r["eligible"]]
    chosen = max(eligible, key=lambda r: r["gain"]["gain"]) if eligible else None
    record = {
        "parent": {"name": parent.card.name, "version": parent.card.version,
                   "model_sha256": parent.card.model_sha256, "folder": Path(cfg.model).name},
        "data": Path(cfg.data).name,
        "data_fingerprint": local.fingerprint(records),
        "cases": {"n": len(records), "by_label": {lab: int((labels == lab).sum()) for lab in sorted(set(labels))},
                  "grouped_by": "group column" if any(r.group for r in records) else "case",
                  "unlabelled_scans": int(len(x_unl))},
        "check": {"method": f"{plan.folds}-fold grouped, label-stratified cross-validation"
                            + (f", {plan.repeats} repeats" if plan.repeats > 1 else ""),
                  "folds": plan.folds, "repeats": plan.repeats, "seed": cfg.seed,
                  "scored_cases": int(scored.sum()), "checked": list(plan.checked),
                  "not_checked": {lab: int((labels == lab).sum()) for lab in plan.not_checked},
                  "classes_without_cases": classes_without_cases(classes, set(labels)),
                  "recipes_compared": len(runnable),
                  "rule": "gain over the parent on the held-out folds above zero (bootstrap over patients, "
                          f"95% interval adjusted for the {len(runnable)} recipes compared) and the "
                          f"reference test split no more than {REFERENCE_MARGIN} lower"},
        "recipes": results,
        "chosen": chosen["name"] if chosen else None,
        "before": case_figures(parent_correct[scored], labels[scored], plan.groups[scored],
                               None if parent_tvn is None else parent_tvn[scored], cfg.bootstrap, cfg.seed),
        "after": chosen["figures"] if chosen else None,
        "reference": _reference_entry(cfg, ref),
        "command": command,
        "date": _dt.date.today().isoformat(),
    }
    if chosen is None:
        model.set_weights(parent_weights)
        record |= {"accepted": False, "verdict": "no gain shown", "package": None,
                   "reasons": ["no recipe showed a gain over the parent within the reference margin"],
                   "duration_s": round(time.time() - t0, 1)}
        progress("done", 1.0)
        return record

    progress(f"training {chosen['name']} on every confirmed case", 0.05 + 0.8 * done / n_fits)
    recipe = next(r for r in recipes if r.name == chosen["name"])
    keras.utils.set_random_seed(cfg.seed)
    bn = apply_recipe(FineTuner(model, arch, recipe, cfg.seed), parent_weights, x_local, t_local,
                      np.concatenate([x_unl, x_local]), ref)
    progress("recalibrating", 0.9)
    calibration, temperature, low_conf, gate = recalibrate(
        model, parent, oof_logits[recipe.name].mean(0)[scored], t_local[scored], x_local, t_local, x_unl, ref)
    reasons = []
    if ref:
        ref["accuracy_after"] = accuracy(model, ref["x_test"], ref["t_test"])
        record["reference"] = _reference_entry(cfg, ref)
        drop = ref["accuracy_before"] - ref["accuracy_after"]
        if drop > REFERENCE_MARGIN:
            reasons.append(f"the model trained on every case drops {drop:.3f} on the reference test split "
                           f"({ref['accuracy_after']:.3f} vs {ref['accuracy_before']:.3f}; at most "
                           f"{REFERENCE_MARGIN} allowed)")
    record |= {"accepted": not reasons, "verdict": "accepted" if not reasons else "rejected",
               "reasons": reasons, "batch_norm": bn or None, "calibration": calibration,
               "package": Path(cfg.out).name, "duration_s": round(time.time() - t0, 1)}
    progress("writing the package", 0.97)
    save_adapted(cfg, parent, model, temperature, low_conf, gate, record)
    progress("done", 1.0)
    return record


def _recipe_entry(recipe: Recipe, arch: str) -> dict:
    return asdict(recipe) | {"trainable_from": trainable_from(arch, recipe) if recipe.epochs else None}


def _oof_scores(logits: np.ndarray, targets: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray | None]:
    """Per case, the share of repeats in which its held-out prediction was right."""
    parts = [predicted_scores(lo, targets, classes) for lo in logits]
    correct = np.mean([p[0] for p in parts], axis=0)
    tvn = None if parts[0][1] is None else np.mean([p[1] for p in parts], axis=0)
    return correct, tvn


def skip_reason(recipe: Recipe, ref: dict | None, model) -> str | None:
    if recipe.needs_reference and ref is None:
        return "needs the parent's reference data (--reference)"
    if recipe.align_bn and not batch_norm_layers(model):
        return "the network has no batch norm"
    return None


def classes_without_cases(classes: Sequence[str], local_labels: set[str]) -> list[str]:
    """The model's classes no local label covers (a partial label ``tumor`` covers the tumour
    classes together)."""
    from medcls.learning.data import label_set

    covered = set().union(*(label_set(lab, classes) for lab in local_labels)) if local_labels else set()
    return [c for c in classes if c not in covered]


def unlabelled_arrays(cfg: AdaptConfig, spec) -> np.ndarray:
    """The site's unlabelled scans (a folder tree, inside ``cfg.scan_root`` when given; or a
    list file of paths), preprocessed like the model's inputs; unreadable files are left out.
    At most :data:`MAX_UNLABELLED`, drawn with the seed."""
    from concurrent.futures import ThreadPoolExecutor

    from medcls.core.errors import DatasetError
    from medcls.io.load import load_scan
    from medcls.io.preprocess import preprocess
    from medcls.io.sources import cli_sources, folder_sources

    sources = folder_sources(cfg.scan_root, cfg.unlabelled) if cfg.scan_root else cli_sources(cfg.unlabelled)
    if len(sources) > MAX_UNLABELLED:
        rng = np.random.default_rng(cfg.seed)
        sources = [sources[i] for i in sorted(rng.choice(len(sources), MAX_UNLABELLED, replace=False))]

    def one(src):
        try:
            return preprocess(load_scan(src.read()), spec).array[..., :1]
        except MedclsError:
            return None

    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        arrays = [a for a in pool.map(one, sources) if a is not None]
    if not arrays:
        raise DatasetError("The folder of unlabelled scans holds no readable scan.")
    log.info("unlabelled scans: %d readable of %d", len(arrays), len(sources))
    return np.stack(arrays).astype(np.float32)


def load_reference(cfg: AdaptConfig, classes: list[str], spec, recipes: Sequence[Recipe],
                   exclude: set[Path]) -> dict:
    """A balanced sample of the reference folders' training split (equal numbers per (source,
    label)), a validation sample for calibration, and the first folder's test split (without
    any file that is also a local case) with the subsample each fold's model is measured on."""
    ds = load_datasets(cfg.reference, classes=classes)
    rng = np.random.default_rng(cfg.seed)

    def balanced(records: list[Record], n: int) -> list[Record]:
        strata: dict[tuple, list[Record]] = {}
        for r in records:
            strata.setdefault((r.source or "", r.label), []).append(r)
        per = max(1, int(np.ceil(n / max(1, len(strata)))))
        out = []
        for key in sorted(strata):
            rs = strata[key]
            out += [rs[i] for i in sorted(rng.choice(len(rs), min(per, len(rs)), replace=False))]
        return out

    n = max([r.reference_n for r in recipes if r.needs_reference] + [0]) or 160
    train = balanced(ds.split("train"), n)
    val = balanced(ds.split("val"), max(40, n // 2))
    own = ds.records[0].root
    test = [r for r in ds.split("test") if r.root == own]
    excluded = [r for r in test if ds.path(r) and ds.path(r).resolve() in exclude]
    test = [r for r in test if r not in excluded]
    if cfg.reference_test and len(test) > cfg.reference_test:
        test = [test[i] for i in sorted(rng.choice(len(test), cfg.reference_test, replace=False))]
    cv = [test[i] for i in sorted(rng.choice(len(test), min(cfg.reference_cv, len(test)), replace=False))]

    def arrays(rs):
        return cached_arrays(ds, rs, spec, cfg.cache_dir, cfg.workers, as_gray=True) if rs \
            else np.zeros((0, spec.input_size, spec.input_size, 1), np.float32)

    x_test = arrays(test)
    pos = {id(r): i for i, r in enumerate(test)}
    cv_idx = [pos[id(r)] for r in cv]
    t_test = ds.targets(test)
    return {"folders": [Path(f).name for f in cfg.reference], "x_train": arrays(train),
            "t_train": ds.targets(train), "n_train": len(train),
            "sources_train": [r.source or "" for r in train], "labels_train": [r.label for r in train],
            "x_val": arrays(val), "t_val": ds.targets(val), "x_test": x_test, "t_test": t_test,
            "x_cv": x_test[cv_idx], "t_cv": t_test[cv_idx], "excluded": len(excluded)}


def _reference_entry(cfg: AdaptConfig, ref: dict | None) -> dict | None:
    if ref is None:
        return None
    return {"folders": ref["folders"], "train_sample": ref["n_train"], "test_cases": int(len(ref["x_test"])),
            "excluded_local_cases": ref["excluded"], "accuracy_before": ref["accuracy_before"],
            "accuracy_after": ref.get("accuracy_after"), "margin": REFERENCE_MARGIN}


def accuracy(model, x_gray, targets) -> float:
    if len(x_gray) == 0:
        return float("nan")
    pred = forward(model, x_gray)[0].argmax(1)
    return float((targets[np.arange(len(pred)), pred] > 0).mean())


def recalibrate(model, parent, oof_logits: np.ndarray, oof_targets: np.ndarray, x_local: np.ndarray,
                t_local: np.ndarray, x_unl: np.ndarray, ref: dict | None):
    """Temperature and low-confidence threshold on the chosen recipe's out-of-fold predictions
    of the local cases (held out when they were made) and the reference validation sample; the
    input gate's class means from the reference training sample and the local single-label
    cases under the final model, its threshold at the 99% quantile of the distances of the
    reference validation sample and the site's unlabelled scans (the site's own images are
    inside what the model is for)."""
    from medcls.learning.train import low_confidence_threshold
    from medcls.models.calibration import InputGate, fit_temperature, probabilities

    logits, targets = [oof_logits], [oof_targets]
    if ref:
        lv, _ = forward(model, ref["x_val"])
        logits.append(lv)
        targets.append(ref["t_val"])
    logits, t = np.concatenate(logits), np.concatenate(targets)
    temperature = fit_temperature(logits, t)
    probs = probabilities(logits, temperature)
    correct = t[np.arange(len(probs)), probs.argmax(1)] > 0
    low_conf = low_confidence_threshold(probs.max(1), correct)
    gate, gate_note = parent.gate, "the parent's (no reference data)"
    if ref and parent.gate is not None:
        t_train = np.concatenate([ref["t_train"], t_local])
        emb_train = np.concatenate([forward(model, ref["x_train"])[1], forward(model, x_local)[1]])
        single = t_train.sum(1) == 1
        held = [forward(model, ref["x_val"])[1][ref["t_val"].sum(1) == 1]]
        if len(x_unl):
            held.append(forward(model, x_unl)[1])
        gate = InputGate.fit(emb_train[single], t_train[single].argmax(1), np.concatenate(held))
        gate_note = ("99% quantile of the reference validation sample's" +
                     (f" and the site's {len(x_unl)} unlabelled scans'" if len(x_unl) else "") + " distances")
    info = {"temperature": float(temperature), "low_confidence_threshold": float(low_conf),
            "fitted_on": f"{len(oof_logits)} out-of-fold local predictions"
                         + (f" and {len(ref['x_val'])} reference validation cases" if ref else ""),
            "gate_threshold": None if gate is None else float(gate.threshold), "gate": gate_note}
    return info, float(temperature), float(low_conf), gate


def check_out(cfg: AdaptConfig) -> None:
    """The output is a new folder, or an earlier adapted package: never the parent or another
    model (the parent is never changed)."""
    from medcls.models.package import CARD_FILE, read_card

    out = Path(cfg.out)
    if out.resolve() == Path(cfg.model).resolve() or \
            ((out / CARD_FILE).is_file() and not is_adapted(read_card(out))):
        raise ModelPackageError(f"--out {out.name} holds a model that is not a site adaptation: "
                                "give a new folder (the parent and other models are never overwritten).")


def not_checked_note(record: dict) -> str | None:
    """The card's limit line for what the local cases could not check."""
    chk = record["check"]
    parts = [f"{lab} ({n} local case{'s' if n != 1 else ''}; a check needs {chk['folds']} patients)"
             for lab, n in chk["not_checked"].items()]
    parts += [f"{c} (no local case)" for c in chk["classes_without_cases"]]
    if not parts:
        return None
    return ("Site adaptation: not checked on this site's cases: " + "; ".join(parts)
            + ". Its accuracy on them is the parent's reference figure only.")


def save_adapted(cfg: AdaptConfig, parent, model, temperature, low_conf, gate, record: dict) -> Path:
    from medcls.models.package import save_package

    out = Path(cfg.out)
    card = parent.card.to_dict()
    card["name"] = cfg.name or out.name
    card["version"] = f"{parent.card.version}+site.{record['data_fingerprint'][:8]}"
    card["temperature"] = temperature
    card["class_bias"] = None  # recalibrated by temperature alone: the parent's biases no longer fit
    card.pop("calibration", None)
    card["low_confidence_threshold"] = low_conf
    if gate is not None and isinstance(card.get("input_gate"), dict):
        card["input_gate"] = card["input_gate"] | {"threshold": gate.threshold,
                                                   "calibration": record["calibration"]["gate"]}
    card.pop("low_confidence_val_accuracy", None)
    card.pop("selective", None)
    card["parent"] = record["parent"]
    card["adaptation"] = record
    note = not_checked_note(record)
    card["limits"] = list(card.get("limits") or []) + ([note] if note else [])
    card["task_description"] = (card.get("task_description") or card["task"]) + \
        f" (site-adapted from {parent.card.name} {parent.card.version})"
    card["metrics"] = {"site_cross_validation": record["after"], "site_gain": _chosen(record)["gain"],
                       "parent_metrics": card.get("metrics", {}),
                       "reference_test_accuracy": (record["reference"] or {}).get("accuracy_after")}
    return save_package(out, model, card, gate)


def _chosen(record: dict) -> dict:
    return next(r for r in record["recipes"] if r["name"] == record["chosen"])


def is_adapted(card) -> bool:
    return isinstance(card.get("parent"), dict) and "adaptation" in card


def adapted_from(card) -> str | None:
    """"<name> <version>" of the parent of a site-adapted model, else None."""
    p = card.get("parent") if is_adapted(card) else None
    return f"{p.get('name')} {p.get('version')}" if p else None
