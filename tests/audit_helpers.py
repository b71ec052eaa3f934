"""Audit-test helpers, importable by the writer processes the concurrency test spawns (kept
light: the children import only this and medcls.integrations.audit.store)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

from medcls.integrations.audit.store import Answer, AuditStore

CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")


def answer(i: int = 0, predicted: str = "glioma", **kw) -> Answer:
    probs = dict.fromkeys(CLASSES, 0.1)
    probs[predicted] = 0.7
    fields = dict(user=f"clin{i % 3}@hospital.test", page="main", model_name="brain-mri-default",
                  model_version="1.0.0", model_sha256="a" * 64, predicted=predicted,
                  confidence=0.7, probabilities=probs, low_confidence=False, withheld=False,
                  input_sha256=f"{i:064x}", heatmap_method="gradcam", task="brain-mri")
    return Answer(**{**fields, **kw})


def writer(args) -> list[int]:
    """One writer process: its own store (engine, connections), answers and verdicts."""
    url, worker, n = args
    store = AuditStore(url)
    ids = []
    for i in range(n):
        aid = store.record_answer(answer(worker * 1000 + i, CLASSES[i % 4]))
        store.record_verdict(aid, f"w{worker}@hospital.test",
                             "agree" if i % 2 else "disagree", None if i % 2 else CLASSES[(i + 1) % 4])
        ids.append(aid)
    store.dispose()
    return ids


def make_read_only(path: Path):
    """Make a file and its folder read-only, also for root (immutable attribute); yields the
    undo function, or skips when this machine allows neither."""
    for p in (path, path.parent):
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    if os.access(path, os.W_OK):  # root ignores modes: use the immutable attribute
        done = []
        for p in (path, path.parent):
            if subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode == 0:
                done.append(p)
        if len(done) < 2:
            for p in done:
                subprocess.run(["chattr", "-i", str(p)])
            import pytest

            pytest.skip("cannot make a file read-only here (root without chattr)")

    def undo():
        for p in (path, path.parent):
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return undo


def read_only_db(tmp_path) -> tuple[str, callable]:
    """A checkpointed audit database file (no -wal/-shm) made read-only."""
    folder = tmp_path / "ro"
    folder.mkdir()
    url = f"sqlite:///{folder / 'audit.sqlite'}"
    store = AuditStore(url)
    store.record_answer(answer())
    store.dispose()
    with sqlite3.connect(folder / "audit.sqlite") as c:
        c.execute("PRAGMA journal_mode=DELETE")
    return url, make_read_only(folder / "audit.sqlite")
