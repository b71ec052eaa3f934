"""The PACS page's state without a page: the studies found, the reviews run and sent, and the
tables the page shows.

Least privilege (:meth:`PacsWorkspace.search_as`): searching the PACS with any filters, and so
listing its patients, is a reviewer's right (``pacs-search``); a clinician opens a study by its
accession number (``pacs-open``: the number of the examination they were asked to read, one
exact value, no wildcard and no other filter). Patient name and ID, study date and accession
number are in the tables and labels only when the page's "Show identifying tags" switch is on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from medcls.core.access import User, may, require
from medcls.core.errors import AccessDeniedError, MedclsError, PacsUnreachableError
from medcls.engine.reading import read_series
from medcls.integrations.pacs.client import PacsClient, StudyInfo, handle
from medcls.integrations.pacs.records import StudyReview
from medcls.integrations.pacs.review import SendOutcome, review_study, send_results

log = logging.getLogger(__name__)


@dataclass
class PacsWorkspace:
    """One session's PACS work, as the page keeps it in ``st.session_state``: the last search,
    the reviews run and what was sent. In memory only, never written anywhere."""

    studies: list[StudyInfo] = field(default_factory=list)
    reviews: dict[str, StudyReview] = field(default_factory=dict)
    outcomes: dict[str, SendOutcome] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # study UID -> message

    def __repr__(self) -> str:  # no UIDs
        return (f"PacsWorkspace({len(self.studies)} studies, {len(self.reviews)} reviewed, "
                f"{len(self.outcomes)} sent)")

    def search(self, client: PacsClient, **filters) -> list[StudyInfo]:
        self.studies = client.search_studies(**filters)
        return self.studies

    def search_as(self, user: User, client: PacsClient, accession: str | None = None,
                  **filters) -> list[StudyInfo]:
        """:meth:`search` within ``user``'s rights: a reviewer (``pacs-search``) with any
        filters; a clinician (``pacs-open``) by one exact accession number and nothing else.
        Refused with :class:`AccessDeniedError` otherwise (nothing is asked of the PACS)."""
        require(user, "pacs-open")
        accession = (accession or "").strip() or None
        if may(user, "pacs-search"):
            return self.search(client, accession=accession, **filters)
        if accession is None or any(c in accession for c in "*?\\") or any(filters.values()):
            raise AccessDeniedError(
                f"Your role ({user.role}) may open a study by its accession number only (one "
                "exact number, no other filter); searching the PACS and listing its patients "
                "needs the reviewer or admin role.")
        return self.search(client, accession=accession)

    def study(self, uid: str) -> StudyInfo | None:
        return next((s for s in self.studies if s.study_uid == uid), None)

    def label(self, uid: str, identifying: bool = False) -> str:
        """How a study is named on screen: its description and size, and with ``identifying``
        its date, patient ID and name and accession number (shown on request, never logged)."""
        s = self.study(uid)
        if s is None:
            return f"study {handle(uid)}"
        who = (s.study_date, s.patient_id, s.patient_name, s.accession) if identifying else ()
        return " · ".join(x for x in (*who, s.description or f"study {handle(uid)}",
                                      f"{s.n_series or 0} series") if x)

    def run(self, client: PacsClient, predictor, uids: Sequence[str],
            progress: Callable[[int, int], None] | None = None) -> None:
        """Review each study; a study that fails gets a message and the others go on."""
        for i, uid in enumerate(uids):
            self.errors.pop(uid, None)
            self.outcomes.pop(uid, None)
            try:
                self.reviews[uid] = review_study(client, predictor, uid)
            except PacsUnreachableError:
                raise  # the PACS is gone: the next studies would fail the same way
            except MedclsError as exc:
                self.reviews.pop(uid, None)
                self.errors[uid] = str(exc)
            except Exception as exc:  # noqa: BLE001 - one odd study never stops the others
                log.warning("unexpected %s while reviewing a study", type(exc).__name__)
                self.reviews.pop(uid, None)
                self.errors[uid] = f"This study could not be processed ({type(exc).__name__})."
            if progress:
                progress(i + 1, len(uids))

    def send(self, client: PacsClient, uid: str) -> SendOutcome:
        outcome = self.outcomes[uid] = send_results(client, self.reviews[uid])
        return outcome


IDENTIFYING_COLUMNS = ("study date", "patient id", "patient", "accession", "study UID")  # UIDs carry dates


def study_rows(studies: Sequence[StudyInfo], identifying: bool = True) -> list[dict]:
    """Rows of a study list (for the page and the CLI; shown, never logged); the columns of
    :data:`IDENTIFYING_COLUMNS` only with ``identifying``."""
    rows = [{"study date": s.study_date, "patient id": s.patient_id, "patient": s.patient_name,
             "accession": s.accession, "description": s.description,
             "modalities": " ".join(s.modalities), "series": s.n_series,
             "instances": s.n_instances, "study UID": s.study_uid} for s in studies]
    if not identifying:
        rows = [{k: v for k, v in r.items() if k not in IDENTIFYING_COLUMNS} for r in rows]
    return rows


def series_rows(review: StudyReview) -> list[dict]:
    """One row per answered stack: the series' coded answer (class, probability, state), the
    slice that shows it, the suspicious run, the region's size and how it was measured, the
    volume, and the study summary's sentence (no UIDs, no patient data)."""
    rows = []
    for s in review.series:
        a, v, roi = s.answer, s.verdict, s.roi
        run = a.summary.run if a is not None else None
        shown = s.driving
        rows.append({
            "series": s.series.number, "modality": s.series.modality,
            "description": s.series.description,
            "slices": sum(x.prediction is not None for x in a.slices) if a else 0,
            "skipped": len(s.skipped),
            # the one answer (medcls.engine.reading): the class by its name or "Withheld", and
            # the same probability, in the same words, as the series view, the SR and the capture
            "answer": read_series(a).name if a is not None and v is not None else "Withheld",
            "probability": read_series(a).probability_text if a is not None and v is not None
            else None,
            "state": s.state,
            "suspicious run": f"{run.start + 1}-{run.stop}" if run is not None else None,
            "shown slice": shown + 1 if shown is not None else None,
            "region method": roi.method if roi is not None else None,
            "region mm²": round(roi.area_mm2, 1) if roi is not None and roi.area_mm2 else None,
            "diameter mm": (round(roi.diameter_mm, 1) if roi is not None and roi.diameter_mm
                            else None),
            "volume mm³": round(a.volume_mm3) if a is not None and a.volume_mm3 else None,
            "summary": v.text if v is not None else "No image in this series.",
        })
    return rows
