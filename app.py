"""MedCLS: upload a scan, read the one-line answer, see where the model looked."""

from __future__ import annotations

import time
from pathlib import Path

import streamlit as st

from medcls import identifying_attributes
from medcls.engine import stack
from medcls.engine.report import render_report
from medcls.io.acquisition import acquisition_of
from medcls.models.saliency import METHODS
from medcls.models.segmenter import size_text
from ui import audit, chrome, common, models, scans, series, viewer

RESULTS = "_results"  # session key: {(scan, frame, model, method, class): (explanation, ms, outline)}
EXPLAIN = "explain"  # session key prefix: the class the heatmap explains, per scan and model
MAX_RESULTS = 2  # per session: the answer's heatmap and one other class's

chrome.navigation()  # runs the chosen page; returns here when it is this one

chrome.page_header("MedCLS · scan classification", "Upload a scan, read the calibrated class "
               "probabilities and see where the model looked; every result needs a clinician's "
               "review.", tab_title="MedCLS")

models.require_models()
warm_up = models.warm_default_model()  # TensorFlow and the default model load while a file is picked

with st.sidebar:
    st.header("Model")
    model_path = models.pick_model("model")
    models.warm_up_status(warm_up, model_path)
    st.header("Heatmap")
    method = models.method_picker()
    alpha = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key="alpha")
    show_overlay = st.toggle("Heatmap overlay", value=True, key="show_overlay",
                             help="Off: the right panel shows the plain scan, for comparison.")
    show_region = st.toggle("Region outline and box", value=True, key="show_region")
    st.header("Privacy")
    show_phi = st.toggle("Show identifying tags", value=False, key="show_phi",
                         help="Shows patient name, ID and dates of a DICOM on screen only. "
                              "They are never stored, logged or exported.")

if series.series_mode():  # several files, a folder, a zip or a NIfTI: ui_series lays it out
    series.series_page(model_path, method, alpha, show_region, show_overlay)
    st.stop()

uploaded = st.file_uploader("Upload a scan: DICOM (with or without .dcm), PNG, JPEG, TIFF or BMP",
                            type=None, key="upload")
data = scans.current_scan_bytes(uploaded)
if data is None:
    st.info("Upload a scan to classify it. Models answer for their own task only; "
            "pick the task in the sidebar.")
    st.stop()

scan, frame = scans.open_scan(data, frame_key="frame")

with common.user_errors("The model"):
    predictor = models.load_predictor(model_path)
card = predictor.card


# ---------------------------------------------------------------- prediction + heatmap
def explained(class_index: int | None):
    """(explanation, ms, outline) of ``class_index`` (None: the answer), a few kept per session."""
    key = (scan.sha256, frame, model_path, method, class_index)
    results = st.session_state.setdefault(RESULTS, {})
    if key not in results:
        t0 = time.perf_counter()
        with st.spinner(f"Classifying and computing {METHODS[method].label}..."):
            explanation = predictor.explain(scan, method, class_index=class_index)
            outline = None if class_index is not None else \
                predictor.outline(scan, explanation.prediction)  # tumour answers only
        while len(results) >= MAX_RESULTS:  # memory stays bounded
            results.pop(next(iter(results)))
        results[key] = (explanation, (time.perf_counter() - t0) * 1000, outline)
    return results[key]


with common.user_errors():
    explanation, elapsed_ms, outline = explained(None)
pred = explanation.prediction

# ---------------------------------------------------------------- the answer, first
verdict = viewer.verdict_line(pred, card)
if verdict.withheld:
    with st.spinner("Checking whether another task's model accepts this scan..."):
        suggestion = models.suggest_other_task(scan, card)
    if suggestion:
        st.info(suggestion)

# ---------------------------------------------------------------- viewer
# The viewer sits right under the verdict (in the first screen of a laptop); the controls that
# choose what it shows (the explained class, "show anyway") are laid out below it.
viewer_slot = st.container()
c_cls, c_any = st.columns([3, 2])
with c_cls:
    class_index = viewer.explain_class_picker(
        pred, card, key=f"{EXPLAIN}_{scan.short_id}_{frame}_{Path(model_path).name}")
anyway = False
if pred.outside_training_distribution and show_overlay:
    anyway = c_any.toggle("Show the heatmap anyway", value=False, key="main_anyway",
                          help="The answer is withheld; the heatmap of an answer that is not "
                               "given is not a finding, so no region or area is drawn on it.")
if class_index != explanation.class_index:
    with common.user_errors():
        explanation = explained(class_index)[0]
asked = explanation.class_index != pred.index  # another class's map, asked for
# the heatmap's own region only without a segmenter (it is no lesion edge), or when asked for
heatmap_region = show_region and (predictor.segmenter is None or asked)
heat, region_drawn = viewer.heat_for_viewer(explanation, pred, card, show_overlay, heatmap_region,
                                            anyway)
with viewer_slot:
    got = viewer.scan_viewer(scan, pred, card, heat, outline if show_region else None,
                             METHODS[method].label, alpha, show_overlay, key="main_viewer",
                             cache_key=("main", scan.sha256, frame, model_path, method,
                                        explanation.class_index, heat is not None,
                                        region_drawn, show_region))
    st.caption(f"{common.plain(scan.modality)} · {scan.shape[1]}×{scan.shape[0]} px"
               + (f" · {scan.pixel_spacing[1]:.2f}×{scan.pixel_spacing[0]:.2f} mm/px"
                  if scan.pixel_spacing else "")
               + (f" · frame {frame + 1}/{scan.n_frames}" if scan.n_frames > 1 else "")
               + (f" · **this scan:** {common.plain(stack.acquisition_words(acquisition_of(scan.metadata, scan.modality), scan.modality))} (from its own tags)"
                  if scan.source_format == "dicom" else "")
               + f" · **{card['name']} was validated on:** {stack.scope_short(card)}")
    if heat is not None:
        st.caption(viewer.heatmap_note(pred, card, explanation, region_drawn))
    elif show_overlay and pred.outside_training_distribution:
        st.caption("Heatmap hidden: the answer is withheld.")
    if region_drawn:
        st.caption(viewer.region_caption(explanation.region))
    if outline is not None and show_region:
        st.caption(f"Tumour outline (yellow, {outline.method}): {size_text(outline)}.")
window = (got["center"], got["width"]) if got and "center" in got else (None, None)
gray = scans.display(scan, *window) if window[0] is not None else scans.display(
    scan, scan.window_center, scan.window_width)
gray = gray if gray.ndim == 2 else gray.mean(axis=2)

kind, text = viewer.confidence_statement(pred, card)
getattr(st, kind)(text)
st.plotly_chart(viewer.probability_chart(pred, card), width="stretch", key="probs")
st.caption(f"Answered by {card['name']} v{card['version']} in {elapsed_ms:.0f} ms "
           "(preprocess, predict and heatmap). Probabilities are calibrated "
           f"(temperature {predictor.package.temperature:.2f}, fitted on the validation split).")
# the audit keeps the tumour's size as shown: the segmentation, else the answer's heatmap region
# (Answer.of keeps none for a no-tumour or withheld answer)
answer_id = audit.audit_answer((scan.sha256, frame, model_path, method), pred, card, "main",
                            region=outline if outline is not None else explained(None)[0].region,
                            input_sha256=scan.sha256, frame=frame, heatmap_method=method)
models.preload_other_tasks(card)

# ---------------------------------------------------------------- export
c1, c2 = st.columns(2)
for col, fmt in ((c1, "png"), (c2, "pdf")):
    col.download_button(f"Download report ({fmt.upper()})",
                        data=lambda fmt=fmt: render_report(
                            gray, explanation, pred, card, scan.sha256, fmt=fmt,
                            method_label=METHODS[method].label, alpha=alpha,
                            segmentation=outline,
                            clinician=audit.recorded_verdict(answer_id)),  # built on click
                        file_name=f"medcls-report-{scan.short_id}.{fmt}",
                        mime="application/pdf" if fmt == "pdf" else "image/png", key=f"dl_{fmt}",
                        on_click=audit.export_logger(answer_id, f"report-{fmt}", "main"))

# ---------------------------------------------------------------- model + metadata
with st.expander("Model card: which model answered, its test figures and limits"):
    models.card_summary(card)
with st.expander("Scan metadata (de-identified)"):
    st.json(scan.metadata, expanded=False)
    if show_phi:
        phi = {}
        with common.user_errors(stop=False):
            phi = identifying_attributes(data)
        if phi:
            st.warning("Identifying tags, shown on request only; not stored or exported.")
            st.json(phi)
        else:
            st.caption("This file carries no identifying tags.")
