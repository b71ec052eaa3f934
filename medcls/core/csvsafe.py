"""Cells of exported tables (CSV worklists now, the audit export later).

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` as a formula (and
some also after a leading tab or carriage return), so text from any source (file names,
DICOM attributes, error messages, class names) could call out to the network or run
commands when the export is opened (OWASP "CSV injection"). Every string cell goes through
:func:`escape_cell`; numbers are left alone, so ``-0.5`` stays a number.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

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
