"""Compare models: one scan, two to four models of one task, side by side."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from medcls.engine import present
from medcls.engine.compare import ModelResult, card_table, check_compatible, run_model, summarize
from medcls.engine.reading import read_prediction
from medcls.models.saliency import METHODS
from ui import audit, chrome, common, models, scans, viewer

MAX_MODELS = 4
MAX_CACHED_RESULTS = 16  # per session, all for the open scan: models x methods
RESULTS_KEY = "_compare_results"
RESULTS_FILE = "bench/results/accuracy.json"  # the benchmark behind the figures' intervals

chrome.page_header("Compare models", "One scan, two to four models of the same task, side by "
               "side: do they agree, how sure is each, where does each look, and how did each do "
               "on the fixed test split.")


# ----------------------------------------------------------------------------- page helpers

def fmt(value, spec: str = ".3f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def test_line(card: dict) -> str:
    """The card's test-split figures on one line."""
    test = card.get("metrics", {}).get("test", {})
    if not test:
        return "No test-split figures in this model's card."
    return (f"Test split (n={test.get('n', '?')}): accuracy **{fmt(test.get('accuracy'))}** · "
            f"macro-F1 **{fmt(test.get('macro_f1'))}** · ECE {fmt(test.get('ece'))} · "
            f"ROC AUC {fmt(test.get('roc_auc'))}")


def cached_result(predictor, scan, scan_key: tuple, path: str, method: str) -> ModelResult:
    """One model's timed explanation, kept per (scan, frame, model, method) in the session so
    reruns (opacity, toggles, adding a model) do not recompute. Only the open scan's results
    are kept, at most MAX_CACHED_RESULTS of them."""
    cache: dict = st.session_state.setdefault(RESULTS_KEY, {})
    for k in [k for k in cache if k[:2] != scan_key]:  # another scan or frame: drop
        del cache[k]
    key = (*scan_key, path, method)
    if key not in cache:
        while len(cache) >= MAX_CACHED_RESULTS:
            cache.pop(next(iter(cache)))
        cache[key] = run_model(predictor, scan, method)
    return cache[key]


def recall_chart(cards: list[dict]) -> go.Figure:
    """Grouped bars: per-class test recall, one colour per model."""
    classes = list(dict.fromkeys(c for card in cards for c in card["classes"]))
    fig = go.Figure()
    for card in cards:
        per_class = card.get("metrics", {}).get("test", {}).get("per_class", {})
        recall = [(per_class.get(c) or {}).get("recall") for c in classes]
        fig.add_bar(name=card["name"], x=present.class_names(card, classes),
                    y=[None if r is None else r * 100 for r in recall],
                    text=[fmt(r, ".0%", "") for r in recall], textposition="auto")
    fig.update_layout(barmode="group", height=320, margin=dict(l=10, r=10, t=30, b=10),
                      title="Per-class recall on the test split",
                      yaxis=dict(range=[0, 100], title="recall (%)"),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def benchmark_results() -> dict | None:
    """The benchmark results behind the figures' intervals, with the date they come from: the
    file's own ``date``, else the date of the commit that last wrote it."""
    results = present.load_results(common.APP_DIR / RESULTS_FILE)
    if results is not None and not results.get("date"):
        import subprocess

        try:
            out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", RESULTS_FILE],
                                 cwd=common.APP_DIR, capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                results["date"] = f"committed {out.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass  # the figures then say the date is not recorded
    return results


# ----------------------------------------------------------------------------- models

models.require_models()

with st.sidebar:
    st.header("Models")
    task = models.task_picker(key="cmp_task")
    task_models = models.models_for_task(task)
    cards_by_path = dict(task_models)
    if len(task_models) >= 2:
        chosen = st.multiselect(
            f"Models to compare (2 to {MAX_MODELS})", list(cards_by_path),
            default=list(cards_by_path)[:MAX_MODELS], max_selections=MAX_MODELS,
            key=f"cmp_models_{task}", format_func=lambda p: models.short_model_label(cards_by_path[p]),
            help="Models by their name within the task; their figures are in the table below.")
    st.header("Heatmap")
    method = models.method_picker(key="cmp_method")
    alpha = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key="cmp_alpha")
    show_region = st.toggle("Region outline and box", value=True, key="cmp_show_region")

if len(task_models) < 2:
    st.warning(f"Task “{task}” has {len(task_models)} model package in `{common.models_root()}`; "
               "a comparison needs two or more models of the same task. Pick another task or "
               "train another model for this one.")
    st.stop()

# ----------------------------------------------------------------------------- scan

uploaded = st.file_uploader("Upload a scan (or keep the one open on the main page): DICOM, PNG, "
                            "JPEG, TIFF or BMP", type=None, key="cmp_upload")
data = scans.current_scan_bytes(uploaded)
if data is None:
    st.info("Upload a scan, or open one on the main page: it is compared here as well.")
    st.stop()

scan, frame = scans.open_scan(data, frame_key="cmp_frame")

if len(chosen) < 2:
    st.info(f"Pick two to {MAX_MODELS} models in the sidebar to compare them.")
    st.stop()

with common.user_errors("These models"):
    check_compatible([cards_by_path[p] for p in chosen])

# ----------------------------------------------------------------------------- run

results: dict[str, ModelResult] = {}
for path in chosen:
    name = cards_by_path[path].name
    with common.user_errors(f"Model {name}", stop=False):  # the others still answer
        predictor = models.load_predictor(path)  # cached per folder: other models are not reloaded
        with st.spinner(f"{name}: classifying and computing {METHODS[method].label}..."):
            results[path] = cached_result(predictor, scan, (scan.sha256, frame), path, method)

comparison = None
if len(results) >= 2:
    with common.user_errors("These models"):
        comparison = summarize(list(results.values()), method)
else:
    st.warning("Fewer than two of the chosen models could answer, so there is nothing to compare.")

# ----------------------------------------------------------------------------- summary

if comparison is not None:
    agr = comparison.agreement
    first_card = cards_by_path[chosen[0]]
    # green only for confident agreement; amber when they agree but are unsure; red otherwise
    viewer.agreement_banner([r.prediction for r in comparison.results], first_card,
                            f"Largest probability spread {present.fmt_prob(agr.max_spread)} "
                            f"(on {present.class_name(first_card, agr.max_spread_class)}).",
                            names=[r.name for r in comparison.results])
    c1, c2, c3 = st.columns(3)
    c1.metric("Largest probability spread", present.fmt_prob(agr.max_spread),
              help="For each class, the highest minus the lowest calibrated probability across "
                   "the models; the largest of these.")
    c2.metric("Heatmap region overlap (box IoU)", fmt(comparison.mean_box_iou, ".2f"),
              help="Mean over model pairs of the IoU of the hottest region's bounding boxes.")
    c3.metric("Heatmap overlap (mask IoU)", fmt(comparison.mean_mask_iou, ".2f"),
              help="Mean over model pairs of the IoU of the heatmaps thresholded at each model's "
                   "region threshold.")
    with st.expander("Probability spread per class and pairwise overlap"):
        st.dataframe(pd.DataFrame({"class": present.class_names(first_card, agr.spread),
                                   "spread (max − min)": list(agr.spread.values()),
                                   **{r.name: r.prediction.probabilities for r in comparison.results}}),
                     hide_index=True, width="stretch", key="cmp_spread_table")
        st.dataframe(pd.DataFrame([{"model A": p.names[0], "model B": p.names[1],
                                    "box IoU": p.box_iou, "mask IoU": p.mask_iou}
                                   for p in comparison.pairs]),
                     hide_index=True, width="stretch", key="cmp_pairs_table")

# ----------------------------------------------------------------------------- panels

center, width = scans.window_controls(scan, key="cmp")
image = scans.display(scan, center, width)
gray = image if image.ndim == 2 else image.mean(axis=2)

cols = st.columns(len(chosen))
for i, (col, path) in enumerate(zip(cols, chosen)):
    card = cards_by_path[path]
    with col:
        st.subheader(card["name"])
        st.caption(f"{card['architecture']} · v{card['version']}")
        if path not in results:
            st.caption("This model could not answer (see the message above).")
            continue
        res = results[path]
        pred, expl = res.prediction, res.explanation
        audit.log_answer((scan.sha256, frame, path, method), pred, card, "compare",
                      input_sha256=scan.sha256, frame=frame, heatmap_method=method)
        reading = read_prediction(pred, card)  # the same words as the main page and the report
        st.markdown(f"**{reading.name}** · {present.fmt_prob(reading.probability)} · {reading.state}"
                    if not reading.withheld else f"**Answer withheld:** {reading.reason}.")
        kind, text = viewer.confidence_statement(pred, card)
        if kind != "success":
            getattr(st, kind)(text)
        st.plotly_chart(viewer.probability_chart(pred, card, height=200),
                        width="stretch", key=f"cmp_probs_{i}")
        over, title, _ = viewer.overlay_panel(gray, expl, pred, card, alpha, True, show_region,
                                                 key=f"cmp_{i}")
        st.image(over, width="stretch", caption=f"{title} · {METHODS[method].label}")
        st.caption(f"{res.ms:.0f} ms for this scan (preprocess, predict and heatmap)")
        st.markdown(test_line(card))

st.caption(f"Heatmaps: {METHODS[method].label}, same opacity for every model. Red: the regions that "
           "drove each model's prediction most; white outline: the hottest region, green: its box "
           "(drawn only for a tumour answer that is given, not for a no-tumour or withheld one). "
           "Probabilities are calibrated on each model's validation split.")

# ----------------------------------------------------------------------------- test split

st.subheader("On the fixed test split")
chosen_cards = [cards_by_path[p] for p in chosen]
table = pd.DataFrame(card_table(chosen_cards))
table.insert(len(table.columns), "ms this scan",
             [results[p].ms if p in results else None for p in chosen])
table = table.drop(columns=["architecture"]).rename(columns={
    "n": "test n", "macro_f1": "macro-F1", "ece": "ECE", "roc_auc": "ROC AUC",
    "size_mb": "size (MB)", "ms_per_scan": "ms per scan (card)"})
# not clipped: the model column pinned (it stays when the table scrolls sideways), the table as
# tall as its rows, recall headings with the human class names
st.dataframe(table, hide_index=True, width="stretch", key="cmp_card_table",
             height=38 + 35 * len(table),
             column_config={c: st.column_config.NumberColumn(
                                c if not c.startswith("recall ") else
                                f"recall {present.class_name(chosen_cards[0], c[len('recall '):])}",
                                format="%.3f")
                            for c in table.columns
                            if c in ("accuracy", "macro-F1", "ECE", "ROC AUC")
                            or c.startswith("recall ")}
             | {"model": st.column_config.TextColumn("model", pinned=True, width="medium"),
                "size (MB)": st.column_config.NumberColumn(format="%.1f"),
                "parameters": st.column_config.NumberColumn(format="localized"),
                "ms per scan (card)": st.column_config.NumberColumn(format="%.0f"),
                "ms this scan": st.column_config.NumberColumn(format="%.0f")})
st.caption("Figures from each model's card (fixed test split, never used in training or "
           "calibration). “ms per scan (card)” is the benchmark median when the card has one; "
           "“ms this scan” is the time measured here on this server, for this scan.")
st.plotly_chart(recall_chart(chosen_cards), width="stretch", key="cmp_recall_chart")

st.subheader("Each model's test figures, intervals and caveats")
st.caption("For the engineer: every figure of each card's test split with its 95% bootstrap "
           "interval where the benchmark computed one, the caveat that qualifies it and where it "
           "comes from (card and training date; results file and its date).")
viewer.figures_table(chosen_cards, benchmark_results(), RESULTS_FILE, key="cmp_figures")
for col, card in zip(st.columns(min(len(chosen_cards), 2)) * 2, chosen_cards):
    fig = viewer.confusion_chart(card)
    if fig is not None:
        col.plotly_chart(fig, width="stretch", key=f"cmp_confusion_{card['name']}")
