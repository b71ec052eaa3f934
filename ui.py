"""Page helpers shared by app.py and pages/: the navigation, the settings, cached model
loading, the model picker, window/level, the heatmap panel of the series view, model cards,
the audit trail and verdict control, and error display (``with user_errors(...)``).

Only layout lives here and in the pages; every computation is a call into ``medcls``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import streamlit as st

from medcls import MedclsError, Scan, display_image, load_scan, present
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
PAGES_DIR = APP_DIR / "pages"
MAIN_PAGE_TITLE = "Classify a scan"
MAX_CACHED_SCAN_BYTES = 256 << 20  # per session: the open scan and a few frames of it


NOT_A_DEVICE = "Research tool, not a diagnostic device."


_navigating = threading.local()  # per session thread: inside the chosen page's run


def navigation() -> None:
    """The app's navigation: app.py first, titled :data:`MAIN_PAGE_TITLE` (not the file name),
    then every page of ``pages/`` in the order of its number prefix, titled from its file name
    as Streamlit does (``2_Batch_review.py`` -> "Batch review", URL ``/Batch_review``).

    Call it first thing in app.py: it runs the chosen page and ends the script run. When the
    chosen page is app.py itself, its nested run calls this again, which returns at once so
    the rest of app.py lays out the main page. Page files still run on their own (AppTest)."""
    if getattr(_navigating, "inside", False):
        return
    pages = [st.Page(APP_DIR / "app.py", title=MAIN_PAGE_TITLE, default=True)]
    pages += [st.Page(path) for path in sorted(PAGES_DIR.glob("*.py"), key=_page_order)]
    page = st.navigation(pages)
    _navigating.inside = True
    try:
        page.run()
    finally:
        _navigating.inside = False
    st.stop()


def _page_order(path: Path) -> tuple[float, str]:
    number = re.match(r"\d+", path.name)
    return (int(number.group()) if number else float("inf"), path.name)


def page_header(title: str, caption: str, icon: str = "🧠", tab_title: str | None = None,
                permission: str = "classify") -> User:
    """The page configuration, title and caption every page opens with, then the sign-in
    guard: the page goes on only for a user who holds ``permission``."""
    st.set_page_config(page_title=tab_title or f"{title} · MedCLS", page_icon=icon, layout="wide")
    from ui_viewer import laptop_layout  # here, not at the top: ui_viewer imports ui

    laptop_layout()
    st.title(title)
    st.caption(f"{caption} {NOT_A_DEVICE}")
    return guard(permission)


def settings() -> Settings:
    """The app's settings: environment, then ``st.secrets``, then defaults (see
    :mod:`medcls.settings`). Read on every run: cheap, and a changed environment is seen."""
    with user_errors("The app's settings"):  # a bad value: its message, not a trace
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

def _build_predictor(path: str):
    from medcls.inference import Predictor

    return Predictor.from_path(path).warmup()


# Models loaded in the background (after the first answer, the other tasks' defaults), so that
# switching task does not wait; load_predictor takes them from here. One loader thread per server.
_PRELOAD: dict[str, Future] = {}
_PRELOAD_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcls-preload")
_LOADED: set[str] = set()


@st.cache_resource(show_spinner="Loading TensorFlow and the model (once per server)...")
def load_predictor(path: str):
    """One Predictor per model folder and server process, shared read-only by all sessions
    (taken from the background loader when :func:`preload_predictors` started it)."""
    fut = _PRELOAD.get(path)
    predictor = fut.result() if fut is not None else _build_predictor(path)
    _LOADED.add(path)
    return predictor


def preload_predictors(paths: list[str]) -> list[str]:
    """Start loading ``paths`` in the background (once each); the ones still loading."""
    for p in paths:
        if p not in _LOADED and p not in _PRELOAD:
            _PRELOAD[p] = _PRELOAD_POOL.submit(_build_predictor, p)
    return [p for p in paths if p in _PRELOAD and not _PRELOAD[p].done()]


def default_model_path() -> str | None:
    """The model the main page opens with: the brain task's ``*-default`` (else the first)."""
    models = available_models()
    if not models:
        return None
    tasks = sorted({c["task"] for _, c in models})
    task = "brain-mri" if "brain-mri" in tasks else tasks[0]
    return models_for_task(task)[0][0]


@st.cache_resource(show_spinner=False)
def warm_default_model() -> threading.Thread:
    """Load TensorFlow and the default model on a background thread, once per server process,
    from the first page run: the first upload is then answered in about a second instead of
    waiting for the import, the model load and the tracing (about 5 s on 2 cores).
    ``load_predictor``'s cache computes each model once, so an upload that arrives during the
    warm-up waits for the same load rather than starting a second one."""
    path = default_model_path()

    def work() -> None:
        t0 = time.perf_counter()
        try:
            if path is not None:
                load_predictor(path)
                # one line in the server log (benchmarks wait for it); names no patient data
                print(f"medcls: default model warm after {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - the page reports it when the model is used
            log.warning("background model warm-up failed: %s", type(exc).__name__)

    thread = threading.Thread(target=work, name="medcls-warm-up", daemon=True)
    thread.start()
    return thread


def warm_up_status(thread: threading.Thread) -> None:
    """One line saying whether the default model is loaded yet (not polled: a script re-run
    every second would collect garbage each time and slow the warm-up down)."""
    if thread.is_alive():
        st.caption("Loading TensorFlow and the default model in the background...")
    else:
        st.caption("Default model loaded: answers take about a second.")


def available_models() -> list[tuple[str, ModelCard]]:
    """(folder, card) of every valid model package, sorted by task and name."""
    return _packages(str(models_root()))


@st.cache_data(ttl=60, show_spinner=False)
def _packages(root: str) -> list[tuple[str, ModelCard]]:
    return [(str(p), card) for p, card in list_packages(root)]


def model_label(card: dict) -> str:
    """The model's name: short enough for a narrow sidebar (figures and provenance:
    :func:`model_caption`, shown under the picker)."""
    return card["name"]


def short_model_label(card: dict) -> str:
    """The model's name without its task's prefix ("brain-mri-compact-cnn" -> "compact-cnn"):
    what fits a tag of a narrow sidebar once the task is chosen."""
    name, prefix = card["name"], f"{card['task']}-"
    return name[len(prefix):] if name.startswith(prefix) and len(name) > len(prefix) else name


def model_caption(card: dict) -> str:
    """Architecture, test figures, site adaptation and the site-default mark of a model."""
    from medcls.adapt import adapted_from, site_defaults

    test = card.get("metrics", {}).get("test", {})
    acc, f1 = test.get("accuracy"), test.get("macro_f1")
    figures = (f"test accuracy {acc:.3f}" + (f", macro-F1 {f1:.3f}" if f1 else "")) if acc else \
        "no test figures in its card"
    caption = f"{card['architecture']} · {figures}"
    if adapted_from(card):
        caption += f" · site-adapted from {adapted_from(card)}"
    if site_defaults(models_root()).get(card["task"]) == card["name"]:
        caption += " · the site's default"
    return caption


def task_picker(key: str = "task") -> str | None:
    models = available_models()
    tasks = sorted({c["task"] for _, c in models})
    if not tasks:
        return None
    descriptions = {c["task"]: c.get("task_description", c["task"]) for _, c in models}
    default = tasks.index("brain-mri") if "brain-mri" in tasks else 0
    task = st.selectbox("Task", tasks, index=default, key=key)
    st.caption(descriptions[task])  # under the picker: the picker's own label stays short
    return task


def models_for_task(task: str) -> list[tuple[str, dict]]:
    from medcls.adapt import site_defaults

    models = [(p, c) for p, c in available_models() if c["task"] == task]
    # the site's default first (medcls.adapt.set_site_default), then the task's default model
    site = site_defaults(models_root()).get(task)
    return sorted(models, key=lambda pc: (Path(pc[0]).name != site,
                                          not pc[1]["name"].endswith("-default"), pc[1]["name"]))


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
    path = st.selectbox("Model", [p for p, _ in task_models], key=key,
                        format_func=lambda p: model_label(dict(task_models)[p]))
    st.caption(model_caption(dict(task_models)[path]))
    return path


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


def show_error(exc: BaseException, what: str = "This file") -> None:
    """A typed medcls error as its own message; anything else as a generic one (its type goes to
    the log; its text may quote file values, so it is not shown or logged)."""
    if isinstance(exc, MedclsError):
        st.error(f"{what} could not be used: {exc}")
    else:
        log.error("unexpected %s in the page", type(exc).__name__)
        st.error(f"{what} could not be processed because of an unexpected error "
                 f"({type(exc).__name__}). Please try another file; the app keeps working.")


WINDOWED_FORMATS = ("dicom", "nifti")  # formats with window/level (plain images keep theirs)


class Outcome:
    """What :func:`user_errors` saw: ``failed`` after an error was shown."""

    failed = False


@contextmanager
def user_errors(what: str = "This file", stop: bool = True) -> Iterator[Outcome]:
    """Turn any failure in the block into a message (:func:`show_error`) and keep the session:
    never a traceback. ``stop``: end this run of the page after the message (else go on, and
    read ``outcome.failed``)::

        with ui.user_errors("The model"):
            predictor = ui.load_predictor(path)
    """
    outcome = Outcome()
    try:
        yield outcome
    except Exception as exc:  # noqa: BLE001 - st.stop/st.rerun are BaseExceptions: they pass
        outcome.failed = True
        show_error(exc, what)
        if stop:
            st.stop()


def window_controls(scan: Scan, key: str) -> tuple[float, float]:
    """Window/level controls for DICOM and NIfTI (modality presets, percentile defaults); plain
    images keep their own contrast."""
    if scan.source_format not in WINDOWED_FORMATS or scan.is_color:
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
    if scan.source_format not in WINDOWED_FORMATS or scan.is_color:
        return display_image(scan)
    return display_image(scan, center, width)


# ----------------------------------------------------------------------------- results

def confidence_statement(pred, card: ModelCard | None = None) -> tuple[str, str]:
    """(kind, text): a plain statement of how sure the model is, worded by
    :func:`medcls.present.confidence_statement` from the card's own figures (the validation
    figure behind the low-confidence threshold only when the card records it)."""
    return present.confidence_statement(pred, card)


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


# ----------------------------------------------------------------------------- heatmap regions

def heatmap_panel(gray: np.ndarray, explanation, card: dict, alpha: float, show_region: bool,
                  requested: bool):
    """(overlay, caption, region drawn or None): the heatmap overlay with the region only where
    :func:`medcls.findings.may_show_region` allows it; otherwise the caption says what the
    heatmap means."""
    from medcls.findings import heatmap_meaning, is_finding_answer, may_show_region
    from medcls.render import draw_region, overlay

    pred = explanation.prediction
    name = present.class_name(card, explanation.class_name)
    allowed = may_show_region(pred, card, requested)
    region = explanation.region if allowed and show_region else None
    over = overlay(gray, explanation.heatmap, alpha)
    draw_region(over, region)
    if allowed:
        caption = (f"Red: the image regions that drove “{name}” most."
                   + (" White outline: hottest region; green: its bounding box."
                      if region is not None else ""))
        if not is_finding_answer(pred, card):
            caption = (f"Strongest “{name}” evidence, shown on request: the answer is "
                       f"“{present.class_name(card, pred.label)}”. " + caption)
    else:
        caption = heatmap_meaning(pred, card, name)
    return over, caption, region


def region_text(region) -> str:
    area = (f"{region.area_mm2:.0f} mm²" if region.area_mm2 is not None
            else f"{region.area_px} px (no pixel spacing in this file, so no mm²)")
    return f"Region above {region.threshold:.0%} of the peak: area {area}."


def strongest_evidence_toggle(pred, card: dict, key: str) -> None:
    """On a no-finding answer: the explicit request for the strongest finding class's map."""
    from medcls.findings import finding_noun, is_finding_answer

    if not is_finding_answer(pred, card):
        st.toggle(f"Show the strongest {finding_noun(card)}-class evidence", key=key,
                  help="Draws the heatmap, outline and area of the most likely tumour class, "
                       "although the answer is not a tumour.")


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


def audit_rows(job, page: str, scan_root: Path | None) -> list[int] | None:
    """Record every row of a finished batch job once (one transaction); the answer ids in row
    order (None for unreadable rows), or None when the audit trail failed. ``job``: a finished
    :class:`medcls.review.ReviewJob` (the ids are kept on it)."""
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
        answers.append(Answer(
            user=user.name, page=page, model_name=card["name"], model_version=str(card["version"]),
            model_sha256=card["model_sha256"], task=card.get("task"), predicted=row.predicted,
            confidence=float(row.confidence), probabilities=dict(row.probabilities),
            low_confidence=bool(row.low_confidence), withheld=bool(row.outside_distribution),
            gate_score=row.gate_score, **inputs))
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


def verdict_control(answer_id: int | None, predicted: str, classes, key: str) -> None:
    """A compact form: agree / disagree with the corrected class / unsure, and a note."""
    with st.container(border=True):
        if answer_id is None:
            st.caption("Your verdict cannot be recorded: the audit trail did not record this answer.")
            return
        saved = st.session_state.get(f"{key}_saved")
        with st.form(key=f"{key}_form", border=False, enter_to_submit=False):
            st.markdown(f"**Your verdict** on “{present.class_name(None, predicted)}”")
            c1, c2 = st.columns([1, 1])
            choice = c1.radio("Verdict", list(VERDICT_WORDS), format_func=VERDICT_WORDS.get,
                              horizontal=True, key=f"{key}_choice", label_visibility="collapsed")
            corrected = c2.selectbox("Correct class (when you disagree)",
                                     [c for c in classes if c != predicted], index=None,
                                     key=f"{key}_class", placeholder="Correct class if you disagree",
                                     format_func=lambda c: present.class_name(None, c))
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
