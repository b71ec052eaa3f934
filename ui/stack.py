"""The stack viewer on a page: a series (or one scan) sent once to the browser, which scrolls it
(wheel, arrow keys, cine, a scroll bar marking the suspicious run and the withheld slices),
windows it (right-drag, typed values, presets), zooms, pans and measures it (ruler in mm, ellipse
with mean and SD) with no server round trip per slice.

A Streamlit component (API v1) served from the local folder ``ui/stack/`` (plain HTML, CSS and
JavaScript: no build step, no network). What is sent is decided in :mod:`medcls.engine.stack`;
this module only caches it per session and places the viewer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import streamlit as st
import streamlit.components.v1 as components

_component = components.declare_component("medcls_stack", path=str(Path(__file__).parent / "stack"))

PAYLOADS = "_stack_payloads"  # session key: {cache key: (data_id, payload)}
MAX_PAYLOADS = 4  # per session: the open series (side by side: up to 3) and the main page's scan


def cached_payload(cache_key, build) -> tuple[str, dict]:
    """(data_id, payload) of ``build()``, kept per session under ``cache_key`` (a rerun sends
    the same message, which the browser already holds)."""
    cache = st.session_state.setdefault(PAYLOADS, {})
    if cache_key not in cache:
        payload = build()
        data_id = hashlib.sha256(json.dumps(cache_key, default=str).encode()).hexdigest()[:16]
        while len(cache) >= MAX_PAYLOADS:
            cache.pop(next(iter(cache)))
        cache[cache_key] = (data_id, payload)
    return cache[cache_key]


def stack_viewer(payload: dict, data_id: str, key: str, height: int = 460, panels: int = 2,
                 titles: tuple[str, str] = ("Scan", "Heatmap"), alpha: float = 0.45,
                 show_heat: bool = True, report: bool = True, details: bool = True,
                 link: str | None = None) -> dict | None:
    """The viewer; returns the slice (0-based) and window the reader stopped on, once they
    pause (``{"slice", "center", "width"}``), or None before any. ``details``: the slice's
    answer, probabilities and notes under the images (off where the page says them);
    ``link``: viewers with the same link name and plane follow each other's position."""
    # the arguments stay the same from run to run (the browser keeps a large message and is
    # sent only its hash again): nothing that changes while reading goes into them
    return _component(data=payload, data_id=data_id, height=height, panels=panels,
                      titles=list(titles), alpha=float(alpha), show_heat=show_heat, report=report,
                      details=details, link=link, key=key, default=None)
