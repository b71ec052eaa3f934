"""Site adaptation: a shipped model adapted to one hospital's scanners from a few dozen cases
its clinicians confirmed, measured on other local cases, kept beside its parent.

:func:`adapt` is the whole mechanism, top to bottom:

1. the local cases (``labels.csv`` with ``file``, ``label``: a class of the model or the partial
   label ``tumor``; or one folder per class) are split into an *adapt* part and a *check* part,
   stratified by label, grouped by the ``group`` column when there is one, with a fixed seed;
2. the parent is measured on the check part (*before*);
3. the recipe (:class:`Recipe`): the head and the last blocks fine-tuned with every batch norm
   frozen, batches drawn half from the local cases (heavily source-randomised) and half from a
   balanced sample of the parent's own training data (``reference``) so it does not forget;
   then temperature, low-confidence threshold and input gate refitted on the adapt part and a
   reference sample (the region threshold stays the parent's: local cases carry no boxes);
4. the adapted model is measured on the check part (*after*) and on the reference test split;
5. a new package is written whose card names the parent (name, version, SHA-256), the local
   data's fingerprint, the recipe and both figures, and a verdict: an adapted model that is
   worse on the check part, or drops by more than :data:`REFERENCE_MARGIN` on the reference
   test split, is written for inspection but marked rejected, and :func:`set_site_default`
   refuses it. The parent is never touched.

The site default of a task is a marker file in the models folder (:data:`SITE_DEFAULT_FILE`)
that the model picker follows. :class:`AdaptationJob` runs :func:`adapt` in a thread for the
admin page.
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

from medcls.core.errors import DatasetError, MedclsError, ModelPackageError
from medcls.learning.data import Record, cached_arrays, load_datasets

log = logging.getLogger(__name__)


MIN_CHECK_PER_LABEL = 5  # fewer check cases of a label measure nothing
MIN_ADAPT_PER_LABEL = 5
REFERENCE_MARGIN = 0.02  # the largest accepted drop on the reference test split


SITE_SOURCE = "site"


# The first layer fine-tuned, per architecture: the head and the last blocks.
TRAINABLE_FROM = {"mobilenet-tl": "block_13_expand", "compact-cnn": "block5_sep1",
                  "seed-cnn": "last_conv"}


class TooFewCasesError(DatasetError):
    """The local data has too few confirmed cases of a label to adapt and measure."""


class AdaptationRejectedError(MedclsError):
    """An adapted model that did worse than its parent cannot become the site default."""


@dataclass(frozen=True)
class Recipe:
    """How a model is adapted (recorded in the card). ``name`` tells the recipes of the bench
    apart; :data:`RECIPES` holds the ones compared."""

    name: str = "mixed"
    epochs: int = 8
    lr: float = 3e-4
    batch_size: int = 16
    trainable_from: str | None = None  # None: TRAINABLE_FROM[architecture]; "" = every layer
    reference_n: int = 160  # reference training cases mixed in (0: plain fine-tune on local)
    local_share: float = 0.5  # share of each batch drawn from the local cases
    source_augment: bool = True
    label_smoothing: float = 0.1
    refit: bool = True  # temperature, low-confidence threshold and gate refitted

    def steps_per_epoch(self, n_local: int) -> int:
        # an epoch sees every local case about twice (half the batch is local)
        return max(4, int(np.ceil(2 * n_local / self.batch_size)))


RECIPES = {
    "plain": Recipe(name="plain", trainable_from="", reference_n=0, local_share=1.0,
                    source_augment=False, label_smoothing=0.0, refit=False),
    "last-blocks": Recipe(name="last-blocks", reference_n=0, local_share=1.0, source_augment=False),
    "mixed": Recipe(),
    "mixed-long": Recipe(name="mixed-long", epochs=14, local_share=0.6),
}


def split_local(records: Sequence[Record], holdout: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(adapt, check): per label, a ``holdout`` share of the groups (the ``group`` column, else
    each case alone) goes to check, drawn with ``seed``. A group of mixed labels follows its
    first case's label."""
    groups: dict[str, list[Record]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.group or f"#{i}", []).append(r)
    by_label: dict[str, list[str]] = {}
    for g, rs in groups.items():
        by_label.setdefault(rs[0].label, []).append(g)
    rng = np.random.default_rng(seed)
    check_groups: set[str] = set()
    for label in sorted(by_label):
        gs = sorted(by_label[label])
        rng.shuffle(gs)
        check_groups.update(gs[:int(round(holdout * len(gs)))])
    adapt = [r for g, rs in groups.items() if g not in check_groups for r in rs]
    check = [r for g, rs in groups.items() if g in check_groups for r in rs]
    return adapt, check


def check_enough(adapt: Sequence[Record], check: Sequence[Record], holdout: float) -> None:
    """Refuse (:class:`TooFewCasesError`) a split with fewer than the minimum cases of a label
    in either part, saying how many confirmed cases per label are needed."""
    labels = sorted({r.label for r in list(adapt) + list(check)})
    if len(labels) < 2:
        raise TooFewCasesError(f"The local cases all carry one label ({labels[0] if labels else 'none'}): "
                               "adaptation needs confirmed cases of at least two labels (e.g. tumour "
                               "and no tumour).")
    need = int(np.ceil(max(MIN_CHECK_PER_LABEL / max(holdout, 1e-6),
                           MIN_ADAPT_PER_LABEL / max(1 - holdout, 1e-6))))
    short = {lab: (sum(r.label == lab for r in adapt), sum(r.label == lab for r in check))
             for lab in labels}
    short = {lab: c for lab, c in short.items() if c[0] < MIN_ADAPT_PER_LABEL or c[1] < MIN_CHECK_PER_LABEL}
    if short:
        have = ", ".join(f"{lab}: {a + c}" for lab, (a, c) in short.items())
        raise TooFewCasesError(
            f"Too few confirmed cases to adapt and measure ({have}). With a hold-out of "
            f"{holdout:.0%}, each label needs at least {need} cases (separate patients when a "
            f"'group' column is given): {MIN_ADAPT_PER_LABEL} to adapt on and "
            f"{MIN_CHECK_PER_LABEL} to check on.")


def site_figures(probs: np.ndarray, targets: np.ndarray, labels: Sequence[str],
                 classes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy (a case is right when the predicted class is one its label allows), recall per
    local label and tumour-vs-none accuracy, each with a 95% percentile-bootstrap interval."""
    from medcls.learning.data import negative_class

    pred = np.asarray(probs).argmax(1)
    correct = targets[np.arange(len(pred)), pred] > 0
    labels = np.asarray(labels)
    neg = negative_class(classes)
    stats: dict[str, Callable[[np.ndarray], float | None]] = {"accuracy": lambda i: correct[i].mean()}
    for lab in sorted(set(labels.tolist())):
        stats[f"recall_{lab}"] = lambda i, lab=lab: correct[i][labels[i] == lab].mean() \
            if (labels[i] == lab).any() else None
    if neg is not None:
        k = list(classes).index(neg)
        agree = (targets[:, k] > 0) == (pred == k)
        stats["tumour_vs_none_accuracy"] = lambda i: agree[i].mean()
    all_idx = np.arange(len(pred))
    out: dict = {"n": int(len(pred)), "n_by_label": {lab: int((labels == lab).sum())
                                                     for lab in sorted(set(labels.tolist()))}}
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, len(pred), len(pred)) for _ in range(n_boot)]
    for key, f in stats.items():
        vals = [v for v in (f(b) for b in boots) if v is not None]
        out[key] = float(f(all_idx))
        out[key + "_ci95"] = [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))] if vals else None
    return out


@dataclass
class AdaptConfig:
    model: str
    data: str
    out: str
    holdout: float = 0.3
    seed: int = 0
    reference: list[str] = field(default_factory=list)  # the parent's training folders
    reference_test: int | None = None  # at most this many reference test cases (None: all)
    recipe: Recipe = field(default_factory=Recipe)
    name: str | None = None
    cache_dir: str | None = ".cache/medcls"
    workers: int = 2
    bootstrap: int = 1000


def adapt(cfg: AdaptConfig, command: str = "", on_progress: Callable[[str, float], None] | None = None) -> dict:
    """Adapt ``cfg.model`` to the site ``cfg.data``; write the package to ``cfg.out``; return
    the adaptation record (also in the card under ``adaptation``). Raises
    :class:`TooFewCasesError` before any training when the local cases cannot measure anything.
    The same seed gives the same figures: TensorFlow's op determinism is on during the run
    (the source randomisation's random ops in parallel tf.data maps otherwise draw in thread
    order), and restored afterwards."""
    with _deterministic():
        return _adapt(cfg, command, on_progress)


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


def _adapt(cfg: AdaptConfig, command: str, on_progress) -> dict:
    import keras

    from medcls.models.package import load_package, read_card

    t0 = time.time()
    progress = on_progress or (lambda stage, frac: None)
    recipe = cfg.recipe
    keras.utils.set_random_seed(cfg.seed)
    _check_out(cfg)
    classes = list(read_card(cfg.model).classes)
    local = load_datasets([cfg.data], classes=classes)
    local.records = [replace(r, source=SITE_SOURCE, split=None) for r in local.records]
    adapt_recs, check_recs = split_local(local.records, cfg.holdout, cfg.seed)
    check_enough(adapt_recs, check_recs, cfg.holdout)  # before anything slow
    parent = load_package(cfg.model)
    spec = parent.card.spec
    progress("preprocessing the local cases", 0.02)
    x_adapt = cached_arrays(local, adapt_recs, spec, cfg.cache_dir, cfg.workers, as_gray=True)
    x_check = cached_arrays(local, check_recs, spec, cfg.cache_dir, cfg.workers, as_gray=True)
    t_adapt, t_check = local.targets(adapt_recs), local.targets(check_recs)
    labels_check = [r.label for r in check_recs]

    ref = _reference(cfg, classes, spec) if cfg.reference else None
    progress("measuring the parent", 0.15)
    before = site_figures(_probs(parent.model, x_check, parent.card.temperature), t_check,
                          labels_check, classes, cfg.bootstrap, cfg.seed)
    ref_before = _accuracy(parent.model, ref["x_test"], ref["t_test"]) if ref else None

    progress("fine-tuning", 0.25)
    model = parent.model
    _set_trainable(model, parent.card.architecture, recipe.trainable_from)
    _fine_tune(model, recipe, x_adapt, t_adapt, ref, cfg.seed,
               lambda f: progress("fine-tuning", 0.25 + 0.55 * f))

    progress("recalibrating", 0.82)
    temperature, low_conf, gate = _refit(model, parent, recipe, x_adapt, t_adapt, ref)
    progress("measuring the adapted model", 0.88)
    after = site_figures(_probs(model, x_check, temperature), t_check, labels_check, classes,
                         cfg.bootstrap, cfg.seed)
    ref_after = _accuracy(model, ref["x_test"], ref["t_test"]) if ref else None

    reasons = []
    if after["accuracy"] < before["accuracy"]:
        reasons.append(f"worse on the local check part ({after['accuracy']:.3f} < {before['accuracy']:.3f})")
    if ref and ref_before - ref_after > REFERENCE_MARGIN:
        reasons.append(f"drops {ref_before - ref_after:.3f} on the reference test split "
                       f"({ref_after:.3f} vs {ref_before:.3f}; at most {REFERENCE_MARGIN} allowed)")
    record = {
        "parent": {"name": parent.card.name, "version": parent.card.version,
                   "model_sha256": parent.card.model_sha256, "folder": Path(cfg.model).name},
        "data": str(cfg.data),
        "data_fingerprint": local.fingerprint(local.records),
        "split": {"holdout": cfg.holdout, "seed": cfg.seed, "adapt": len(adapt_recs),
                  "check": len(check_recs),
                  "grouped_by": "group column" if any(r.group for r in local.records) else "case"},
        "recipe": asdict(recipe) | {"trainable_from": _trainable_from(parent.card.architecture, recipe)},
        "reference": ({"folders": [str(f) for f in cfg.reference], "train_sample": ref["n_train"],
                       "test_cases": int(len(ref["x_test"])), "accuracy_before": ref_before,
                       "accuracy_after": ref_after, "margin": REFERENCE_MARGIN} if ref else None),
        "before": before,
        "after": after,
        "accepted": not reasons,
        "reasons": reasons,
        "command": command,
        "date": _dt.date.today().isoformat(),
        "duration_s": round(time.time() - t0, 1),
    }
    progress("writing the package", 0.97)
    _save(cfg, parent, model, temperature, low_conf, gate, record)
    progress("done", 1.0)
    return record


def _check_out(cfg: AdaptConfig) -> None:
    """The output is a new folder, or an earlier adapted package: never the parent or another
    model (the parent is never changed)."""
    from medcls.models.package import CARD_FILE, read_card

    out = Path(cfg.out)
    if out.resolve() == Path(cfg.model).resolve() or \
            ((out / CARD_FILE).is_file() and not is_adapted(read_card(out))):
        raise ModelPackageError(f"--out {out.name} holds a model that is not a site adaptation: "
                                "give a new folder (the parent and other models are never overwritten).")


def _trainable_from(arch: str, recipe: Recipe) -> str:
    return TRAINABLE_FROM.get(arch, "") if recipe.trainable_from is None else recipe.trainable_from


def _set_trainable(model, arch: str, trainable_from: str | None) -> None:
    """Layers from ``trainable_from`` on are trained; every batch norm stays frozen (its
    statistics from tens of cases would be noise)."""
    import keras

    start_name = TRAINABLE_FROM.get(arch, "") if trainable_from is None else trainable_from
    names = [layer.name for layer in model.layers]
    start = names.index(start_name) if start_name else 0
    for i, layer in enumerate(model.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)


def _reference(cfg: AdaptConfig, classes: list[str], spec) -> dict:
    """A balanced sample of the reference folders' training split (equal numbers per (source,
    label)), a validation sample for calibration, and the first folder's test split."""
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

    n = cfg.recipe.reference_n
    train = balanced(ds.split("train"), n) if n else []
    val = balanced(ds.split("val"), max(40, n // 2))
    own = ds.records[0].root
    test = [r for r in ds.split("test") if r.root == own]
    if cfg.reference_test and len(test) > cfg.reference_test:
        test = [test[i] for i in sorted(rng.choice(len(test), cfg.reference_test, replace=False))]

    def arrays(rs):
        return cached_arrays(ds, rs, spec, cfg.cache_dir, cfg.workers, as_gray=True) if rs \
            else np.zeros((0, spec.input_size, spec.input_size, 1), np.float32)

    return {"x_train": arrays(train), "t_train": ds.targets(train), "n_train": len(train),
            "sources_train": [r.source or "" for r in train], "labels_train": [r.label for r in train],
            "x_val": arrays(val), "t_val": ds.targets(val),
            "x_test": arrays(test), "t_test": ds.targets(test)}


def _fine_tune(model, recipe: Recipe, x_local, t_local, ref, seed: int, progress) -> None:
    """Batches drawn ``local_share`` from the local cases (labels alike) and the rest from the
    reference sample (its (source, label) strata alike)."""
    import keras

    from medcls.learning.data import tf_dataset
    from medcls.learning.train import label_set_loss

    keys_local = [f"local|{np.flatnonzero(t).tolist()}" for t in t_local]
    x, t, keys = x_local, t_local, keys_local
    use_ref = ref is not None and ref["n_train"] and recipe.local_share < 1.0
    if use_ref:
        keys_ref = [f"ref|{s}|{lab}" for s, lab in zip(ref["sources_train"], ref["labels_train"])]
        x, t, keys = np.concatenate([x_local, ref["x_train"]]), np.concatenate([t_local, ref["t_train"]]), \
            keys_local + keys_ref
    strata_keys = sorted(set(keys))
    idx = np.array([strata_keys.index(k) for k in keys])
    local_k = [k for k in strata_keys if k.startswith("local|")]
    ref_k = [k for k in strata_keys if k.startswith("ref|")]
    share = recipe.local_share if use_ref else 1.0
    weight = {i: (share / len(local_k) if k.startswith("local|") else (1 - share) / len(ref_k))
              for i, k in enumerate(strata_keys)}
    steps = recipe.steps_per_epoch(len(x_local))
    # epochs are counted in local cases seen, whatever the size of the reference sample
    ds = tf_dataset(x, t, recipe.batch_size, training=True, seed=seed, strata=(idx, weight),
                    source_augment=recipe.source_augment).repeat()
    schedule = keras.optimizers.schedules.CosineDecay(recipe.lr, decay_steps=steps * recipe.epochs, alpha=0.05)
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=1e-4),
                  loss=label_set_loss(recipe.label_smoothing))

    class _Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            log.info("adapt epoch %d/%d: loss %.4f", epoch + 1, recipe.epochs, (logs or {}).get("loss", np.nan))
            progress((epoch + 1) / recipe.epochs)

    model.fit(ds, epochs=recipe.epochs, steps_per_epoch=steps, callbacks=[_Progress()], verbose=0)


def _forward(model, x_gray: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    from medcls.learning.train import model_outputs

    if len(x_gray) == 0:
        return np.zeros((0, model.output_shape[-1])), np.zeros((0, 1))
    return model_outputs(model, x_gray, batch_size)  # expands gray to the model's channels per chunk


def _probs(model, x_gray, temperature: float) -> np.ndarray:
    from medcls.models.calibration import probabilities

    return probabilities(_forward(model, x_gray)[0], temperature)


def _accuracy(model, x_gray, targets) -> float:
    pred = _forward(model, x_gray)[0].argmax(1)
    return float((targets[np.arange(len(pred)), pred] > 0).mean())


def _refit(model, parent, recipe: Recipe, x_adapt, t_adapt, ref):
    """Temperature, low-confidence threshold and input gate on the adapt part and the reference
    validation sample (the check part stays unseen); the parent's, unchanged, without ``refit``."""
    from medcls.learning.train import low_confidence_threshold
    from medcls.models.calibration import InputGate, fit_temperature, probabilities

    if not recipe.refit:
        return parent.card.temperature, parent.card.low_confidence_threshold, parent.gate
    xs = [x_adapt] + ([ref["x_val"]] if ref else [])
    ts = [t_adapt] + ([ref["t_val"]] if ref else [])
    logits, emb = _forward(model, np.concatenate(xs))
    t = np.concatenate(ts)
    temperature = fit_temperature(logits, t)
    probs = probabilities(logits, temperature)
    correct = t[np.arange(len(probs)), probs.argmax(1)] > 0
    low_conf = low_confidence_threshold(probs.max(1), correct)
    gx = [x_adapt] + ([ref["x_train"], ref["x_val"]] if ref else [])
    gt = np.concatenate([t_adapt] + ([ref["t_train"], ref["t_val"]] if ref else []))
    _, gemb = _forward(model, np.concatenate(gx))
    single = gt.sum(1) == 1
    # the gate's class means need single-label cases of every class it scores against
    gate = InputGate.fit(gemb[single], gt[single].argmax(1), gemb) if single.sum() > gemb.shape[1] // 8 \
        else parent.gate
    return float(temperature), float(low_conf), gate


def _save(cfg: AdaptConfig, parent, model, temperature, low_conf, gate, record: dict) -> Path:
    from medcls.models.package import save_package

    out = Path(cfg.out)
    card = parent.card.to_dict()
    card["name"] = cfg.name or out.name
    card["version"] = f"{parent.card.version}+site.{record['data_fingerprint'][:8]}"
    card["temperature"] = temperature
    card["low_confidence_threshold"] = low_conf
    if gate is not None and isinstance(card.get("input_gate"), dict):
        card["input_gate"] = card["input_gate"] | {"threshold": gate.threshold,
                                                   "calibration": "99% quantile of the adapt part's and the reference sample's distances"}
    card.pop("low_confidence_val_accuracy", None)
    card.pop("selective", None)
    card["parent"] = record["parent"]
    card["adaptation"] = record
    card["task_description"] = (card.get("task_description") or card["task"]) + \
        f" (site-adapted from {parent.card.name} {parent.card.version})"
    card["metrics"] = {"site_check": record["after"],
                       "parent_metrics": card.get("metrics", {}),
                       "reference_test_accuracy": (record["reference"] or {}).get("accuracy_after")}
    return save_package(out, model, card, gate)


def figures_table(record: dict) -> list[dict]:
    """Before/after rows (figure, parent, adapted, both 95% CIs) for the page and the CLI."""
    rows = []
    for key in [k for k in record["after"] if not k.endswith("_ci95") and k not in ("n", "n_by_label")]:
        b, a = record["before"].get(key), record["after"].get(key)
        rows.append({"figure": key.replace("_", " "), "parent": b, "parent 95% CI": record["before"].get(key + "_ci95"),
                     "adapted": a, "adapted 95% CI": record["after"].get(key + "_ci95")})
    return rows


def report_markdown(record: dict) -> str:
    def fmt(v, ci=None):
        return "n/a" if v is None else f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    s = record["split"]
    lines = [f"# Site adaptation of {record['parent']['name']} {record['parent']['version']}", "",
             f"Local cases: {s['adapt']} to adapt, {s['check']} to check (hold-out {s['holdout']}, "
             f"seed {s['seed']}, grouped by {s['grouped_by']}); recipe {record['recipe']['name']}.", "",
             "| figure (check part) | parent [95% CI] | adapted [95% CI] |", "|---|---|---|"]
    for row in figures_table(record):
        lines.append(f"| {row['figure']} | {fmt(row['parent'], row['parent 95% CI'])} | "
                     f"{fmt(row['adapted'], row['adapted 95% CI'])} |")
    ref = record.get("reference")
    if ref:
        lines += ["", f"Reference test split ({ref['test_cases']} cases): accuracy "
                      f"{fmt(ref['accuracy_before'])} -> {fmt(ref['accuracy_after'])} "
                      f"(largest allowed drop {ref['margin']})."]
    lines += ["", "Verdict: " + ("accepted" if record["accepted"] else "rejected: " + "; ".join(record["reasons"]))]
    return "\n".join(lines) + "\n"


def is_adapted(card) -> bool:
    return isinstance(card.get("parent"), dict) and "adaptation" in card


def adapted_from(card) -> str | None:
    """"<name> <version>" of the parent of a site-adapted model, else None."""
    p = card.get("parent") if is_adapted(card) else None
    return f"{p.get('name')} {p.get('version')}" if p else None
