"""Does it generalise? Every shipped model on every test set it can be asked about, per source:
the shortcut check (tumours called no tumour, normals called a tumour), calibration before and
after temperature scaling, and selective prediction (coverage and accuracy of the answered scans,
with the card's low-confidence threshold and input gate).

Test sets (fixed splits; nothing here is used for training or choosing):
- brain-mri: 595 slices, 4 classes (figshare tumours, Br35H normals)
- br35h-tumour: 217 Br35H slices with a tumour of unknown type (partial label)
- normal-ixi: 103 healthy subjects' axial T1 slices
- normal-ixi-levels: 57 axial T1 slices of 2 healthy IXI subjects from the skull base to the
  vertex (also by level: skull base and posterior fossa, mid-brain, vertex)
- volunteer-sagittal-t1: a healthy volunteer's 35-slice sagittal T1 DICOM series (test only)
- volunteer2-axial-flair / -axial-t2gre / -sagittal-t1: a second healthy adult's FLAIR, T2* and
  sagittal T1 series (30 / 30 / 29 slices, test only): per slice, and each series' own answer
  (medcls.engine.series: a healthy series must never read "tumour suspected")
- chest-xray: the chest model's official test split

    python -m bench.generalisation [--models models] [--attempt NAME --note TEXT]

``--attempt`` records the run under that name in the attempts list (the shipped models' rows
stay the headline); every attempt keeps the training command from its card.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import command, machine, parser, table, write

VOLUNTEER_SERIES = ("volunteer-sagittal-t1", "volunteer2-axial-flair", "volunteer2-axial-t2gre",
                    "volunteer2-sagittal-t1")
BRAIN_SETS = ("brain-mri", "br35h-tumour", "normal-ixi", "normal-ixi-levels") + VOLUNTEER_SERIES
LEVELS = {"skull base and posterior fossa": (0.0, 0.3), "mid-brain": (0.3, 0.7), "vertex": (0.7, 1.01)}
FIELDS = ("n", "accuracy", "macro_f1", "called_no_tumor", "called_tumour", "ece", "ece_uncalibrated", "ece_finding",
          "coverage", "answered_accuracy", "tumour_answers_unflagged")


def volunteer_series(data: Path, name: str, classes):
    """A volunteer's DICOM series as a one-source dataset of normal slices."""
    from medcls.learning.data import Dataset, Record

    folder = data / "dicom" / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in ("LICENSE", "SOURCE.md"))
    return Dataset(root=folder, classes=list(classes), name=name,
                   records=[Record(ref=p.name, label="no_tumor", split="test", source=name,
                                   root=folder) for p in files])


def series_answer(model_dir: Path, data: Path, name: str) -> dict:
    """The series' own answer (the rule of the series view, the PACS and the listener)."""
    from medcls.engine.inference import Predictor
    from medcls.engine.series import answer_series
    from medcls.io.gather import gather
    from medcls.io.sources import folder_sources

    study = gather(folder_sources(data / "dicom" / name))
    predictor = Predictor.from_path(model_dir)
    answer = answer_series(predictor, study.series[0])
    # each slice's own answer (the series view's; scope read from the slice's own tags, as the
    # main page does for a single file): a tumour class with no low-confidence, gate or scope flag
    negative = predictor.card.get("negative_class")
    preds = [s.prediction for s in answer.slices if s.prediction is not None]
    bare = sum(p.label != negative and not p.low_confidence and not p.outside_training_distribution
               for p in preds)
    return {"outcome": answer.summary.outcome.value, "summary": answer.summary.text,
            "slices": len(preds), "tumour_answers_without_any_flag": bare,
            "flagged_by_scope": sum(p.outside_scope for p in preds)}


def by_level(model_dir: Path, card: dict, data: Path) -> dict:
    """normal-ixi-levels' test slices called a tumour, by level band (labels.csv ``level``)."""
    import csv

    from medcls.engine.inference import Predictor

    predictor = Predictor.from_path(model_dir)
    root = data / "normal-ixi-levels"
    with open(root / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    out = {}
    for band, (lo, hi) in LEVELS.items():
        chosen = [r for r in rows if lo <= float(r["level"]) < hi]
        preds = [predictor.predict_file(root / r["file"]) for r in chosen]
        tumour = [p.label != card["negative_class"] for p in preds]
        out[band] = {"n": len(chosen), "called_tumour": sum(tumour) / max(1, len(chosen)),
                     "called_tumour_confidently": sum(t and not p.low_confidence
                                                      and not p.outside_training_distribution
                                                      for t, p in zip(tumour, preds)) / max(1, len(chosen))}
    return out


def evaluate_sets(model_dir: Path, card: dict, data: Path) -> dict:
    from medcls.learning.data import load_datasets
    from medcls.learning.evaluate import evaluate_model

    sets = {}
    names = BRAIN_SETS if card["task"] == "brain-mri" else (card["task"],)
    for name in names:
        if name in VOLUNTEER_SERIES:
            ds = volunteer_series(data, name, card["classes"])
        else:
            ds = load_datasets([data / name], classes=card["classes"])
        rep = evaluate_model(model_dir, ds, split="test", bootstrap=0)
        overall = rep["overall"]
        row = {k: overall.get(k) for k in FIELDS}
        row["accuracy"] = rep["accuracy"] if name in ("brain-mri", "chest-xray") else None
        row["macro_f1"] = rep["macro_f1"] if name in ("brain-mri", "chest-xray") else None
        row["by_source"] = {s: {k: r.get(k) for k in FIELDS} for s, r in rep["by_source"].items()}
        row["risk_coverage"] = rep["risk_coverage"]
        if name in VOLUNTEER_SERIES:
            row["series_answer"] = series_answer(model_dir, data, name)
        if name == "normal-ixi-levels":
            row["by_level"] = by_level(model_dir, card, data)
        sets[name] = row
    return sets


def main(argv=None):
    from medcls.models.package import list_packages

    p = parser(__doc__)
    p.add_argument("--attempt", help="record these models as an attempt with this name")
    p.add_argument("--note", default="", help="what the attempt changed")
    args = p.parse_args(argv)
    path = args.out / "generalisation.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    # an attempt keeps the headline's command: each attempt names its own training command
    result = {"command": old.get("command") if args.attempt and old else command(),
              "machine": machine(), "models": old.get("models", {}),
              "attempts": old.get("attempts", [])}
    for folder, card in list_packages(args.models):
        if card["task"] not in ("brain-mri", "chest-xray"):
            continue
        sets = evaluate_sets(folder, card, args.data)
        entry = {"model": card["name"], "version": card.get("version"),
                 "model_sha256": card.get("model_sha256"),
                 "training_command": card.get("training", {}).get("command"), "sets": sets}
        if args.attempt:
            result["attempts"] = [a for a in result["attempts"]
                                  if (a["attempt"], a["model"]) != (args.attempt, card["name"])]
            result["attempts"].append(entry | {"attempt": args.attempt, "note": args.note})
        else:
            result["models"][card["name"]] = entry
        print(card["name"], json.dumps({k: {f: v.get(f) for f in FIELDS} for k, v in sets.items()}), flush=True)
    write("generalisation", result, markdown(result), args.out)


def _rows(entries):
    rows = []
    for e in entries:
        for name, s in e["sets"].items():
            rows.append([e.get("attempt", e["model"]) if "attempt" in e else e["model"], name, s["n"],
                         s.get("accuracy"), s.get("macro_f1"), s.get("called_no_tumor"),
                         s.get("called_tumour"), s.get("ece_uncalibrated"), s.get("ece"),
                         s.get("ece_finding"), s.get("coverage"), s.get("answered_accuracy"), s.get("tumour_answers_unflagged")])
    return rows


HEADERS = ["model", "test set", "n", "accuracy", "macro-F1", "tumour called no_tumor",
           "normal called tumour", "ECE before T", "ECE", "ECE finding or none", "coverage", "answered accuracy",
           "tumour answers on normals, no confidence or gate flag (scope: below)"]


def markdown(result: dict) -> str:
    md = ["# Does it generalise? Per test set and source", "",
          "Tumour called no_tumor: share of slices with a tumour answered `no_tumor` (a missed tumour). "
          "Normal called tumour: share of normal slices answered with a tumour class. Coverage: share "
          "answered (confidence at or above the card's low-confidence threshold and inside the input "
          "gate); answered accuracy: correct among those (a Br35H tumour of unknown type is correct when "
          "any tumour class is called). ECE before T: before temperature scaling. ECE finding or none: "
          "calibration of the question every label answers (a tumour of unknown type included): "
          "the probability of no_tumor against its complement.", "",
          table(HEADERS, _rows(result["models"].values()))]
    by_src = []
    for e in result["models"].values():
        s = e["sets"].get("brain-mri")
        if s:
            for src, r in s["by_source"].items():
                by_src.append([e["model"], src, r["n"], r.get("accuracy"), r.get("called_no_tumor"),
                               r.get("called_tumour"), r.get("ece"), r.get("coverage"), r.get("answered_accuracy")])
    if by_src:
        md += ["", "brain-mri test split by source:", "",
               table(["model", "source", "n", "accuracy", "tumour called no_tumor", "normal called tumour",
                      "ECE", "coverage", "answered accuracy"], by_src)]
    series, levels = [], []
    for e in result["models"].values():
        for name, s in e["sets"].items():
            if s.get("series_answer"):
                a = s["series_answer"]
                series.append([e["model"], name, s["n"], a["outcome"], a.get("flagged_by_scope"),
                               a.get("tumour_answers_without_any_flag"), a["summary"]])
            for band, r in (s.get("by_level") or {}).items():
                levels.append([e["model"], band, r["n"], r["called_tumour"], r["called_tumour_confidently"]])
    if series:
        md += ["", "Each healthy volunteer series answered as a series (the rule of the series view, the "
               "PACS and the listener): it must never read \"tumour suspected\". Each slice alone, as the "
               "main page answers a file: slices whose scope (plane, sequence from their own tags) is not "
               "validated, and slices answered a tumour with no flag at all (confidence, input gate, scope).", "",
               table(["model", "series", "slices", "outcome", "slices outside scope",
                      "tumour answers with no flag", "summary"], series)]
    if levels:
        md += ["", "normal-ixi-levels test slices by level:", "",
               table(["model", "level", "n", "called a tumour", "called a tumour, confidently and unflagged"], levels)]
    if result["attempts"]:
        md += ["", "## Attempts (same test sets; each chosen on validation)", ""]
        for a in result["attempts"]:
            md.append(f"- **{a['attempt']}** ({a['model']}): {a['note']}  \n  `{a.get('training_command') or ''}`")
        md += ["", table(HEADERS, _rows(result["attempts"]))]
    md += ["", f"Command: `{result['command']}`"]
    return "\n".join(md)


if __name__ == "__main__":
    main()
