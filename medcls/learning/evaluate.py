"""Evaluation: accuracy, per-class precision/recall/F1, macro-F1, confusion matrix, one-vs-rest
ROC AUC and calibration error, from scikit-learn; bootstrap confidence intervals; report files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from medcls.models.calibration import expected_calibration_error


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
    if report.get("by_source"):
        lines += ["", "By source (partial-label rows count for tumour-vs-none only; answered = "
                  "confident and inside the input gate):", "",
                  "| source | n | accuracy | macro-F1 | tumour called no-tumour | no-tumour called tumour "
                  "| ECE | coverage | answered accuracy |", "|---|---|---|---|---|---|---|---|---|"]
        for src, r in report["by_source"].items():
            lines.append(f"| {src} | {r['n']} | {fmt(r.get('accuracy'))} | {fmt(r.get('macro_f1'))} | "
                         f"{fmt(r.get('called_no_tumor'))} | {fmt(r.get('called_tumour'))} | "
                         f"{fmt(r.get('ece'))} | {fmt(r.get('coverage'))} | {fmt(r.get('answered_accuracy'))} |")
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


def source_report(targets: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                  negative: str | None, low_confidence_threshold: float | None = None,
                  outside: np.ndarray | None = None, probs_uncalibrated: np.ndarray | None = None) -> dict:
    """Figures of one source (or any set of rows), partial labels included.

    ``targets`` (N, K) are label sets (:meth:`medcls.learning.data.Dataset.targets`). Single-label rows
    give the K-class accuracy and macro-F1; every row counts for tumour-vs-none (the shortcut
    check): ``called_negative`` is the share of rows with a finding (tumour) called the negative
    class, ``called_positive`` the share of negative rows called a finding. A row is *correct*
    when the predicted class is one its label allows; ECE and selective figures use that."""
    targets = np.asarray(targets)
    probs = np.asarray(probs, np.float64)
    pred = probs.argmax(1)
    correct = targets[np.arange(len(pred)), pred] > 0
    single = targets.sum(1) == 1
    out: dict = {"n": int(len(pred))}
    if single.any():
        y = targets[single].argmax(1)
        labels = list(range(len(classes)))
        out["n_single_label"] = int(single.sum())
        out["accuracy"] = float(accuracy_score(y, pred[single]))
        present = sorted(set(y.tolist()))
        out["macro_f1"] = (float(f1_score(y, pred[single], labels=present, average="macro", zero_division=0))
                           if len(present) > 1 else None)
        out["confusion_matrix"] = confusion_matrix(y, pred[single], labels=labels).tolist()
    if negative is not None:
        k = list(classes).index(negative)
        positive_rows = targets[:, k] == 0
        called_negative = pred == k
        out["n_tumour"], out["n_no_tumour"] = int(positive_rows.sum()), int((~positive_rows).sum())
        out["called_no_tumor"] = float(called_negative[positive_rows].mean()) if positive_rows.any() else None
        out["called_tumour"] = float((~called_negative)[~positive_rows].mean()) if (~positive_rows).any() else None
        # the one question every row's label answers (also "tumour, type unknown"): finding or
        # none, forecast by the probability mass on either side; top-label ECE scores a type
        # that such a label cannot confirm
        p_none = probs[:, k]
        says_none = p_none >= 0.5
        out["ece_finding"] = _top_label_ece(np.stack([p_none, 1.0 - p_none], 1),
                                            says_none == ~positive_rows)
    out["ece"] = _top_label_ece(probs, correct)
    if probs_uncalibrated is not None:
        out["ece_uncalibrated"] = _top_label_ece(np.asarray(probs_uncalibrated),
                                                 targets[np.arange(len(pred)), np.asarray(probs_uncalibrated).argmax(1)] > 0)
    if low_confidence_threshold is not None:
        conf = probs.max(1)
        answered = conf >= low_confidence_threshold
        if outside is not None:
            answered &= ~np.asarray(outside, bool)
        out["coverage"] = float(answered.mean())
        out["answered_accuracy"] = float(correct[answered].mean()) if answered.any() else None
        out["flagged_low_confidence"] = float((conf < low_confidence_threshold).mean())
        if outside is not None:
            out["flagged_outside"] = float(np.mean(outside))
        if negative is not None:
            k = list(classes).index(negative)
            wrong_tumour = (targets[:, k] > 0) & (pred != k)
            out["tumour_answers_unflagged"] = int((wrong_tumour & answered).sum())
    return out


def _top_label_ece(probs: np.ndarray, correct: np.ndarray) -> float:
    """Top-label ECE where correctness is given (a partial label is right when its set holds
    the prediction)."""
    return expected_calibration_error(probs, None, correct=correct)


def risk_coverage(probs: np.ndarray, correct: np.ndarray, steps: int = 20) -> list[dict]:
    """Accuracy among the answered scans as the confidence threshold rises (the risk-coverage
    curve of selective prediction)."""
    conf = np.asarray(probs).max(1)
    correct = np.asarray(correct, bool)
    out = []
    for q in np.linspace(0.0, 0.95, steps):
        t = float(np.quantile(conf, q))
        a = conf >= t
        out.append({"threshold": t, "coverage": float(a.mean()),
                    "accuracy": float(correct[a].mean()) if a.any() else None})
    return out


def record_planes(dataset, records) -> list[str | None]:
    """Each record's slice plane where its file is a DICOM with an orientation (header only)."""
    import pydicom

    from medcls.io.geometry import plane_of_normal, slice_normal

    planes = []
    for r in records:
        path = dataset.path(r)
        plane = None
        try:
            with open(path, "rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                plane = plane_of_normal(slice_normal(ds.get("ImageOrientationPatient")))[0]
        except (OSError, AttributeError, TypeError, ValueError, pydicom.errors.InvalidDicomError):
            plane = None
        planes.append(plane)
    return planes


def evaluate_model(model_dir: str | Path, data, split: str | None = "test",
                   out_dir: str | Path | None = None, bootstrap: int = 1000, workers: int = 2,
                   records=None) -> dict:
    """Run a model package on labelled data (one folder or several; labels.csv or
    folder-per-class) and report.

    ``split='all'`` (or a dataset without a split column) uses every row. The probabilities
    are the calibrated ones the app shows; ``ece_uncalibrated`` is given beside ``ece``.
    Single-label rows give the K-class figures; ``by_source`` gives each source's figures,
    partial labels included (:func:`source_report`: the shortcut check and selective
    prediction with the card's low-confidence threshold and input gate).
    """
    from medcls.engine.inference import Predictor
    from medcls.learning.data import Dataset, load_datasets, preprocess_records
    from medcls.models.calibration import probabilities

    predictor = Predictor.from_path(model_dir)
    if isinstance(data, Dataset):
        dataset = data
    else:
        folders = [data] if isinstance(data, (str, Path)) else list(data)
        dataset = load_datasets(folders, classes=list(predictor.classes))
    if records is None:
        records = dataset.split(None if split in (None, "all") else split)
    x, kept = preprocess_records(dataset, records, predictor.spec, workers=workers, on_error="skip")
    kept_records = [records[i] for i in kept]
    targets = dataset.targets(kept_records)
    logits, emb = predictor.forward(x)
    probs = probabilities(logits, predictor.package.temperature, predictor.package.class_bias)
    raw = probabilities(logits, 1.0)
    single = targets.sum(1) == 1
    y = targets[single].argmax(1)
    if single.any():
        report = classification_report(y, probs[single], predictor.classes)
        report["ece_uncalibrated"] = expected_calibration_error(raw[single], y)
    else:  # only partial labels (tumours of unknown type): the by-source figures say it all
        report = {"n": 0, "accuracy": None, "macro_f1": None, "roc_auc": None, "ece": None,
                  "classes": list(predictor.classes)}
    report["unreadable"] = len(records) - len(kept)
    report["model"] = predictor.name
    report["split"] = split
    gate = predictor.package.gate
    outside = gate.is_outside(emb) if gate is not None else np.zeros(len(probs), bool)
    validated = (predictor.card.get("scope") or {}).get("validated_planes")
    if validated:  # the card's scope: DICOM slices in planes never validated are withheld too
        planes = record_planes(dataset, kept_records)
        outside = outside | np.array([p is not None and p not in validated for p in planes])
    low = float(predictor.card["low_confidence_threshold"])
    negative = predictor.card.get("negative_class") or dataset.negative_class
    sources = sorted({r.source or "" for r in kept_records})
    report["by_source"] = {}
    for src in sources:
        idx = np.array([i for i, r in enumerate(kept_records) if (r.source or "") == src])
        report["by_source"][src] = source_report(
            targets[idx], probs[idx], predictor.classes, negative, low,
            None if outside is None else outside[idx], raw[idx])
    report["overall"] = source_report(targets, probs, predictor.classes, negative, low, outside, raw)
    correct = targets[np.arange(len(probs)), probs.argmax(1)] > 0
    report["risk_coverage"] = risk_coverage(probs, correct)
    if bootstrap and single.any():
        report["ci95"] = bootstrap_ci(y, probs[single], predictor.classes, n_boot=bootstrap)
    if out_dir is not None:
        write_report(report, out_dir, title=f"{predictor.name} ({split or 'all'})")
    return report
