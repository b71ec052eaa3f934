"""Series mode of the main page: several files, a folder, a zip or a NIfTI volume opened as
series, answered slice by slice, with the study summary above a strip of the class
probabilities over slice position, a slice slider, one window/level for every slice, and the
heatmap of the shown slice.

Layout only: gathering is :mod:`medcls.io.gather`, the answer and its rule
:mod:`medcls.engine.series`, the region rule :mod:`medcls.engine.findings`. Uploaded bytes stay in
``st.session_state["series_files"]`` (a list of (name, bytes)); nothing is written to disk.
"""

from __future__ import annotations

import hashlib

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from medcls.engine import present
from medcls.engine.series import Outcome, answer_series, slice_explanation
from medcls.io.gather import gather
from medcls.io.sources import bytes_source, zip_sources
from medcls.models.saliency import METHODS
from ui import audit, chrome, common, models, scans, viewer

MODES = ("One scan", "A series")
FILES = "series_files"  # session key: [(name, bytes)] of the open series upload
SLICE = "series_slice"  # session key: the 1-based slice shown
MAX_ANSWERS = 2  # per session: the open series (and the one before, for a quick switch back)


def series_mode() -> bool:
    """The "one scan / a series" switch at the top of the main page."""
    return st.radio(
        "Open", MODES, key="open_mode", horizontal=True, label_visibility="collapsed",
        help="A series: several DICOM files, a folder, a .zip or a NIfTI volume, answered "
             "slice by slice with a study summary.") == MODES[1]


# ----------------------------------------------------------------------------- input

def _uploads() -> list[tuple[str, bytes]] | None:
    kind = st.radio("Upload", ["Files, a .zip or a NIfTI", "A folder"], horizontal=True,
                    key="series_upload_kind", label_visibility="collapsed")
    if kind == "A folder":
        files = st.file_uploader("Choose the folder of one study or series",
                                 accept_multiple_files="directory", key="series_upload_dir")
    else:
        files = st.file_uploader("Upload the slices of a series: DICOM files (with or without "
                                 ".dcm), a .zip of them, or a NIfTI volume (.nii, .nii.gz)",
                                 accept_multiple_files=True, key="series_upload_files")
    if files:
        items = [(f.name, f.getvalue()) for f in files]
        if st.session_state.get(FILES) != items:
            st.session_state[FILES] = items
            for key in (SLICE, "series_strongest"):  # a new series opens at slice 1, no request
                st.session_state.pop(key, None)
    return st.session_state.get(FILES)


def _sources(items: list[tuple[str, bytes]]) -> list:
    out = []
    for name, data in items:
        if name.lower().endswith(".zip") or data[:4] == b"PK\x03\x04":
            out.extend(zip_sources(data, prefix=f"{name}/"))  # checked before expansion
        else:
            out.append(bytes_source(name, data))
    return out


def _study(items):
    digest = hashlib.sha256(b"".join(hashlib.sha256(d).digest() + n.encode()
                                     for n, d in items)).hexdigest()
    cached = st.session_state.get("_series_study")
    if cached is None or cached[0] != digest:
        with st.spinner("Reading the slice headers and ordering the series..."):
            cached = (digest, gather(_sources(items)))
        st.session_state["_series_study"] = cached
        st.session_state.pop("_series_answers", None)
    return cached[1]


def _answer(predictor, series, model_path: str):
    answers = st.session_state.setdefault("_series_answers", {})
    key = (series.key, model_path)
    if key not in answers:
        bar = st.progress(0.0, text=f"Answering {len(series)} slices...")
        answer = answer_series(predictor, series, on_progress=lambda d, n: bar.progress(
            d / n, text=f"{d} of {n} slices answered"))
        bar.empty()
        while len(answers) >= MAX_ANSWERS:
            answers.pop(next(iter(answers)))
        answers[key] = answer
    return answers[key]


# ----------------------------------------------------------------------------- views

def summary_box(answer) -> None:
    sm = answer.summary
    kind = {Outcome.SUSPECTED: "error", Outcome.NOT_SEEN: "success",
            Outcome.CANNOT_ANSWER: "warning"}[sm.outcome]
    getattr(st, kind)(sm.text)
    facts = [f"{answer.series.label}", f"ordered by {answer.series.ordered_by}"]
    if answer.series.slice_spacing:
        facts.append(f"slice spacing {answer.series.slice_spacing:.2f} mm")
    if answer.volume_mm3 is not None:
        facts.append(f"suspicious region ≈ {answer.volume_mm3:,.0f} mm³ ({answer.volume_note})")
    elif sm.run is not None and answer.volume_note:
        facts.append(answer.volume_note)
    facts.append(f"answered in {answer.elapsed_s:.1f} s")
    st.caption(common.plain(" · ".join(facts)))
    st.caption(f"Rule: {sm.rule}")


def strip_figure(answer, shown: int) -> go.Figure:
    """Class probabilities over slice position: the suspicious run shaded, slices outside the
    training distribution marked, the shown slice as a vertical line."""
    series, sm = answer.series, answer.summary
    x = [series.position_of(i) for i in range(len(series))]
    probs = answer.probabilities()
    fig = go.Figure()
    for c, name in enumerate(answer.classes):
        fig.add_trace(go.Scatter(x=x, y=probs[:, c], mode="lines+markers",
                                 name=present.class_name(answer.card, name),
                                 customdata=[(k + 1, present.fmt_prob(v, 1) if np.isfinite(v) else "–")
                                             for k, v in enumerate(probs[:, c])],
                                 hovertemplate="slice %{customdata[0]}: %{customdata[1]}<extra>"
                                               + present.class_name(answer.card, name) + "</extra>"))
    for run in (sm.run, *sm.other_runs):
        if run is not None:
            fig.add_vrect(x0=x[run.start], x1=x[run.stop - 1], fillcolor="#d62728",
                          opacity=0.18 if run is sm.run else 0.08, line_width=0,
                          annotation_text="suspicious run" if run is sm.run else None,
                          annotation_position="top left")
    outside = [i for i, s in enumerate(answer.slices)
               if s.prediction is not None and s.prediction.outside_training_distribution]
    unread = [i for i, s in enumerate(answer.slices) if s.prediction is None]
    for idx, label, symbol in ((outside, "outside training distribution", "x"),
                               (unread, "unreadable", "square-open")):
        if idx:
            fig.add_trace(go.Scatter(x=[x[i] for i in idx], y=[1.05] * len(idx), mode="markers",
                                     marker=dict(symbol=symbol, color="#555", size=9), name=label))
    fig.add_hline(y=sm.threshold, line_dash="dot", line_color="#888")
    fig.add_vline(x=x[shown], line_color="#111", line_width=1.5)
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=20, b=10),
                      yaxis=dict(range=[0, 1.1], title="probability", tickformat=".0%"),
                      xaxis=dict(title="slice position (mm)" if series.positions is not None
                                 else "slice"),
                      legend=dict(orientation="h", y=-0.35))
    return fig


def _jump(to: int) -> None:
    st.session_state[SLICE] = to + 1


def _findings(study, series) -> None:
    for f in [*study.findings, *series.findings]:
        st.warning(common.plain(f.message)) if f.kind.value in ("gap", "duplicate", "mixed_orientation",
                                                  "unreadable", "uneven_size", "no_order") \
            else st.info(common.plain(f.message))


def _step(delta: int, n: int) -> None:
    st.session_state[SLICE] = min(max(int(st.session_state.get(SLICE, 1)) + delta, 1), n)


def series_page(model_path: str, method: str, alpha: float, show_region: bool,
                show_overlay: bool = True) -> None:
    items = _uploads()
    if not items:
        st.info("Upload the slices of a series (several DICOM files, a folder or a .zip) or a "
                "NIfTI volume. Every slice is answered; the summary says whether a tumour run "
                "is seen.")
        return
    try:
        study = _study(items)
    except Exception as exc:  # noqa: BLE001 - a refused zip, an unreadable volume
        common.show_error(exc, "The upload")
        return
    if not study.series:
        for f in study.findings:
            st.error(common.plain(f.message))
        st.error("No series could be read from this upload.")
        return
    choice = 0
    if len(study.series) > 1:
        choice = st.selectbox("Series", range(len(study.series)), key="series_choice",
                              format_func=lambda i: study.series[i].label)
    series = study.series[choice]
    try:
        predictor = models.load_predictor(model_path)
        answer = _answer(predictor, series, model_path)
    except Exception as exc:  # noqa: BLE001
        common.show_error(exc, "The series")
        return
    card = predictor.card

    summary_box(answer)
    _findings(study, series)
    n = len(series)
    if st.session_state.get(SLICE, 1) > n:
        st.session_state[SLICE] = 1
    most = answer.summary.most_suspicious
    c1, c2 = st.columns([3, 1])
    with c2:
        st.button("Jump to the most suspicious slice", key="series_jump",
                  disabled=most is None, on_click=_jump, args=(most or 0,), type="primary",
                  help="The answered slice with the highest P(tumour).")
    with c1:
        shown = (st.slider("Slice", 1, n, key=SLICE) if n > 1 else 1) - 1
    st.plotly_chart(strip_figure(answer, shown), width="stretch", key="series_strip")

    ref = series.scan(n // 2)  # one window/level for every slice, set on the middle one
    try:
        scan = series.scan(shown)
    except Exception as exc:  # noqa: BLE001
        common.show_error(exc, f"Slice {shown + 1}")
        return
    st.subheader(f"Slice {shown + 1} of {n}")
    c_wl, c_step = st.columns([3, 2])
    with c_wl:  # window/level once, for both images and every slice
        center, width = scans.window_controls(ref, key="series")
    with c_step:  # keyboard: k / j step through the slices
        b1, b2 = st.columns(2)
        b1.button("◀ Previous slice", key="series_prev", on_click=_step, args=(-1, n),
                  disabled=shown == 0)
        b2.button("Next slice ▶", key="series_next", on_click=_step, args=(1, n),
                  disabled=shown >= n - 1)
        chrome.keyboard_steps({"j": "Next slice ▶", "k": "◀ Previous slice"})
    image = scans.display(scan, center, width)
    where = (f" · position {series.position_of(shown):.1f} mm" if series.positions is not None
             else "")
    facts = (f"{common.plain(scan.modality)} · {scan.shape[1]}×{scan.shape[0]} px" + where
             + (f" · {scan.pixel_spacing[1]:.2f}×{scan.pixel_spacing[0]:.2f} mm/px"
                if scan.pixel_spacing else ""))
    item = answer.slices[shown]
    if item.prediction is None:
        st.image(image, clamp=True, width="stretch", caption=facts)
        st.error(f"This slice could not be read: {item.error}")
        return
    requested = bool(st.session_state.get("series_strongest"))
    cache = st.session_state.setdefault("_series_heatmaps", {})
    hkey = (series.key, model_path, shown, method, requested)
    if hkey not in cache:
        cache.clear()  # one heatmap per session
        cache[hkey] = slice_explanation(predictor, answer, shown, method, requested)
    explanation = cache[hkey]
    gray = image if image.ndim == 2 else image.mean(axis=2)
    pred = item.prediction
    over, meaning, region = viewer.heatmap_panel(gray, explanation, card, alpha, show_region, requested,
                                                 answer.segmentations.get(shown))
    title = f"Heatmap · {METHODS[method].label} for “{present.class_name(card, explanation.class_name)}”"
    if not show_overlay:
        over, title = np.dstack([gray] * 3), "Heatmap hidden (overlay off)"
    viewer.linked_viewer(image, over, (f"Slice {shown + 1}", title), key="series_viewer")
    st.caption(facts + ". Drag to pan, scroll to zoom (both images move together).")
    if show_overlay:
        st.caption(meaning)
    if region is not None:
        st.caption(viewer.region_text(region))
    viewer.strongest_evidence_toggle(pred, card, key="series_strongest")
    kind, text = viewer.confidence_statement(pred, card)
    getattr(st, kind)(f"Slice {shown + 1}: " + text)
    st.plotly_chart(viewer.probability_chart(pred, card), width="stretch", key="series_probs")
    # the shown slice's answer goes into the audit trail, with the clinician's verdict on it
    audit.audit_answer((series.key, model_path, shown, method), pred, card, "series", region=region,
                    input_sha256=scan.sha256, frame=scan.frame if scan.n_frames > 1 else None,
                    heatmap_method=method)
    _report_buttons(predictor, answer, method, alpha, center, width)


def _report_buttons(predictor, answer, method, alpha, center, width) -> None:
    from medcls.engine.report import render_series_report

    def build(fmt: str) -> bytes:
        i = answer.summary.most_suspicious
        image = explanation = None
        if i is not None:
            scan = answer.series.scan(i)
            image = scans.display(scan, center, width)
            explanation = slice_explanation(predictor, answer, i, method)
        return render_series_report(answer, image, explanation, i, fmt=fmt,
                                    method_label=METHODS[method].label, alpha=alpha)

    c1, c2 = st.columns(2)
    for col, fmt in ((c1, "png"), (c2, "pdf")):
        col.download_button(f"Download the series report ({fmt.upper()})",
                            data=lambda fmt=fmt: build(fmt), on_click="ignore",
                            file_name=f"medcls-series-{answer.series.key}.{fmt}",
                            mime="application/pdf" if fmt == "pdf" else "image/png",
                            key=f"series_dl_{fmt}")


# ----------------------------------------------------------------------------- batch page

def batch_series_table(job, predictor) -> None:
    """The batch review's worklist grouped by series: one row per series with its summary,
    slice rows on request. Answered once per job (kept on the :class:`ReviewJob`)."""
    import pandas as pd

    from medcls.engine.series import review_by_series

    if getattr(job, "series_answers", None) is None:
        with st.spinner("Grouping the files into series and answering every slice..."):
            job.series_answers = review_by_series(predictor, job.sources)
    study, answers = job.series_answers
    for f in study.findings:
        st.caption(common.plain(f.message))
    if not answers:
        st.info("No DICOM series or NIfTI volume among these files.")
        return
    order = {Outcome.SUSPECTED: 0, Outcome.CANNOT_ANSWER: 1, Outcome.NOT_SEEN: 2}
    answers = sorted(answers, key=lambda a: order[a.summary.outcome])
    st.dataframe(pd.DataFrame([a.as_record() for a in answers]), hide_index=True,
                 key=f"batch_series_{id(job)}",
                 column_order=["series", "outcome", "summary", "suspected_class", "volume_mm3",
                               "most_suspicious_slice", "slices", "answered",
                               "outside_distribution", "findings", "plane", "ordered_by"])
    if st.toggle("Show slice rows", key="batch_series_slices"):
        st.dataframe(pd.DataFrame([r for a in answers for r in a.slice_records()]),
                     hide_index=True, key=f"batch_series_slices_{id(job)}")
