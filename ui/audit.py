"""The audit trail from the pages: every answer shown recorded once per session, exports
recorded, and the clinician's verdict control.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from medcls.core.errors import AuditError
from medcls.engine import present
from medcls.integrations.audit.store import Answer, AuditStore, database_url
from ui.common import audit_warning, settings
from ui.signin import current_user, permitted


@st.cache_resource(show_spinner=False)
def _store(url: str) -> AuditStore:
    return AuditStore(url)


def audit_store() -> AuditStore:
    return _store(database_url(settings()))


def record_answer(key, make_answer) -> int | None:
    """Record an answer once per session and ``key`` (reruns do not repeat it); its id, or
    None when the audit trail failed (the failure is shown; the page goes on)."""
    done = st.session_state.setdefault("_audited", {})
    if key not in done:
        try:
            done[key] = audit_store().record_answer(make_answer())
        except AuditError as exc:
            audit_warning(exc)
            return None
        while len(done) > 64:  # bounded: the oldest keys go first
            done.pop(next(iter(done)))
    return done[key]


def log_answer(key, prediction, card: dict, page: str, **inputs) -> int | None:
    """Record an answer on screen once per session and ``key``; its id, or None."""
    user = current_user()
    return record_answer((page, key), lambda: Answer.of(prediction, card, user.name, page, **inputs))


def audit_answer(key, prediction, card: dict, page: str, **inputs) -> int | None:
    """Record the answer on screen and put the verdict control next to it."""
    answer_id = log_answer(key, prediction, card, page, **inputs)
    verdict_control(answer_id, prediction.label, prediction.classes, key=f"verdict_{page}_{answer_id}",
                    card=card, withheld=prediction.outside_training_distribution)
    return answer_id


def audit_rows(job, page: str, scan_root: Path | None) -> list[int] | None:
    """Record every row of a finished batch job once (one transaction); the answer ids in row
    order (None for unreadable rows), or None when the audit trail failed. ``job``: a finished
    :class:`medcls.engine.review.ReviewJob` (the ids are kept on it)."""
    if hasattr(job, "answer_ids"):
        if getattr(job, "audit_error", None) is not None:
            audit_warning(job.audit_error)
        return job.answer_ids
    user, card = current_user(), job.card
    # only a server-folder job's sources are paths (an upload's read() would decompress again)
    from_folder = scan_root is not None and str(job.origin or "").startswith("folder")
    root = Path(scan_root).resolve() if from_folder else None
    answers, index = [], []
    for i, row in enumerate(job.rows):
        if row.predicted is None:
            continue
        target = job.sources[i].read() if root is not None and i < len(job.sources) else None
        inputs = {"input_sha256": getattr(row, "sha256", None)}
        if isinstance(target, (str, Path)) and root is not None:
            path = Path(target).resolve()
            if root in path.parents:
                inputs.update(input_source="server-folder", input_path=str(path.relative_to(root)))
        if not (inputs.get("input_sha256") or inputs.get("input_path")):
            continue  # nothing names this input (a row from an engine without hashes)
        answers.append(Answer.of(row, card, user.name, page, **inputs))
        index.append(i)
    ids: list[int | None] = [None] * len(job.rows)
    job.audit_error = None
    try:
        for i, answer_id in zip(index, audit_store().record_answers(answers)):
            ids[i] = answer_id
        job.answer_ids = ids
    except AuditError as exc:
        job.audit_error, job.answer_ids = exc, None
        audit_warning(exc)
    return job.answer_ids


def record_export(kind: str, page: str, answer_id: int | None = None, n_answers: int = 1,
                  target: str | None = None) -> None:
    """Record an export or a PACS send (``target``: e.g. the stored objects' UIDs)."""
    try:
        audit_store().record_export(current_user().name, page, kind, answer_id, n_answers,
                                    (target or None) and target[:1024])
    except AuditError as exc:
        audit_warning(exc)


def export_logger(answer_id: int | None, kind: str, page: str, n_answers: int = 1):
    """An on_click callback that records an export (report, CSV) in the audit trail."""
    def record():
        try:
            audit_store().record_export(current_user().name, page, kind, answer_id, n_answers)
        except AuditError as exc:
            st.session_state["_audit_export_error"] = str(exc)
    return record


VERDICT_WORDS = {"agree": "Agree", "disagree": "Disagree", "unsure": "Unsure"}


def recorded_verdict(answer_id: int | None):
    """The verdict last recorded on an answer, for its report
    (:class:`medcls.engine.report.ClinicianVerdict`), or None (the report then leaves an empty
    place for it). Read when the report is built, so a verdict saved a moment ago is in it."""
    from medcls.engine.report import ClinicianVerdict

    if answer_id is None:
        return None
    try:  # built on click, outside the script run: a failure leaves the place empty
        got = audit_store().latest_verdict(answer_id)
    except Exception:  # noqa: BLE001 - the report is still given, with an empty place
        return None
    if got is None:
        return None
    return ClinicianVerdict(got["verdict"], got["user"], f"{got['at']:%Y-%m-%d %H:%M} UTC",
                            got["corrected_class"], got["note"])


def verdict_control(answer_id: int | None, predicted: str, classes, key: str,
                    card: dict | None = None, withheld: bool = False) -> None:
    """A compact form: agree / disagree with the corrected class / unsure, and a note. It starts
    with no choice: nothing is recorded until the reader picks one and saves."""
    with st.container(border=True):
        if answer_id is None:
            st.caption("Your verdict cannot be recorded: the audit trail did not record this answer.")
            return
        saved = st.session_state.get(f"{key}_saved")
        with st.form(key=f"{key}_form", border=False, enter_to_submit=False):
            on = "the withheld answer" if withheld else f"“{present.class_name(card, predicted)}”"
            st.markdown(f"**Your verdict** on {on}")
            c1, c2 = st.columns([1, 1])
            choice = c1.radio("Verdict", list(VERDICT_WORDS), format_func=VERDICT_WORDS.get,
                              index=None, horizontal=True, key=f"{key}_choice",
                              label_visibility="collapsed")
            corrected = c2.selectbox("Correct class (when you disagree)",
                                     [c for c in classes if withheld or c != predicted], index=None,
                                     key=f"{key}_class", placeholder="Correct class if you disagree",
                                     format_func=lambda c: present.class_name(card, c))
            note = st.text_input("Note (optional; no patient names or IDs)", key=f"{key}_note",
                                 max_chars=500)
            submitted = st.form_submit_button("Save verdict")
        if submitted:
            if choice is None:
                st.warning("Choose Agree, Disagree or Unsure first: nothing was recorded.")
                return
            if not permitted("verdict"):
                return
            try:
                audit_store().record_verdict(answer_id, current_user().name, choice,
                                             corrected if choice == "disagree" else None, note)
                saved = st.session_state[f"{key}_saved"] = (
                    VERDICT_WORDS[choice] + (f": {present.class_name(card, corrected)}"
                                             if choice == "disagree" and corrected else ""))
            except AuditError as exc:
                st.error(str(exc))
                return
        if saved:
            st.success(f"Verdict saved ({saved}), with your name and the time.", icon="✅")
