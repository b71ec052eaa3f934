"""Incoming: the series the PACS sends to MedCLS's listener (`python -m medcls listen`), live:
received, answering, sent, not answered (and why), failed (with a retry), the time from a
series' last instance to its results in the PACS, and the listener's health.

Layout only: the rows, counts, words and the retry are :mod:`medcls.integrations.dicomnode.incoming`
and :mod:`medcls.integrations.dicomnode.jobs` calls on the queue in the audit trail's database."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from medcls.core.errors import MedclsError
from medcls.integrations.dicomnode import incoming
from medcls.integrations.dicomnode.jobs import FAILED, JobQueue
from ui import audit, chrome, common

chrome.page_header("Incoming", "Series the PACS routes to MedCLS's DICOM listener, answered and "
                   "sent back into the PACS without anyone asking.", icon="📥",
                   permission="incoming")

with st.sidebar:
    live = st.toggle("Refresh every 3 s", value=True, key="incoming_live")
    shown = st.multiselect("Show", incoming.GROUPS, default=list(incoming.GROUPS),
                           key="incoming_groups")

queue = JobQueue(audit.audit_store(), "")


@st.fragment(run_every=3 if live else None)
def board() -> None:
    with common.user_errors("The listener's queue"):
        health = queue.health()
        jobs = queue.rows()
    # ------------------------------------------------------------------ health
    st.subheader("Listener")
    if not health:
        st.info("No listener has run against this database yet. Start one with "
                "`python -m medcls listen` (README: Wire it to the PACS).")
    for row in health:
        h = incoming.health_view(row)
        c = st.columns([2, 2, 1.4])
        (c[0].success if h.up else c[0].error)(h.status)
        c[1].markdown(f"**Last association**  \n{h.last_association}")
        c[2].markdown(f"**Spool**  \n{h.spool}")
        c[2].progress(h.spool_fraction)
        st.caption(h.detail)
    # ------------------------------------------------------------------ queue
    st.subheader("Queue")
    n = incoming.counts(jobs)
    for col, group in zip(st.columns(len(incoming.GROUPS)), incoming.GROUPS):
        col.metric(group.capitalize(), n[group])
    st.caption(incoming.latency(jobs).text)
    rows = [r for r, j in zip(incoming.job_rows(jobs), jobs)
            if incoming.GROUP_OF.get(j["state"]) in shown]
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="incoming_table")
    else:
        st.caption("No series in the groups shown.")
    # ------------------------------------------------------------------ retry
    failed = [j for j in jobs if j["state"] == FAILED]
    if failed:
        st.subheader("Failed series")
        words = {j["id"]: f"job {j['id']} · {j.get('modality') or '?'} series "
                          f"{j.get('series_number') or ''} · {incoming.reason_text(j)}"
                 for j in failed}
        pick = st.selectbox("Series", list(words), format_func=words.get, key="incoming_failed")
        if st.button("Retry", key="incoming_retry", type="primary"):
            try:
                st.success(incoming.retry(queue, pick))
            except MedclsError as exc:
                st.error(str(exc))


board()
st.caption("Series are named by a hash of their UID; no patient data is kept in the queue. Rules "
           "for which model answers: the card's modality, body part and validated scope.")
