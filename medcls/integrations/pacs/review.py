"""A study from the PACS answered as the series view answers it, and the results sent back.

:func:`review_study` retrieves each image series (WADO-RS), gathers its instances into ordered
stacks (:func:`medcls.io.gather.gather`: along the slice normal, so the whole series is
retrieved before its slices go through the model in batches) and answers it with
:func:`medcls.engine.series.answer_series`; objects without an image are skipped with the reason.
:func:`send_results` stores the DICOM SR and Secondary Captures (:mod:`.results`) in new series of
the study, once per model version. The audit trail (:func:`record_review`) gets each answered
instance keyed by the SHA-256 of its SOP Instance UID (:func:`audit_key`: many UIDs embed the
examination's date and time), never a name, ID or date.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Callable

from medcls.core.errors import NotAnImageError, PacsError
from medcls.engine.series import answer_series, series_verdict, slice_explanation
from medcls.integrations.pacs.client import NON_IMAGE_MODALITIES, PacsClient, SeriesInfo, handle
from medcls.integrations.pacs.records import ModelIdentity, SeriesReview, Skipped, StudyReview

log = logging.getLogger(__name__)


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
    gathered into ordered stacks (:func:`medcls.io.gather.gather`: position along the normal,
    multi-frame instances frame by frame), each stack is answered by
    :func:`medcls.engine.series.answer_series` (the aggregation rule, the suspicious run, the
    per-slice strip) and coded by :func:`medcls.engine.series.series_verdict`. The slice that
    shows the answer is explained; a tumour answer gets its region (``roi_source``, default the
    segmentation companion's outline when the card names one, else the heatmap region), a
    no-tumour or withheld answer none. Objects without an image (reports, presentation states)
    and images that cannot be read are skipped and listed. One review per stack: a series whose
    slices face one way (the usual case) gives one."""
    from medcls.integrations.pacs.results import default_roi
    from medcls.io.gather import gather
    from medcls.io.series import FindingKind
    from medcls.io.sources import bytes_source

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
    from medcls.integrations.pacs.results import build_results

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


def audit_key(sop_instance_uid: str) -> str:
    """How the audit trail knows a PACS instance: the SHA-256 (hex) of its SOP Instance UID, as
    the logs name it by a hash; an instance is found again by hashing the PACS's UIDs."""
    return hashlib.sha256(str(sop_instance_uid).encode()).hexdigest()


def audit_answers(review: StudyReview, predictor, user: str, page: str = "pacs",
                  method: str = "gradcam") -> list:
    """The study's answers for the audit trail (:class:`medcls.integrations.audit.store.Answer`), one per answered
    instance (per frame of a multi-frame one), keyed by the hash of its SOP Instance UID (not patient data:
    the PACS holds it; no name, ID or date goes in): the model's identity, the slice's own answer
    and state (low confidence, withheld by the input gate or the card's scope), the series'
    outcome, and on the slice that shows a tumour answer its region's area, longest diameter and
    method ("segmentation" or "Grad-CAM region")."""
    from medcls.integrations.audit.store import Answer

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
                                 sop_instance_uid=audit_key(header.SOPInstanceUID),
                                 frame=s.slice_frame(i) if multi else None,
                                 heatmap_method=method if i == s.driving else None,
                                 series_outcome=outcome))
    return out


def record_review(store, review: StudyReview, predictor, user: str, page: str = "pacs") -> list[int]:
    """Write :func:`audit_answers` to the audit ``store`` in one transaction; their ids (kept on
    the review as ``answer_ids``: :func:`audit_key` of the SOP Instance UID -> id). Raises
    :class:`medcls.core.errors.AuditError` when the trail cannot be written (the caller shows it and
    goes on: the answers stay on screen)."""
    answers = audit_answers(review, predictor, user, page)
    ids = store.record_answers(answers)
    review.answer_ids = {a.sop_instance_uid: i for a, i in zip(answers, ids)}
    return ids
