"""Answering one spooled series and sending its results: the PACS review's own code
(:func:`medcls.integrations.pacs.review.review_series`: the series view's answer, its verdict and
region; :func:`medcls.integrations.pacs.results.build_results`: the TID 1500 SR and the Secondary
Capture; :func:`medcls.integrations.pacs.review.audit_answers`: one audit row per answered
instance) run on the spool instead of a WADO-RS retrieval, and the results stored in the PACS by
STOW-RS (:meth:`medcls.integrations.pacs.client.PacsClient.store`) or by C-STORE to a configured
AE.
"""

from __future__ import annotations

import io
import logging
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from medcls.core.errors import ListenerError, MedclsError, PacsError
from medcls.integrations.dicomnode.routing import Router, SiteModel
from medcls.integrations.dicomnode.spool import Spool
from medcls.integrations.pacs.client import Instance, SeriesInfo

log = logging.getLogger(__name__)

USER_PREFIX = "listener"  # the audit trail's user: "listener MEDCLS"
PAGE = "listener"


def read_header(data: bytes):
    """An instance's header; pixel data left unread (kept only as "present or not")."""
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), defer_size=256, force=True)


def has_pixels(ds) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


class SpoolSeries:
    """The spool seen as the PACS client :func:`review_series` reads a series from."""

    def __init__(self, spool: Spool):
        self.spool = spool

    def iter_series(self, study_uid: str, series_uid: str) -> Iterator[Instance]:
        for data in self.spool.read_all(series_uid):
            ds = read_header(data)
            yield Instance(data, str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")),
                           has_pixels(ds))


class Predictors:
    """Each site model's :class:`~medcls.engine.inference.Predictor`, loaded once."""

    def __init__(self):
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._loaded)

    def get(self, model: SiteModel):
        from medcls.engine.inference import Predictor

        with self._lock:
            if model.key not in self._loaded:
                self._loaded[model.key] = Predictor.from_path(model.folder).warmup()
            return self._loaded[model.key]


@dataclass
class Outcome:
    """What answering a job gave: an answer to send, or why there is none."""

    reason: str | None = None  # not answered: why
    datasets: list = field(default_factory=list)
    answers: list = field(default_factory=list)  # audit rows
    outcome: str | None = None
    label: str | None = None
    probability: float | None = None
    state: str | None = None

    @property
    def answered(self) -> bool:
        return self.reason is None


def answer_job(job: dict, spool: Spool, router: Router, predictors: Predictors,
               user: str) -> Outcome:
    """Answer the spooled series of ``job`` with its model (the scope decides first), build
    the SR and captures, and the audit rows (not yet written)."""
    from medcls.integrations.pacs.records import ModelIdentity, StudyReview
    from medcls.integrations.pacs.results import build_results
    from medcls.integrations.pacs.review import audit_answers, review_series

    model = router.by_key(job["model_key"])
    if model is None:
        return Outcome("The model chosen when the series arrived is no longer among this site's "
                       "models; send the series again to answer it with the current one.")
    headers = [read_header(d) for d in spool.read_all(job["series_uid"])]
    if not headers:
        return Outcome("No image of this series was kept (nothing arrived, or every instance "
                       "was refused).")
    note = router.scope(model, headers)
    if note:
        return Outcome(note)
    predictor = predictors.get(model)
    info = SeriesInfo(job["study_uid"], job["series_uid"], job.get("modality") or "",
                      job.get("series_number"), "", len(headers))
    reviews = review_series(SpoolSeries(spool), predictor, info)
    review = StudyReview(job["study_uid"], ModelIdentity.of(predictor), reviews)
    if not review.answered:
        reasons = [k.reason for k in review.skipped]
        return Outcome("No image of this series could be read"
                       + (f": {reasons[0]}" if reasons else "."))
    try:
        datasets = build_results(review)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        log.warning("job %s: building the DICOM results failed: %s", job["id"], type(exc).__name__)
        raise ListenerError("The results could not be written as DICOM: the source images lack "
                            "attributes a report needs.") from None
    first = review.answered[0]
    v = first.verdict
    return Outcome(None, datasets, audit_answers(review, predictor, user, PAGE),
                   first.answer.summary.outcome.value, v.label, v.probability, first.state)


# ----------------------------------------------------------------------------- sending

def parse_ae(text: str) -> tuple[str, str, int]:
    """``AET@host:port`` -> (AE title, host, port)."""
    try:
        aet, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        port_n = int(port)
        if not aet.strip() or not host or not 1 <= port_n <= 65535:
            raise ValueError
        return aet.strip(), host.strip("[]"), port_n
    except ValueError:
        raise ListenerError("The listener's store_ae setting must read AET@host:port (for "
                            "example PACS@10.0.0.5:104).") from None


class Sender:
    """Stores results in the PACS: STOW-RS through the PACS settings' DICOMweb client, or
    C-STORE to ``store_ae`` (``AET@host:port``) as ``our_ae``."""

    def __init__(self, settings, our_ae: str):
        self.store_ae = settings.listener.store_ae
        self.our_ae = our_ae
        self._client = None
        self._settings = settings

    @property
    def target(self) -> str:
        """Where results go, safe to show (no credentials, no path)."""
        if self.store_ae:
            aet, host, port = parse_ae(self.store_ae)
            return f"C-STORE {aet}@{host}:{port}"
        return f"STOW-RS {self.client().address}"

    def client(self):
        from medcls.integrations.pacs.client import PacsClient, pacs_settings

        if self._client is None:
            settings = pacs_settings(self._settings)
            if settings is None:
                raise ListenerError("No PACS is configured to send the results to: set "
                                    "MEDCLS_PACS_URL (the [pacs] section), or the listener's "
                                    "store_ae for C-STORE.")
            self._client = PacsClient(settings)
        return self._client

    def send(self, datasets: Sequence) -> list[str]:
        """Store ``datasets``; their SOP Instance UIDs. Raises a :class:`PacsError`."""
        if self.store_ae:
            return self._c_store(datasets)
        return self.client().store(datasets)

    def _c_store(self, datasets: Sequence) -> list[str]:
        from pynetdicom import AE

        aet, host, port = parse_ae(self.store_ae)
        ae = AE(ae_title=self.our_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for uid in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
            ae.add_requested_context(uid)
        assoc = ae.associate(host, port, ae_title=aet)
        if not assoc.is_established:
            raise PacsError(f"The PACS ({aet} at {host}:{port}) did not accept the association "
                            "for storing the results.")
        stored = []
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise PacsError(f"The PACS ({aet}) did not answer a C-STORE of the results.")
                if code != 0 and not 0xB000 <= code <= 0xBFFF:  # warnings store the object
                    raise PacsError(f"The PACS ({aet}) refused a result object (DICOM status "
                                    f"0x{code:04X}).")
                stored.append(str(ds.SOPInstanceUID))
        finally:
            if assoc.is_established:
                assoc.release()
        return stored


def describe_error(exc: BaseException) -> str:
    """A failure in words for the queue and the page (typed errors say it; others are named)."""
    if isinstance(exc, MedclsError):
        return str(exc)
    return f"Unexpected {type(exc).__name__} (see the listener's log)."
