"""The spool: the instances of each incoming series on disk until it is answered, in one folder
only its owner may read, under a size budget.

The folder and everything in it is created for the owner alone (folders 0700, files 0600),
whatever the process's umask; a spool folder found open to others is closed (0700) before
anything is written, and one that belongs to another user or is not a folder is refused. Files
are named by a hash of their UIDs, never by a UID or anything a file holds. An instance is
written to a temporary name and renamed once complete, so a crash never leaves half a file
that counts as an instance. Room is reserved before writing: an instance that would take the
spool over its budget is refused (the receiver answers the sender "out of resources").

The built results of a series (the SR and the Secondary Capture) are kept beside it until they
are in the PACS, so a restart sends exactly the objects that were built, never new ones.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Iterable, Iterator

from medcls.core.errors import ListenerError

SERIES_DIR, RESULTS_DIR = "series", "results"
PART = ".part"


def key_of(uid: str) -> str:
    """A file or folder name for a UID (24 hex digits of its SHA-256): no UID on disk."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:24]


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


class Spool:
    """Series folders under ``root`` and the bytes they hold, within ``budget_bytes``.
    Thread-safe: the receiver's association threads write while the worker reads and
    removes."""

    def __init__(self, root: str | Path, budget_bytes: int):
        self.root = Path(root)
        self.budget = int(budget_bytes)
        self._lock = threading.Lock()
        self._check_root()
        for sub in (SERIES_DIR, RESULTS_DIR):
            _private_dir(self.root / sub)
        self.used = self._measure()

    def __repr__(self) -> str:
        return f"Spool({self.used}/{self.budget} bytes)"

    def _check_root(self) -> None:
        if self.root.exists():
            if not self.root.is_dir() or self.root.is_symlink():
                raise ListenerError("The listener's spool folder is not a folder; choose another "
                                    "spool_dir in the [listener] settings.")
            if self.root.stat().st_uid != os.getuid():
                raise ListenerError("The listener's spool folder belongs to another user; "
                                    "choose another spool_dir in the [listener] settings.")
            if stat.S_IMODE(self.root.stat().st_mode) & 0o077:
                # made by hand, or by an older tool: close it before anything is written into it
                os.chmod(self.root, 0o700)
        else:
            _private_dir(self.root)

    def _measure(self) -> int:
        """Bytes in the spool now; half-written files of a crash are removed."""
        total = 0
        for path in self.root.rglob("*"):
            if path.is_file():
                if path.name.endswith(PART):
                    path.unlink(missing_ok=True)
                    continue
                total += path.stat().st_size
        return total

    # ------------------------------------------------------------------ instances
    def series_dir(self, series_uid: str) -> Path:
        return self.root / SERIES_DIR / key_of(series_uid)

    def has_room(self, size: int) -> bool:
        with self._lock:
            return self.used + size <= self.budget

    def write(self, series_uid: str, sop_uid: str, data: bytes) -> bool:
        """Write one instance (its Part 10 bytes). False when it would not fit the budget
        (nothing is written). Writing the same instance twice keeps one copy."""
        folder = _private_dir(self.series_dir(series_uid))
        path = folder / f"{key_of(sop_uid)}.dcm"
        with self._lock:
            old = path.stat().st_size if path.exists() else 0
            if self.used - old + len(data) > self.budget:
                return False
            self.used += len(data) - old
        tmp = path.with_name(path.name + PART)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError:
            with self._lock:
                self.used -= len(data) - old
            tmp.unlink(missing_ok=True)
            raise
        return True

    def files(self, series_uid: str) -> list[Path]:
        folder = self.series_dir(series_uid)
        return sorted(folder.glob("*.dcm")) if folder.is_dir() else []

    def read_all(self, series_uid: str) -> Iterator[bytes]:
        for path in self.files(series_uid):
            yield path.read_bytes()

    def remove(self, series_uid: str) -> None:
        """Forget a series' instances (answered, sent, or not answered)."""
        self._remove_tree(self.series_dir(series_uid))

    def _remove_tree(self, folder: Path) -> None:
        if not folder.is_dir():
            return
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        with self._lock:
            self.used = max(0, self.used - size)

    # ------------------------------------------------------------------ built results
    def results_dir(self, job_id: int) -> Path:
        return self.root / RESULTS_DIR / str(int(job_id))

    def save_results(self, job_id: int, datasets: Iterable) -> None:
        """Keep the built SR and captures of a job until they are in the PACS (written even
        over the budget: an answer is never lost for lack of room; counted in the spool's use)."""
        folder = self.results_dir(job_id)
        self._remove_tree(folder)
        _private_dir(folder)
        for i, ds in enumerate(datasets):
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            data = buf.getvalue()
            path = folder / f"{i:03d}.dcm"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            with self._lock:
                self.used += len(data)

    def load_results(self, job_id: int) -> list:
        import pydicom

        folder = self.results_dir(job_id)
        return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))] if folder.is_dir() else []

    def remove_results(self, job_id: int) -> None:
        self._remove_tree(self.results_dir(job_id))
