"""Page helpers shared by app.py and pages/: the navigation, the settings, cached model
loading, the model picker, the image viewer with window/level, probability charts, model cards
and error display (``with user_errors(...)``).

Only layout lives here and in the pages; every computation is a call into ``medcls``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from medcls import MedclsError, Scan, display_image, load_scan
from medcls.card import ModelCard
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


def page_header(title: str, caption: str, icon: str = "🧠", tab_title: str | None = None) -> None:
    """The page configuration, title and caption every page opens with."""
    st.set_page_config(page_title=tab_title or f"{title} · MedCLS", page_icon=icon, layout="wide")
    st.title(title)
    st.caption(f"{caption} {NOT_A_DEVICE}")


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

@st.cache_resource(show_spinner="Loading TensorFlow and the model (once per server)...")
def load_predictor(path: str):
    """One Predictor per model folder and server process, shared read-only by all sessions."""
    from medcls.inference import Predictor

    return Predictor.from_path(path).warmup()


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
            st.session_state.pop("strongest_evidence", None)  # asked for one scan, not the next
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
    if pred.outside_scope and not pred.gate_outside:  # the gate passed: give the scope's reason
        return "error", (f"Outside what this model was trained on: {pred.scope_note}, so its "
                         "prediction is not a finding.")
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


# ----------------------------------------------------------------------------- heatmap regions

def explain_for_display(predictor, scan: Scan, method: str, requested: bool):
    """The heatmap to show: of the predicted class; on a no-finding answer, of the strongest
    finding class when the user asked for it (``requested``)."""
    from medcls.findings import is_finding_answer, strongest_finding_class

    explanation = predictor.explain(scan, method)
    pred = explanation.prediction
    if requested and not is_finding_answer(pred, predictor.card) and \
            pred.label == explanation.class_name:
        explanation = predictor.explain(
            scan, method, class_index=strongest_finding_class(pred.probabilities, predictor.card))
    return explanation


def heatmap_view(gray: np.ndarray, explanation, card: dict, alpha: float, show_region: bool,
                 requested: bool, key: str) -> None:
    """The heatmap overlay with the region only where :func:`medcls.findings.may_show_region`
    allows it; otherwise a sentence on what the heatmap means, and the explicit request."""
    from medcls.findings import finding_noun, heatmap_meaning, is_finding_answer, may_show_region
    from medcls.render import draw_region, overlay

    pred = explanation.prediction
    allowed = may_show_region(pred, card, requested)
    region = explanation.region if allowed and show_region else None
    over = overlay(gray, explanation.heatmap, alpha)
    draw_region(over, region)
    if allowed:
        caption = (f"Red: the image regions that drove “{explanation.class_name}” most."
                   + (" White outline: hottest region; green: its bounding box."
                      if region is not None else ""))
        if not is_finding_answer(pred, card):
            caption = (f"Strongest “{explanation.class_name}” evidence, shown on request: the "
                       f"answer is “{pred.label}”. " + caption)
    else:
        caption = heatmap_meaning(pred, card, explanation.class_name)
    st.image(over, width="stretch", caption=caption)
    if region is not None:
        area = (f"{region.area_mm2:.0f} mm²" if region.area_mm2 is not None
                else f"{region.area_px} px (no pixel spacing in this file, so no mm²)")
        st.caption(f"Region above {region.threshold:.0%} of the peak: area {area}.")
    if not is_finding_answer(pred, card):
        st.toggle(f"Show the strongest {finding_noun(card)}-class evidence", key=key,
                  help="Draws the heatmap, outline and area of the most likely tumour class, "
                       "although the answer is not a tumour.")
