"""MedCLS: upload a scan, see it, read the calibrated prediction and the heatmap."""

from __future__ import annotations

import time

import streamlit as st

import ui
import ui_series
from medcls import identifying_attributes
from medcls.report import render_report
from medcls.saliency import METHODS

ui.navigation()  # runs the chosen page; returns here when it is this one

ui.page_header("MedCLS · scan classification", "Upload a scan, read the calibrated class "
               "probabilities and see where the model looked; every result needs a clinician's "
               "review.", tab_title="MedCLS")

ui.require_models()
warm_up = ui.warm_default_model()  # TensorFlow and the default model load while a file is picked

with st.sidebar:
    st.header("Model")
    model_path = ui.pick_model("model")
    ui.warm_up_status(warm_up)
    st.header("Heatmap")
    method = ui.method_picker()
    alpha = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key="alpha")
    show_region = st.toggle("Region outline and box", value=True, key="show_region")
    st.header("Privacy")
    show_phi = st.toggle("Show identifying tags", value=False, key="show_phi",
                         help="Shows patient name, ID and dates of a DICOM on screen only. "
                              "They are never stored, logged or exported.")

if ui_series.series_mode():  # several files, a folder, a zip or a NIfTI: ui_series lays it out
    ui_series.series_page(model_path, method, alpha, show_region)
    st.stop()

uploaded = st.file_uploader("Upload a scan: DICOM (with or without .dcm), PNG, JPEG, TIFF or BMP",
                            type=None, key="upload")
data = ui.current_scan_bytes(uploaded)
if data is None:
    st.info("Upload a scan to classify it. Models answer for their own task only; "
            "pick the task in the sidebar.")
    st.stop()

with ui.user_errors():  # every failure becomes a message, never a trace
    scan = ui.cached_scan(data)

frame = 0
if scan.n_frames > 1:
    frame = st.slider("Frame", 1, scan.n_frames, 1, key="frame") - 1
    with ui.user_errors():
        scan = ui.cached_scan(data, frame)

with ui.user_errors("The model"):
    predictor = ui.load_predictor(model_path)
card = predictor.card

# ---------------------------------------------------------------- prediction + heatmap
requested = bool(st.session_state.get("strongest_evidence"))  # the user asked for tumour evidence
key = (scan.sha256, frame, model_path, method, requested)
results = st.session_state.setdefault("_results", {})
if key not in results:
    with ui.user_errors():
        t0 = time.perf_counter()
        with st.spinner(f"Classifying and computing {METHODS[method].label}..."):
            explanation = ui.explain_for_display(predictor, scan, method, requested)
            outline = predictor.outline(scan, explanation.prediction)  # tumour answers only
        results.clear()  # keep one result per session: memory stays bounded
        results[key] = (explanation, (time.perf_counter() - t0) * 1000, outline)
explanation, elapsed_ms, outline = results[key]
heatmap_outline = show_region and predictor.segmenter is None  # the heatmap is not a lesion edge
pred = explanation.prediction

# ---------------------------------------------------------------- layout
left, right = st.columns(2)
with left:
    st.subheader("Scan")
    center, width = ui.window_controls(scan, key="main")
    image = ui.display(scan, center, width)
    ui.scan_image(image, outline, show_region,
                  caption=f"{scan.modality} · {scan.shape[1]}×{scan.shape[0]} px"
                     + (f" · {scan.pixel_spacing[1]:.2f}×{scan.pixel_spacing[0]:.2f} mm/px"
                        if scan.pixel_spacing else "")
                     + (f" · frame {frame + 1}/{scan.n_frames}" if scan.n_frames > 1 else ""))
with right:
    st.subheader(f"Heatmap · {METHODS[method].label} for “{explanation.class_name}”: "
                 "what drove the class")
    gray = image if image.ndim == 2 else image.mean(axis=2)
    # the heatmap's own region only without a segmenter (it is no lesion edge), or on request
    ui.heatmap_view(gray, explanation, card, alpha, heatmap_outline or (show_region and requested),
                    requested, key="strongest_evidence")

st.subheader(f"Prediction: {pred.label}" if not pred.outside_training_distribution
             else "Prediction withheld: outside what this model was trained on")
kind, text = ui.confidence_statement(pred, card)
getattr(st, kind)(text)
st.plotly_chart(ui.probability_chart(pred.classes, pred.probabilities), width="stretch",
                key="probs")
st.caption(f"Answered by {card['name']} v{card['version']} in {elapsed_ms:.0f} ms "
           "(preprocess, predict and heatmap). Probabilities are calibrated "
           f"(temperature {predictor.package.temperature:.2f}, fitted on the validation split).")
answer_id = ui.audit_answer(key, pred, card, "main", input_sha256=scan.sha256, frame=frame,
                            heatmap_method=method)

# ---------------------------------------------------------------- export
c1, c2 = st.columns(2)
for col, fmt in ((c1, "png"), (c2, "pdf")):
    col.download_button(f"Download report ({fmt.upper()})",
                        data=lambda fmt=fmt: render_report(
                            gray, explanation, pred, card, scan.sha256, fmt=fmt,
                            method_label=METHODS[method].label, alpha=alpha,
                            segmentation=outline),  # built on click
                        file_name=f"medcls-report-{scan.short_id}.{fmt}",
                        mime="application/pdf" if fmt == "pdf" else "image/png", key=f"dl_{fmt}",
                        on_click=ui.export_logger(answer_id, f"report-{fmt}", "main"))

# ---------------------------------------------------------------- model + metadata
with st.expander("Model card: which model answered, its test figures and limits"):
    ui.card_summary(card)
with st.expander("Scan metadata (de-identified)"):
    st.json(scan.metadata, expanded=False)
    if show_phi:
        phi = {}
        with ui.user_errors(stop=False):
            phi = identifying_attributes(data)
        if phi:
            st.warning("Identifying tags, shown on request only; not stored or exported.")
            st.json(phi)
        else:
            st.caption("This file carries no identifying tags.")
