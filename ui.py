"""Page helpers shared by app.py and pages/: cached model loading, the model picker, the
image viewer with window/level, probability charts, model cards and error display.

Only layout lives here and in the pages; every computation is a call into ``medcls``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from medcls import MedclsError, Scan, display_image, load_scan
from medcls.card import ModelCard
from medcls.access import (LOCAL_USER, User, login_provider, may, policy_from, require,
                           sign_in_configured)
from medcls.audit import Answer, AuditStore, database_url
from medcls.errors import AccessDeniedError, AuditError
from medcls.package import list_packages
from medcls.saliency import METHODS
from medcls.settings import Settings, load_settings

log = logging.getLogger("medcls.app")

APP_DIR = Path(__file__).resolve().parent
MAX_CACHED_SCAN_BYTES = 256 << 20  # per session: the open scan and a few frames of it


NOT_A_DEVICE = "Research tool, not a diagnostic device."


def page_header(title: str, caption: str, icon: str = "🧠", tab_title: str | None = None,
                permission: str = "classify") -> User:
    """The page configuration, title and caption every page opens with, then the sign-in
    guard: the page goes on only for a user who holds ``permission``."""
    st.set_page_config(page_title=tab_title or f"{title} · MedCLS", page_icon=icon, layout="wide")
    st.title(title)
    st.caption(f"{caption} {NOT_A_DEVICE}")
    return guard(permission)


def settings() -> Settings:
    """The app's settings: environment, then ``st.secrets``, then defaults (see
    :mod:`medcls.settings`). Read on every run: cheap, and a changed environment is seen."""
    return load_settings(secrets=_secrets())


def _secrets() -> dict:
    try:  # no secrets.toml is normal: st.secrets raises then
        return st.secrets.to_dict()
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable file means "no secrets"
        log.debug("no secrets.toml used (%s)", type(exc).__name__)
        return {}


def models_root() -> Path:
    return settings().models_dir


# ----------------------------------------------------------------------------- models

@st.cache_resource(show_spinner="Loading TensorFlow and the model (once per server)...")
def load_predictor(path: str):
    """One Predictor per model folder and server process, shared read-only by all sessions."""
    from medcls.inference import Predictor

    return Predictor.from_path(path).warmup()


def available_models() -> list[tuple[str, dict[str, Any]]]:
    """(folder, card) of every valid model package, sorted by task and name."""
    return _packages(str(models_root()))


@st.cache_data(ttl=60, show_spinner=False)
def _packages(root: str) -> list[tuple[str, dict[str, Any]]]:
    return [(str(p), card) for p, card in list_packages(root)]


def model_label(card: dict) -> str:
    test = card.get("metrics", {}).get("test", {})
    acc = test.get("accuracy")
    return f"{card['name']} ({card['architecture']}" + (f", test acc {acc:.3f})" if acc else ")")


def task_picker(key: str = "task") -> str | None:
    models = available_models()
    tasks = sorted({c["task"] for _, c in models})
    if not tasks:
        return None
    descriptions = {c["task"]: c.get("task_description", c["task"]) for _, c in models}
    default = tasks.index("brain-mri") if "brain-mri" in tasks else 0
    return st.selectbox("Task", tasks, index=default, key=key,
                        format_func=lambda t: f"{t}: {descriptions[t]}")


def models_for_task(task: str) -> list[tuple[str, dict]]:
    models = [(p, c) for p, c in available_models() if c["task"] == task]
    # the task's default model first
    return sorted(models, key=lambda pc: (not pc[1]["name"].endswith("-default"), pc[1]["name"]))


def require_models() -> None:
    """Stop the page with a clear message when no model package is installed."""
    if not available_models():
        st.error(f"No model packages found in `{models_root()}`. Each model is a folder with "
                 "`model.keras` and `card.json` (see the README: `python -m medcls train ...`).")
        st.stop()


def pick_model(key: str) -> str:
    """Task and model pickers (call inside ``st.sidebar``); returns the chosen model folder."""
    task = task_picker(key=f"{key}_task")
    task_models = models_for_task(task)
    return st.selectbox("Model", [p for p, _ in task_models], key=key,
                        format_func=lambda p: model_label(dict(task_models)[p]))


# ----------------------------------------------------------------------------- scans

def current_scan_bytes(uploaded) -> bytes | None:
    """The scan open in this session: a new upload replaces it; the comparison page reuses it.

    Bytes stay in memory (``st.session_state``); nothing is written to disk.
    """
    if uploaded is not None:
        data = uploaded.getvalue()
        if st.session_state.get("scan_bytes") != data:
            st.session_state["scan_bytes"] = data
            st.session_state.pop("_results", None)
    return st.session_state.get("scan_bytes")


def cached_scan(data: bytes, frame: int = 0) -> Scan:
    """load_scan with a small per-session cache (re-running a page does not re-decode), bounded
    in bytes: the oldest scans go first; the newest is always kept (the decode budget bounds it)."""
    digest = hashlib.sha256(data).hexdigest()
    cache = st.session_state.setdefault("_scan_cache", {})
    key = (digest, frame)
    if key not in cache:
        scan = load_scan(data, frame=frame)
        while cache and sum(s.nbytes for s in cache.values()) + scan.nbytes > MAX_CACHED_SCAN_BYTES:
            cache.pop(next(iter(cache)))
        cache[key] = scan
    return cache[key]


def show_error(exc: Exception, what: str = "This file") -> None:
    """A typed medcls error as a clear message; anything else without a stack trace."""
    if isinstance(exc, MedclsError):
        st.error(f"{what} could not be used: {exc}")
    else:
        log.error("unexpected %s in the page", type(exc).__name__)
        st.error(f"{what} could not be processed because of an unexpected error "
                 f"({type(exc).__name__}). Please try another file; the app keeps working.")


def window_controls(scan: Scan, key: str) -> tuple[float, float]:
    """Window/level controls for DICOM (modality presets, percentile defaults); plain images
    keep their own contrast."""
    if scan.source_format != "dicom" or scan.is_color:
        return scan.window_center, scan.window_width
    presets = {"File default" if scan.window_source == "dicom" else "Percentile 0.5-99.5 (default)":
               (scan.window_center, scan.window_width), **scan.window_presets}
    names = list(dict.fromkeys(presets))
    choice = st.selectbox("Window preset", names, key=f"{key}_preset")
    c0, w0 = presets[choice]
    lo, hi = float(np.min(scan.values)), float(np.max(scan.values))
    span = max(hi - lo, 1.0)
    c1, c2 = st.columns(2)
    center = c1.slider("Level (centre)", lo - span / 2, hi + span / 2, float(c0),
                       key=f"{key}_c_{choice}")
    width = c2.slider("Window (width)", max(span / 1000, 1e-3), 2 * span, float(min(max(w0, span / 1000), 2 * span)),
                      key=f"{key}_w_{choice}")
    return center, width


def display(scan: Scan, center: float, width: float) -> np.ndarray:
    if scan.source_format != "dicom" or scan.is_color:
        return display_image(scan)
    return display_image(scan, center, width)


def scan_image(image: np.ndarray, outline, show_outline: bool = True, caption: str = "") -> None:
    """The scan, with the tumour's segmentation outline (a tumour answer only) and its size."""
    from medcls.render import draw_outline
    from medcls.segmentation import size_text

    st.image(draw_outline(image, outline if show_outline else None), width="stretch",
             caption=caption)
    if outline is not None:
        st.caption(f"Tumour outline (yellow, {outline.method}): {size_text(outline)}.")


# ----------------------------------------------------------------------------- results

def probability_chart(classes, probs, title: str = "", highlight: int | None = None,
                      height: int = 220) -> go.Figure:
    """Horizontal bars of calibrated class probabilities on a fixed 0-100% axis."""
    probs = np.asarray(probs, dtype=float)
    hi = int(np.argmax(probs)) if highlight is None else highlight
    colors = ["#d62728" if i == hi else "#8c8c8c" for i in range(len(classes))]
    fig = go.Figure(go.Bar(x=probs * 100, y=list(classes), orientation="h", marker_color=colors,
                           text=[f"{p:.1%}" for p in probs], textposition="auto"))
    fig.update_layout(title=title or None, height=height, margin=dict(l=10, r=10, t=30 if title else 10, b=10),
                      xaxis=dict(range=[0, 100], title="probability (%)"),
                      yaxis=dict(autorange="reversed"))
    return fig


def confidence_statement(pred, card: ModelCard | None = None) -> tuple[str, str]:
    """(kind, text): a plain statement of how sure the model is. The validation figure behind
    the low-confidence threshold is quoted only when the card records it."""
    if pred.outside_training_distribution:
        return "error", ("Outside what this model was trained on: this scan does not look like "
                         "the model's training images, so its prediction is not a finding. "
                         f"(input-gate distance {pred.gate_score:.1f} > threshold "
                         f"{pred.gate_threshold:.1f})")
    if pred.low_confidence:
        accuracy = card.low_confidence_val_accuracy if card is not None else None
        basis = ("set on the validation split" if accuracy is None else
                 f"above which validation predictions were {accuracy:.0%} correct")
        return "warning", (f"Low confidence: the model gives {pred.label} only {pred.confidence:.0%} "
                           f"(below its {pred.low_confidence_threshold:.0%} threshold, {basis}). "
                           "Treat as uncertain.")
    return "success", (f"The model is confident: {pred.label} with {pred.confidence:.0%} "
                       "calibrated probability.")


def card_summary(card: dict) -> None:
    test = card.get("metrics", {}).get("test", {})
    st.markdown(f"**{card['name']}** v{card['version']} · {card['architecture']} · "
                f"trained {card['training'].get('date', '?')}")
    if test:
        st.markdown(f"Test split (n={test.get('n')}): accuracy **{test['accuracy']:.3f}**, "
                    f"macro-F1 **{test['macro_f1']:.3f}**, ROC AUC {test.get('roc_auc') or float('nan'):.3f}, "
                    f"ECE {test.get('ece', float('nan')):.3f}")
    st.markdown(f"*Intended use:* {card.get('intended_use', '')}")
    if card.get("limits"):
        st.markdown("*Limits:*\n" + "\n".join(f"- {x}" for x in card["limits"]))


def method_picker(key: str = "method") -> str:
    names = list(METHODS)
    return st.selectbox("Heatmap method", names, index=0, key=key,
                        format_func=lambda m: METHODS[m].label)


# ----------------------------------------------------------------------------- sign-in

def guard(permission: str = "classify") -> User:
    """Who is using the page, checked against ``permission``; stops the page otherwise.

    Without ``[auth]`` in secrets.toml there is one local user who may do everything.
    With it, an unsigned visitor gets the sign-in button, a user off the allow-list a
    clear refusal, and a user whose role lacks ``permission`` a message naming the role.
    """
    secrets = _secrets()
    st.session_state.pop("_user", None)  # decided afresh on every run
    if not sign_in_configured(secrets):
        user = LOCAL_USER
        st.sidebar.caption("Sign-in is not configured: one local user, every page open "
                           "(see the README, “Sign-in”).")
    else:
        if not getattr(st.user, "is_logged_in", False):
            st.info("Sign in to use MedCLS. Your organisation's account decides what you may do.")
            provider = login_provider(secrets)
            st.button("Sign in", type="primary", key="_sign_in",
                      on_click=(lambda: st.login(provider)) if provider else st.login)
            st.stop()
        try:
            user = policy_from(settings().auth).user(st.user.to_dict())
        except AccessDeniedError as exc:
            st.error(f"Access refused. {exc}")
            st.caption(f"Signed in as {st.user.get('email') or 'an account without an e-mail address'}.")
            st.button("Sign out", key="_sign_out_refused", on_click=st.logout)
            st.stop()
        with st.sidebar:
            st.caption(f"Signed in as **{user.email}** ({user.role})")
            st.button("Sign out", key="_sign_out", on_click=st.logout)
    st.session_state["_user"] = user
    failed_export = st.session_state.pop("_audit_export_error", None)
    if failed_export:  # a download's callback could not record it (callbacks cannot show)
        audit_warning(failed_export)
    if not may(user, permission):
        show_refusal(user, permission)
        st.stop()
    return user


def current_user() -> User:
    """The user the guard admitted on this run (a page that skipped the guard runs it now)."""
    return st.session_state.get("_user") or guard("classify")


def show_refusal(user: User, permission: str) -> None:
    try:
        require(user, permission)
    except AccessDeniedError as exc:
        st.error(str(exc))


def permitted(permission: str, explain: bool = True) -> bool:
    """Whether the current user holds ``permission``; says why not when ``explain``."""
    user = current_user()
    if may(user, permission):
        return True
    if explain:
        show_refusal(user, permission)
    return False


# ----------------------------------------------------------------------------- audit trail

@st.cache_resource(show_spinner=False)
def _store(url: str) -> AuditStore:
    return AuditStore(url)


def audit_store() -> AuditStore:
    return _store(database_url(settings()))


def audit_warning(exc: Exception) -> None:
    st.warning(f"Audit trail: {exc}", icon="⚠️")


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
    verdict_control(answer_id, prediction.label, prediction.classes, key=f"verdict_{page}_{answer_id}")
    return answer_id


def audit_rows(job: dict, page: str, scan_root: Path | None) -> list[int] | None:
    """Record every row of a finished batch job once (one transaction); the answer ids in row
    order (None for unreadable rows), or None when the audit trail failed."""
    if "answer_ids" in job:
        if job.get("audit_error") is not None:
            audit_warning(job["audit_error"])
        return job["answer_ids"]
    user, card = current_user(), job["card"]
    # only a server-folder job's sources are paths (an upload's read() would decompress again)
    from_folder = scan_root is not None and str(job.get("origin", "")).startswith("folder")
    root = Path(scan_root).resolve() if from_folder else None
    answers, index = [], []
    for i, row in enumerate(job["rows"]):
        if row.predicted is None:
            continue
        target = job["sources"][i].read() if root is not None and i < len(job["sources"]) else None
        inputs = {"input_sha256": getattr(row, "sha256", None)}
        if isinstance(target, (str, Path)) and root is not None:
            path = Path(target).resolve()
            if root in path.parents:
                inputs.update(input_source="server-folder", input_path=str(path.relative_to(root)))
        if not (inputs.get("input_sha256") or inputs.get("input_path")):
            continue  # nothing names this input (a row from an engine without hashes)
        answers.append(Answer(
            user=user.name, page=page, model_name=card["name"], model_version=str(card["version"]),
            model_sha256=card["model_sha256"], task=card.get("task"), predicted=row.predicted,
            confidence=float(row.confidence), probabilities=dict(row.probabilities),
            low_confidence=bool(row.low_confidence), withheld=bool(row.outside_distribution),
            gate_score=row.gate_score, **inputs))
        index.append(i)
    ids: list[int | None] = [None] * len(job["rows"])
    job["audit_error"] = None
    try:
        for i, answer_id in zip(index, audit_store().record_answers(answers)):
            ids[i] = answer_id
        job["answer_ids"] = ids
    except AuditError as exc:
        job["audit_error"], job["answer_ids"] = exc, None
        audit_warning(exc)
    return job["answer_ids"]


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


def verdict_control(answer_id: int | None, predicted: str, classes, key: str) -> None:
    """A compact form: agree / disagree with the corrected class / unsure, and a note."""
    with st.container(border=True):
        if answer_id is None:
            st.caption("Your verdict cannot be recorded: the audit trail did not record this answer.")
            return
        saved = st.session_state.get(f"{key}_saved")
        with st.form(key=f"{key}_form", border=False, enter_to_submit=False):
            st.markdown(f"**Your verdict** on “{predicted}”")
            c1, c2 = st.columns([1, 1])
            choice = c1.radio("Verdict", list(VERDICT_WORDS), format_func=VERDICT_WORDS.get,
                              horizontal=True, key=f"{key}_choice", label_visibility="collapsed")
            corrected = c2.selectbox("Correct class (when you disagree)",
                                     [c for c in classes if c != predicted], index=None,
                                     key=f"{key}_class", placeholder="Correct class if you disagree")
            note = st.text_input("Note (optional; no patient names or IDs)", key=f"{key}_note",
                                 max_chars=500)
            submitted = st.form_submit_button("Save verdict")
        if submitted:
            if not permitted("verdict"):
                return
            try:
                audit_store().record_verdict(answer_id, current_user().name, choice,
                                             corrected if choice == "disagree" else None, note)
                saved = st.session_state[f"{key}_saved"] = (
                    VERDICT_WORDS[choice] + (f": {corrected}" if choice == "disagree" else ""))
            except AuditError as exc:
                st.error(str(exc))
                return
        if saved:
            st.success(f"Verdict saved ({saved}), with your name and the time.", icon="✅")
