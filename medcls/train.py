"""Training: the fixed split, the shared preprocessing, MRI-safe augmentation, class weights,
early stopping on validation macro-F1, temperature and input gate fitted on validation, test
figures measured with :mod:`medcls.evaluate`, all written into a model package.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .architectures import get_architecture, set_backbone_trainable
from .calibration import InputGate, expected_calibration_error, fit_temperature, probabilities
from .data import Dataset, box_masks, cached_arrays, load_dataset, tf_dataset
from .errors import DatasetError
from .evaluate import classification_report, write_report
from .package import save_package
from .preprocess import PreprocessSpec

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
    data: str
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
    weights: str | None = None  # ImageNet *_no_top.h5 for mobilenet-tl
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


class MacroF1Checkpoint:
    """Keras callback: validation loss, accuracy and macro-F1 of ``eval_model`` after each epoch
    (after the EMA weights are swapped in, when EMA is on); keeps the best weights by macro-F1
    and stops after ``patience`` epochs without improvement."""

    def __new__(cls, *args, **kwargs):  # build the subclass lazily so importing needs no keras
        import keras
        from sklearn.metrics import accuracy_score, f1_score

        from .calibration import nll

        class _Cb(keras.callbacks.Callback):
            def __init__(self, eval_model, x_val, y_val, patience, batch_size, history):
                super().__init__()
                self.eval_model = eval_model
                self.x_val, self.y_val, self.patience = x_val, y_val, patience
                self.batch_size, self.history = batch_size, history
                self.best, self.best_weights, self.wait = -1.0, None, 0

            def on_epoch_end(self, epoch, logs=None):
                logits = self.eval_model.predict(self.x_val, batch_size=self.batch_size, verbose=0)
                pred = logits.argmax(1)
                logs = dict(logs or {})
                logs.update(val_loss=nll(logits, self.y_val), val_accuracy=accuracy_score(self.y_val, pred),
                            val_macro_f1=float(f1_score(self.y_val, pred, average="macro")))
                self.history.append({k: float(v) for k, v in logs.items()} | {"epoch": len(self.history) + 1})
                log.info("epoch %d: %s", len(self.history),
                         ", ".join(f"{k}={v:.4f}" for k, v in logs.items()))
                if logs["val_macro_f1"] > self.best + 1e-4:
                    self.best, self.wait = logs["val_macro_f1"], 0
                    self.best_weights = [w.copy() for w in self.eval_model.get_weights()]
                else:
                    self.wait += 1
                    if self.wait >= self.patience:
                        self.model.stop_training = True

        return _Cb(*args, **kwargs)


def box_energy_loss(targets, class_maps):
    """Localisation loss: minus the log of the share of the true class's activation map (which
    Grad-CAM reproduces for this head) that lies inside the tumour box, with the map turned
    into a spatial distribution by a softmax. Bounded gradients, whatever the map's scale
    (a ratio of raw positive evidence diverged when the evidence went to zero).

    ``targets`` (B, h, w, K): +1 inside and -1 outside the box on the true class's channel, 0
    elsewhere and for images without a box (which then add no loss)."""
    from keras import ops

    on_true = ops.abs(targets)  # 1 on the true class's channel where a box exists
    has_box = ops.cast(ops.sum(on_true, axis=(1, 2, 3)) > 0, "float32")
    true_map = ops.sum(class_maps * ops.cast(ops.sum(on_true, axis=(1, 2), keepdims=True) > 0, "float32"),
                       axis=-1)  # (B, h, w)
    b = ops.shape(true_map)[0]
    flat = ops.reshape(true_map, (b, -1))
    inside = ops.reshape(ops.sum(ops.relu(targets), axis=-1), (b, -1))
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
    axes[1].plot(ep, [h.get("accuracy", h.get("logits_accuracy")) for h in history], label="train accuracy")
    axes[1].plot(ep, [h.get("val_accuracy") for h in history], label="val accuracy")
    axes[1].plot(ep, [h.get("val_macro_f1") for h in history], label="val macro-F1")
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _features(model, x: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Logits and penultimate embeddings of arrays, with one compiled forward pass."""
    import keras

    feat = keras.Model(model.input, [model.output, model.get_layer("embedding").output])
    logits, emb = feat.predict(x, batch_size=batch_size, verbose=0)
    return np.asarray(logits), np.asarray(emb)


def train(cfg: TrainConfig, command: str | None = None) -> Path:
    import keras
    import tensorflow as tf
    from sklearn.utils.class_weight import compute_class_weight

    t0 = time.time()
    keras.utils.set_random_seed(cfg.seed)
    arch = get_architecture(cfg.arch)
    dataset: Dataset = load_dataset(cfg.data)
    if not dataset.has_splits:
        raise DatasetError("Training needs a labels.csv with a 'split' column (train/val/test).")
    size = cfg.input_size or arch.input_size
    spec = PreprocessSpec(**{"input_size": size, "channels": 3, **cfg.preprocess})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.name or out.name

    recs = {s: dataset.split(s) for s in ("train", "val", "test")}
    if cfg.max_train:
        rng = np.random.default_rng(cfg.seed)
        recs = {s: [r[i] for i in sorted(rng.choice(len(r), min(len(r), cfg.max_train if s == "train" else cfg.max_train // 2), replace=False))]
                for s, r in recs.items()}
    log.info("preprocessing %s", {s: len(r) for s, r in recs.items()})
    arrays = {s: cached_arrays(dataset, r, spec, cfg.cache_dir, cfg.workers) for s, r in recs.items()}
    labels = {s: dataset.label_index(r) for s, r in recs.items()}
    log.info("preprocessed in %.0f s", time.time() - t0)

    cw = compute_class_weight("balanced", classes=np.arange(len(dataset.classes)), y=labels["train"])
    class_weight = {i: float(w) for i, w in enumerate(cw)}
    n_classes = len(dataset.classes)
    onehot = np.eye(n_classes, dtype=np.float32)[labels["train"]]
    masks = None
    if cfg.box_loss:
        if not any(r.box for r in recs["train"]):
            raise DatasetError("--box-loss needs tumour boxes (box_xc, box_yc, box_w, box_h) in labels.csv.")
        masks = box_masks(dataset, recs["train"], spec, cfg.cache_dir, cfg.workers)

    strategy = tf.distribute.get_strategy()
    history: list[dict] = []
    with strategy.scope():
        kwargs = {"weights": cfg.weights} if cfg.arch == "mobilenet-tl" else {}
        model = arch.build(size, n_classes, channels=3, **kwargs)
        train_model = _class_maps_model(model, arch.cam_layer) if cfg.box_loss else model
        grid = int(model.get_layer(arch.cam_layer).output.shape[1])
        train_ds = tf_dataset(arrays["train"], onehot, cfg.batch_size, training=True, seed=cfg.seed,
                              sample_weight=cw[labels["train"]], box_masks=masks, grid=grid,
                              clip=spec.unit_range)
        phases = [("train", cfg.epochs, cfg.lr)]
        if cfg.arch == "mobilenet-tl":
            set_backbone_trainable(model, False)
            phases = [("head", max(1, cfg.epochs // 3), cfg.lr), ("fine-tune", cfg.fine_tune_epochs, cfg.fine_tune_lr)]
        ce = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing)
        for phase, epochs, lr in phases:
            if phase == "fine-tune":
                set_backbone_trainable(model, True, from_layer=cfg.fine_tune_from)
            steps = max(1, int(np.ceil(len(arrays["train"]) / cfg.batch_size))) * epochs
            schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps, alpha=0.05)
            train_model.compile(
                optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=1e-4,
                                                 use_ema=cfg.ema, ema_momentum=0.99),
                loss=[ce, box_energy_loss] if cfg.box_loss else ce,
                loss_weights=[1.0, cfg.box_loss] if cfg.box_loss else None,
                metrics=[["accuracy"], []] if cfg.box_loss else ["accuracy"])
            cb = MacroF1Checkpoint(model, arrays["val"], labels["val"], cfg.patience, cfg.batch_size, history)
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

    # Calibration and input gate on validation; figures on test.
    val_logits, val_emb = _features(model, arrays["val"])
    temperature = fit_temperature(val_logits, labels["val"])
    train_logits, train_emb = _features(model, arrays["train"])
    gate = InputGate.fit(train_emb, labels["train"], val_emb)
    test_logits, _ = _features(model, arrays["test"])
    reports = {}
    for split, logits in (("val", val_logits), ("test", test_logits)):
        rep = classification_report(labels[split], probabilities(logits, temperature), dataset.classes)
        rep["ece_uncalibrated"] = expected_calibration_error(probabilities(logits, 1.0), labels[split])
        reports[split] = rep
    write_report(reports["test"], out / "evaluation", title=f"{name} on the test split")
    _plot_history(history, out / "training_curves.png")
    (out / "history.json").write_text(json.dumps(history, indent=2))

    val_conf = probabilities(val_logits, temperature).max(1)
    val_correct = probabilities(val_logits, temperature).argmax(1) == labels["val"]
    low_conf = _low_confidence_threshold(val_conf, val_correct)
    task = cfg.task or dataset.name
    card = {
        "name": name,
        "version": cfg.version,
        "task": task,
        "task_description": cfg.task_description or f"{len(dataset.classes)}-class classification ({dataset.name})",
        "classes": dataset.classes,
        "architecture": cfg.arch,
        "architecture_description": arch.description,
        "input_size": size,
        "channels": 3,
        "output": "logits",
        "preprocessing": spec.to_dict(),
        "cam_layer": arch.cam_layer,
        "temperature": temperature,
        "low_confidence_threshold": low_conf,
        "input_gate": {"method": "mahalanobis-nearest-class (Ledoit-Wolf shared covariance) on "
                                 "the 'embedding' layer", "threshold": gate.threshold,
                       "calibration": f"{gate.quantile:.0%} quantile of validation-split distances"},
        "parameters": int(model.count_params()),
        "training": {
            "command": command or "",
            "data": f"{dataset.name}: {len(recs['train'])} train / {len(recs['val'])} val / "
                    f"{len(recs['test'])} test images from labels.csv's fixed split",
            "data_fingerprint": dataset.fingerprint(recs["train"] + recs["val"] + recs["test"]),
            "epochs_run": len(history),
            "best_val_macro_f1": max(h["val_macro_f1"] for h in history),
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "label_smoothing": cfg.label_smoothing,
            "box_loss": cfg.box_loss,
            "box_supervision": ("auxiliary loss on the share of the true class's activation map "
                                "outside the tumour box (train-split boxes only)") if cfg.box_loss else None,
            "weight_ema": cfg.ema,
            "fine_tune_from": cfg.fine_tune_from if cfg.arch == "mobilenet-tl" else None,
            "augmentation": "horizontal flip, rotation +-15 deg, shift 6%, zoom 10%, contrast 20%, brightness 10%",
            "class_weight": class_weight,
            "date": _dt.date.today().isoformat(),
            "duration_s": round(time.time() - t0, 1),
            "environment": f"python {platform.python_version()}, tensorflow {tf.__version__}, "
                           f"keras {keras.__version__}, CPU only",
        },
        "metrics": {"test": _card_metrics(reports["test"]), "val": _card_metrics(reports["val"])},
        "intended_use": cfg.intended_use,
        "limits": cfg.limits or [],
    }
    save_package(out, model, card, gate)
    if any(r.box for r in recs["val"]):
        from .localization import store_region_threshold

        fit = store_region_threshold(out, cfg.data, "val", records=recs["val"])
        log.info("region threshold %.2f (val mean box IoU %.3f)", fit["threshold"], fit["mean_iou"])
    log.info("saved %s in %.0f s: test accuracy %.4f, macro-F1 %.4f", out, time.time() - t0,
             reports["test"]["accuracy"], reports["test"]["macro_f1"])
    return out


def _card_metrics(rep: dict) -> dict:
    keep = ("n", "accuracy", "macro_f1", "roc_auc", "ece", "ece_uncalibrated", "per_class",
            "confusion_matrix")
    return {k: rep[k] for k in keep if k in rep}


def _low_confidence_threshold(conf: np.ndarray, correct: np.ndarray, target_precision: float = 0.99) -> float:
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
