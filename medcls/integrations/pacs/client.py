"""A hospital's PACS over DICOMweb: search studies (QIDO-RS) and series, retrieve a series'
instances (WADO-RS) and store objects (STOW-RS).

The client is ``dicomweb-client`` on a ``requests`` session. Every call has a timeout and is
retried on transient failures (connection refused or reset, time-outs, HTTP 429/503/504);
what still fails becomes a typed error with plain words (:class:`PacsUnreachableError`,
:class:`PacsAuthError`, :class:`StudyNotFoundError`, :class:`NotAnImageError`).

Patient data: study and series descriptions, names, ids and UIDs are returned to the caller
and copied into the DICOM results, nowhere else. Logs name a study by a short hash of its UID
(:func:`handle`); the request URLs (which carry patient ids and UIDs) are kept out of the logs
by quieting dicomweb-client's and urllib3's own debug output.

Connection settings come from the environment or ``.streamlit/secrets.toml``, never from
code (the ``pacs`` section of :mod:`medcls.core.settings`; :func:`pacs_settings`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from dataclasses import dataclass, field
from datetime import date
from typing import Callable, Iterator, Sequence

from medcls.core.errors import (
    PacsAuthError,
    PacsError,
    PacsUnreachableError,
    SettingsError,
    StudyNotFoundError,
)
from medcls.core.settings import PacsSettings, Settings, load_settings

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


def pacs_settings(settings: Settings | None = None) -> PacsSettings | None:
    """The ``pacs`` section of the settings (default :func:`medcls.core.settings.load_settings`:
    environment ``MEDCLS_PACS_URL``, ``_USER``, ``_PASSWORD``, ``_TOKEN``, ``_TIMEOUT``,
    ``_RETRIES``, then the ``[pacs]`` table of ``.streamlit/secrets.toml``); ``None`` when no
    URL is set."""
    settings = (settings or load_settings()).pacs
    if not settings.url:
        return None
    if settings.retries < 0:
        raise SettingsError("The PACS retries setting must be 0 or more.")
    return dataclasses.replace(settings, url=settings.url.rstrip("/"))


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
    accession: str = field(default="", repr=False)

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
                   n_instances=None if inst is None else int(inst),
                   accession=str(_value(item, "AccessionNumber", "") or ""))


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


class PacsClient:
    """DICOMweb client with timeouts, retries and typed errors."""

    STUDY_FIELDS = ("StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                    "NumberOfStudyRelatedInstances", "AccessionNumber")
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
                       description: str | None = None, limit: int = 100, *,
                       accession: str | None = None) -> list[StudyInfo]:
        """Studies matching all the given filters (``description``: a substring, any case;
        ``accession``: the AccessionNumber exactly)."""
        filters: dict = {"AccessionNumber": accession} if accession else {}
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
