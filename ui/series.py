"""Series mode of the main page: several files, a folder, a zip or a NIfTI volume opened as
series (a new pick replaces the open one), each answered slice by slice: the study summary, the
series' acquisition beside the model's validated scope, the stack viewer (:mod:`ui.stack`: every
slice sent once, scrolled, windowed and measured in the browser), the strip of the class
probabilities over slice position, and the verdict on the slice the reader rests on; several
series of one study side by side.

Layout only: gathering is :mod:`medcls.io.gather`, the answer and its rule
:mod:`medcls.engine.series`, what the viewer may show :mod:`medcls.engine.stack` (asking the
region rule of :mod:`medcls.engine.findings`). Uploaded bytes stay in
``st.session_state["series_files"]`` (a list of (name, bytes)); nothing is written to disk.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from medcls.engine import present, stack
from medcls.engine.series import Outcome, answer_series, slice_explanation
from medcls.io.display import display_image
from medcls.io.gather import gather
from medcls.io.sources import bytes_source, zip_sources
from medcls.models.saliency import METHODS
from ui import audit, common, models
from ui import stack as ui_stack

MODES = ("One scan", "A series")
FILES = "series_files"  # session key: [(name, bytes)] of the open series upload
VIEWER = "series_viewer"  # session key: the slice and window the reader rests on (the viewer's)
UPLOAD_GEN = "series_upload_gen"  # session key: the uploader's generation (a pick empties it)
MAX_ANSWERS = 4  # per session: the series open (side by side: up to 3) and one more
SIDE_BY_SIDE = 3  # series at most in columns


def series_mode() -> bool:
    """The "one scan / a series" switch at the top of the main page."""
    return st.radio(
        "Open", MODES, key="open_mode", horizontal=True, label_visibility="collapsed",
        help="A series: several DICOM files, a folder, a .zip or a NIfTI volume, answered "
             "slice by slice with a study summary.") == MODES[1]


# ----------------------------------------------------------------------------- input

def _uploads() -> list[tuple[str, bytes]] | None:
    """The open series' files. Every pick opens a new series in place of the one open (a second
    folder replaces the first, it is not added to it): the picked files are kept in the session
    and the uploader starts empty again."""
    gen = int(st.session_state.get(UPLOAD_GEN, 0))
    items = st.session_state.get(FILES)
    where = st.expander(f"Open another series · now open: {_what(items)}") if items \
        else st.container()
    with where:
        kind = st.radio("Upload", ["Files, a .zip or a NIfTI", "A folder"], horizontal=True,
                        key="series_upload_kind", label_visibility="collapsed")
        if kind == "A folder":
            files = st.file_uploader("Choose the folder of one study or series",
                                     accept_multiple_files="directory",
                                     key=f"series_upload_dir_{gen}")
        else:
            files = st.file_uploader("Upload the slices of a series: DICOM files (with or without "
                                     ".dcm), a .zip of them, or a NIfTI volume (.nii, .nii.gz)",
                                     accept_multiple_files=True, key=f"series_upload_files_{gen}")
    if files:
        st.session_state[FILES] = [(f.name, f.getvalue()) for f in files]
        st.session_state[UPLOAD_GEN] = gen + 1  # a fresh, empty uploader: the next pick replaces
        for key in (VIEWER, "series_strongest", "series_anyway", "series_choice", "series_side"):
            st.session_state.pop(key, None)  # a new series opens at its own start
        st.rerun()
    return items


def _what(items) -> str:
    """The open upload in a few words: "30 files from volunteer2-axial-flair/"."""
    folders = sorted({name.split("/")[0] for name, _ in items if "/" in name})
    where = f" from {', '.join(f + '/' for f in folders[:2])}{' ...' if len(folders) > 2 else ''}" \
        if folders else ""
    return f"{len(items)} file{'s' if len(items) != 1 else ''}{where}"


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

def summary_box(answer, facts: bool = True) -> None:
    """The study summary (red: suspected, green: not seen, amber: cannot answer or not
    validated), with its facts and rule unless ``facts`` is False (the series view gives them
    under the viewer)."""
    sm = answer.summary
    kind = {Outcome.SUSPECTED: "error", Outcome.NOT_SEEN: "success",
            Outcome.CANNOT_ANSWER: "warning"}[sm.outcome]
    getattr(st, kind)(sm.text)
    if facts:
        summary_facts(answer)


def summary_facts(answer) -> None:
    """Under the viewer: the series' facts, the volume with its method, and the rule."""
    sm = answer.summary
    facts = [f"{answer.series.label}", f"ordered by {answer.series.ordered_by}"]
    if answer.series.slice_spacing:
        facts.append(f"slice spacing {answer.series.slice_spacing:.2f} mm")
    if answer.volume_mm3 is not None:
        facts.append(f"suspicious region ≈ {answer.volume_mm3:,.0f} mm³ ({answer.volume_note})")
    elif sm.run is not None and answer.volume_note:
        facts.append(answer.volume_note)
    facts.append(f"answered in {answer.elapsed_s:.1f} s")
    st.caption(common.plain(" · ".join(facts)))
    st.caption(f"Rule: {sm.rule} Scope: {stack.scope_words(answer.card)}")


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
    for idx, label, symbol in ((outside, "withheld (outside what the model was trained or "
                                "validated on)", "x"), (unread, "unreadable", "square-open")):
        if idx:
            fig.add_trace(go.Scatter(x=[x[i] for i in idx], y=[1.05] * len(idx), mode="markers",
                                     marker=dict(symbol=symbol, color="#555", size=9), name=label))
    fig.add_hline(y=sm.threshold, line_dash="dot", line_color="#888")
    fig.add_vline(x=x[shown], line_color="#111", line_width=1.5)
    fig.update_layout(height=240, margin=dict(l=10, r=10, t=20, b=10),
                      yaxis=dict(range=[0, 1.1], title="probability", tickformat=".0%"),
                      xaxis=dict(title="slice position (mm)" if series.positions is not None
                                 else "slice"),
                      legend=dict(orientation="h", y=-0.35))
    return fig


def _findings(study, series) -> None:
    for f in [*study.findings, *series.findings]:
        st.warning(common.plain(f.message)) if f.kind.value in ("gap", "duplicate", "mixed_orientation",
                                                  "unreadable", "uneven_size", "no_order") \
            else st.info(common.plain(f.message))


def acquisition_line(series, card) -> None:
    """What this series is (its own tags) beside what the model was validated on (its card)."""
    acq = common.plain(stack.acquisition_words(stack.series_acquisition(series), series.modality))
    st.caption(f"**This series:** {acq} (from its own tags) · **{card['name']} was validated "
               f"on:** {stack.scope_short(card)}")


def _payload(predictor, answer, model_path, method, show_region, budget, key_extra=()):
    """The viewer's data for ``answer`` (cached per session): every slice, its heatmap where
    the answer allows one, the outlines the region rule allows."""
    requested = bool(st.session_state.get("series_strongest"))
    anyway = bool(st.session_state.get("series_anyway"))
    cache_key = (answer.series.key, model_path, method, requested, anyway, show_region, budget,
                 *key_extra)

    def build():
        bar = st.progress(0.0, text="Preparing the slices for the viewer...")
        heats = stack.series_heatmaps(predictor, answer, method, requested, withheld_too=anyway,
                                      on_progress=lambda d, n: bar.progress(
                                          d / max(n, 1), text=f"Heatmaps: {d} of {n} slices"))
        if not show_region:
            heats = {i: dataclasses.replace(h, region=None) for i, h in heats.items()}
        payload = stack.series_stack(answer, heats, key=answer.series.key, budget=budget)
        bar.empty()
        return payload

    return ui_stack.cached_payload(cache_key, build)


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
    try:
        predictor = models.load_predictor(model_path)
    except Exception as exc:  # noqa: BLE001
        common.show_error(exc, "The model")
        return
    card = predictor.card
    choice = 0
    if len(study.series) > 1:
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        side = c2.toggle("Side by side", key="series_side",
                         help="Several series of this study next to each other, each with its "
                              "own answer (or why it has none).")
        if side:
            _side_by_side(study, predictor, model_path, method, alpha, show_region, show_overlay)
            return
        choice = c1.selectbox("Series", range(len(study.series)), key="series_choice",
                              format_func=lambda i: _series_name(study.series[i]))
    series = study.series[choice]
    try:
        answer = _answer(predictor, series, model_path)
        data_id, payload = _payload(predictor, answer, model_path, method, show_region,
                                    stack.PIXEL_BUDGET)
    except Exception as exc:  # noqa: BLE001 - an unreadable multi-frame file, a refused slice
        common.show_error(exc, "The series")
        return

    summary_box(answer, facts=False)
    _unreadable(answer)
    acquisition_line(series, card)
    got = ui_stack.stack_viewer(payload, data_id, key=VIEWER, height=470, panels=2,
                                titles=("Scan", f"Heatmap · {METHODS[method].label}"),
                                alpha=alpha, show_heat=show_overlay)
    if not (got and got.get("key") == payload["key"] and 0 <= int(got.get("slice", -1)) < len(series)):
        got = None  # not yet reported for this series (or for another one)
    shown = int(got["slice"]) if got else payload["start"]
    window = (got["center"], got["width"]) if got else None
    _evidence_toggles(answer, card)
    summary_facts(answer)
    _findings(study, series)
    st.plotly_chart(strip_figure(answer, shown), width="stretch", key="series_strip")
    answer_id = _slice_verdict(answer, card, shown, model_path, method, payload)
    _report_buttons(predictor, answer, method, alpha, window, answer_id, shown)


def _unreadable(answer) -> None:
    """Slices that could not be read, with why (the typed error's message: never a trace)."""
    errors = [s.error or "The slice could not be read." for s in answer.slices if s.prediction is None]
    for why in dict.fromkeys(errors):
        st.error(f"{errors.count(why)} of {len(answer.slices)} slices could not be read: {why}")


def _series_name(series) -> str:
    acq = stack.series_acquisition(series)
    what = acq.sequence if acq is not None and acq.sequence else None
    return series.label + (f" · {what}" if what else "")


def _evidence_toggles(answer, card) -> None:
    """The explicit requests: the strongest tumour-class evidence on no-tumour slices, the
    heatmaps of withheld slices (never with a region)."""
    from medcls.engine.findings import finding_noun, normal_class

    c1, c2 = st.columns(2)
    if normal_class(card) is not None and answer.summary.n_answered:
        c1.toggle(f"Show the strongest {finding_noun(card)}-class evidence", key="series_strongest",
                  help="On slices answered 'no tumour': the heatmap, outline and area of the most "
                       "likely tumour class, named as asked for.")
    if answer.summary.n_outside:
        c2.toggle("Show the heatmaps of withheld slices anyway", key="series_anyway",
                  help="A withheld answer is not an answer: its heatmap only shows what the "
                       "network reacted to, so no region or area is drawn on it.")


def _slice_verdict(answer, card, shown: int, model_path: str, method: str, payload) -> int | None:
    """The slice the reader stopped on: its answer into the audit trail, with the verdict (the
    answer's audit id, or None)."""
    item = answer.slices[shown]
    if item.prediction is None:
        return None
    try:
        scan = answer.series.scan(shown)
    except Exception as exc:  # noqa: BLE001
        common.show_error(exc, f"Slice {shown + 1}")
        return None
    st.caption(f"Your verdict on slice {shown + 1} of {len(answer.slices)} (the slice the viewer "
               "rests on):")
    region = answer.segmentations.get(shown) or answer.regions.get(shown)
    return audit.audit_answer((answer.series.key, model_path, shown, method), item.prediction, card,
                       "series", region=region, input_sha256=scan.sha256,
                       frame=scan.frame if scan.n_frames > 1 else None, heatmap_method=method)


def _side_by_side(study, predictor, model_path, method, alpha, show_region, show_overlay) -> None:
    """Up to :data:`SIDE_BY_SIDE` series of the study in columns, each with its acquisition,
    its own answer (or why it has none) and its own viewer."""
    names = [_series_name(s) for s in study.series]
    picked = st.multiselect("Series side by side", range(len(study.series)),
                            default=list(range(min(SIDE_BY_SIDE, len(study.series)))),
                            max_selections=SIDE_BY_SIDE, format_func=names.__getitem__,
                            key="series_side_pick")
    if not picked:
        st.info("Choose the series to show side by side.")
        return
    st.caption(f"**Validated scope:** {stack.scope_words(predictor.card)}")
    budget = stack.PIXEL_BUDGET // len(picked)
    for col, i in zip(st.columns(len(picked)), picked):
        series = study.series[i]
        with col:
            acq = common.plain(stack.acquisition_words(stack.series_acquisition(series),
                                                       series.modality))
            st.markdown(f"**{common.plain(series.label)}**  \n{acq}")
            try:
                answer = _answer(predictor, series, model_path)
                data_id, payload = _payload(predictor, answer, model_path, method, show_region,
                                            budget, ("side",))
            except Exception as exc:  # noqa: BLE001
                common.show_error(exc, "This series")
                continue
            summary_box(answer, facts=False)
            ui_stack.stack_viewer(payload, data_id, key=f"series_side_{series.key}", height=360,
                                  panels=1, titles=("Scan", "Heatmap"), alpha=alpha,
                                  show_heat=show_overlay, report=False, link="side-by-side")
    st.caption("Each series is answered on its own. Series in the same plane scroll together "
               "(by position in mm). Turn 'Side by side' off to read one series with both panels "
               "and record a verdict.")


def _report_buttons(predictor, answer, method, alpha, window, answer_id=None, shown=0) -> None:
    """The series report, with the verdict the reader recorded on the slice they rest on (read
    when the report is built, so a verdict saved a moment ago is in it)."""
    from medcls.engine.report import render_series_report

    def build(fmt: str) -> bytes:
        i = answer.summary.most_suspicious
        image = explanation = None
        if i is not None:
            scan = answer.series.scan(i)
            image = display_image(scan, *window) if window else display_image(scan)
            explanation = slice_explanation(predictor, answer, i, method)
        clinician = audit.recorded_verdict(answer_id)
        if clinician is not None:
            clinician = dataclasses.replace(clinician, on=f"slice {shown + 1} of {len(answer.slices)}")
        return render_series_report(answer, image, explanation, i, fmt=fmt,
                                    method_label=METHODS[method].label, alpha=alpha,
                                    clinician=clinician)

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
