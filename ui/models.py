"""Models on the page: cached loading (once per server, the default warmed in the background),
the task and model pickers, the heatmap method picker and a card's summary.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import streamlit as st

from medcls.engine import present
from medcls.models.card import ModelCard
from medcls.models.package import list_packages
from medcls.models.saliency import METHODS
from ui.common import models_root

log = logging.getLogger("medcls.app")


def _build_predictor(path: str):
    from medcls.engine.inference import Predictor

    return Predictor.from_path(path).warmup()


# Models loaded in the background (after the first answer, the other tasks' defaults), so that
# switching task does not wait; load_predictor takes them from here. One loader thread per server.
_PRELOAD: dict[str, Future] = {}
_PRELOAD_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcls-preload")
_LOADED: set[str] = set()


@st.cache_resource(show_spinner="Loading TensorFlow and the model (once per server)...")
def _cached_predictor(path: str):
    fut = _PRELOAD.get(path)
    predictor = fut.result() if fut is not None else _build_predictor(path)
    _LOADED.add(path)
    return predictor


WARM_SLOT = "_warm_up_slot"  # session key: the sidebar line saying whether the model is loaded


def load_predictor(path: str):
    """One Predictor per model folder and server process, shared read-only by all sessions
    (taken from the background loader when :func:`preload_predictors` started it). Once it is
    there, the sidebar's "Loading TensorFlow..." line of this run says so."""
    predictor = _cached_predictor(path)
    _LOADED.add(path)
    slot, run = st.session_state.pop(WARM_SLOT, (None, None))
    if slot is not None and run is _this_run():  # never a slot left by an earlier run
        slot.caption(LOADED_TEXT)
    return predictor


def _this_run():
    """An object that is the same for one script run only (its cursors, reset every run)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return None if ctx is None else ctx.cursors


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


LOADED_TEXT = "Model loaded: answers take about a second."


def warm_up_status(thread: threading.Thread, path: str | None = None) -> None:
    """One line saying whether the model (``path``, else the default) is loaded yet. Not polled
    (a script re-run every second would collect garbage each time and slow the warm-up down):
    while loading, the line is a slot that :func:`load_predictor` rewrites in the same run as
    soon as the model answers, so it never says "Loading" beside an answer."""
    if (path is not None and path in _LOADED) or not thread.is_alive():
        st.caption(LOADED_TEXT)
        st.session_state.pop(WARM_SLOT, None)
        return
    slot = st.empty()
    slot.caption("Loading TensorFlow and the model in the background...")
    st.session_state[WARM_SLOT] = (slot, _this_run())


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
    from medcls.learning.adapt import adapted_from
    from medcls.learning.site import site_defaults

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
    from medcls.learning.site import site_defaults

    models = [(p, c) for p, c in available_models() if c["task"] == task]
    # the site's default first (medcls.learning.site.set_site_default), then the task's default model
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

def suggest_other_task(scan, card: dict) -> str | None:
    """For a withheld answer: run the other tasks' default models' input gates on the scan and
    name the task whose gate accepts it."""
    others = [models[0] for task, models in _tasks().items() if task != card["task"] and models]
    candidates = []
    for path, other in others:
        try:
            candidates.append((other, load_predictor(path).predict(scan)))
        except Exception:  # noqa: BLE001 - a suggestion never breaks the page
            continue
    return present.task_suggestion(candidates)


def _tasks() -> dict[str, list[tuple[str, dict]]]:
    tasks = sorted({c["task"] for _, c in available_models()})
    return {t: models_for_task(t) for t in tasks}


def preload_other_tasks(card: dict) -> None:
    """After the first answer, load the other tasks' default models in the background, and
    say what is loading."""
    paths = {models[0][0]: models[0][1]["name"] for task, models in _tasks().items()
             if task != card["task"] and models}
    pending = preload_predictors(list(paths))
    if pending:
        st.caption("Loading " + ", ".join(paths[p] for p in pending) + " in the background, so "
                   "that switching task is quick.")
