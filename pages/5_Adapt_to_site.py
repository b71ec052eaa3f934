"""Adapt to site (admins): adapt a model to this hospital's scanners from cases its clinicians
confirmed. Every recipe is cross-validated on those cases; the page shows the choice, every
recipe's figures, parent vs adapted per label (and the labels not checked), then offers to make
the adapted model the site default or to discard it.

Layout only: the work is :mod:`medcls.learning.adapt` (an :class:`~medcls.learning.site.AdaptationJob`
runs in a background thread kept in the session; each script run shows its progress and reruns).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from medcls import MedclsError
from medcls.learning.adapt import RECIPES, AdaptConfig
from medcls.learning.adapt_check import DEFAULT_FOLDS
from medcls.learning.adapt_recipes import DEFAULT_RECIPES
from medcls.learning.adapt_report import figures_table, recipes_table, verdict_sentence, words
from medcls.learning.site import (
    AdaptationJob,
    cases_folder,
    discard,
    new_package_folder,
    set_site_default,
    unlabelled_folder,
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
            "class, inside the scan folder, or the same as a .zip. Each recipe is tried in "
            "cross-validation on these cases; one is kept only if it measurably beats the model as it is.")
folder = st.text_input("Folder of confirmed cases (a folder inside the scan folder)", key="adapt_folder")
upload = st.file_uploader("... or upload a .zip", type=["zip"], key="adapt_zip")
unlabelled = st.text_input("Unlabelled scans from this site (optional, a folder inside the scan folder): "
                           "they align batch norm and calibrate the input gate, no labels needed",
                           key="adapt_unlabelled")
reference = st.text_input("Reference data (the parent's training folders, space-separated; "
                          "optional, checks the model does not forget)", key="adapt_reference")
with st.expander("Advanced"):
    folds = st.number_input("Cross-validation folds", 3, 10, DEFAULT_FOLDS, key="adapt_folds",
                            help="A label needs at least this many patients to be checked.")
    chosen_recipes = st.multiselect("Recipes compared", list(RECIPES), list(DEFAULT_RECIPES), key="adapt_recipes",
                                    format_func=lambda n: f"{n}: {RECIPES[n].description}")
    epochs = st.number_input("Fine-tuning epochs (0: each recipe's own)", 0, 30, 0, key="adapt_epochs")

job: AdaptationJob | None = st.session_state.get(JOB)
if st.button("Adapt", type="primary", disabled=bool(job and job.running)):
    try:
        root = common.settings().scan_root
        if upload is not None:
            data = unpack_cases(upload.getvalue(), tempfile.mkdtemp(prefix="medcls-site-"))
        else:
            data = cases_folder(root, folder)
        if not chosen_recipes:
            raise MedclsError("Choose at least one recipe to compare.")
        cfg = AdaptConfig(model=parent, data=str(data), unlabelled=unlabelled_folder(root, unlabelled),
                          scan_root=str(root), folds=int(folds), recipes=list(chosen_recipes),
                          epochs=int(epochs) or None, reference=reference.split(),
                          out=str(new_package_folder(common.models_root(), Path(parent).name)))
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
        st.subheader("The choice")
        say = {"accepted": st.success, "rejected": st.error}.get(rec["verdict"], st.warning)
        say(verdict_sentence(rec))
        chk = rec["check"]
        missing = [f"{words(lab)} ({n} cases)" for lab, n in chk["not_checked"].items()] + \
            [f"{words(c)} (no case)" for c in chk["classes_without_cases"]]
        if missing:
            st.warning("Not checked on this site's cases: " + ", ".join(missing) + f". Labels with fewer "
                       f"than {chk['folds']} patients are adapted on but not measured; the card says so.")
        st.markdown("**Every recipe, cross-validated on the confirmed cases**")
        st.dataframe(pd.DataFrame(recipes_table(rec)), hide_index=True)
        st.markdown("**The model as it is vs adapted, on the held-out folds** (95% intervals)")
        st.dataframe(pd.DataFrame(figures_table(rec)), hide_index=True)
        ref = rec.get("reference")
        if ref:
            after = ref.get("accuracy_after")
            st.write(f"Reference test split ({ref['test_cases']} cases): accuracy {ref['accuracy_before']:.3f}"
                     + (f" → {after:.3f}" if after is not None else "") + f" (at most {ref['margin']} lower allowed)")
        st.caption(f"Rule: {chk['rule']}.")
        if rec["package"] is None:
            st.info("Nothing was written; the parent model stays in place.")
        else:
            st.caption(f"Adapted package: {rec['package']} (beside its parent).")
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
