"""The DICOM receiver: a pynetdicom C-STORE and C-ECHO SCP that accepts associations only from
the configured calling AE titles (and only when called by its own AE title), checks each
instance and writes it to the spool, and answers every refusal with its DICOM status.

Statuses of C-STORE (PS3.4 B.2.3, PS3.7 C):

- ``0x0000`` success: the instance is in the spool (or, for a series no model of the site
  answers, counted and left to the PACS: its job says why it is not answered);
- ``0xA700`` refused, out of resources: the spool is full (its size budget), or the disk;
- ``0xA900`` data set does not match SOP class: no Study, Series or SOP Instance UID, or UIDs
  other than the request's;
- ``0xC210`` cannot understand: the data set cannot be decoded (malformed);
- ``0x0122`` SOP class not supported: an object without an image (a report, raw data ...);
- ``0x0110`` processing failure: the queue could not record it (the database is down).

An association from an AE title that is not accepted is rejected (A-ASSOCIATE-RJ, "calling AE
title not recognised"), one that calls another AE title too ("called AE title not recognised").
Logs name the calling AE title, the status and a hash of the series UID: never a patient's
name, ID or date, nor any UID.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from medcls.integrations.dicomnode.answer import has_pixels
from medcls.integrations.dicomnode.jobs import JobQueue
from medcls.integrations.dicomnode.routing import Router
from medcls.integrations.dicomnode.spool import Spool
from medcls.integrations.pacs.client import handle

log = logging.getLogger(__name__)

# pynetdicom's own INFO and DEBUG lines name SOP Instance UIDs and dump requests
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110

STATUS_WORDS = {
    SUCCESS: "stored", OUT_OF_RESOURCES: "refused: out of resources (spool full)",
    DOES_NOT_MATCH: "refused: data set does not match its SOP class",
    CANNOT_UNDERSTAND: "refused: cannot understand (malformed)",
    SOP_CLASS_NOT_SUPPORTED: "refused: SOP class not supported (no image)",
    PROCESSING_FAILURE: "refused: processing failure",
}


def _uid_ok(value) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and all(c.isdigit() or c == "." for c in text)


def _sop_class_name(uid) -> str:
    from pydicom.uid import UID

    try:
        return UID(str(uid)).name
    except Exception:  # noqa: BLE001
        return "unknown SOP class"


class Receiver:
    """The SCP's event handlers and its counters (the listener's health)."""

    def __init__(self, ae_title: str, accept_from: tuple[str, ...], whole_series_from: tuple[str, ...],
                 spool: Spool, queue: JobQueue, router: Router,
                 on_complete: Callable[[list], None] | None = None):
        self.ae_title = ae_title
        self.accept_from = tuple(accept_from)
        self.whole_series_from = set(whole_series_from)
        self.spool, self.queue, self.router = spool, queue, router
        self.on_complete = on_complete
        self.associations = 0
        self.rejected = 0
        self.last_association_at: float | None = None
        self.last_calling_ae: str | None = None
        self.statuses: dict[int, int] = {}
        self._series_of: dict[int, set[int]] = {}  # association id -> job ids it carried
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ pynetdicom
    def application_entity(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.require_calling_aet = list(self.accept_from)
        ae.require_called_aet = True
        ae.maximum_associations = 8
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        # every storage SOP class and transfer syntax: a refusal is a C-STORE status with its
        # reason, not a presentation context the sender cannot interpret
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_C_ECHO, self.on_echo),
                    (evt.EVT_ACCEPTED, self.on_accepted), (evt.EVT_RELEASED, self.on_released),
                    (evt.EVT_ABORTED, self.on_aborted), (evt.EVT_REJECTED, self.on_rejected)]
        return ae, handlers

    def start(self, bind: str, port: int):
        """The server, listening on ``bind``:``port`` (threads; returns at once)."""
        ae, handlers = self.application_entity()
        return ae.start_server((bind, port), block=False, evt_handlers=handlers)

    # ------------------------------------------------------------------ association events
    @staticmethod
    def _calling(event) -> str:
        title = event.assoc.requestor.ae_title
        return (title.decode(errors="replace") if isinstance(title, bytes) else str(title)).strip()

    def on_accepted(self, event) -> None:
        with self._lock:
            self.associations += 1
            self.last_association_at = time.time()
            self.last_calling_ae = self._calling(event)
            self._series_of[id(event.assoc)] = set()

    def on_rejected(self, event) -> None:
        calling = self._calling(event)
        called = getattr(getattr(event.assoc.requestor, "primitive", None), "called_ae_title", "")
        called = (called.decode(errors="replace") if isinstance(called, bytes) else str(called or "")).strip()
        with self._lock:
            self.rejected += 1
        why = ("calling AE title not accepted" if calling not in self.accept_from
               else f"called AE title is not {self.ae_title}" if called != self.ae_title
               else "too many associations at once")
        log.warning("association from calling AE %r to called AE %r rejected: %s", calling[:16],
                    called[:16], why)

    def on_released(self, event) -> None:
        """A normal end. From a sender that sends a whole series per association, the series
        it carried are complete now."""
        with self._lock:
            carried = self._series_of.pop(id(event.assoc), set())
        if carried and self._calling(event) in self.whole_series_from:
            try:
                done = self.queue.complete(sorted(carried))
            except Exception as exc:  # noqa: BLE001 - the quiet time completes them instead
                log.warning("ending %d series at release failed: %s", len(carried), exc)
                return
            if done and self.on_complete:
                self.on_complete(done)

    def on_aborted(self, event) -> None:
        """An abort ends nothing: its series complete after the quiet time (or when sent again)."""
        with self._lock:
            carried = self._series_of.pop(id(event.assoc), set())
        if carried:
            log.warning("association from %s aborted while carrying %d series", self._calling(event),
                        len(carried))

    def on_echo(self, event) -> int:
        return SUCCESS

    # ------------------------------------------------------------------ C-STORE
    def on_store(self, event) -> int:
        status = self._store(event)
        with self._lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
        return status

    def _store(self, event) -> int:
        calling = self._calling(event)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            study, series, sop = (ds.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                       "SOPInstanceUID"))
            sop_class = ds.get("SOPClassUID")
            pixels = has_pixels(ds)
            modality = str(ds.get("Modality", "") or "")
        except Exception as exc:  # noqa: BLE001 - any decoding failure: the data set is malformed
            log.warning("C-STORE from %s refused (0x%04X): the data set cannot be decoded (%s)",
                        calling, CANNOT_UNDERSTAND, type(exc).__name__)
            return CANNOT_UNDERSTAND
        request = event.request
        if not (_uid_ok(study) and _uid_ok(series) and _uid_ok(sop)) \
                or str(sop) != str(request.AffectedSOPInstanceUID) \
                or str(sop_class) != str(request.AffectedSOPClassUID):
            log.warning("C-STORE from %s refused (0x%04X): the instance lacks valid Study, Series "
                        "or SOP Instance UIDs, or they differ from the request's", calling,
                        DOES_NOT_MATCH)
            return DOES_NOT_MATCH
        if not pixels:
            log.info("C-STORE from %s refused (0x%04X): %s holds no image", calling,
                     SOP_CLASS_NOT_SUPPORTED, _sop_class_name(sop_class))
            return SOP_CLASS_NOT_SUPPORTED
        try:
            route = self.router.route(ds)
            number = ds.get("SeriesNumber")
            try:
                number = int(number) if number not in (None, "") else None
            except (TypeError, ValueError):
                number = None
            data = event.encoded_dataset() if route.model is not None else b""
            with self.queue.lock:
                job_id, joins = self.queue.open_job(
                    str(series), str(study), route.key,
                    route.model.folder.name if route.model is not None else None,
                    modality[:16] or None, number, calling[:16], route.reason)
                if not joins:
                    log.info("C-STORE from %s: series %s was already answered by this model "
                             "version; instance counted as a repeat", calling, handle(str(series)))
                    return SUCCESS
                stored = route.model is None or self.spool.write(str(series), str(sop), data)
                self.queue.count(job_id, stored)
        except OSError as exc:
            log.warning("C-STORE from %s refused (0x%04X): the spool could not be written (%s)",
                        calling, OUT_OF_RESOURCES, type(exc).__name__)
            return OUT_OF_RESOURCES
        except Exception as exc:  # noqa: BLE001 - the queue's database, or anything unforeseen
            log.warning("C-STORE from %s refused (0x%04X): %s", calling, PROCESSING_FAILURE,
                        type(exc).__name__)
            return PROCESSING_FAILURE
        with self._lock:
            self._series_of.setdefault(id(event.assoc), set()).add(job_id)
        if not stored:
            log.warning("C-STORE from %s refused (0x%04X): the spool is full (%.0f of %.0f MB); "
                        "series %s", calling, OUT_OF_RESOURCES, self.spool.used / 1e6,
                        self.spool.budget / 1e6, handle(str(series)))
            return OUT_OF_RESOURCES
        return SUCCESS

