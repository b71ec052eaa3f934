"""PACS: search the hospital's PACS (DICOMweb), classify whole studies, and send the results
back as DICOM (a TID 1500 structured report and heatmap captures) beside the images.

Layout only: searching, reviewing and sending are :class:`medcls.integrations.pacs.workspace.PacsWorkspace` calls;
the workspace lives in this session's state (patient data shown here only with the "Show
identifying tags" switch, never logged or written anywhere but the DICOM results sent to the
PACS). A reviewer searches the PACS; a clinician opens a study by its accession number. Every
text from the PACS is shown as plain text (``common.plain``). Connection settings come from the
environment or ``.streamlit/secrets.toml`` (see the README, section "PACS")."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from medcls import MedclsError
from medcls.core.errors import AuditError
from medcls.integrations.pacs.client import PacsClient, pacs_settings
from medcls.integrations.pacs.results import RESEARCH_LABEL, overlay_capture
from medcls.integrations.pacs.review import record_review
from medcls.integrations.pacs.workspace import PacsWorkspace, series_rows, study_rows
from ui import audit, chrome, common, models, series, signin

WORKSPACE = "pacs_workspace"

user = chrome.page_header("PACS", "Search the PACS, classify whole studies series by series, and "
                          "send the results back as DICOM beside the images.", icon="🏥",
                          permission="pacs-open")
models.require_models()

try:
    settings = pacs_settings(common.settings())
except MedclsError as exc:
    common.show_error(exc, "The PACS settings")
    st.stop()
if settings is None:
    st.info("No PACS is configured. Set `MEDCLS_PACS_URL` (and `MEDCLS_PACS_USER` / "
            "`MEDCLS_PACS_PASSWORD`, or `MEDCLS_PACS_TOKEN`) or a `[pacs]` section in "
            "`.streamlit/secrets.toml`; see the README, section PACS.")
    st.stop()
client = PacsClient(settings)
ws: PacsWorkspace = st.session_state.setdefault(WORKSPACE, PacsWorkspace())

with st.sidebar:
    st.header("Model")
    model_path = models.pick_model("pacs_model")
    st.caption(f"PACS: {common.plain(client.address)}")
    st.header("Privacy")
    show_phi = st.toggle("Show identifying tags", value=False, key="pacs_show_phi",
                         help="Shows patient name and ID, study dates, accession numbers and "
                              "UIDs on screen only. They are never stored, logged or exported.")
may_search = signin.permitted("pacs-search", explain=False)

# ----------------------------------------------------------------------------- search
filters: dict = {}
with st.form("pacs_search"):
    if may_search:
        c0, c1, c2, c3, c4, c5 = st.columns([1.4, 1.6, 1.3, 1.3, 1, 2])
        accession = c0.text_input("Accession number")
        filters["patient_id"] = c1.text_input("Patient ID").strip() or None
        filters["date_from"] = c2.date_input("Study date from", value=None, format="YYYY-MM-DD")
        filters["date_to"] = c3.date_input("to", value=None, format="YYYY-MM-DD")
        filters["modality"] = c4.text_input("Modality", placeholder="MR").strip().upper() or None
        filters["description"] = c5.text_input("Description contains").strip() or None
    else:
        accession = st.text_input("Accession number", help="The accession number of the study "
                                  "you were asked to read. Searching the PACS and listing its "
                                  "patients needs the reviewer role.")
    searched = st.form_submit_button("Search" if may_search else "Open", type="primary")
if searched:
    try:
        with st.spinner("Searching the PACS..."):
            ws.search_as(user, client, accession=accession, **filters)
    except MedclsError as exc:
        common.show_error(exc, "The PACS search")

if not ws.studies:
    st.caption("No studies listed yet: " + ("search by accession number, patient ID, study date, "
                                            "modality or description." if may_search else
                                            "open a study by its accession number."))
    st.stop()

st.subheader(f"Studies ({len(ws.studies)})")
st.dataframe(pd.DataFrame(study_rows(ws.studies, identifying=show_phi)), hide_index=True,
             width="stretch")
uids = [s.study_uid for s in ws.studies]
chosen = st.multiselect("Studies to classify", uids, format_func=lambda u: ws.label(u, show_phi),
                        key="pacs_selected")
if st.button("Run", type="primary", disabled=not chosen):
    predictor = models.load_predictor(model_path)
    bar = st.progress(0.0, text="Retrieving and classifying...")
    try:
        ws.run(client, predictor, chosen,
               progress=lambda i, n: bar.progress(i / n, text=f"{i} / {n} studies done"))
    except MedclsError as exc:
        common.show_error(exc, "The PACS")
    bar.empty()
    # every answered instance in the audit trail, by its SOP Instance UID (no patient data)
    for uid in chosen:
        if uid in ws.reviews:
            try:
                record_review(audit.audit_store(), ws.reviews[uid], predictor, signin.current_user().name)
            except AuditError as exc:
                common.audit_warning(exc)

# ----------------------------------------------------------------------------- results
for uid, message in ws.errors.items():
    st.error(f"{common.plain(ws.label(uid, show_phi))}: {common.plain(message)}")


for uid, review in ws.reviews.items():
    st.divider()
    st.subheader(f"Results: {common.plain(ws.label(uid, show_phi))}")
    st.caption(common.plain(f"Model {review.model.name} {review.model.version} ({review.model.tag})"))
    st.dataframe(pd.DataFrame(series_rows(review)), hide_index=True, width="stretch")
    for k in review.skipped:
        st.caption(common.plain(f"Skipped (series {k.series_number}, {k.sop_class}): {k.reason}"))
    for s in review.series:
        if s.answer is None or not s.answer.slices:
            continue
        with st.expander(common.plain(f"Series {s.series.number} · {s.series.description} · "
                                      f"{s.state}"), expanded=True):
            # the series view's summary and strip: the same answer as on the main page
            series.summary_box(s.answer)
            st.plotly_chart(series.strip_figure(s.answer, s.driving if s.driving is not None else 0),
                            width="stretch", key=f"strip-{s.series.series_uid}-{s.answer.series.key}")
            if s.roi is not None:
                size = (f"area {s.roi.area_mm2:.0f} mm²" if s.roi.area_mm2 is not None
                        else f"area {s.roi.area_px} px (no pixel spacing)")
                if s.roi.diameter_mm is not None:
                    size += f", longest diameter {s.roi.diameter_mm:.1f} mm"
                st.caption(f"Tumour region on slice {s.driving + 1}: {size} "
                           f"(method: {s.roi.method})")
            if s.explanation is not None:
                st.image(overlay_capture(s, review.model), width=420,
                         caption=f"Slice {s.driving + 1}, the slice that shows the answer "
                                 f"({RESEARCH_LABEL})")
    outcome = ws.outcomes.get(uid)
    if review.already_sent and outcome is None:
        st.info("Results of this model version are already in the PACS for this study "
                "(found by QIDO-RS); they are not sent again.")
        if show_phi:
            st.code("\n".join(f"SR series {s.series_uid}" for s in review.prior_results))
    elif outcome is None and st.button("Send results to PACS", key=f"send-{uid}",
                                       disabled=not review.answered
                                       or not signin.permitted("pacs-send")) and signin.permitted("pacs-send", False):
        try:
            with st.spinner("Storing the SR and the captures (STOW-RS)..."):
                outcome = ws.send(client, uid)
            if outcome.sent:
                audit.record_export("pacs-send", "pacs", n_answers=len(review.answer_ids)
                                 or len(review.series),
                                 target=" ".join(outcome.sop_instance_uids))
        except MedclsError as exc:
            common.show_error(exc, "Sending")
    if outcome is not None:
        (st.success if outcome.sent else st.info)(common.plain(outcome.message))
        if show_phi:  # UIDs carry the examination's date and time
            st.code("\n".join([f"stored {u}" for u in outcome.sop_instance_uids]
                              + [f"series {u}" for u in outcome.series_uids]))
