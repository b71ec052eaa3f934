"""Work from a hospital's PACS over DICOMweb: search studies (QIDO-RS), retrieve a series'
instances (WADO-RS), answer the series as the series view does (:mod:`medcls.series_answer`:
the instances are ordered along the slice normal first, so the whole series is retrieved
before its slices go through the model in batches), and store results back (STOW-RS).

The client is ``dicomweb-client`` on a ``requests`` session. Every call has a timeout and is
retried on transient failures (connection refused or reset, time-outs, HTTP 429/503/504);
what still fails becomes a typed error with plain words (:class:`PacsUnreachableError`,
:class:`PacsAuthError`, :class:`StudyNotFoundError`, :class:`NotAnImageError`).

Patient data: study and series descriptions, names, ids and UIDs are returned to the caller
(the page shows them in the session) and copied into the DICOM results, nowhere else. Logs
name a study by a short hash of its UID (:func:`handle`); the request URLs (which carry
patient ids and UIDs) are kept out of the logs by quieting dicomweb-client's and urllib3's
own debug output. The audit trail (:func:`record_review`) gets each answered instance by its
SOP Instance UID (the PACS holds it; it names no patient), never a name, ID or date.

Connection settings come from the environment or ``.streamlit/secrets.toml``, never from
code (the ``pacs`` section of :mod:`medcls.settings`; :func:`pacs_settings`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import logging
import re
import sys
from dataclasses import dataclass, field
from datetime import date
from typing import Callable, Iterator, Sequence

from .errors import (MedclsError, NotAnImageError, PacsAuthError, PacsError,
                     PacsUnreachableError, SettingsError, StudyNotFoundError)
from .series_answer import (WITHHELD, SeriesAnswer, SeriesVerdict, answer_series,
                            series_verdict, slice_explanation)
from .settings import PacsSettings, Settings, load_settings

log = logging.getLogger(__name__)

# Their debug/info lines carry request URLs (patient ids, UIDs in the query and path) and, for
# highdicom, the UIDs of the source instances it copies patient and study attributes from.
for _noisy in ("dicomweb_client", "urllib3.connectionpool", "highdicom"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

#: Series that hold results, not images: never classified.
NON_IMAGE_MODALITIES = {"SR", "PR", "KO", "SEG", "RTSTRUCT", "REG", "DOC", "AU", "ECG"}


def handle(uid: str) -> str:
    """A non-identifying handle of a UID for logs (8 hex digits of its SHA-256)."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------- settings

def pacs_settings(settings: Settings | None = None) -> PacsSettings | None:
    """The ``pacs`` section of the settings (default :func:`medcls.settings.load_settings`:
    environment ``MEDCLS_PACS_URL``, ``_USER``, ``_PASSWORD``, ``_TOKEN``, ``_TIMEOUT``,
    ``_RETRIES``, then the ``[pacs]`` table of ``.streamlit/secrets.toml``); ``None`` when no
    URL is set."""
    settings = (settings or load_settings()).pacs
    if not settings.url:
        return None
    if settings.retries < 0:
        raise SettingsError("The PACS retries setting must be 0 or more.")
    return dataclasses.replace(settings, url=settings.url.rstrip("/"))


# ----------------------------------------------------------------------------- records

def _value(item: dict, keyword: str, default=None):
    """A value of a DICOM JSON (QIDO-RS) record by keyword; person names as plain text."""
    from pydicom.datadict import tag_for_keyword

    tag = f"{tag_for_keyword(keyword):08X}"
    values = item.get(tag, {}).get("Value")
    if not values:
        return default
    v = values[0]
    if isinstance(v, dict):  # PN
        v = v.get("Alphabetic", "")
    return v if len(values) == 1 or keyword != "ModalitiesInStudy" else values


@dataclass(frozen=True)
class StudyInfo:
    """A study as the PACS describes it. Holds patient data: show it, never log it."""

    study_uid: str
    patient_id: str = field(repr=False)
    patient_name: str = field(repr=False)
    study_date: str = field(repr=False)
    description: str = field(repr=False)
    modalities: tuple[str, ...] = ()
    n_series: int | None = None
    n_instances: int | None = None

    def __repr__(self) -> str:
        return f"StudyInfo({handle(self.study_uid)})"

    @classmethod
    def from_json(cls, item: dict) -> "StudyInfo":
        mods = _value(item, "ModalitiesInStudy", ())
        mods = tuple(mods) if isinstance(mods, list) else ((mods,) if mods else ())
        num = _value(item, "NumberOfStudyRelatedSeries")
        inst = _value(item, "NumberOfStudyRelatedInstances")
        return cls(study_uid=_value(item, "StudyInstanceUID", ""),
                   patient_id=str(_value(item, "PatientID", "")),
                   patient_name=str(_value(item, "PatientName", "")),
                   study_date=str(_value(item, "StudyDate", "")),
                   description=str(_value(item, "StudyDescription", "")), modalities=mods,
                   n_series=None if num is None else int(num),
                   n_instances=None if inst is None else int(inst))


@dataclass(frozen=True)
class SeriesInfo:
    study_uid: str
    series_uid: str
    modality: str
    number: int | None
    description: str = field(repr=False)
    n_instances: int | None = None

    def __repr__(self) -> str:
        return f"SeriesInfo({handle(self.series_uid)}, {self.modality})"

    @classmethod
    def from_json(cls, study_uid: str, item: dict) -> "SeriesInfo":
        num = _value(item, "SeriesNumber")
        inst = _value(item, "NumberOfSeriesRelatedInstances")
        return cls(study_uid=study_uid, series_uid=_value(item, "SeriesInstanceUID", ""),
                   modality=str(_value(item, "Modality", "")),
                   number=None if num is None else int(num),
                   description=str(_value(item, "SeriesDescription", "")),
                   n_instances=None if inst is None else int(inst))


@dataclass(frozen=True)
class Instance:
    """One retrieved DICOM object: its Part 10 bytes and the UIDs the results reference."""

    data: bytes = field(repr=False)
    sop_class_uid: str
    sop_instance_uid: str
    has_pixels: bool

    def __repr__(self) -> str:
        return f"Instance({handle(self.sop_instance_uid)}, {len(self.data)} bytes)"


def _matches(text: str, part: str) -> bool:
    """Substring match, any case. Done here rather than as a QIDO wildcard (``*part*``):
    dicomweb-client percent-encodes ``*`` and spaces, and Orthanc 1.10's DICOMweb plugin
    compares the still-encoded value, so such a filter never matches there."""
    return part.casefold() in (text or "").casefold()


def _dicom_date(d: date | str | None) -> str:
    if d is None or d == "":
        return ""
    return d.strftime("%Y%m%d") if isinstance(d, date) else str(d).replace("-", "")


# ----------------------------------------------------------------------------- client

class PacsClient:
    """DICOMweb client with timeouts, retries and typed errors."""

    STUDY_FIELDS = ("StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                    "NumberOfStudyRelatedInstances")
    SERIES_FIELDS = ("SeriesDescription", "SeriesNumber", "Modality",
                     "NumberOfSeriesRelatedInstances")

    def __init__(self, settings: PacsSettings, backoff: float = 0.25):
        import requests
        from dicomweb_client.api import DICOMwebClient

        if not settings.url.startswith(("http://", "https://")):
            raise PacsError("The PACS address must start with http:// or https://.")
        self.settings = settings
        session = requests.Session()
        if settings.token:
            session.headers["Authorization"] = f"Bearer {settings.token}"
        elif settings.user:
            session.auth = (settings.user, settings.password or "")
        self._web = DICOMwebClient(settings.url, session=session,
                                   timeout=(min(settings.timeout, 5.0), settings.timeout))
        self._web.set_http_retry_params(retry=settings.retries > 0,
                                        max_attempts=settings.retries + 1,
                                        wait_exponential_multiplier=int(backoff * 1000))

    # -------------------------------------------------------------- error handling
    def _call(self, fn: Callable, *args, what: str = "answer", missing: str | None = None, **kw):
        """``fn(*args, **kw)`` with its errors typed. The retries happen inside dicomweb-client
        (``retrying``: any exception of the request itself, i.e. refused or reset connections
        and time-outs, and HTTP 408/429/503/504), with exponential back-off."""
        import requests

        try:
            return fn(*args, **kw)
        except (requests.ConnectionError, requests.Timeout):
            raise PacsUnreachableError(
                f"The PACS did not {what} (no answer from {self.address} within "
                f"{self.settings.timeout:g} s, {self.settings.retries + 1} attempt(s)). Check "
                "that it is running and that the address is right.") from None
        except requests.HTTPError as exc:
            raise self._http_error(exc, missing) from None

    @property
    def address(self) -> str:
        """Scheme, host and port of the PACS (no path, no credentials): safe to show."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.settings.url)
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")

    def _http_error(self, exc, missing: str | None) -> PacsError:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            return PacsAuthError("The PACS refused the credentials (not authorised). Check the "
                                 "user and password (or token) in the PACS settings.")
        if status == 404 and missing:
            return StudyNotFoundError(missing)
        if status in (429, 503, 504, 408):
            return PacsUnreachableError(f"The PACS is busy or unavailable (HTTP {status}), "
                                        "even after retrying. Try again later.")
        return PacsError(f"The PACS answered with an error (HTTP {status}).")

    # -------------------------------------------------------------- QIDO-RS
    def check(self) -> None:
        """One cheap QIDO request: raises when the PACS is unreachable or refuses us."""
        self._call(self._web.search_for_studies, limit=1, what="answer")

    def search_studies(self, patient_id: str | None = None, date_from: date | str | None = None,
                       date_to: date | str | None = None, modality: str | None = None,
                       description: str | None = None, limit: int = 100) -> list[StudyInfo]:
        """Studies matching all the given filters (``description``: a substring, any case)."""
        filters: dict = {}
        if patient_id:
            filters["PatientID"] = patient_id
        if date_from or date_to:
            filters["StudyDate"] = f"{_dicom_date(date_from)}-{_dicom_date(date_to)}"
        if modality:
            filters["ModalitiesInStudy"] = modality
        items = self._call(self._web.search_for_studies, search_filters=filters,
                           fields=list(self.STUDY_FIELDS), limit=limit, what="answer the search")
        studies = [StudyInfo.from_json(i) for i in items]
        if description:  # wildcards cannot reach Orthanc 1.10 (see _matches)
            studies = [s for s in studies if _matches(s.description, description)]
        log.info("PACS search: %d studies", len(studies))
        return sorted(studies, key=lambda s: (s.study_date, s.study_uid), reverse=True)

    def search_series(self, study_uid: str, modality: str | None = None,
                      description: str | None = None,
                      series_description: str | None = None) -> list[SeriesInfo]:
        """The study's series (``description``: a substring, any case, matched here;
        ``series_description``: an exact value, matched by the PACS)."""
        filters = {"Modality": modality} if modality else {}
        if series_description:
            filters["SeriesDescription"] = series_description
        items = self._call(self._web.search_for_series, study_uid, search_filters=filters,
                           fields=list(self.SERIES_FIELDS), what="list the study's series",
                           missing="The PACS holds no such study.")
        if not items and not filters and not description:
            raise StudyNotFoundError("The PACS holds no study with this UID (or it has no series).")
        series = [SeriesInfo.from_json(study_uid, i) for i in items]
        if description:
            series = [x for x in series if _matches(x.description, description)]
        return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.series_uid))

    def find_series(self, series_uid: str) -> SeriesInfo:
        """The series with this SeriesInstanceUID, in whichever study (QIDO-RS at the root):
        a list of series UIDs needs no study UIDs."""
        items = self._call(self._web.search_for_series,
                           search_filters={"SeriesInstanceUID": series_uid},
                           fields=["StudyInstanceUID", *self.SERIES_FIELDS], what="find the series")
        if not items:
            raise StudyNotFoundError("The PACS holds no series with this UID.")
        return SeriesInfo.from_json(str(_value(items[0], "StudyInstanceUID", "")), items[0])

    # -------------------------------------------------------------- WADO-RS
    def iter_series(self, study_uid: str, series_uid: str) -> Iterator[Instance]:
        """The series' instances as they arrive (in their stored transfer syntax)."""
        import requests

        stream = self._call(self._web.iter_series, study_uid, series_uid,
                            media_types=(("application/dicom", "*"),),
                            what="send the series", missing="The PACS holds no such series.")
        try:
            for ds in stream:
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=False)
                yield Instance(buf.getvalue(), str(ds.get("SOPClassUID", "")),
                               str(ds.get("SOPInstanceUID", "")), "PixelData" in ds
                               or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds)
        except (requests.ConnectionError, requests.Timeout):
            raise PacsUnreachableError("The PACS stopped answering while sending the series.") from None
        except requests.HTTPError as exc:
            raise self._http_error(exc, "The PACS holds no such series.") from None

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[Instance]:
        return list(self.iter_series(study_uid, series_uid))

    # -------------------------------------------------------------- STOW-RS
    def store(self, datasets: Sequence) -> list[str]:
        """Store datasets; returns the stored SOP Instance UIDs. Raises when any is refused."""
        if not datasets:
            return []
        result = self._call(self._web.store_instances, list(datasets), what="store the results")
        failed = result.get("FailedSOPSequence") or []
        if failed:
            raise PacsError(f"The PACS refused {len(failed)} of {len(datasets)} object(s).")
        stored = [str(item.ReferencedSOPInstanceUID)
                  for item in result.get("ReferencedSOPSequence") or []]
        log.info("PACS store: %d object(s) stored", len(stored))
        return stored


# ----------------------------------------------------------------------------- reviews

@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    sha256: str

    @classmethod
    def of(cls, predictor) -> "ModelIdentity":
        card = predictor.card
        return cls(card.name, str(card.version), card.model_sha256)

    @property
    def tag(self) -> str:
        """The mark of this model version's results (in the SR's series description)."""
        return f"sha256-{self.sha256[:16]}"

    @property
    def results_description(self) -> str:
        """The SR's series description, matched exactly by QIDO-RS to find earlier results.
        Only characters a query string carries unescaped (letters, digits, ``.-_``): Orthanc
        1.10 compares percent-escaped values as they come (see :func:`_matches`)."""
        safe = lambda text: re.sub(r"[^A-Za-z0-9.-]+", "-", text)  # noqa: E731
        return f"MedCLS_{safe(self.name)[:24]}_{safe(self.version)[:8]}_{self.tag}"[:64]


@dataclass(frozen=True)
class Skipped:
    """A retrieved object that was not classified, and why (no UIDs: shown to anyone)."""

    series_number: int | None
    sop_class: str
    reason: str


@dataclass
class SeriesReview:
    """One image series (or, when its slices face several ways, one orientation of it) answered
    by the series view's engine (:func:`medcls.series_answer.answer_series`: every slice in
    batches, the aggregation rule, the suspicious run) and coded by
    :func:`medcls.series_answer.series_verdict`."""

    series: SeriesInfo
    answer: SeriesAnswer | None  # medcls.series_answer.SeriesAnswer
    headers: list = field(default_factory=list, repr=False)  # the image instances' headers (no pixels), as retrieved
    skipped: list[Skipped] = field(default_factory=list)
    explanation: object | None = field(default=None, repr=False)  # the shown slice's Explanation
    scan: object | None = field(default=None, repr=False)  # the shown slice's Scan
    roi: object | None = None  # dicom_results.Roi: a tumour answer's region, else None
    verdict: SeriesVerdict | None = None
    slice_instances: list[tuple[int, int]] = field(default_factory=list, repr=False)  # per slice: (header index, frame)

    @property
    def driving(self) -> int | None:
        """The slice (0-based, series order) that shows the answer; None when withheld."""
        return self.verdict.slice if self.verdict is not None else None

    @property
    def state(self) -> str:
        return self.verdict.state if self.verdict is not None else WITHHELD

    @property
    def prediction(self):
        """The shown slice's own prediction (None when the answer is withheld)."""
        if self.answer is None or self.driving is None:
            return None
        return self.answer.slices[self.driving].prediction

    def slice_header(self, i: int):
        """Header of the instance that holds slice ``i``."""
        return self.headers[self.slice_instances[i][0]]

    def slice_frame(self, i: int) -> int:
        """0-based frame of slice ``i`` in its instance (0 for single-frame images)."""
        return self.slice_instances[i][1]

    @property
    def driving_header(self):
        return None if self.driving is None else self.slice_header(self.driving)

    @property
    def driving_frame(self) -> int | None:
        return None if self.driving is None else self.slice_frame(self.driving)

    @property
    def answered_instances(self) -> list[tuple[int, object]]:
        """(slice, header) of every slice the model answered (its gate verdict included)."""
        if self.answer is None:
            return []
        return [(s.index, self.slice_header(s.index)) for s in self.answer.slices
                if s.prediction is not None]


@dataclass
class StudyReview:
    study_uid: str
    model: ModelIdentity
    series: list[SeriesReview]
    prior_results: list[SeriesInfo] = field(default_factory=list)  # this model's SR already there
    answer_ids: dict[str, int] = field(default_factory=dict, repr=False)  # audit: SOP UID -> id

    @property
    def answered(self) -> list[SeriesReview]:
        return [s for s in self.series if s.answer is not None and s.answer.slices
                and s.verdict is not None]

    @property
    def skipped(self) -> list[Skipped]:
        return [k for s in self.series for k in s.skipped]

    @property
    def already_sent(self) -> bool:
        return bool(self.prior_results)

    def __repr__(self) -> str:
        return f"StudyReview({handle(self.study_uid)}, {len(self.series)} series)"


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    try:
        return UID(uid).name if uid else "unknown object"
    except Exception:  # noqa: BLE001
        return "unknown object"


def _header(data: bytes):
    """The dataset of an instance without its pixel data (what the results reference)."""
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)


def find_results(client: PacsClient, study_uid: str, model: ModelIdentity) -> list[SeriesInfo]:
    """This model version's SR series already stored in the study (QIDO-RS on the SR's
    series description, which carries the model's SHA-256)."""
    found = client.search_series(study_uid, modality="SR",
                                 series_description=model.results_description)
    return [s for s in found if s.description == model.results_description]


def review_series(client: PacsClient, predictor, series: SeriesInfo,
                  roi_source: Callable | None = None, method: str = "gradcam") -> list[SeriesReview]:
    """Retrieve one series and answer it as the series view does: its image instances are
    gathered into ordered stacks (:func:`medcls.study.gather`: position along the normal,
    multi-frame instances frame by frame), each stack is answered by
    :func:`medcls.series_answer.answer_series` (the aggregation rule, the suspicious run, the
    per-slice strip) and coded by :func:`medcls.series_answer.series_verdict`. The slice that
    shows the answer is explained; a tumour answer gets its region (``roi_source``, default the
    segmentation companion's outline when the card names one, else the heatmap region), a
    no-tumour or withheld answer none. Objects without an image (reports, presentation states)
    and images that cannot be read are skipped and listed. One review per stack: a series whose
    slices face one way (the usual case) gives one."""
    from .dicom_results import default_roi
    from .study import FindingKind, bytes_source, gather

    roi_source = roi_source or default_roi
    images: list[bytes] = []
    headers: list = []
    skipped: list[Skipped] = []
    for inst in client.iter_series(series.study_uid, series.series_uid):
        if not inst.has_pixels:
            reason = NotAnImageError("This DICOM object holds no image (a report or other "
                                     "non-image object).")
            skipped.append(Skipped(series.number, _sop_class_name(inst.sop_class_uid), str(reason)))
            continue
        images.append(inst.data)
        headers.append(_header(inst.data))
    if not images:
        return [SeriesReview(series, None, skipped=skipped)]
    # sources named by their retrieval index: the slices map back to their instances' UIDs
    study = gather([bytes_source(str(i), data) for i, data in enumerate(images)])
    for f in study.findings:
        if f.kind != FindingKind.UNREADABLE:
            continue
        for name in f.files:  # an instance whose header could not be read as an image
            k = int(name)
            skipped.append(Skipped(series.number, _sop_class_name(str(headers[k].get(
                "SOPClassUID", ""))), f.message))
    reviews = []
    for stack in study.series:
        answer = answer_series(predictor, stack, method=method)
        review = SeriesReview(series, answer, headers, skipped if not reviews else [],
                              slice_instances=[(int(r.name), r.frame) for r in stack.slices])
        review.verdict = series_verdict(answer)
        for s in answer.slices:  # images the loader could not decode (with its reason)
            if s.error:
                review.skipped.append(Skipped(series.number, _sop_class_name(str(
                    review.slice_header(s.index).get("SOPClassUID", ""))), s.error))
        i = review.driving
        if i is not None:
            review.scan = stack.scan(i)
            review.explanation = slice_explanation(predictor, answer, i, method)
            # a region is a finding's: a "no tumour" or withheld answer has none
            if review.verdict.is_finding:
                review.roi = roi_source(predictor, review.explanation, review.scan)
        log.info("PACS series %s: %d slice(s), %d skipped, %s (%s)", handle(series.series_uid),
                 len(answer.slices), len(review.skipped), answer.summary.outcome.value,
                 review.state)
        reviews.append(review)
    return reviews


def review_study(client: PacsClient, predictor, study_uid: str, roi_source: Callable | None = None,
                 method: str = "gradcam") -> StudyReview:
    """Every image series of a study through the model; results series are left out."""
    all_series = client.search_series(study_uid)
    model = ModelIdentity.of(predictor)
    reviews = []
    for s in all_series:
        if s.modality.upper() in NON_IMAGE_MODALITIES or s.description.startswith("MedCLS"):
            continue
        reviews.extend(review_series(client, predictor, s, roi_source, method))
    return StudyReview(study_uid, model, reviews, find_results(client, study_uid, model))


@dataclass(frozen=True)
class SendOutcome:
    sent: bool  # False: this model's results were already in the PACS
    sop_instance_uids: tuple[str, ...]
    series_uids: tuple[str, ...]
    message: str


def send_results(client: PacsClient, review: StudyReview) -> SendOutcome:
    """Build the SR and the overlay captures and store them, unless this model version's
    results are already in the study (then nothing is sent twice)."""
    from .dicom_results import build_results

    prior = find_results(client, review.study_uid, review.model)
    if prior:
        review.prior_results = prior
        return SendOutcome(False, (), tuple(s.series_uid for s in prior),
                           "Results of this model version are already in the PACS for this "
                           "study; nothing was sent again.")
    if not review.answered:
        raise PacsError("No series of this study was classified: there is nothing to send.")
    try:
        datasets = build_results(review)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom refuses source attributes it cannot carry over; the message could quote them
        log.warning("building the DICOM results failed: %s", type(exc).__name__)
        raise PacsError("The results could not be written as DICOM: the source images lack "
                        "attributes a report needs.") from None
    stored = client.store(datasets)
    review.prior_results = find_results(client, review.study_uid, review.model)
    series = tuple(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in datasets))
    return SendOutcome(True, tuple(stored), series,
                       f"Stored {len(stored)} object(s) in {len(series)} new series.")


# ----------------------------------------------------------------------------- audit

def audit_answers(review: StudyReview, predictor, user: str, page: str = "pacs",
                  method: str = "gradcam") -> list:
    """The study's answers for the audit trail (:class:`medcls.audit.Answer`), one per answered
    instance (per frame of a multi-frame one), keyed by its SOP Instance UID (not patient data:
    the PACS holds it; no name, ID or date goes in): the model's identity, the slice's own answer
    and state (low confidence, withheld by the input gate or the card's scope), the series'
    outcome, and on the slice that shows a tumour answer its region's area, longest diameter and
    method ("segmentation" or "Grad-CAM region")."""
    from .audit import Answer

    card = predictor.card
    out = []
    for s in review.series:
        if s.answer is None:
            continue
        outcome = s.answer.summary.outcome.value
        for i, header in s.answered_instances:
            pred = s.answer.slices[i].prediction
            multi = int(header.get("NumberOfFrames", 1) or 1) > 1
            # the region belongs to the slice that shows a tumour answer (Answer.of keeps it
            # for a tumour answer of that slice only)
            region = s.roi if i == s.driving and s.verdict.is_finding else None
            out.append(Answer.of(pred, card, user, page, region=region, input_source="pacs",
                                 sop_instance_uid=str(header.SOPInstanceUID),
                                 frame=s.slice_frame(i) if multi else None,
                                 heatmap_method=method if i == s.driving else None,
                                 series_outcome=outcome))
    return out


def record_review(store, review: StudyReview, predictor, user: str, page: str = "pacs") -> list[int]:
    """Write :func:`audit_answers` to the audit ``store`` in one transaction; their ids (kept on
    the review as ``answer_ids``: SOP Instance UID -> id). Raises
    :class:`medcls.errors.AuditError` when the trail cannot be written (the caller shows it and
    goes on: the answers stay on screen)."""
    answers = audit_answers(review, predictor, user, page)
    ids = store.record_answers(answers)
    review.answer_ids = {a.sop_instance_uid: i for a, i in zip(answers, ids)}
    return ids


# ----------------------------------------------------------------------------- workspace

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

    def study(self, uid: str) -> StudyInfo | None:
        return next((s for s in self.studies if s.study_uid == uid), None)

    def label(self, uid: str) -> str:
        """How a study is named on screen (patient data: shown, never logged)."""
        s = self.study(uid)
        if s is None:
            return uid
        return " · ".join(x for x in (s.study_date, s.patient_id, s.patient_name, s.description,
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


# ----------------------------------------------------------------------------- tables

def study_rows(studies: Sequence[StudyInfo]) -> list[dict]:
    """Rows of a study list (for the page and the CLI; shown, never logged)."""
    return [{"study date": s.study_date, "patient id": s.patient_id, "patient": s.patient_name,
             "description": s.description, "modalities": " ".join(s.modalities),
             "series": s.n_series, "instances": s.n_instances, "study UID": s.study_uid}
            for s in studies]


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
            "answer": v.label if v is not None and v.label is not None else "withheld",
            "probability": round(v.probability, 3) if v is not None and v.probability is not None
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


# ----------------------------------------------------------------------------- CLI

def add_pacs_parser(sub) -> None:
    p = sub.add_parser("pacs", help="search a PACS (DICOMweb), review a study, send results back")
    ps = p.add_subparsers(dest="pacs_command", required=True)
    s = ps.add_parser("search", help="search studies (QIDO-RS)")
    s.add_argument("--patient-id")
    s.add_argument("--from", dest="date_from", help="first study date, YYYY-MM-DD or YYYYMMDD")
    s.add_argument("--to", dest="date_to", help="last study date")
    s.add_argument("--modality")
    s.add_argument("--description", help="part of the study description")
    s.add_argument("--limit", type=int, default=100)
    s.add_argument("--show-patient", action="store_true",
                   help="also print patient names and ids (on screen only)")
    s.set_defaults(func=_cmd_search)
    r = ps.add_parser("review", help="classify a study's series; --send stores SR + captures")
    r.add_argument("--study", required=True, help="Study Instance UID")
    r.add_argument("--model", help="model folder (default: brain-mri-default in the models "
                                    "folder, MEDCLS_MODELS)")
    r.add_argument("--send", action="store_true", help="store the results in the PACS")
    r.set_defaults(func=_cmd_review)


def _client() -> PacsClient:
    settings = pacs_settings()
    if settings is None:
        raise PacsError("No PACS is configured: set MEDCLS_PACS_URL (and MEDCLS_PACS_USER / "
                        "MEDCLS_PACS_PASSWORD or MEDCLS_PACS_TOKEN), or a [pacs] section in "
                        ".streamlit/secrets.toml.")
    return PacsClient(settings)


def _print_table(rows: list[dict]) -> None:
    if not rows:
        print("(none)")
        return
    keys = list(rows[0])
    width = {k: max(len(k), *(len(str(r[k] if r[k] is not None else "")) for r in rows)) for k in keys}
    print("  ".join(k.ljust(width[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r[k] if r[k] is not None else "").ljust(width[k]) for k in keys))


def _cmd_search(args: argparse.Namespace) -> int:
    studies = _client().search_studies(args.patient_id, args.date_from, args.date_to,
                                       args.modality, args.description, args.limit)
    rows = study_rows(studies)
    if not args.show_patient:
        for r in rows:
            del r["patient id"], r["patient"]
    _print_table(rows)
    return 0


CLI_PAGE = "pacs-cli"


def _cli_audit(review: StudyReview, predictor):
    """Record the review's answers in the audit trail (the settings' database) as the user of
    this command line; a failure is reported and the command goes on. (store, user)."""
    import getpass

    from .audit import open_store

    user = f"{getpass.getuser()} (command line)"
    try:
        store = open_store()
        record_review(store, review, predictor, user, CLI_PAGE)
        return store, user
    except MedclsError as exc:
        print(f"Audit trail: {exc}", file=sys.stderr)
        return None, user


def _cmd_review(args: argparse.Namespace) -> int:
    from .inference import Predictor

    client = _client()
    predictor = Predictor.from_path(args.model or load_settings().models_dir / "brain-mri-default")
    review = review_study(client, predictor, args.study)
    _print_table(series_rows(review))
    for k in review.skipped:
        print(f"skipped (series {k.series_number}, {k.sop_class}): {k.reason}")
    store, user = _cli_audit(review, predictor)
    if args.send:
        outcome = send_results(client, review)
        print(outcome.message)
        if outcome.sent and store is not None:
            try:
                store.record_export(user, CLI_PAGE, "pacs-send", n_answers=len(review.answer_ids),
                                    target=" ".join(outcome.sop_instance_uids)[:1024])
            except MedclsError as exc:
                print(f"Audit trail: {exc}", file=sys.stderr)
        for uid in outcome.sop_instance_uids:
            print(f"stored {uid}")
        for uid in outcome.series_uids:
            print(f"series {uid}")
    elif review.already_sent:
        print("Results of this model version are already in the PACS for this study.")
    return 0


__all__ = ["Instance", "ModelIdentity", "PacsClient", "PacsSettings", "PacsWorkspace", "SendOutcome",
           "SeriesAnswer", "SeriesInfo", "SeriesReview", "SeriesVerdict", "StudyInfo", "StudyReview",
           "add_pacs_parser", "find_results", "pacs_settings", "review_series",
           "review_study", "send_results", "series_rows", "study_rows"]
