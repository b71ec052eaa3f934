"""Training: the fixed split, the shared preprocessing, MRI-safe augmentation, class weights,
early stopping on validation macro-F1, temperature and input gate fitted on validation, test
figures measured with :mod:`medcls.learning.evaluate`, all written into a model package.

Runs inside a ``tf.distribute`` strategy scope (the default strategy on one machine), so the
same code runs under a ``MirroredStrategy`` or ``MultiWorkerMirroredStrategy``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shlex
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medcls.core.errors import DatasetError
from medcls.io.preprocess import PreprocessSpec
from medcls.learning.data import Dataset, box_masks, cached_arrays, load_datasets, stratum_weights, tf_dataset
from medcls.learning.evaluate import classification_report, write_report
from medcls.models.architectures import get_architecture, pretrained_provenance, set_backbone_trainable
from medcls.models.calibration import InputGate, expected_calibration_error, fit_calibration, probabilities
from medcls.models.card import EMBEDDING_LAYER
from medcls.models.package import load_package, save_package

log = logging.getLogger(__name__)

LIMITS_BRAIN = [
    "Research tool, not a diagnostic device: every output needs a clinician's review.",
    "Trained on single 2-D slices (T1-weighted contrast-enhanced for the tumour classes; "
    "axial, coronal and sagittal), not on volumes.",
    "The no_tumor class comes from another source (Br35H: other scanners and sequences, "
    "mostly T2/FLAIR) than the tumour classes (figshare, T1 contrast-enhanced): the model may "
    "partly recognise the source instead of the anatomy. Check the heatmap.",
    "Classes outside glioma, meningioma, pituitary tumour and no tumour (metastases, "
    "lymphoma, other lesions, post-operative changes) are not recognised.",
]


@dataclass
class TrainConfig:
    data: list[str] | str  # one folder, or several combined (the first is the task's own)
    arch: str
    out: str
    name: str | None = None
    task: str | None = None
    epochs: int = 30
    fine_tune_epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    fine_tune_lr: float = 2e-4
    patience: int = 6
    seed: int = 1234
    input_size: int | None = None
    weights: str | None = None  # ImageNet *_no_top.h5 for transfer architectures
    fine_tune_from: str | None = "block_9_expand"
    cache_dir: str | None = ".cache/medcls"
    workers: int = 2
    limits: list[str] = field(default_factory=list)
    intended_use: str = ("Research and education: helps clinicians and ML engineers inspect how a "
                         "CNN classifies a single 2-D slice; not for diagnosis.")
    task_description: str | None = None
    version: str = "1.0.0"
    max_train: int | None = None  # smoke runs only
    preprocess: dict = field(default_factory=dict)  # PreprocessSpec overrides, e.g. {"crop": False}
    label_smoothing: float = 0.0
    ema: bool = False  # exponential moving average of the weights, evaluated each epoch
    box_loss: float = 0.0  # weight of the tumour-box localisation loss (needs boxes in labels.csv)
    init: str | None = None  # start from this model package's weights (fine-tuning only)
    source_augment: bool = False  # per-image source randomisation (medcls.learning.augment)
    balanced: bool = False  # sample batches balanced over (source, label)
    modality: str | None = None  # DICOM Modality the model is for (e.g. MR); others are refused
    scope: dict = field(default_factory=dict)  # what each source holds (planes, sequences)

    @property
    def folders(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)


class MacroF1Checkpoint:
    """Keras callback: validation figures of ``eval_model`` after each epoch (after the EMA
    weights are swapped in, when EMA is on); keeps the best weights by the validation score
    and stops after ``patience`` epochs without improvement.

    The score is the 4-class macro-F1 on single-label rows; when the validation data mixes
    sources or holds partial labels, it is the mean of that macro-F1 and the tumour-vs-none
    accuracy averaged over the (source, label) groups, so a model that learns a source shortcut
    (right on the big sources, wrong on Br35H tumours) is not chosen."""

    def __new__(cls, *args, **kwargs):  # build the subclass lazily so importing needs no keras
        import keras

        class _Cb(keras.callbacks.Callback):
            def __init__(self, eval_model, x_val, t_val, negative, patience, batch_size, history,
                         groups=None):
                super().__init__()
                self.eval_model = eval_model
                self.x_val, self.t_val, self.negative, self.groups = x_val, t_val, negative, groups
                self.patience, self.batch_size, self.history = patience, batch_size, history
                self.best, self.best_weights, self.wait = -1.0, None, 0
                self.started = time.time()

            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.time()

            def on_epoch_end(self, epoch, logs=None):
                train_s = time.time() - self.started
                logits = self.eval_model.predict(self.x_val, batch_size=self.batch_size, verbose=0)
                logs = dict(logs or {}) | {"epoch_s": train_s}
                logs.update(validation_figures(logits, self.t_val, self.negative, self.groups))
                self.history.append({k: float(v) for k, v in logs.items()} | {"epoch": len(self.history) + 1})
                log.info("epoch %d: %s", len(self.history),
                         ", ".join(f"{k}={v:.4f}" for k, v in logs.items()))
                if logs["val_score"] > self.best + 1e-4:
                    self.best, self.wait = logs["val_score"], 0
                    self.best_weights = [w.copy() for w in self.eval_model.get_weights()]
                else:
                    self.wait += 1
                    if self.wait >= self.patience:
                        self.model.stop_training = True

        return _Cb(*args, **kwargs)


def validation_figures(logits: np.ndarray, targets: np.ndarray, negative: int | None,
                       groups: np.ndarray | None = None) -> dict:
    """Validation loss (of the allowed set), accuracy and macro-F1 on single-label rows, the
    tumour-vs-none accuracy averaged over ``groups`` (the rows' (source, label) strata; one
    group per tumour/none side without them), and the score early stopping follows."""
    from scipy.special import log_softmax
    from sklearn.metrics import f1_score

    logits = np.asarray(logits, np.float64)
    lp = log_softmax(logits, axis=1)
    set_lp = np.log(np.maximum((np.exp(lp) * targets).sum(1), 1e-12))
    pred = logits.argmax(1)
    single = targets.sum(1) == 1
    y = targets[single].argmax(1)
    out = {"val_loss": float(-set_lp.mean()),
           "val_accuracy": float((pred[single] == y).mean()) if single.any() else 0.0,
           "val_macro_f1": float(f1_score(y, pred[single], average="macro")) if single.any() else 0.0}
    out["val_score"] = out["val_macro_f1"]
    mixed = negative is not None and (not single.all())
    if negative is not None:
        true_tumour = targets[:, negative] == 0
        right = true_tumour == (pred != negative)
        groups = true_tumour.astype(int) if groups is None else np.asarray(groups)
        per_group = [right[groups == g].mean() for g in np.unique(groups)]
        out["val_tumour_group_accuracy"] = float(np.mean(per_group))
        out["val_tumour_worst_group"] = float(np.min(per_group))
        if mixed:
            out["val_score"] = 0.5 * (out["val_macro_f1"] + out["val_tumour_group_accuracy"])
    return out


def label_set_loss(label_smoothing: float = 0.0):
    """Cross-entropy against a set of allowed classes: minus the log of the summed probability
    of the classes a row's label allows (one class: the usual cross-entropy; the partial label
    ``tumor``: the tumour classes together, so the row raises them together and says nothing of
    their split). Label smoothing mixes in the mean cross-entropy over all classes, which for a
    one-class row is exactly Keras' label smoothing."""
    from keras import ops

    def loss(targets, logits):
        log_z = ops.logsumexp(logits, axis=-1)
        log_set = ops.logsumexp(ops.where(targets > 0, logits, -1e9), axis=-1) - log_z
        if not label_smoothing:
            return -log_set
        mean_log_p = ops.mean(logits, axis=-1) - log_z
        return -(1.0 - label_smoothing) * log_set - label_smoothing * mean_log_p

    loss.__name__ = "label_set_loss"
    return loss


def box_energy_loss(targets, class_maps):
    """Localisation loss: minus the log of the share of the true class's activation map (which
    Grad-CAM reproduces for this head) that lies inside the tumour box, with the map turned
    into a spatial distribution by a softmax. Bounded gradients, whatever the map's scale
    (a ratio of raw positive evidence diverged when the evidence went to zero).

    ``targets`` (B, h, w, K): +1 inside and -1 outside the box on the true class's channel, 0
    elsewhere and for images without a box (which then add no loss). For a partial label (a
    tumour of unknown type) the allowed classes' channels carry the box and their maps are
    summed: the tumour evidence together must lie in the box."""
    from keras import ops

    on_true = ops.abs(targets)  # 1 on the true class's channel where a box exists
    has_box = ops.cast(ops.sum(on_true, axis=(1, 2, 3)) > 0, "float32")
    true_map = ops.sum(class_maps * ops.cast(ops.sum(on_true, axis=(1, 2), keepdims=True) > 0, "float32"),
                       axis=-1)  # (B, h, w)
    b = ops.shape(true_map)[0]
    flat = ops.reshape(true_map, (b, -1))
    inside = ops.reshape(ops.minimum(ops.sum(ops.relu(targets), axis=-1), 1.0), (b, -1))
    p = ops.softmax(flat, axis=-1)
    share_inside = ops.sum(p * inside, axis=-1)
    return has_box * -ops.log(share_inside + 1e-6)


def _class_maps_model(model, cam_layer: str):
    """A training view of ``model`` with a second output: the class activation maps
    ``last_conv . W_logits + b`` (the same weights as the logits layer)."""
    import keras
    from keras import ops

    dense = model.get_layer("logits")

    class ClassMaps(keras.layers.Layer):
        def call(self, features):
            maps = ops.einsum("bhwk,kc->bhwc", features, dense.kernel)
            return maps if dense.bias is None else maps + dense.bias

    maps = ClassMaps(name="class_maps")(model.get_layer(cam_layer).output)
    return keras.Model(model.input, [model.output, maps], name=model.name + "_train")


def _plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
    axes[0].plot(ep, [h.get("logits_loss", h.get("loss")) for h in history], label="train loss")
    axes[0].plot(ep, [h.get("val_loss") for h in history], label="val loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    axes[1].plot(ep, [h.get("val_accuracy") for h in history], label="val accuracy")
    axes[1].plot(ep, [h.get("val_macro_f1") for h in history], label="val macro-F1")
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_FEATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_outputs(model, x: np.ndarray, batch_size: int = 64, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Logits and penultimate embeddings of arrays, with one compiled forward pass. Gray arrays
    (N, S, S, 1) are expanded to the model's channels a chunk at a time (memory stays small).
    The two-output view of a network is built once and kept while the network lives, so the
    many passes of a training run or a site adaptation's cross-validation (the weights change
    in place) trace it once."""
    import keras

    if len(x) == 0:
        return np.zeros((0, model.output_shape[-1])), np.zeros((0, 1))
    feat = _FEATURES.get(model)
    if feat is None:
        feat = _FEATURES[model] = keras.Model(model.input, [model.output,
                                                            model.get_layer(EMBEDDING_LAYER).output])
    channels = model.input.shape[-1]
    logits, emb = [], []
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk]
        if part.shape[-1] != channels:
            part = np.repeat(part, channels, axis=-1)
        lo, em = feat.predict(part, batch_size=batch_size, verbose=0)
        logits.append(np.asarray(lo))
        emb.append(np.asarray(em))
    return np.concatenate(logits), np.concatenate(emb)


def train(cfg: TrainConfig, command: str | None = None, strategy=None) -> Path:
    """Train a model package, top to bottom: data, arrays, network, phases, calibration, gate,
    card. ``strategy`` is a ``tf.distribute`` strategy (default: the current one)."""
    import keras
    import tensorflow as tf

    t0 = time.time()
    keras.utils.set_random_seed(cfg.seed)

    # 1. Data: one or several folders, their fixed splits, partial labels as label sets.
    dataset: Dataset = load_datasets(cfg.folders)
    if not dataset.has_splits:
        raise DatasetError("Training needs a labels.csv with a 'split' column (train/val/test).")
    parent = load_package(cfg.init) if cfg.init else None
    arch = get_architecture(parent.card["architecture"] if parent else cfg.arch)
    if parent and parent.classes != dataset.classes:
        raise DatasetError(f"--init {cfg.init}: its classes {parent.classes} differ from the "
                           f"data's {dataset.classes}.")
    size = parent.spec.input_size if parent else (cfg.input_size or arch.input_size)
    spec = parent.spec if parent else PreprocessSpec(**{"input_size": size, "channels": 3, **cfg.preprocess})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.name or out.name
    recs = _split_records(dataset, cfg)
    negative = dataset.classes.index(dataset.negative_class) if dataset.negative_class else None

    # 2. Arrays through the shared preprocessing (cached), targets, strata, tumour boxes.
    log.info("preprocessing %s", {s: len(r) for s, r in recs.items()})
    gray = {s: cached_arrays(dataset, r, spec, cfg.cache_dir, cfg.workers, as_gray=True)
            for s, r in recs.items()}
    targets = {s: dataset.targets(r) for s, r in recs.items()}
    log.info("preprocessed in %.0f s", time.time() - t0)
    strata = stratum_weights(recs["train"]) if cfg.balanced else None
    if strata:
        log.info("balanced sampling over (source, label): %s",
                 {f"{k[0]}/{k[1]}": round(w, 3) for k, w in strata[1].items()})
    masks = None
    if cfg.box_loss:
        if not any(r.box for r in recs["train"]):
            raise DatasetError("--box-loss needs tumour boxes (box_xc, box_yc, box_w, box_h) in labels.csv.")
        masks = box_masks(dataset, recs["train"], spec, cfg.cache_dir, cfg.workers)
    x_val = np.repeat(gray["val"], 3, axis=-1)

    # 3. The network and its training phases.
    strategy = strategy or tf.distribute.get_strategy()
    history: list[dict] = []
    with strategy.scope():
        if parent:
            model = parent.model
        else:
            kwargs = {"weights": cfg.weights} if arch.transfer else {}
            model = arch.build(size, len(dataset.classes), channels=3, **kwargs)
        train_model = _class_maps_model(model, arch.cam_layer) if cfg.box_loss else model
        grid = int(model.get_layer(arch.cam_layer).output.shape[1])
        train_ds = tf_dataset(gray["train"], targets["train"], cfg.batch_size, training=True,
                              seed=cfg.seed, box_masks=masks, grid=grid, clip=spec.unit_range,
                              strata=strata, source_augment=cfg.source_augment)
        loss = label_set_loss(cfg.label_smoothing)
        for phase, epochs, lr in _phases(cfg, arch, parent is not None):
            if arch.transfer:
                set_backbone_trainable(model, phase == "fine-tune",
                                       from_layer=cfg.fine_tune_from if phase == "fine-tune" else None)
            steps = max(1, int(np.ceil(len(gray["train"]) / cfg.batch_size))) * epochs
            schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps, alpha=0.05)
            train_model.compile(
                optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=1e-4,
                                                 use_ema=cfg.ema, ema_momentum=0.99),
                loss=[loss, box_energy_loss] if cfg.box_loss else loss,
                loss_weights=[1.0, cfg.box_loss] if cfg.box_loss else None)
            cb = MacroF1Checkpoint(model, x_val, targets["val"], negative, cfg.patience,
                                   cfg.batch_size, history, groups=stratum_weights(recs["val"])[0])
            # with EMA, the averaged weights are swapped in before the checkpoint evaluates
            callbacks = ([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema else []) + [cb]
            log.info("phase %s: %d epochs, lr %g, %d trainable weights", phase, epochs, lr,
                     len(model.trainable_weights))
            train_model.fit(train_ds, epochs=epochs, callbacks=callbacks,
                            verbose=1 if sys.stderr.isatty() else 2)
            if cb.best_weights is not None:
                model.set_weights(cb.best_weights)
            for h in history:
                h.setdefault("phase", phase)

    # 4. Calibration, low-confidence threshold and input gate on validation.
    val_logits, val_emb = model_outputs(model, x_val)
    calibration = fit_calibration(val_logits, targets["val"])
    temperature, bias = calibration["temperature"], calibration["class_bias"]
    log.info("calibration: %s (cross-validated NLL %s)", calibration["method"],
             {m: round(v, 4) for m, v in calibration["cv_nll"].items()})
    gate = fit_gate(model, gray["train"], targets["train"], val_emb, targets["val"])
    val_probs = probabilities(val_logits, temperature, bias)
    val_correct = targets["val"][np.arange(len(val_probs)), val_probs.argmax(1)] > 0
    low_conf = low_confidence_threshold(val_probs.max(1), val_correct)
    selective = selective_figures(val_probs, val_correct, low_conf,
                                  gate.is_outside(val_emb)) | {"split": "val"}

    # 5. Test figures on the task's own folder (the first), the card, the package.
    own = [i for i, r in enumerate(recs["test"]) if r.root == dataset.records[0].root]
    test_logits, _ = model_outputs(model, gray["test"][own])
    own_val = [i for i, r in enumerate(recs["val"]) if r.root == dataset.records[0].root]
    reports = {}
    for split, logits, idx in (("val", val_logits[own_val], own_val), ("test", test_logits, own)):
        y = targets[split][idx].argmax(1)
        rep = classification_report(y, probabilities(logits, temperature, bias), dataset.classes)
        rep["ece_uncalibrated"] = expected_calibration_error(probabilities(logits, 1.0), y)
        reports[split] = rep
    write_report(reports["test"], out / "evaluation", title=f"{name} on the test split")
    _plot_history(history, out / "training_curves.png")
    (out / "history.json").write_text(json.dumps(history, indent=2))
    card = build_card(cfg, command, dataset, recs, arch, spec, model, calibration, low_conf,
                      selective, gate, history, reports, parent, time.time() - t0)
    save_package(out, model, card, gate)
    if any(r.box for r in recs["val"]):
        from medcls.learning.localization import store_region_threshold

        fit = store_region_threshold(out, cfg.folders[0], "val",
                                     records=[r for r in recs["val"] if r.box])
        log.info("region threshold %.2f (val mean box IoU %.3f)", fit["threshold"], fit["mean_iou"])
    log.info("saved %s in %.0f s: test accuracy %.4f, macro-F1 %.4f", out, time.time() - t0,
             reports["test"]["accuracy"], reports["test"]["macro_f1"])
    return out


def fit_gate(model, gray_train: np.ndarray, targets_train: np.ndarray, val_emb: np.ndarray,
             targets_val: np.ndarray) -> InputGate:
    """The input gate: class means and covariance from the training rows with one class, and
    the threshold at the 99% quantile of the *single-label* validation rows' distances. Rows of
    a partial label (Br35H tumours of unknown type) have no class mean of their own and sit far
    from every mean; letting them set the threshold raised it until chest radiographs passed."""
    single = targets_train.sum(1) == 1
    _, train_emb = model_outputs(model, gray_train[single])
    val_single = targets_val.sum(1) == 1
    return InputGate.fit(train_emb, targets_train[single].argmax(1), val_emb[val_single])


def _split_records(dataset: Dataset, cfg: TrainConfig) -> dict:
    recs = {s: dataset.split(s) for s in ("train", "val", "test")}
    if cfg.max_train:  # smoke runs only
        rng = np.random.default_rng(cfg.seed)
        recs = {s: [r[i] for i in sorted(rng.choice(len(r), min(len(r), cfg.max_train if s == "train" else cfg.max_train // 2), replace=False))]
                for s, r in recs.items()}
    return recs


def _phases(cfg: TrainConfig, arch, from_parent: bool) -> list[tuple[str, int, float]]:
    """Training phases. A transfer network first trains its head on a frozen backbone, then
    fine-tunes from ``fine_tune_from`` (batch norm stays frozen: left training, a probe fell to
    0.61 test accuracy). Starting from a package (``init``) goes straight to fine-tuning."""
    if from_parent:
        return [("fine-tune", cfg.fine_tune_epochs, cfg.fine_tune_lr)]
    if not arch.transfer:
        return [("train", cfg.epochs, cfg.lr)]
    return [("head", max(1, cfg.epochs // 3), cfg.lr), ("fine-tune", cfg.fine_tune_epochs, cfg.fine_tune_lr)]


def selective_figures(probs: np.ndarray, correct: np.ndarray, threshold: float,
                      outside: np.ndarray | None = None) -> dict:
    """Selective prediction: a scan is *answered* when its confidence reaches the low-confidence
    threshold and the input gate accepts it. Coverage is the share answered; answered accuracy
    the share of those that are right."""
    conf = np.asarray(probs).max(1)
    answered = conf >= threshold
    if outside is not None:
        answered &= ~np.asarray(outside, bool)
    correct = np.asarray(correct, bool)
    return {"n": int(len(conf)), "threshold": float(threshold),
            "coverage": float(answered.mean()) if len(conf) else 0.0,
            "answered_accuracy": float(correct[answered].mean()) if answered.any() else None,
            "accuracy_above_threshold": float(correct[conf >= threshold].mean()) if (conf >= threshold).any() else None}


def build_card(cfg, command, dataset, recs, arch, spec, model, calibration, low_conf, selective,
               gate, history, reports, parent, duration_s) -> dict:
    """The model card: contract (what inference reads), scope, provenance and figures."""
    import keras
    import tensorflow as tf

    from medcls.learning.augment import DESCRIPTION as SOURCE_AUGMENT

    name = cfg.name or Path(cfg.out).name
    task = cfg.task or dataset.name.split("+")[0]
    augmentation = ("horizontal flip, rotation +-15 deg, shift 6%, zoom -20%..+15% (border/skull "
                    "crop jitter), contrast 20%, brightness 10%")
    if cfg.source_augment:
        augmentation += "; " + SOURCE_AUGMENT
    counts = {s: len(r) for s, r in recs.items()}
    return {
        "name": name,
        "version": cfg.version,
        "task": task,
        "task_description": cfg.task_description or f"{len(dataset.classes)}-class classification ({dataset.name})",
        "classes": dataset.classes,
        "negative_class": dataset.negative_class,
        "modality": cfg.modality,
        "architecture": arch.name,
        "architecture_description": arch.description,
        "input_size": spec.input_size,
        "channels": 3,
        "output": "logits",
        "preprocessing": spec.to_dict(),
        "cam_layer": arch.cam_layer,
        "temperature": calibration["temperature"],
        "class_bias": calibration["class_bias"],
        "calibration": {"method": calibration["method"], "split": "val",
                        "cv_nll": calibration["cv_nll"],
                        "rule": "temperature alone, or with one bias per class when that lowers the "
                                "5-fold cross-validated validation NLL"},
        "low_confidence_threshold": low_conf,
        "low_confidence_val_accuracy": selective["accuracy_above_threshold"],
        "selective": selective,
        "input_gate": {"method": "mahalanobis-nearest-class (Ledoit-Wolf shared covariance) on "
                                 f"the '{EMBEDDING_LAYER}' layer", "threshold": gate.threshold,
                       "calibration": f"{gate.quantile:.0%} quantile of the single-label validation rows' distances"},
        "scope": training_scope(dataset, recs["train"], cfg.scope),
        "parameters": int(model.count_params()),
        "training": {
            "command": command or "",
            "data": f"{dataset.name}: {counts['train']} train / {counts['val']} val / "
                    f"{counts['test']} test images from the labels.csv files' fixed splits",
            "data_fingerprint": dataset.fingerprint(recs["train"] + recs["val"] + recs["test"]),
            "init_from": ({"name": parent.card["name"], "version": parent.card.get("version"),
                           "model_sha256": parent.card["model_sha256"]} if parent else None),
            "epochs_run": len(history),
            "best_val_score": max(h["val_score"] for h in history),
            "best_val_macro_f1": max(h["val_macro_f1"] for h in history),
            "selection": "best epoch by the validation score (4-class macro-F1, averaged with "
                         "the tumour-vs-none accuracy over (source, label) groups when sources mix)",
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "label_smoothing": cfg.label_smoothing,
            "loss": "minus the log of the allowed classes' summed probability (partial labels: "
                    "the tumour classes together)",
            "sampling": "balanced over (source, label): sources by the square root of their size, "
                        "labels alike within a source" if cfg.balanced else "shuffled",
            "box_loss": cfg.box_loss,
            "box_supervision": ("auxiliary loss on the share of the allowed classes' activation "
                                "map outside the tumour box (train-split boxes only)") if cfg.box_loss else None,
            "weight_ema": cfg.ema,
            "fine_tune_from": cfg.fine_tune_from if arch.transfer else None,
            "pretrained": (parent.card.get("training", {}).get("pretrained") if parent else
                           pretrained_provenance(cfg.weights) if arch.transfer and cfg.weights else None),
            "epoch_seconds": [round(h["epoch_s"], 1) for h in history if "epoch_s" in h],
            "augmentation": augmentation,
            "date": _dt.date.today().isoformat(),
            "duration_s": round(duration_s, 1),
            "environment": f"python {platform.python_version()}, tensorflow {tf.__version__}, "
                           f"keras {keras.__version__}, CPU only",
        },
        "metrics": {"test": _card_metrics(reports["test"]), "val": _card_metrics(reports["val"])},
        "intended_use": cfg.intended_use,
        "limits": cfg.limits or [],
    }


def training_scope(dataset: Dataset, train_records, described: dict) -> dict:
    """What each class was trained on: sources with image counts (partial-label rows count
    for every class they allow), planes where labels.csv states them, and the per-source
    descriptions given in ``described`` (modality, sequences, planes as far as known)."""
    from medcls.learning.data import label_set

    per_class: dict[str, dict[str, int]] = {c: {} for c in dataset.classes}
    planes: dict[str, set] = {c: set() for c in dataset.classes}
    for r in train_records:
        for c in label_set(r.label, dataset.classes):
            key = r.source + (" (type unknown)" if r.partial else "")
            per_class[c][key] = per_class[c].get(key, 0) + 1
            if r.plane:
                planes[c].add(r.plane)
    return {"classes": {c: {"train_images_by_source": per_class[c],
                            "planes_in_labels": sorted(planes[c])} for c in dataset.classes},
            "sources": described.get("sources", {}),
            "modality": described.get("modality"),
            "validated_planes": described.get("validated_planes"),
            "validated_planes_why": described.get("validated_planes_why"),
            "validated_sequences": described.get("validated_sequences"),
            "validated_sequences_why": described.get("validated_sequences_why"),
            "not_seen": described.get("not_seen", [])}


def _card_metrics(rep: dict) -> dict:
    keep = ("n", "accuracy", "macro_f1", "roc_auc", "ece", "ece_uncalibrated", "per_class",
            "confusion_matrix")
    return {k: rep[k] for k in keep if k in rep}


def low_confidence_threshold(conf: np.ndarray, correct: np.ndarray, target_precision: float = 0.99) -> float:
    """The smallest confidence above which validation predictions are at least 99% correct
    (at least 0.5). Below it the app says the result is uncertain."""
    order = np.argsort(-conf)
    conf_sorted, corr_sorted = conf[order], correct[order].astype(float)
    cum_acc = np.cumsum(corr_sorted) / np.arange(1, len(conf) + 1)
    ok = np.nonzero(cum_acc >= target_precision)[0]
    if len(ok) == 0:
        return 0.9
    return float(max(0.5, min(0.95, conf_sorted[ok[-1]])))


def command_line() -> str:
    argv = [os.path.basename(sys.executable).replace("python3.11", "python")] + sys.argv
    if argv[1:2] and argv[1].endswith("__main__.py"):
        argv = ["python", "-m", "medcls"] + sys.argv[1:]
    return " ".join(shlex.quote(a) for a in argv)
