"""Batch review: triage a folder of scans (hundreds to thousands) into a worklist: what each
scan looks like to the model, which are uncertain, which could not be read.

Input is a folder on the server, only inside the allowed scan folder (``scan_root`` of
:mod:`medcls.core.settings`: ``MEDCLS_SCAN_ROOT``, else ``.streamlit/secrets.toml``, else
``scans/`` next to app.py), or a folder, several files or one .zip uploaded through the
browser. The run is a :class:`medcls.engine.review.ReviewJob` kept in the session (on this server, or on the
configured Ray cluster through :func:`medcls.integrations.ray.review.review_stream`) (its docstring
tells how a run proceeds across reruns and how Stop really stops); this page is layout.
"""

from __future__ import annotations

import hashlib

import pandas as pd
import plotly.express as px
import streamlit as st

from medcls.engine import present
from medcls.engine.render import draw_outline
from medcls.engine.review import ReviewJob
from medcls.integrations.ray.review import review_stream
from medcls.io.sources import folder_sources, upload_sources
from medcls.models.saliency import METHODS
from medcls.models.segmenter import size_text
from ui import audit, chrome, common, models, scans, series, signin, viewer

BATCH_SIZE = 16
WORKERS = 2
CHUNK_SECONDS = 3.0
HEATMAP_METHOD = "gradcam"
JOB = "batch_job"
SELECTED = "_batch_selected"
SORT = "batch_sort"  # session key: the worklist's order, kept when the filters change
POSITION = "_batch_pos"  # session key prefix: the viewer's row, per job and view
SEEN = "_batch_seen"  # session key prefix: the table selection the viewer last followed
SUMMARY = "_batch_summary"  # session key: the signed worklist summary last made

chrome.page_header("Batch review", "Triage a folder of scans: predicted class, calibrated "
               "probabilities and the scans that need a look (low confidence, outside what the "
               "model was trained on, unreadable).", icon="🗂️")


# ----------------------------------------------------------------------------- layout helpers

def progress_text(job: ReviewJob) -> tuple[float, str]:
    p = job.progress
    left = p.remaining_s
    text = (f"{p.done} / {p.total} scans · {p.rate:.1f} scans/s · "
            + (f"about {left:.0f} s left" if left is not None else "estimating time left..."))
    return (p.done / p.total if p.total else 1.0), text


def scan_report(gray, explanation, pred, card, sha256: str, outline, fmt: str,
                clinician=None) -> bytes:
    """The scan's report, with the verdict recorded on it (or an empty place for one)."""
    from medcls.engine.report import render_report

    return render_report(gray, explanation, pred, card, sha256, fmt=fmt,
                         method_label=METHODS[HEATMAP_METHOD].label, segmentation=outline,
                         clinician=clinician)


def table_of(job: ReviewJob, indices: list[int]) -> pd.DataFrame:
    """The rows at ``indices`` as a DataFrame indexed by row number, with the answer as the
    clinician reads it (the class by its name, or "unreadable: reason", or withheld)."""
    def shown(p):  # the one probability formatter, never "100.00%"
        return "" if p is None or p != p else present.fmt_prob(p, 1)

    records = [rec | {"answer_name": rec["answer"],
                      "answer": present.worklist_record(job.rows[i], job.classes, job.card)["predicted"],
                      "probabilities_top": max(job.rows[i].probabilities.values(), default=None),
                      "confidence_text": shown(rec["confidence"]),
                      **{f"pt_{c}": shown(rec.get(f"p_{c}")) for c in job.classes}}
               for i, rec in zip(indices, job.records(indices))]
    table = pd.DataFrame.from_records(records, index=indices) if records else pd.DataFrame(
        columns=["file", "predicted", "confidence", "needs_attention", "error"])
    for col in ("series_number", "instance_number"):  # whole numbers, blank when missing
        if col in table:
            table[col] = pd.to_numeric(table[col], errors="coerce").astype("Int64")
    return table


# ----------------------------------------------------------------------------- model

models.require_models()

with st.sidebar:
    st.header("Model")
    model_path = models.pick_model("batch_model")
    st.caption("Every scan is classified by this model; flags use its low-confidence "
               "threshold and input gate (see its card).")

job: ReviewJob | None = st.session_state.get(JOB)
if job is not None:
    job.close_if_stopped()  # Stop was clicked: its callback ran before this run
running = bool(job and job.running)


def begin(make_sources, origin: str, address: str | None = None) -> None:
    """Build the sources and start a job (replacing this session's); refusals become
    messages, never traces, and keep the earlier results."""
    with common.user_errors("The input", stop=False) as outcome:
        sources = make_sources()
    if outcome.failed:
        return
    if not sources:
        st.warning("No files were found there (hidden files, DICOMDIR and labels.csv are "
                   "skipped).")
        return
    with common.user_errors("The model", stop=False) as outcome:
        predictor = models.load_predictor(model_path)
    if outcome.failed:
        return
    old = st.session_state.get(JOB)
    if old is not None:
        old.stop()
    st.session_state[JOB] = ReviewJob(
        predictor, sources, origin, model_path, batch_size=BATCH_SIZE, workers=WORKERS,
        make_stream=lambda stop: review_stream(model_path, sources, predictor, address,
                                               batch_size=BATCH_SIZE, workers=WORKERS, stop=stop))
    st.session_state.pop(SELECTED, None)


# ----------------------------------------------------------------------------- input

server_tab, upload_tab = st.tabs(["Folder on the server", "Upload from this computer"])

with server_tab:
    folder_allowed = signin.permitted("server-folder")  # reviewers and admins only
    root = common.settings().scan_root
    # the folder's name only: its absolute path tells anyone how the server is laid out
    st.caption(f"Allowed scan folder: `{root.name or 'scans'}`. Only folders inside it can be reviewed; "
               "subfolders are searched (a DICOM series folder gives one row per file).")
    folder = st.text_input("Folder (relative to the scan folder)", value=".", key="batch_folder",
                           help="For example `study-2024/series-3`. `.` reviews the whole scan "
                                "folder. Paths outside it (`..`, links pointing out, other "
                                "absolute paths) are refused.")
    root_ok = root.is_dir()
    if not root_ok:
        st.warning("The scan folder does not exist on this server. Set `MEDCLS_SCAN_ROOT` (or "
                   "`scan_root` in `.streamlit/secrets.toml`) to the folder that holds the scans.")
    cluster = common.settings().ray_address
    on_cluster = bool(cluster) and st.toggle(
        f"Run on the Ray cluster (`{cluster}`)", key="batch_on_cluster",
        help="The cluster reads the scans from the same folder (it must be mounted on every "
             "node) and classifies them in parallel; progress shows here as on this server.")
    if st.button("Review this folder", key="batch_start_folder", type="primary",
                 disabled=running or not root_ok or not folder_allowed) and folder_allowed:
        begin(lambda: folder_sources(root, folder.strip() or "."), f"folder {folder.strip() or '.'}"
              + (" on the Ray cluster" if on_cluster else ""), cluster if on_cluster else None)

with upload_tab:
    kind = st.radio("Upload", ["A folder", "Files or one .zip"], horizontal=True,
                    key="batch_upload_kind")
    if kind == "A folder":
        uploads = st.file_uploader("Choose a folder; its subfolders are included",
                                   accept_multiple_files="directory", key="batch_upload_dir")
    else:
        uploads = st.file_uploader("Choose scans (DICOM, PNG, JPEG, TIFF, BMP) or a .zip of them",
                                   accept_multiple_files=True, key="batch_upload_files")
    st.caption("Uploads stay in this session's memory; nothing is written to disk. A .zip is "
               "checked before it is opened (no paths leaving it, no zip bombs).")
    if st.button("Review the uploaded files", key="batch_start_upload", type="primary",
                 disabled=running or not uploads):
        begin(lambda: upload_sources(uploads), f"{len(uploads)} uploaded file(s)")

job = st.session_state.get(JOB)

# ----------------------------------------------------------------------------- progress

if job is not None and job.running:
    bar = st.progress(*progress_text(job))
    st.button("Stop", key="batch_stop", on_click=job.request_stop,
              help="Stops after the batch in progress; the scans done so far are kept.")
    job.advance(CHUNK_SECONDS, on_batch=lambda _: bar.progress(*progress_text(job)))
    st.rerun()  # the next chunk after serving any click, or the results once finished

if job is None:
    st.info("Choose a folder on the server or upload scans, then start the review.")
    st.stop()

# ----------------------------------------------------------------------------- results

rows, classes, card = job.rows, job.classes, job.card
answer_ids = audit.audit_rows(job, "batch", common.settings().scan_root)
n_total = len(job.sources)
if job.state == "failed":
    common.show_error(job.error, "The review")
status = {"done": "finished", "stopped": "stopped", "failed": "ended by an error"}[job.state]
st.subheader(f"Results: {common.plain(job.origin)}")
st.caption(f"{len(rows)} of {n_total} scans, {status} in {job.elapsed_s:.1f} s · model "
           f"{card.name} v{card.version}")
if job.state == "stopped" and job.not_reviewed:
    st.warning(f"Stopped: {job.not_reviewed} scans were not reviewed.")
if not rows:
    st.stop()

s = job.summary()  # the tiles count a class only for scans given it (medcls.engine.reading.tally)
cols = st.columns(len(classes) + 1)
cols[0].metric("Scans", s["total"])
for col, c in zip(cols[1:], classes):
    col.metric(present.class_name(card, c), s["per_class"][c])
cols = st.columns(4)
cols[0].metric("Needs attention", s["needs_attention"])
cols[1].metric("Low confidence", s["low_confidence"],
               help="Given a class, below the model's low-confidence threshold.")
cols[2].metric("Withheld (no class)", s["withheld"],
               help="Outside what the model was validated on (its scope) or unlike its training "
                    "images (input gate): no class is given, so they count in no class above.")
cols[3].metric("Unreadable", s["unreadable"])

table = table_of(job, list(range(len(rows))))
readable = table[table["error"].isna()]
if len(readable):
    threshold = card.low_confidence_threshold
    readable = readable.assign(top=readable["probabilities_top"])
    fig = px.histogram(readable, x="top", color="answer_name", nbins=20, range_x=[0, 1],
                       category_orders={"answer_name": [*present.class_names(card, classes), "Withheld"]},
                       labels={"top": "top calibrated probability", "answer_name": "answer"})
    fig.add_vline(x=threshold, line_dash="dash", annotation_text="low-confidence threshold")
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), bargap=0.05,
                      title="How sure the model is")
    with st.expander("How sure the model is: confidence of every scan"):  # the worklist first
        st.plotly_chart(fig, width="stretch", key="batch_hist")

# ---------------------------------------------------------------- series
if st.toggle("Group by series", key="batch_by_series",
             help="One row per DICOM series or NIfTI volume with its study summary: every slice "
                  "and frame answered, ordered along the slice normal (see the main page's "
                  "series mode for the rule)."):
    series.batch_series_table(job, models.load_predictor(job.model_path))

# ---------------------------------------------------------------- table
sort_by = st.selectbox("Order", list(present.SORTS), key=SORT,
                       format_func=lambda k: present.SORTS[k][0],
                       help="Kept when the filters change. Needs attention: unreadable, then "
                            "withheld, then uncertain; within each, least confident first.")
f1, f2, f3 = st.columns([1.6, 2, 2])
attention_only = f1.toggle("Needs attention only", key="batch_attention",
                           help="Low confidence, outside the training distribution, or unreadable.")
chosen = f2.multiselect("Answer", [*classes, "withheld", "unreadable"], key="batch_classes",
                        placeholder="All answers",
                        format_func=lambda c: c.capitalize() if c in ("withheld", "unreadable")
                        else present.class_name(card, c))
name_filter = f3.text_input("File name contains", key="batch_name").strip()

passing = set(job.filter(attention_only, chosen, name_filter))
view = table_of(job, [i for i in present.triage_order(rows, sort_by) if i in passing])

prob_cols = [f"pt_{c}" for c in classes]  # as text: medcls.engine.present.fmt_prob
column_config = {
    "file": st.column_config.TextColumn("File", width="medium"),
    "predicted": st.column_config.TextColumn("Predicted"),
    "answer": st.column_config.TextColumn("Answer", width="medium",
                                          help="The class, or why there is none."),
    "confidence": st.column_config.ProgressColumn("Confidence", min_value=0.0, max_value=1.0,
                                                  format="percent"),
    "confidence_text": st.column_config.TextColumn("Confidence", width="small",
                                                   help="Calibrated probability of the answer."),
    **{f"pt_{c}": st.column_config.TextColumn(f"P({present.class_name(card, c)})", width="small")
       for c in classes},
    "outside_distribution": st.column_config.CheckboxColumn(
        "Outside training distribution", help="The input gate says this scan does not look "
        "like the model's training images."),
    "low_confidence": st.column_config.CheckboxColumn("Low confidence"),
    "gate_score": st.column_config.NumberColumn("Gate distance", format="%.1f"),
    "flags": st.column_config.TextColumn("Flags", width=130),
    "error": st.column_config.TextColumn("Error", width="medium"),
    "series_number": st.column_config.NumberColumn("Series", format="%d"),
    "instance_number": st.column_config.NumberColumn("Instance", format="%d"),
    "modality": st.column_config.TextColumn("Modality"),
}
order = ["file", "answer", "flags", "confidence_text", *prob_cols, "gate_score", "modality",
         "series_number", "instance_number"]  # flags pinned beside the answer
# the selection is positions in `view`: a new filter gets a new table (and no stale selection)
view_key = hashlib.sha1(repr((attention_only, chosen, name_filter, sort_by)).encode()).hexdigest()[:8]
event = st.dataframe(view, key=f"batch_table_{job.id}_{view_key}", hide_index=True,
                     column_order=[c for c in order if c in view.columns],
                     column_config=column_config, on_select="rerun",
                     selection_mode="single-row", height=min(420, 38 + 35 * max(len(view), 1)))
st.caption(f"{len(view)} of {len(table)} rows shown, {present.SORTS[sort_by][0].lower()}. Tick "
           "a row to open it in the viewer; then ◀ Previous / Next ▶ (keys k / j) step through "
           "the rows shown.")


shown = list(view.index)
st.download_button(f"Download CSV ({len(shown)} rows shown)",
                   data=lambda shown=shown: job.csv(shown),
                   file_name="medcls-review.csv", mime="text/csv", key="batch_csv",
                   on_click=audit.export_logger(None, "worklist-csv", "batch", len(shown)),
                   help="File names, predictions, probabilities, flags and series/instance "
                        "numbers; no patient tags.")

# ---------------------------------------------------------------- signed summary
with st.expander("Signed summary of this worklist (PDF)"):
    st.caption("Every scan's answer as the table says it (withheld scans: “Withheld” and why), the "
               "class counts, the model's identity and today's date, signed with your name; the "
               "file's SHA-256 is recorded in the audit trail. No file names or patient tags.")
    made = st.session_state.get(f"{SUMMARY}_{job.id}")
    if st.button("Sign and make the summary", key="batch_sign"):
        from medcls.engine.summary import signed_summary

        with common.user_errors("The summary", stop=False), st.spinner("Writing the summary..."):
            made = signed_summary([r.reading(card) for r in rows], [r.sha256 for r in rows], card,
                                  signin.current_user().name, job.origin)
            audit.record_export("worklist-summary-pdf", "batch", n_answers=len(rows),
                                target=f"sha256:{made.sha256}")
            st.session_state[f"{SUMMARY}_{job.id}"] = made
    if made is not None:
        st.download_button("Download the signed summary (PDF)", data=made.pdf,
                           file_name="medcls-worklist-summary.pdf", mime="application/pdf",
                           key="batch_summary_pdf", on_click="ignore")
        st.caption(f"SHA-256 {made.sha256} (recorded in the audit trail).")

# ---------------------------------------------------------------- selected row
selected = list(getattr(getattr(event, "selection", None), "rows", None) or [])
pos_key, seen_key = f"{POSITION}_{job.id}_{view_key}", f"{SEEN}_{job.id}_{view_key}"
if selected and selected != st.session_state.get(seen_key):  # a new tick in the table
    st.session_state[pos_key], st.session_state[seen_key] = selected[0], selected
if st.session_state.get(pos_key) is None or not len(view):
    st.stop()


@st.fragment
def selected_row() -> None:
    """The row in the viewer, stepped with ◀ / ▶ (keys k / j). A fragment: stepping reruns only
    this part, so a report button still on screen from the row before keeps its file (a full
    rerun would drop it: "Deferred file not found")."""
    position = min(max(int(st.session_state[pos_key]), 0), len(view) - 1)

    def step(delta: int) -> None:
        st.session_state[pos_key] = min(max(position + delta, 0), len(view) - 1)

    index = int(view.index[position])
    row = rows[index]
    st.subheader(f"Selected: {common.plain(row.file)}")
    p1, p2, p3 = st.columns([1, 1, 4])
    p1.button("◀ Previous", key="batch_prev", on_click=step, args=(-1,), disabled=position == 0)
    p2.button("Next ▶", key="batch_next", on_click=step, args=(1,), disabled=position >= len(view) - 1)
    p3.caption(f"Row {position + 1} of {len(view)} shown.")
    chrome.keyboard_steps({"j": "Next ▶", "k": "◀ Previous"})
    if row.error is not None:
        st.error(f"This file could not be read: {row.error}")
        return

    cache = st.session_state.setdefault(SELECTED, {})
    key = (job.id, index, HEATMAP_METHOD)
    if key not in cache:
        with common.user_errors():
            with st.spinner("Reloading the scan and computing its heatmap..."):
                scan = job.load(index)
                predictor = models.load_predictor(job.model_path)
                explanation = predictor.explain(scan, HEATMAP_METHOD)
                outline = predictor.outline(scan, explanation.prediction)  # tumour answers only
        cache.clear()  # one selected scan per session
        cache[key] = (scan, explanation, outline)
    scan, explanation, outline = cache[key]
    pred = explanation.prediction
    viewer.verdict_line(pred, card)

    c1, c2 = st.columns([2, 1.2])
    with c1:
        w1, w2 = st.columns([2, 1])
        with w1:  # one window/level for both images
            center, width = scans.window_controls(scan, key="batch")
        show_overlay = w2.toggle("Overlay", value=True, key="batch_overlay",
                                 help="The heatmap overlay on the right image; off: the plain scan.")
        image = scans.display(scan, center, width)
        gray = image if image.ndim == 2 else image.mean(axis=2)
        # the heatmap's own region only without a segmentation companion (it is no lesion edge)
        over, title, drawn = viewer.overlay_panel(gray, explanation, pred, card, 0.45, show_overlay,
                                                  not card.get("segmentation"), key="batch")
        viewer.linked_viewer(draw_outline(image, outline), over,
                             ("Scan", f"{title} · {METHODS[HEATMAP_METHOD].label}"),
                             key="batch_viewer", height=340)
        st.caption(f"{common.plain(scan.modality)} · {scan.shape[1]}×{scan.shape[0]} px"
                   + (f" · {viewer.region_caption(explanation.region)}" if drawn else "")
                   + ". Drag to pan, scroll to zoom (both images move together).")
        if outline is not None:
            st.caption(f"Tumour outline (yellow, {outline.method}): {size_text(outline)}.")
    with c2:
        kind, text = viewer.confidence_statement(pred, card)
        getattr(st, kind)(text)
        st.plotly_chart(viewer.probability_chart(pred, card), width="stretch", key="batch_probs")
        answer_id = answer_ids[index] if answer_ids else None
        audit.verdict_control(answer_id, row.predicted, classes,
                              key=f"batch_verdict_{id(job)}_{index}", card=card,
                              withheld=row.outside_distribution)
        for fmt in ("pdf", "png"):  # built on click; no file name or patient tag goes in
            st.download_button(
                f"Report for this scan ({fmt.upper()})",
                data=lambda fmt=fmt, args=(gray, explanation, pred, card, scan.sha256, outline),
                answer_id=answer_id: scan_report(*args, fmt=fmt,
                                                 clinician=audit.recorded_verdict(answer_id)),
                file_name=f"medcls-report-{scan.short_id}.{fmt}",
                on_click=audit.export_logger(answer_id, f"report-{fmt}", "batch"),
                mime="application/pdf" if fmt == "pdf" else "image/png", key=f"batch_report_{fmt}")


selected_row()
