"""The signed worklist summary (PDF): every scan of a batch review as the screen says it (its
:class:`~medcls.engine.reading.Reading`: class, probability and state, or "Withheld" and why),
the counts of the class tiles, the answering model's identity, the date and the user who made
it. Its SHA-256 (:func:`signed_summary`) is what the audit trail records as the signature.

No file names (they may hold a patient's name) and no patient tags: a scan is named by its row
number and the SHA-256 of its bytes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence

from medcls.engine.present import class_name
from medcls.engine.reading import Reading, tally

ROWS_PER_PAGE = 44
DISCLAIMER = ("Research tool - not a diagnosis. Every answer must be reviewed by a qualified "
              "clinician.")


@dataclass(frozen=True)
class SignedSummary:
    pdf: bytes
    sha256: str  # of the PDF's bytes: recorded in the audit trail with the user's name
    n_rows: int


def summary_lines(readings: Sequence[Reading], hashes: Sequence[str | None], card: Mapping,
                  user: str, when: _dt.datetime, origin: str = "") -> tuple[list[str], list[str]]:
    """(head, rows): the summary's heading lines and one line per scan, in worklist order."""
    t = tally(readings, card["classes"])
    counts = ", ".join(f"{class_name(card, c)} {n}" for c, n in t["per_class"].items())
    head = [
        f"Signed by: {user}    Date: {when.strftime('%Y-%m-%d %H:%M %Z').strip()}",
        f"Model: {card['name']} v{card['version']}, model SHA-256 {card.get('model_sha256', '?')}",
        f"Worklist: {origin or 'batch review'}; {t['total']} scans",
        f"Answers: {counts}; withheld {t['withheld']}; unreadable {t['unreadable']} "
        f"(uncertain among the answers: {t['uncertain']})",
    ]
    rows = []
    for i, (r, h) in enumerate(zip(readings, hashes)):
        said = r.headline if r.withheld else f"{r.name} · {r.probability_text} · {r.state}"
        rows.append(f"{i + 1:>4}  {(h or '-')[:16]:<16}  {said}")
    return head, rows


def render_summary(head: Sequence[str], rows: Sequence[str]) -> bytes:
    """The summary as PDF bytes (A4 pages of at most :data:`ROWS_PER_PAGE` rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    buf = io.BytesIO()
    pages = [rows[i:i + ROWS_PER_PAGE] for i in range(0, len(rows), ROWS_PER_PAGE)] or [[]]
    with matplotlib.rc_context({"pdf.fonttype": 42}), PdfPages(buf, metadata={
            "Title": "MedCLS worklist summary", "Creator": "MedCLS"}) as pdf:
        for n, chunk in enumerate(pages):
            fig = plt.figure(figsize=(8.27, 11.69), dpi=100)
            fig.text(0.05, 0.965, "MedCLS worklist summary", fontsize=15, fontweight="bold", va="top")
            y = 0.935
            if n == 0:
                for line in head:
                    fig.text(0.05, y, textwrap.fill(line, 100), fontsize=8.5, va="top")
                    y -= 0.018 * (1 + len(line) // 100)
                y -= 0.01
            fig.text(0.05, y, f"{'row':>4}  {'input SHA-256':<16}  answer", fontsize=7.5,
                     family="monospace", fontweight="bold", va="top")
            y -= 0.017
            for line in chunk:
                fig.text(0.05, y, line[:118], fontsize=7.5, family="monospace", va="top")
                y -= 0.0175
            fig.text(0.05, 0.045, DISCLAIMER + " The SHA-256 of this file is recorded in the audit "
                     "trail with the signer's name.", fontsize=7.5, color="#b00000", wrap=True)
            fig.text(0.95, 0.02, f"page {n + 1} of {len(pages)}", fontsize=7, ha="right")
            pdf.savefig(fig)
            plt.close(fig)
    return buf.getvalue()


def signed_summary(readings: Sequence[Reading], hashes: Sequence[str | None], card: Mapping,
                   user: str, origin: str = "", when: _dt.datetime | None = None) -> SignedSummary:
    """The worklist summary PDF signed by ``user`` (its SHA-256 is the signature the caller
    records in the audit trail)."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    head, rows = summary_lines(readings, hashes, card, user, when, origin)
    pdf = render_summary(head, rows)
    return SignedSummary(pdf, hashlib.sha256(pdf).hexdigest(), len(rows))
