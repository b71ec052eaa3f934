"""Adapt to site (admins): adapt a model to this hospital's scanners from cases its clinicians
confirmed, see before/after on other local cases, then make it the site default or discard it.

Layout only: the work is :mod:`medcls.learning.adapt` (an :class:`~medcls.learning.site.AdaptationJob` runs in
a background thread kept in the session; each script run shows its progress and reruns).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from medcls import MedclsError
from medcls.learning.adapt import AdaptConfig, Recipe, figures_table
from medcls.learning.site import (
    AdaptationJob,
    cases_folder,
    discard,
    new_package_folder,
    set_site_default,
    unpack_cases,
)
from ui import chrome, common, models

JOB = "adapt_job"
POLL_S = 1.0

chrome.page_header("Adapt to site", "Adapt a model to this site's scanners with cases its clinicians "
               "confirmed; the parent model is kept.", icon="🏥", permission="adapt")
models.require_models()
with st.sidebar:
    parent = models.pick_model("adapt_model")

st.markdown("Confirmed cases: a folder with `labels.csv` (`file`, `label`: a class of the model or "
            "`tumor` for a tumour of unknown type; optional `group` = patient) or one folder per "
            f"class, inside the scan folder `{common.settings().scan_root}`, or the same as a .zip.")
folder = st.text_input("Folder of confirmed cases (inside the scan folder)", key="adapt_folder")
upload = st.file_uploader("... or upload a .zip", type=["zip"], key="adapt_zip")
reference = st.text_input("Reference data (the parent's training folders, space-separated; "
                          "optional, checks the model does not forget)", key="adapt_reference")
with st.expander("Advanced"):
    holdout = st.slider("Share of the cases kept to check on", 0.2, 0.5, 0.3, 0.05, key="adapt_holdout")
    epochs = st.number_input("Fine-tuning epochs", 1, 30, Recipe().epochs, key="adapt_epochs")

job: AdaptationJob | None = st.session_state.get(JOB)
if st.button("Adapt", type="primary", disabled=bool(job and job.running)):
    try:
        if upload is not None:
            data = unpack_cases(upload.getvalue(), tempfile.mkdtemp(prefix="medcls-site-"))
        else:
            data = cases_folder(common.settings().scan_root, folder)
        parent_name = Path(parent).name
        cfg = AdaptConfig(model=parent, data=str(data), holdout=holdout,
                          out=str(new_package_folder(common.models_root(), parent_name)),
                          reference=reference.split(), recipe=Recipe(epochs=int(epochs)))
        job = st.session_state[JOB] = AdaptationJob(cfg).start()
    except MedclsError as exc:
        common.show_error(exc, "These cases")

if job is not None:
    if job.running:
        st.progress(job.fraction, text=f"{job.stage}...")
        time.sleep(POLL_S)
        st.rerun()
    elif job.error is not None:
        st.error(str(job.error))
    else:
        rec = job.record
        s = rec["split"]
        st.subheader(f"{Path(job.cfg.out).name}: before and after")
        st.caption(f"{s['adapt']} cases adapted on, {s['check']} checked on (not used to adapt); "
                   f"95% bootstrap intervals.")
        st.dataframe(pd.DataFrame(figures_table(rec)), hide_index=True)
        if rec["reference"]:
            r = rec["reference"]
            st.write(f"Reference test split: accuracy {r['accuracy_before']:.3f} → {r['accuracy_after']:.3f}")
        if rec["accepted"]:
            st.success("Accepted: the adapted model does at least as well as its parent here.")
        else:
            st.error("Rejected: " + "; ".join(rec["reasons"]) + ". It cannot become the site default.")
        c1, c2 = st.columns(2)
        if c1.button("Make it the site default", disabled=not rec["accepted"]):
            try:
                set_site_default(job.cfg.out)
                st.success("It is now the site default: the model pickers offer it first.")
            except MedclsError as exc:
                common.show_error(exc, "This model")
        if c2.button("Discard it"):
            discard(job.cfg.out)
            del st.session_state[JOB]
            st.info("Discarded; the parent model is unchanged.")
