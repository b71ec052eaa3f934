"""The audit store on SQLite and on a real PostgreSQL 15 (started by the tests): schema and its
version check, writes and reads, concurrent writers, locked and read-only files, and the
monitoring tables and training export computed from it."""

from __future__ import annotations

import csv
import multiprocessing as mp
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from audit_helpers import CLASSES, answer, read_only_db, writer
from conftest import PROJECT_ROOT

from medcls.core.errors import AuditError, AuditSchemaError
from medcls.integrations.audit import store as audit
from medcls.integrations.audit.store import AuditStore
from medcls.io.dicom_tags import IDENTIFYING_ATTRIBUTES

# ----------------------------------------------------------------------------- schema

def test_schema_is_created_on_first_use_with_its_version(audit_url):
    store = AuditStore(audit_url)
    store.record_answer(answer())
    engine = store.engine
    names = set(sa.inspect(engine).get_table_names())
    assert {"answers", "exports", "verdicts", "audit_schema"} <= names
    assert store.rows("audit_schema")[0]["version"] == audit.SCHEMA_VERSION
    if engine.dialect.name == "sqlite":
        with engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.dispose()


def test_no_column_can_hold_a_patient_identifier():
    """The schema has no place for patient data: no column named after an identifying DICOM
    attribute, none about patients, names of people, births or study dates."""
    ident = {re.sub(r"(?<!^)(?=[A-Z])", "_", a).lower() for a in IDENTIFYING_ATTRIBUTES}
    allowed_uid = {"sop_instance_uid"}  # PACS inputs are known by their instance UID only
    for table in audit.metadata.tables.values():
        for col in table.columns:
            name = col.name.lower()
            assert name in allowed_uid or name not in ident, (table.name, name)
            assert not any(w in name for w in ("patient", "birth", "accession", "study",
                                               "physician", "institution")), (table.name, name)


def test_a_newer_schema_is_refused_and_not_written(audit_url):
    store = AuditStore(audit_url)
    store.record_answer(answer())
    with store.engine.begin() as c:
        c.execute(sa.update(audit.schema_info).values(version=audit.SCHEMA_VERSION + 1))
    store.dispose()
    newer = AuditStore(audit_url)
    with pytest.raises(AuditSchemaError,
                       match=f"schema version {audit.SCHEMA_VERSION + 1}, newer than"):
        newer.record_answer(answer(1))
    with newer.engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(audit.answers)).scalar() == 1
    newer.dispose()


def test_a_version_1_database_is_migrated_and_keeps_its_rows(audit_url):
    """A trail written by schema 1 (before the region columns) gets the new columns on first
    use by this version; its rows stay, new answers carry the region."""
    store = AuditStore(audit_url)
    store.record_answer(answer())
    with store.engine.begin() as c:  # back to what schema 1 wrote
        for _, table, name in audit.ADDED_COLUMNS:
            c.exec_driver_sql(f'ALTER TABLE {table} DROP COLUMN "{name}"')
        c.execute(sa.update(audit.schema_info).values(version=1))
    store.dispose()
    again = AuditStore(audit_url)
    aid = again.record_answer(answer(1, region_method="segmentation", region_area_mm2=120.5,
                                     region_diameter_mm=14.0, series_outcome="suspected"))
    rows = {r["id"]: r for r in again.rows("answers")}
    assert len(rows) == 2 and again.rows("audit_schema")[0]["version"] == audit.SCHEMA_VERSION == 3
    assert (rows[aid]["region_method"], rows[aid]["region_area_mm2"],
            rows[aid]["region_diameter_mm"], rows[aid]["series_outcome"]) == (
        "segmentation", 120.5, 14.0, "suspected")
    assert min(rows) != aid and rows[min(rows)]["region_method"] is None
    again.dispose()


# ----------------------------------------------------------------------------- writes and reads

def test_answers_verdicts_and_exports_round_trip(audit_url):
    store = AuditStore(audit_url)
    a = answer(7, "meningioma", low_confidence=True, frame=2, input_source="server-folder",
               input_path="study/x.dcm")
    aid = store.record_answer(a)
    pacs = store.record_answer(answer(8, input_source="pacs", input_sha256=None,
                                      sop_instance_uid="1.2.826.0.1.3680043.8.498.1"))
    store.record_verdict(aid, "clin0@hospital.test", "unsure", note="motion")
    store.record_verdict(aid, "clin1@hospital.test", "disagree", "glioma", "  enhancing rim  ")
    store.record_verdict(pacs, "clin1@hospital.test", "agree")
    store.record_export("clin0@hospital.test", "main", "report-pdf", aid)
    store.record_export("rev@hospital.test", "pacs", "pacs-send", pacs, target="1.2.3.4")

    rows = {r["id"]: r for r in store.answers_with_verdicts()}
    got = rows[aid]
    for k in ("user", "page", "model_name", "model_version", "model_sha256", "predicted",
              "probabilities", "low_confidence", "withheld", "input_sha256", "input_path",
              "input_source", "frame", "heatmap_method"):
        assert got[k] == getattr(a, k), k
    assert got["confidence"] == pytest.approx(0.7)
    # the latest verdict counts, the earlier one stays in the trail
    assert (got["verdict"], got["corrected_class"], got["note"]) == ("disagree", "glioma", "enhancing rim")
    assert len(store.rows("verdicts")) == 3
    assert rows[pacs]["sop_instance_uid"] == "1.2.826.0.1.3680043.8.498.1"
    assert rows[pacs]["verdict"] == "agree" and rows[pacs]["corrected_class"] is None
    kinds = [(e["kind"], e["answer_id"], e["target"]) for e in store.rows("exports")]
    assert kinds == [("report-pdf", aid, None), ("pacs-send", pacs, "1.2.3.4")]
    store.dispose()


def test_verdicts_are_checked(audit_url):
    store = AuditStore(audit_url)
    aid = store.record_answer(answer())
    with pytest.raises(AuditError, match="needs the class"):
        store.record_verdict(aid, "u@h.test", "disagree")
    with pytest.raises(AuditError, match="the one the model gave"):
        store.record_verdict(aid, "u@h.test", "disagree", "glioma")
    with pytest.raises(AuditError, match="not in the audit trail"):
        store.record_verdict(aid + 1000, "u@h.test", "agree")
    assert store.rows("verdicts") == []
    store.dispose()


def test_eight_concurrent_writers_lose_no_row(audit_url):
    """8 processes start on an empty database at once (schema creation races included) and
    write 25 answers and 25 verdicts each."""
    n = 25
    with mp.get_context("spawn").Pool(8) as pool:
        ids = pool.map(writer, [(audit_url, w, n) for w in range(8)])
    flat = [i for part in ids for i in part]
    assert len(flat) == len(set(flat)) == 8 * n
    store = AuditStore(audit_url)
    rows = store.answers_with_verdicts()
    assert len(rows) == 8 * n and len(store.rows("verdicts")) == 8 * n
    assert {r["input_sha256"] for r in rows} == {f"{w * 1000 + i:064x}" for w in range(8) for i in range(n)}
    assert all(r["verdict"] in ("agree", "disagree") for r in rows)
    store.dispose()


def test_eight_threads_share_one_store(audit_url):
    from concurrent.futures import ThreadPoolExecutor

    store = AuditStore(audit_url)
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: store.record_answer(answer(i)), range(80)))
    assert len(set(ids)) == 80 and len(store.rows("answers")) == 80
    store.dispose()


# ----------------------------------------------------------------------------- failures

def test_a_locked_sqlite_file_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "BUSY_TIMEOUT_S", 0.3)
    path = tmp_path / "audit.sqlite"
    AuditStore(f"sqlite:///{path}").record_answer(answer())
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the write lock
    try:
        store = AuditStore(f"sqlite:///{path}")
        with pytest.raises(AuditError, match="is locked by another program") as err:
            store.record_answer(answer(1))
        assert "INSERT" not in str(err.value) and "answer is shown" in str(err.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert len(store.rows("answers")) == 1
    store.record_answer(answer(2))  # the lock is gone: writing works again
    store.dispose()


def test_a_read_only_sqlite_file_gives_a_clear_error(tmp_path):
    url, undo = read_only_db(tmp_path)
    try:
        store = AuditStore(url)
        with pytest.raises(AuditError, match="read-only|cannot be opened") as err:
            store.record_answer(answer(1))
        assert "answer is shown" in str(err.value)
        store.dispose()
    finally:
        undo()


def test_an_unreachable_postgresql_gives_a_clear_error():
    from appserver import free_port

    store = AuditStore(f"postgresql://medcls@127.0.0.1:{free_port()}/medcls")
    with pytest.raises(AuditError, match="cannot be reached"):
        store.record_answer(answer())


# ----------------------------------------------------------------------------- monitoring and export

def test_monitoring_tables(audit_url):
    from medcls.integrations.audit import monitoring as mon

    store = AuditStore(audit_url)
    ids = store.record_answers([answer(0, "glioma"), answer(1, "glioma", withheld=True),
                                answer(2, "meningioma", low_confidence=True),
                                answer(3, "pituitary"), answer(4, "glioma")])
    store.record_verdict(ids[0], "c@h.test", "agree")
    store.record_verdict(ids[1], "c@h.test", "disagree", "meningioma")
    store.record_verdict(ids[2], "c@h.test", "disagree", "pituitary",
                         note="=cmd|' /C calc'!A0")
    store.record_verdict(ids[3], "c@h.test", "unsure")
    frame = mon.answers_frame(store)
    day = mon.per_day(frame)
    assert day["answers"].sum() == 5
    assert day["withheld_share"].iloc[-1] == pytest.approx(1 / 5)
    assert day["low_confidence_share"].iloc[-1] == pytest.approx(1 / 5)
    assert day["day"].iloc[-1] == frame["at"].iloc[-1].date().isoformat()  # whole days on the axis
    # answers by the names the screen uses; a withheld answer is "Withheld", never its top class
    agr = mon.agreement(frame).set_index("answer")
    assert agr.loc["Glioma", ["answers", "agree", "disagree"]].tolist() == [2, 1, 0]
    assert agr.loc["Glioma", "agreement"] == pytest.approx(1.0)
    assert agr.loc["Withheld", ["answers", "disagree"]].tolist() == [1, 1]
    assert agr.loc["Pituitary", "unsure"] == 1 and pd.isna(agr.loc["Pituitary", "agreement"])
    m = mon.confusion(frame, "brain-mri-default")
    assert m.loc["Glioma", "Glioma"] == 1 and m.loc["Withheld", "Meningioma"] == 1
    assert m.loc["Meningioma", "Pituitary"] == 1 and m.values.sum() == 3
    dis = mon.disagreements(frame)
    assert sorted(dis["answer_id"]) == sorted(ids[1:3])
    text = mon.to_csv(dis)
    cells = [c for row in csv.reader(text.splitlines()) for c in row]
    assert "'=cmd|' /C calc'!A0" in cells  # the note cannot run as a formula
    assert not any(c[:1] in "=+-@" for c in cells if c)
    store.dispose()


def test_export_round_trips_into_a_training_dataset(tmp_path, data_dir):
    """Disagreements on server-folder files become a labels.csv that medcls.learning.data reads, alone
    and beside a reference dataset as `medcls train --data REF EXPORT` reads them; the scans
    load; uploads, changed and vanished files are left out."""
    from medcls.io.load import load_scan
    from medcls.learning.data import load_dataset, load_datasets

    root = tmp_path / "scans"
    (root / "ward").mkdir(parents=True)
    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        picks = [r for r in csv.DictReader(fh) if r["split"] == "test"][:4]
    paths = []
    for r in picks:
        dst = root / "ward" / Path(r["file"]).name
        shutil.copy(data_dir / "brain-mri" / r["file"], dst)
        paths.append(dst)
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.sqlite'}")
    ids = []
    for i, p in enumerate(paths):
        scan = load_scan(p)
        ids.append(store.record_answer(answer(i, "glioma" if i else "meningioma",
                                              input_source="server-folder", input_sha256=scan.sha256,
                                              input_path=str(p.relative_to(root)))))
    upload = store.record_answer(answer(9, "glioma"))
    corrected = ["pituitary", "no_tumor", "meningioma", "pituitary"]
    for aid, label in zip(ids + [upload], corrected + ["pituitary"]):
        store.record_verdict(aid, "rev@hospital.test", "disagree", label)
    paths[2].write_bytes(paths[2].read_bytes() + b"x")  # changed since it was answered
    paths[3].unlink()  # gone

    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "medcls", "audit", "export",
                        "--since", "2000-01-01", "--out", str(out), "--scan-root", str(root),
                        "--database-url", store.url], capture_output=True, text=True,
                       cwd=PROJECT_ROOT)
    assert r.returncode == 0, r.stderr
    assert "2 corrected server-folder cases" in r.stdout
    assert "1 uploads" in r.stdout and "1 missing" in r.stdout and "1 changed" in r.stdout
    ds = load_dataset(out)
    assert sorted((Path(x.ref).name, x.label, x.split) for x in ds.records) == sorted(
        [(paths[0].name, "pituitary", "train"), (paths[1].name, "no_tumor", "train")])
    for rec in ds.records:
        assert ds.scan(rec).sha256 == rec.group  # the very bytes the clinician judged
    # `medcls train --data REFERENCE EXPORT` reads both as one dataset
    both = load_datasets([data_dir / "brain-mri", out])
    audit_rows = [x for x in both.records if x.source == "audit"]
    assert len(audit_rows) == 2 and all(x.split == "train" for x in audit_rows)
    assert set(both.classes) == set(CLASSES)
    assert all(both.scan(x).sha256 == x.group for x in audit_rows)
    # a later --since leaves them out
    later = tmp_path / "later"
    r = subprocess.run([sys.executable, "-m", "medcls", "audit", "export", "--since",
                        "2999-01-01", "--out", str(later), "--scan-root", str(root),
                        "--database-url", store.url], capture_output=True, text=True)
    assert r.returncode == 0 and "0 corrected" in r.stdout
    store.dispose()
