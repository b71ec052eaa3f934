"""Monitoring: what the audit trail says about the models in use (reviewers and admins).
Every table is computed by :mod:`medcls.integrations.audit.monitoring`; this page lays them out."""

from __future__ import annotations

import datetime as dt

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from medcls.core.errors import AuditError
from medcls.integrations.audit import monitoring as mon
from ui import audit, chrome

chrome.page_header("Monitoring", "Answers, drift and agreement with the clinicians, from the audit "
               "trail.", icon="📈", permission="monitoring")

with st.sidebar:
    st.header("Period")
    today = dt.datetime.now(dt.timezone.utc).date()
    period = st.date_input("Answers from / to (UTC)", (today - dt.timedelta(days=90), today),
                           key="mon_period")
    period = tuple(period) if isinstance(period, (tuple, list)) else (period,)
    start, end = (period[0], period[-1]) if period else (today, today)
since = dt.datetime.combine(start, dt.time(), dt.timezone.utc)
until = dt.datetime.combine(end, dt.time(), dt.timezone.utc) + dt.timedelta(days=1)

try:
    frame = mon.answers_frame(audit.audit_store(), since, until)
except AuditError as exc:
    st.error(str(exc).replace(" The answer is shown, but it was not recorded in the audit trail.", ""))
    st.stop()
st.caption(f"Audit trail: {audit.audit_store().where}")  # a file's name, never its server path
if frame.empty:
    st.info("No answers were recorded in this period.")
    st.stop()

decided = frame["verdict"].isin(["agree", "disagree"])
c = st.columns(4)
c[0].metric("Answers", len(frame))
c[1].metric("With a verdict", int(frame["verdict"].notna().sum()))
c[2].metric("Agreement", f"{(frame['verdict'] == 'agree').sum() / decided.sum():.0%}"
            if decided.any() else "–", help="agree / (agree + disagree); 'unsure' is left out")
c[3].metric("Withheld", f"{frame['withheld'].mean():.1%}",
            help="Outside what the model was trained on (input gate) or its validated scope")

# ----------------------------------------------------------------------------- volume and drift
daily = mon.per_day(frame)
left, right = st.columns(2)
DAYS = dict(type="date", tickformat="%d %b %Y", dtick=86_400_000, title="day (UTC)")  # whole days
bars = px.bar(daily, x="day", y="answers", title="Answers per day", height=280)
bars.update_layout(xaxis=DAYS, margin=dict(l=10, r=10, t=40, b=10))
left.plotly_chart(bars, width="stretch", key="mon_daily")
drift = go.Figure()
drift.add_scatter(x=daily["day"], y=daily["withheld_share"] * 100, name="withheld (input gate or scope)",
                  mode="lines+markers")
drift.add_scatter(x=daily["day"], y=daily["low_confidence_share"] * 100, name="low confidence",
                  mode="lines+markers")
drift.update_layout(title="Drift: share flagged per day", height=280, yaxis_title="% of answers",
                    xaxis=DAYS,
                    margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))
right.plotly_chart(drift, width="stretch", key="mon_drift")
st.caption("Rising shares of withheld or low-confidence answers are the first sign that the scans "
           "have changed (a new scanner, sequence or patient group).")

# ----------------------------------------------------------------------------- agreement
st.subheader("Agreement with the clinicians")
agreement = mon.agreement(frame)
st.dataframe(agreement, hide_index=True, width="stretch", key="mon_agreement",
             column_config={"agreement": st.column_config.ProgressColumn(
                 "agreement", min_value=0.0, max_value=1.0, format="percent")})
models = sorted(frame["model_name"].unique())
model = st.selectbox("Confusion matrix of model", models, key="mon_model")
matrix = mon.confusion(frame, model)
if matrix.empty or not matrix.values.sum():
    st.caption("No agree/disagree verdicts for this model yet.")
else:
    fig = px.imshow(matrix, text_auto=True, color_continuous_scale="Blues",
                    labels=dict(x="clinician's class", y="model's class", color="answers"))
    fig.update_layout(height=360, margin=dict(l=10, r=10, t=30, b=10),
                      title=f"{model}: model versus clinician")
    st.plotly_chart(fig, width="stretch", key="mon_confusion")

# ----------------------------------------------------------------------------- disagreements
st.subheader("Disagreements")
dis = mon.disagreements(frame)
names = mon.shown(frame).set_index("id")  # the classes as the screen says them
st.dataframe(dis.assign(predicted=[names.at[i, "answer"] for i in dis["answer_id"]],
                        corrected_class=[names.at[i, "clinician_answer"] for i in dis["answer_id"]])
             .rename(columns={"predicted": "answer", "corrected_class": "clinician's class"}),
             hide_index=True, width="stretch", key="mon_disagreements")
st.caption("Inputs are named by SHA-256, SOP Instance UID or path in the scan folder; no patient "
           "data is stored. The CSV keeps the class identifiers (a data set's labels). `python -m medcls audit export --since DATE --out DIR` writes those "
           "with known files as a labels.csv for training.")
st.download_button("Download disagreements (CSV)", data=mon.to_csv(dis),
                   file_name="medcls-disagreements.csv", mime="text/csv", key="mon_csv",
                   on_click=audit.export_logger(None, "disagreements-csv", "monitoring", len(dis)))
