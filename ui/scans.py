"""The open scan: its bytes kept per session within a budget, decoded once, and window/level.
"""

from __future__ import annotations

import hashlib

import numpy as np
import streamlit as st

from medcls import Scan, display_image, load_scan
from ui import common

MAX_CACHED_SCAN_BYTES = 256 << 20  # per session: the open scan and a few frames of it


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


WINDOWED_FORMATS = ("dicom", "nifti")  # formats with window/level (plain images keep theirs)


def open_scan(data: bytes, frame_key: str) -> tuple[Scan, int]:
    """The scan of ``data`` (a failure becomes a message, never a trace) and, for a multi-frame
    file, the frame the reader picks with a slider (``frame_key``): (scan, frame index)."""
    with common.user_errors():
        scan = cached_scan(data)
    frame = 0
    if scan.n_frames > 1:
        frame = st.slider("Frame", 1, scan.n_frames, 1, key=frame_key) - 1
        with common.user_errors():
            scan = cached_scan(data, frame)
    return scan, frame


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
