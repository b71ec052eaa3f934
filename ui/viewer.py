"""The clinician's screen: the verdict line, the probability bars, the scan and its heatmap in
one linked viewer (shared zoom and pan), the heatmap's meaning and the region's caption, the
"explain class" choice, the agreement banner of several models, a card's figures and
confusion matrix. Every word comes from :mod:`medcls.engine.present`.
"""
from __future__ import annotations

import base64

import cv2
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from medcls.engine import present
from medcls.engine.render import draw_region, overlay
from medcls.models.card import ModelCard

WITHHELD_GREY = "#c8c8c8"


def verdict_line(pred, card: dict) -> present.Verdict:
    """The one-line answer, directly under the uploader."""
    v = present.verdict(pred, card)
    getattr(st, v.kind)(f"**{v.text}**", icon={"success": ":material/check_circle:", "warning": ":material/help:",
                                          "error": ":material/block:"}[v.kind])
    return v


def probability_chart(pred, card: dict | None = None, title: str = "", height: int = 200) -> go.Figure:
    """Calibrated probabilities with human class names; a withheld answer's bars are grey
    (it is not an answer), the top class of a given answer is red."""
    names = present.class_names(card, pred.classes)
    probs = np.asarray(pred.probabilities, dtype=float)
    withheld = pred.outside_training_distribution
    colors = [WITHHELD_GREY if withheld else ("#d62728" if i == pred.index else "#8c8c8c")
              for i in range(len(names))]
    fig = go.Figure(go.Bar(x=probs * 100, y=names, orientation="h", marker_color=colors,
                           text=[present.fmt_prob(p, 1) for p in probs], textposition="auto",
                           hovertemplate="%{y}: %{text}<extra></extra>"))
    fig.update_layout(title=title or ("Withheld: not an answer" if withheld else None),
                      height=height, margin=dict(l=10, r=10, t=30 if (title or withheld) else 10, b=10),
                      xaxis=dict(range=[0, 100], title="calibrated probability (%)"),
                      yaxis=dict(autorange="reversed"))
    return fig


def image_uri(image: np.ndarray) -> str:
    """A PNG data URI of an image in [0, 1] (gray or RGB) or uint8."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def linked_viewer(left: np.ndarray, right: np.ndarray, titles: tuple[str, str], key: str,
                  height: int = 380) -> None:
    """Original and overlay side by side on axes that share zoom and pan (drag to pan, wheel
    to zoom, double-click to reset: one moves both)."""
    h, w = left.shape[:2]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.02, subplot_titles=titles)
    for col, img in ((1, left), (2, right)):
        fig.add_trace(go.Image(source=image_uri(img), x0=0, y0=0, dx=1, dy=1,
                               hoverinfo="skip"), row=1, col=col)
    fig.update_xaxes(matches="x", range=[0, w], showticklabels=False, showgrid=False, zeroline=False,
                     constrain="domain")
    fig.update_yaxes(matches="y", range=[h, 0], showticklabels=False, showgrid=False, zeroline=False,
                     scaleanchor="x", constrain="domain")
    fig.update_layout(height=height, margin=dict(l=0, r=0, t=24, b=0), dragmode="pan",
                      font=dict(size=12))
    fig.update_annotations(font_size=13)
    st.plotly_chart(fig, key=key, width="stretch",
                    config={"scrollZoom": True, "displaylogo": False,
                            "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"]})


def overlay_panel(gray: np.ndarray, explanation, pred, card: dict, alpha: float,
                  show_overlay: bool, show_region: bool, key: str) -> tuple[np.ndarray, str, bool]:
    """The right-hand panel: the heatmap overlay (with the region only where it means a finding:
    :func:`medcls.engine.present.shows_region`), or the plain scan when the overlay is off or the answer
    is withheld and the heatmap not asked for ("show anyway"). Returns (image, title, region
    drawn)."""
    cls_name = present.class_name(card, explanation.class_name)
    if pred.outside_training_distribution:
        show_overlay = show_overlay and st.toggle(
            "Show the heatmap anyway", value=False, key=f"{key}_anyway",
            help="The answer is withheld; the heatmap of an answer that is not given is not a "
                 "finding, so no region or area is drawn on it.")
    if not show_overlay:
        why = "answer withheld" if pred.outside_training_distribution else "overlay off"
        return np.dstack([gray] * 3), f"Heatmap hidden ({why})", False
    over = overlay(gray, explanation.heatmap, alpha)
    drawn = show_region and explanation.region is not None and \
        present.shows_region(pred, explanation.class_name, card)
    if drawn:
        over = draw_region(over, explanation.region)
    if explanation.class_name != pred.label and not pred.outside_training_distribution:
        return over, f"Heatmap for “{cls_name}” (asked for; the answer is " \
                     f"“{present.class_name(card, pred.label)}”)", drawn
    return over, f"Heatmap for “{cls_name}”: what drove the class", drawn


def heatmap_note(pred, card: dict, explanation, drawn: bool) -> str:
    """One sentence under the viewer on what the heatmap shows."""
    if drawn:
        return (f"Red: the regions that drove “{present.class_name(card, explanation.class_name)}” "
                "most; white outline: hottest region, green: its box.")
    if explanation.class_name == pred.label or pred.outside_training_distribution:
        return present.heatmap_meaning(pred, card, explanation.class_name)
    return (f"Red: the regions that drove “{present.class_name(card, explanation.class_name)}” "
            "most.")


def region_caption(region) -> str:
    """The one caption of a heatmap region (:func:`medcls.engine.present.region_caption`)."""
    return present.region_caption(region)


def explain_class_picker(pred, card: dict, key: str) -> int:
    """Which class the heatmap explains: the answer by default. Offered with a button: the
    runner-up's map when the answer is uncertain, the strongest finding class's map on a
    no-finding answer (its region is then drawn, named as asked for). Returns the class index."""
    from medcls.engine.findings import is_finding_answer, normal_class, strongest_finding_class

    if pred.outside_training_distribution:
        return pred.index  # a withheld answer has no class to choose between
    choices = present.explain_choices(pred)
    labels = {i: f"{present.class_name(card, pred.classes[i])} ({present.fmt_prob(pred.probabilities[i])})"
              + (" · the answer" if i == pred.index else " · runner-up" if i == choices[1] else "")
              for i in choices}
    offer, words = None, ""
    if pred.low_confidence:
        offer, words = choices[1], "Uncertain: show the runner-up's map"
    elif not is_finding_answer(pred, card) and normal_class(card) is not None:
        from medcls.engine.findings import finding_noun

        offer = strongest_finding_class(pred.probabilities, card)
        words = f"Show the strongest {finding_noun(card)}-class evidence"
    if offer is not None and st.session_state.get(key, pred.index) == pred.index:
        def pick():
            st.session_state[key] = offer

        name = present.class_name(card, pred.classes[offer])
        st.button(f"{words} ({name}, {present.fmt_prob(pred.probabilities[offer])})",
                  key=f"{key}_offer", on_click=pick)
    return st.selectbox("Explain class", choices, key=key, format_func=labels.get,
                        help="The heatmap shows where the model saw evidence for this class.")


def agreement_banner(preds, card: dict, extra: str = "", names=None) -> present.AgreementState:
    """Green only for confident agreement; amber when the models agree but are unsure, or when
    only one model answers (one answer is no agreement)."""
    s = present.agreement_state(preds, names=names, card=card)
    getattr(st, s.kind)(f"{s.text} {extra}".strip())
    return s


def figures_table(cards: list[dict], results: dict | None, results_file: str, key: str) -> None:
    """Each model's test figures with their 95% interval and the caveat beside the figure it
    qualifies, one table per model (so it fits a laptop screen, as tall as its rows); where
    the figures come from (card and training date, results file and its date) above each
    table. The tables also carry ``model`` and the full ``source`` per figure (not shown)."""
    for i, card in enumerate(cards):
        figures = present.model_figures(card, results, results_file)
        table = pd.DataFrame([{"model": f.model, "figure": f.figure,
                               "value": None if f.value is None else round(f.value, 3),
                               "95% interval": "" if f.ci is None else f"{f.ci[0]:.3f} – {f.ci[1]:.3f}",
                               "caveat": f.caveat, "source": f.source} for f in figures])
        sources = list(dict.fromkeys(part.strip() for f in figures
                                     for part in f.source.split("; interval:")))
        st.markdown(f"**{card['name']}**")
        st.caption("From " + sources[0] + (f"; intervals from {sources[1]}" if len(sources) > 1
                                           else "; no benchmark intervals for this model"))
        st.dataframe(table, hide_index=True, width="stretch", key=f"{key}_{i}",
                     height=38 + 35 * len(table),
                     column_order=["figure", "value", "95% interval", "caveat"],
                     column_config={"figure": st.column_config.TextColumn(width="medium"),
                                    "value": st.column_config.NumberColumn(width="small", format="%.3f"),
                                    "95% interval": st.column_config.TextColumn(width=120),
                                    "caveat": st.column_config.TextColumn(width="large")})
        for fig, text in present.caveats(card).items():  # in full: a cell can be too narrow
            st.caption(f":material/warning: {present.class_name(card, fig)}: {text}")


def confusion_chart(card: dict, height: int = 300) -> go.Figure | None:
    got = present.confusion(card)
    if got is None:
        return None
    names, matrix = got
    fig = go.Figure(go.Heatmap(z=matrix, x=names, y=names, colorscale="Blues", showscale=False,
                               text=matrix, texttemplate="%{text}",
                               hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    fig.update_layout(title=f"{card['name']}: test confusion matrix", height=height,
                      margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(title="predicted"), yaxis=dict(title="true", autorange="reversed"))
    return fig

def confidence_statement(pred, card: ModelCard | None = None) -> tuple[str, str]:
    """(kind, text): a plain statement of how sure the model is, worded by
    :func:`medcls.engine.present.confidence_statement` from the card's own figures (the validation
    figure behind the low-confidence threshold only when the card records it)."""
    return present.confidence_statement(pred, card)


def heatmap_panel(gray: np.ndarray, explanation, card: dict, alpha: float, show_region: bool,
                  requested: bool, segmentation=None):
    """(overlay, caption, region drawn or None): the heatmap overlay with the region only where
    :func:`medcls.engine.findings.may_show_region` allows it; otherwise the caption says what the
    heatmap means. One size per finding, as the report and the PACS give it: with the model's
    ``segmentation`` of this slice (a segmentation companion), its outline and size, never the
    heatmap region's; a model with a companion but no outline here gives no size at all."""
    from medcls.engine.findings import is_finding_answer, may_show_region
    from medcls.engine.render import draw_outline, draw_region, overlay

    pred = explanation.prediction
    name = present.class_name(card, explanation.class_name)
    allowed = may_show_region(pred, card, requested) and \
        may_show_region(pred, card, class_name=explanation.class_name)  # never the normal map
    over = overlay(gray, explanation.heatmap, alpha)
    if allowed and show_region and not requested and card.get("segmentation"):
        region = segmentation  # the segmentation's outline and size, or none
        if region is not None:
            over = draw_outline(over, region)
    else:
        region = explanation.region if allowed and show_region else None
        draw_region(over, region)
    if allowed:
        caption = f"Red: the image regions that drove “{name}” most."
        if region is not None and region is segmentation:
            caption += " Yellow: the tumour's outline (segmentation)."
        elif region is not None:
            caption += " White outline: hottest region; green: its bounding box."
        if not is_finding_answer(pred, card):
            caption = (f"Strongest “{name}” evidence, shown on request: the answer is "
                       f"“{present.class_name(card, pred.label)}”. " + caption)
    else:
        caption = present.heatmap_meaning(pred, card, explanation.class_name)
    return over, caption, region


def region_text(region) -> str:
    """The one caption of a region: a heatmap region's (:func:`medcls.engine.present.region_caption`)
    or a segmentation's size with its method (:class:`medcls.engine.reading.Measure`)."""
    if hasattr(region, "threshold"):
        return present.region_caption(region)
    from medcls.engine.reading import measure_of

    return "Tumour outline: " + measure_of(region).text + "."


def strongest_evidence_toggle(pred, card: dict, key: str) -> None:
    """On a no-finding answer: the explicit request for the strongest finding class's map."""
    from medcls.engine.findings import finding_noun, is_finding_answer

    if not is_finding_answer(pred, card):
        st.toggle(f"Show the strongest {finding_noun(card)}-class evidence", key=key,
                  help="Draws the heatmap, outline and area of the most likely tumour class, "
                       "although the answer is not a tumour.")
