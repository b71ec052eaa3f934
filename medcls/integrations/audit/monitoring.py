"""What the audit trail says about the models in use: volume, drift and agreement with the
clinicians. The Monitoring page lays these tables out; they are computed here.

- answers per day, with the share withheld by the input gate (the scan did not look like
  the model's training data) and the share of low-confidence answers: both rising is the
  first sign that the scans have changed (a new scanner, sequence or population);
- agreement per model and predicted class: agree / (agree + disagree) over the answers with
  a verdict (``unsure`` is counted but not in the rate);
- the model-versus-clinician confusion matrix (the clinician's class is the model's when
  they agreed, their corrected class when they did not);
- the disagreements themselves, with the inputs' SHA-256, UID or server path;
- ``audit export``: the disagreements whose files are known, as a labels.csv for training.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from pathlib import Path
from typing import Sequence

import pandas as pd

from medcls.core.csvsafe import atomic_output, escape_cell
from medcls.integrations.audit.store import AuditStore

DISAGREEMENT_COLUMNS = ["answer_id", "at", "model_name", "model_version", "predicted",
                        "confidence", "corrected_class", "note", "verdict_user", "input_source",
                        "input_sha256", "sop_instance_uid", "input_path"]


def answers_frame(store: AuditStore, since: dt.datetime | None = None,
                  until: dt.datetime | None = None) -> pd.DataFrame:
    """Answers with their latest verdict, one row per answer."""
    rows = store.answers_with_verdicts(since, until)
    frame = pd.DataFrame.from_records(rows)
    if frame.empty:
        return frame
    frame["at"] = pd.to_datetime(frame["at"], utc=True)
    frame["day"] = frame["at"].dt.date
    frame["clinician_class"] = frame["predicted"].where(frame["verdict"] == "agree",
                                                        frame["corrected_class"])
    return frame


def per_day(frame: pd.DataFrame) -> pd.DataFrame:
    """day (as "YYYY-MM-DD" text: a chart's axis then shows whole days, never fractions of a
    second), answers, withheld share, low-confidence share."""
    if frame.empty:
        return pd.DataFrame(columns=["day", "answers", "withheld_share", "low_confidence_share"])
    g = frame.groupby("day")
    out = pd.DataFrame({"answers": g.size(),
                        "withheld_share": g["withheld"].mean().astype(float),
                        "low_confidence_share": g["low_confidence"].mean().astype(float)}
                       ).reset_index()
    out["day"] = out["day"].map(lambda d: d.isoformat())
    return out


def shown(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with the words the screen uses: ``answer`` (the class given by its human name,
    or "Withheld"), ``clinician_answer`` (the clinician's class by its name)."""
    from medcls.engine.present import class_name

    if frame.empty:
        return frame.assign(answer=[], clinician_answer=[])
    answer = [("Withheld" if w else class_name(None, p))
              for p, w in zip(frame["predicted"], frame["withheld"].astype(bool))]
    clinician = ["" if c is None or c != c else class_name(None, c) for c in frame["clinician_class"]]
    return frame.assign(answer=answer, clinician_answer=clinician)


def agreement(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model (name and version) and answer (the class given by its name, or "Withheld"):
    verdict counts and agreement rate."""
    cols = ["model", "answer", "answers", "verdicts", "agree", "disagree", "unsure",
            "agreement"]
    if frame.empty:
        return pd.DataFrame(columns=cols)
    f = shown(frame).assign(model=frame["model_name"] + " v" + frame["model_version"])
    out = []
    for (model, predicted), g in f.groupby(["model", "answer"], sort=True):
        counts = g["verdict"].value_counts()
        agree, disagree, unsure = (int(counts.get(v, 0)) for v in ("agree", "disagree", "unsure"))
        decided = agree + disagree
        out.append({"model": model, "answer": predicted, "answers": len(g),
                    "verdicts": agree + disagree + unsure, "agree": agree, "disagree": disagree,
                    "unsure": unsure, "agreement": agree / decided if decided else None})
    return pd.DataFrame(out, columns=cols)


def confusion(frame: pd.DataFrame, model_name: str) -> pd.DataFrame:
    """Rows: the model's class; columns: the clinician's class; over decided verdicts."""
    if frame.empty:
        return pd.DataFrame()
    f = shown(frame)
    f = f[(f["model_name"] == model_name) & f["clinician_class"].notna()]
    rows = sorted(set(f["answer"]))
    cols = sorted(set(f["clinician_answer"]))
    table = pd.crosstab(f["answer"], f["clinician_answer"]).reindex(
        index=sorted(set(rows) | set(cols)), columns=cols, fill_value=0)
    table.index.name, table.columns.name = "model", "clinician"
    return table


def disagreements(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(columns=DISAGREEMENT_COLUMNS)
    d = frame[frame["verdict"] == "disagree"].rename(columns={"id": "answer_id"})
    return d[DISAGREEMENT_COLUMNS].reset_index(drop=True)


def to_csv(table: pd.DataFrame) -> str:
    """A table as CSV text with every cell escaped."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([escape_cell(str(c)) for c in table.columns])
    for row in table.itertuples(index=False):
        w.writerow([escape_cell("" if v is None or (isinstance(v, float) and pd.isna(v)) else
                                v if isinstance(v, (int, float)) else str(v)) for v in row])
    return buf.getvalue()


def export_corrections(store: AuditStore, out_dir: str | Path, scan_root: str | Path,
                       since: dt.datetime | None = None, split: str = "train") -> dict:
    """Write the disagreements whose files are known as ``out_dir/labels.csv`` (columns
    ``file``, ``label``, ``split``, ``group``, ``source``) that :mod:`medcls.learning.data` reads: merge
    its rows into a dataset's labels.csv (they are ``split`` = train by default) and
    ``medcls train`` learns from the corrected cases.

    Server-folder inputs are linked into ``out_dir/files/`` (a symlink per file, so nothing
    is copied and the dataset folder is self-contained for :mod:`medcls.learning.data`); a file that
    no longer exists or whose bytes changed (SHA-256) is skipped. PACS inputs (SOP Instance
    UIDs) are listed in ``pacs.csv`` for retrieval; uploads cannot be found again.
    Returns counts.
    """
    out = Path(out_dir)
    root = Path(scan_root).resolve()
    frame = answers_frame(store, since)
    d = disagreements(frame) if not frame.empty else disagreements(pd.DataFrame())
    # one label per input: the latest disagreement about that file wins
    d = d.sort_values("answer_id")
    rows, pacs, skipped = {}, {}, {"upload": 0, "missing": 0, "changed": 0}
    for r in d.itertuples(index=False):
        if r.input_source == "server-folder" and isinstance(r.input_path, str):
            path = (root / r.input_path).resolve()
            if root not in path.parents or not path.is_file():
                skipped["missing"] += 1
                continue
            if isinstance(r.input_sha256, str) and _sha256(path) != r.input_sha256:
                skipped["changed"] += 1
                continue
            rows[r.input_path] = (path, r.corrected_class, r.input_sha256)
        elif r.input_source == "pacs" and isinstance(r.sop_instance_uid, str):
            pacs[r.sop_instance_uid] = r.corrected_class
        else:
            skipped["upload"] += 1
    out.mkdir(parents=True, exist_ok=True)
    files = out / "files"
    with atomic_output(out / "labels.csv", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "split", "group", "source"])
        for rel, (path, label, sha) in sorted(rows.items()):
            link = files / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(path)
            w.writerow([f"files/{rel}", label, split, sha or "", "audit"])
    if pacs:
        with atomic_output(out / "pacs.csv", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["sop_instance_uid_sha256", "label"])  # as the audit keys PACS rows
            for uid, label in sorted(pacs.items()):
                w.writerow([uid, label])
    return {"written": len(rows), "pacs": len(pacs), **{f"skipped_{k}": v for k, v in skipped.items()}}


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_since(text: str | None) -> dt.datetime | None:
    """``YYYY-MM-DD`` (UTC midnight) or an ISO time, for ``--since``."""
    if not text:
        return None
    value = dt.datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


__all__: Sequence[str] = ["answers_frame", "per_day", "agreement", "confusion", "disagreements",
                          "to_csv", "export_corrections", "parse_since"]
