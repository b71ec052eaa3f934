"""Cells of exported tables (CSV worklists now, the audit export later), and the one way an
export file is written (:func:`atomic_output`: whole or not at all).

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` as a formula (and
some also after a leading tab or carriage return), so text from any source (file names,
DICOM attributes, error messages, class names) could call out to the network or run
commands when the export is opened (OWASP "CSV injection"). Every string cell goes through
:func:`escape_cell`; numbers are left alone, so ``-0.5`` stays a number.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping

from medcls.core.errors import OutputWriteError

#: First characters a spreadsheet treats as the start of a formula.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower().lstrip("+-") not in ("nan", "inf", "infinity")


def escape_cell(value: Any) -> Any:
    """``value`` made safe for a spreadsheet: a string that would start a formula (also after
    leading spaces) gets a leading apostrophe, which spreadsheets show as text; a string that is
    a plain number, and any non-string value, is returned unchanged."""
    if not isinstance(value, str):
        return value
    head = value.lstrip(" ")[:1]
    if (value[:1] in FORMULA_PREFIXES or head in FORMULA_PREFIXES) and not _is_number(value):
        return "'" + value
    return value


def escape_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Every cell of a record, keys (column names) included, through :func:`escape_cell`."""
    return {escape_cell(k): escape_cell(v) for k, v in row.items()}


def escape_header(names: Iterable[str]) -> list[str]:
    return [escape_cell(n) for n in names]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w", **open_args) -> Iterator[IO]:
    """Write ``path`` whole or not at all: the block writes a temporary file beside it, which
    replaces ``path`` (``os.replace``, atomic on one file system) only once it is complete and
    on disk. A failure leaves the old file (or none) and no temporary one; a full disk or any
    other write failure is an :class:`OutputWriteError` naming only the file's name::

        with atomic_output(out, newline="") as fh:
            csv.writer(fh).writerows(rows)
    """
    path = Path(path)
    if "b" not in mode:
        open_args.setdefault("encoding", "utf-8")
    fd, tmp = None, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        with os.fdopen(fd, mode, **open_args) as fh:
            fd = None
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OutputWriteError(_write_failure(path.name, exc)) from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _write_failure(name: str, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"The disk is full: {name} was not written (nothing partial was left). Free some space and run again."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{name} could not be written: its folder is not writable."
    if exc.errno == errno.ENOENT:
        return f"{name} could not be written: its folder does not exist."
    return f"{name} could not be written ({errno.errorcode.get(exc.errno or 0, 'I/O error')})."
