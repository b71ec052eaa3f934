"""Evaluation: accuracy, per-class precision/recall/F1, macro-F1, confusion matrix, one-vs-rest
ROC AUC and calibration error, from scikit-learn; bootstrap confidence intervals; report files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score)

from .calibration import expected_calibration_error


def classification_report(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Every figure a card or report states, computed from labels and probabilities."""
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    report = {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "roc_auc": _roc_auc(y, probs, labels),
        "ece": expected_calibration_error(probs, y),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(s[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "classes": list(classes),
    }
    return report


def _roc_auc(y: np.ndarray, probs: np.ndarray, labels: list[int]) -> float | None:
    present = np.unique(y)
    if len(present) < 2:
        return None
    if len(labels) == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels))


def bootstrap_ci(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> dict:
    """95% percentile-bootstrap intervals of accuracy, macro-F1, ROC AUC, ECE and per-class recall."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    probs = np.asarray(probs)
    n = len(y)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        yb, pb = y[idx], probs[idx]
        pred = pb.argmax(axis=1)
        vals = {
            "accuracy": accuracy_score(yb, pred),
            "macro_f1": f1_score(yb, pred, labels=list(range(len(classes))), average="macro",
                                 zero_division=0),
            "ece": expected_calibration_error(pb, yb),
        }
        auc = _roc_auc(yb, pb, list(range(len(classes))))
        if auc is not None:
            vals["roc_auc"] = auc
        rec = precision_recall_fscore_support(yb, pred, labels=list(range(len(classes))),
                                              zero_division=0)[1]
        for i, c in enumerate(classes):
            vals[f"recall_{c}"] = rec[i]
        for k, v in vals.items():
            samples.setdefault(k, []).append(float(v))
    return {k: [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))]
            for k, v in samples.items()}


def write_report(report: dict, out_dir: str | Path, title: str = "Evaluation") -> None:
    """``report.json``, ``report.md`` and ``confusion_matrix.png`` / ``.json`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "confusion_matrix.json").write_text(json.dumps(
        {"classes": report["classes"], "matrix": report["confusion_matrix"]}, indent=2))
    plot_confusion_matrix(report, out / "confusion_matrix.png")
    (out / "report.md").write_text(report_markdown(report, title))


def report_markdown(report: dict, title: str) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"# {title}", "", f"Images: {report['n']}", "",
             "| metric | value |", "|---|---|",
             f"| accuracy | {fmt(report['accuracy'])} |", f"| macro-F1 | {fmt(report['macro_f1'])} |",
             f"| ROC AUC (one-vs-rest, macro) | {fmt(report['roc_auc'])} |",
             f"| ECE (15 bins) | {fmt(report['ece'])} |"]
    if "ece_uncalibrated" in report:
        lines.append(f"| ECE before temperature scaling | {fmt(report['ece_uncalibrated'])} |")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for c, m in report["per_class"].items():
        lines.append(f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
    lines += ["", "Confusion matrix (rows: true, columns: predicted):", "",
              "| | " + " | ".join(report["classes"]) + " |",
              "|---" * (len(report["classes"]) + 1) + "|"]
    for c, row in zip(report["classes"], report["confusion_matrix"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    if "ci95" in report:
        lines += ["", "95% bootstrap intervals:", ""]
        lines += [f"- {k}: [{v[0]:.4f}, {v[1]:.4f}]" for k, v in report["ci95"].items()]
    return "\n".join(lines) + "\n"


def plot_confusion_matrix(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(report["confusion_matrix"])
    classes = report["classes"]
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5), dpi=110)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(f"accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate_model(model_dir: str | Path, data: str | Path, split: str | None = "test",
                   out_dir: str | Path | None = None, bootstrap: int = 1000, workers: int = 2,
                   records=None) -> dict:
    """Run a model package on a labelled dataset (labels.csv or folder-per-class) and report.

    ``split='all'`` (or a dataset without a split column) uses every row. The probabilities
    are the calibrated ones the app shows; ``ece_uncalibrated`` is given beside ``ece``.
    """
    from .calibration import probabilities
    from .data import load_dataset, preprocess_records
    from .inference import Predictor

    predictor = Predictor.from_path(model_dir)
    dataset = load_dataset(data, classes=predictor.classes)
    if records is None:
        records = dataset.split(None if split in (None, "all") else split)
    x, kept = preprocess_records(dataset, records, predictor.spec, workers=workers, on_error="skip")
    y = dataset.label_index([records[i] for i in kept])
    logits, _ = predictor.forward(x)
    probs = probabilities(logits, predictor.package.temperature)
    report = classification_report(y, probs, predictor.classes)
    report["ece_uncalibrated"] = expected_calibration_error(probabilities(logits, 1.0), y)
    report["unreadable"] = len(records) - len(kept)
    report["model"] = predictor.name
    report["split"] = split
    if bootstrap:
        report["ci95"] = bootstrap_ci(y, probs, predictor.classes, n_boot=bootstrap)
    if out_dir is not None:
        write_report(report, out_dir, title=f"{predictor.name} ({split or 'all'})")
    return report
