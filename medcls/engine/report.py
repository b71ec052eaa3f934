"""One-page scan report (PNG or PDF): the image, the heatmap overlay, calibrated probabilities,
the model's name and version, the input file's hash and a "not a diagnosis" line.

Nothing identifying goes in: no patient tags, no file name (it may hold a patient's name),
only the content hash."""

from __future__ import annotations

import datetime as _dt
import io
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medcls.engine.findings import may_show_region
from medcls.engine.inference import Explanation, Prediction
from medcls.engine.present import class_name, fmt_prob
from medcls.engine.reading import measure_of, read_prediction, read_series
from medcls.engine.render import overlay
from medcls.engine.series import HEATMAP_REGION, SEGMENTATION

if TYPE_CHECKING:  # pragma: no cover
    from medcls.engine.series import SeriesAnswer

DISCLAIMER = ("Research tool - not a diagnosis. The result must be reviewed by a qualified "
              "clinician; the heatmap shows what drove the model, not a lesion boundary.")


@dataclass(frozen=True)
class ClinicianVerdict:
    """The clinician's verdict on an answer, as the audit trail recorded it, for the report."""

    verdict: str  # agree / disagree / unsure
    user: str
    at: str  # when it was recorded, as text
    corrected_class: str | None = None
    note: str | None = None
    on: str | None = None  # what it was given on, where the report covers more (e.g. "slice 7 of 30")


VERDICT_WORDS = {"agree": "Agree", "disagree": "Disagree", "unsure": "Unsure"}


def verdict_lines(clinician: ClinicianVerdict | None, card: Mapping) -> list[str]:
    """The report's place for the clinician's verdict and note: what was recorded, or an empty
    form to fill in by hand."""
    if clinician is None:
        return ["Clinician's verdict: [ ] Agree   [ ] Disagree, correct class: ____________   "
                "[ ] Unsure",
                "Note: ________________________________________________   Signed: ______________"]
    said = VERDICT_WORDS.get(clinician.verdict, clinician.verdict)
    if clinician.verdict == "disagree" and clinician.corrected_class:
        said += f" (correct class: {class_name(card, clinician.corrected_class)})"
    out = [f"Clinician's verdict: {said}" + (f" on {clinician.on}" if clinician.on else "")
           + f", recorded by {clinician.user} on {clinician.at}"]
    if clinician.note:
        out.append(f"Note: {clinician.note}")
    return out


def render_report(image01: np.ndarray, explanation: Explanation | None, prediction: Prediction,
                  card: dict, sha256: str, fmt: str = "png", method_label: str = "",
                  alpha: float = 0.4, segmentation=None,
                  clinician: ClinicianVerdict | None = None) -> bytes:
    """The report as PNG or PDF bytes, said from the answer's :class:`~medcls.engine.reading.Reading`
    (the same words as the screen). A withheld answer gives no class, no red bar and no heatmap:
    the reason instead. A finding's region: the ``segmentation`` (outline, area, longest diameter,
    method named) when given, else the heatmap region where
    :func:`medcls.engine.findings.may_show_region` allows it for the map shown (a map asked for of
    another class than the answer's is named as such). ``clinician``: the recorded verdict and
    note (else an empty place for them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if fmt not in ("png", "pdf"):
        raise ValueError("fmt must be 'png' or 'pdf'")
    shown_class = explanation.class_name if explanation is not None else None
    region = _shown_region(explanation, prediction, card)
    measured = segmentation if segmentation is not None else (
        region if region is not None and not card.get("segmentation") else None)
    reading = read_prediction(prediction, card, measured, class_shown=None if segmentation is not None
                              else shown_class)
    if not reading.is_finding:
        segmentation = None  # a no-finding or withheld answer carries no outline or size
    fig = plt.figure(figsize=(8.27, 11.69), dpi=100)  # A4 portrait
    fig.suptitle("MedCLS scan report", fontsize=16, fontweight="bold", y=0.975)
    fig.text(0.05, 0.945, textwrap.fill(reading.headline, 80), fontsize=11.5, va="top",
             fontweight="bold", color="#b00000" if reading.withheld else "#000000")
    gray = image01 if image01.ndim == 2 else image01.mean(axis=2)
    ax1 = fig.add_axes([0.05, 0.53, 0.43, 0.36])
    ax1.imshow(gray, cmap="gray", vmin=0, vmax=1)
    _draw_outline(ax1, segmentation)
    ax1.set_title("Image" + (" and tumour outline" if segmentation is not None else ""))
    ax1.axis("off")
    ax2 = fig.add_axes([0.52, 0.53, 0.43, 0.36])
    if reading.withheld:
        ax2.text(0.5, 0.5, "No heatmap: the answer is withheld,\nso nothing on this image is a "
                 "finding.", ha="center", va="center", fontsize=10, wrap=True)
    elif explanation is not None:
        ax2.imshow(overlay(gray, explanation.heatmap, alpha))
        if region is not None:
            x0, y0, x1, y1 = region.box
            ax2.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.5))
        ax2.set_title(heatmap_title(explanation, prediction, card, method_label), fontsize=9.5)
    else:
        ax2.text(0.5, 0.5, "no heatmap", ha="center", va="center")
    ax2.axis("off")

    ax3 = fig.add_axes([0.25, 0.33, 0.65, 0.16])
    names = [class_name(card, c) for c in prediction.classes]
    probs = prediction.probabilities
    colors = ["#c8c8c8" if reading.withheld else
              ("#d62728" if i == prediction.index else "#7f7f7f") for i in range(len(names))]
    ax3.barh(names[::-1], probs[::-1], color=colors[::-1])
    ax3.set_xlim(0, 1)
    ax3.set_xlabel("calibrated probability" + (" (withheld: not an answer)" if reading.withheld else ""))
    for i, p in enumerate(probs[::-1]):
        ax3.text(min(p + 0.01, 0.9), i, fmt_prob(p, 1), va="center")

    test = card.get("metrics", {}).get("test", {})
    lines = [reading.headline]
    if reading.measure is not None:
        lines.append(("Tumour size: " if reading.measure.method == SEGMENTATION else "Region size: ")
                     + reading.measure.text)
    lines += [
        f"Model: {card['name']} v{card['version']} ({card['architecture']}), "
        f"trained {card['training'].get('date', '?')}",
        f"Test split: accuracy {test.get('accuracy', float('nan')):.3f}, "
        f"macro-F1 {test.get('macro_f1', float('nan')):.3f} (n={test.get('n', '?')})",
        f"Input file SHA-256: {sha256}",
        f"Generated: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        *verdict_lines(clinician, card),
    ]
    return _finish(fig, lines, top=0.29, fontsize=9.5, fmt=fmt)


def heatmap_title(explanation: Explanation, prediction: Prediction, card: Mapping,
                  method_label: str = "") -> str:
    """The heatmap's title: its method and class, and, for a map asked for of another class than
    the answer's, that it was asked for."""
    method = method_label or explanation.method
    shown = class_name(card, explanation.class_name)
    if explanation.class_name != prediction.label:
        return (f"Heatmap: {method}, {shown} evidence (asked for;\nthe answer is "
                f"{class_name(card, prediction.label)})")
    return f"Heatmap: {method} ({shown})"


def _finish(fig, lines: list[str], top: float, fontsize: float, fmt: str) -> bytes:
    """The report's text lines and the disclaimer under the figures, then the file's bytes."""
    import matplotlib
    import matplotlib.pyplot as plt

    # characters per line that fit the page from x = 5% (a monospace glyph is ~0.6 em wide;
    # a longer line is cut off at the page's edge, and its last characters lost)
    width = min(100, int(0.93 * fig.get_figwidth() * 72 / (0.61 * fontsize)))
    fig.text(0.05, top, "\n".join(textwrap.fill(x, width, subsequent_indent="  ") for x in lines),
             fontsize=fontsize, va="top", family="monospace", parse_math=False)  # file text: as written
    fig.text(0.05, 0.05, textwrap.fill(DISCLAIMER, 95), fontsize=10, color="#b00000", fontweight="bold")
    buf = io.BytesIO()
    # TrueType (Type 42) fonts: the PDF's words are real text a reader can select and search and a
    # PHI scan can read (matplotlib's default Type 3 fonts draw each glyph as a picture).
    with matplotlib.rc_context({"pdf.fonttype": 42, "svg.fonttype": "none"}):
        fig.savefig(buf, format=fmt)
    plt.close(fig)
    return buf.getvalue()


def size_line(segmentation, region, card: dict) -> str | None:
    """The tumour's size with the method named (:class:`medcls.engine.reading.Measure`): the
    segmentation's when there is one, else, for a model without a segmentation companion, the
    Grad-CAM region's (coarse). ``None``: no size to give."""
    if segmentation is not None:
        return "Tumour size: " + measure_of(segmentation).text
    if region is not None and region.area_mm2 and not card.get("segmentation"):
        return "Region size: " + measure_of(region, HEATMAP_REGION).text
    return None


def _draw_outline(ax, segmentation) -> None:
    """The segmentation's outline (closed polygon, gold) on the image axes; nothing for None."""
    if segmentation is not None:
        pts = np.array(segmentation.polygon + segmentation.polygon[:1])
        ax.plot(pts[:, 0], pts[:, 1], color="gold", lw=1.2)


def _shown_region(explanation: Explanation | None, prediction: Prediction, card: dict):
    """The region the report may draw on the heatmap shown: the one region rule
    (:func:`medcls.engine.findings.may_show_region` for the map's class)."""
    if explanation is None or explanation.region is None:
        return None
    ok = may_show_region(prediction, card, class_name=explanation.class_name)
    return explanation.region if ok else None


def strip_axes(ax, answer: "SeriesAnswer") -> None:
    """The series strip on matplotlib axes: class probabilities over slice position, the
    suspicious run shaded, slices outside the training distribution marked."""
    series, summary = answer.series, answer.summary
    x = np.array([series.position_of(i) for i in range(len(series))])
    probs = answer.probabilities()
    for c, name in enumerate(answer.classes):
        ax.plot(x, probs[:, c], marker=".", lw=1.2, label=class_name(answer.card, name))
    for run in (summary.run, *summary.other_runs):
        if run is not None:
            ax.axvspan(x[run.start], x[run.stop - 1], color="#d62728",
                       alpha=0.15 if run is summary.run else 0.07, lw=0)
    outside = [i for i, s in enumerate(answer.slices)
               if s.prediction is not None and s.prediction.outside_training_distribution]
    if outside:
        ax.scatter(x[outside], np.full(len(outside), 1.04), marker="x", color="#555555",
                   label="outside training distribution", clip_on=False)
    ax.axhline(summary.threshold, ls="--", lw=0.8, color="#888888")
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("slice position (mm)" if series.positions is not None else "slice")
    ax.set_ylabel("calibrated probability")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))


def render_series_report(answer: "SeriesAnswer", image01: np.ndarray | None,
                         explanation: Explanation | None, slice_index: int | None,
                         fmt: str = "png", method_label: str = "", alpha: float = 0.4,
                         clinician: ClinicianVerdict | None = None) -> bytes:
    """A one-page report for a series: the study summary, the strip, the most suspicious slice
    (``slice_index``, its image and heatmap), the model and the inputs' hash. No file names, no
    UIDs, no patient tags."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if fmt not in ("png", "pdf"):
        raise ValueError("fmt must be 'png' or 'pdf'")
    card, series, summary = answer.card, answer.series, answer.summary
    # the segmentation of the shown slice, when it lies in the suspicious run (the only slices
    # with a tumour answer) and the model's card names a segmentation companion
    shown_seg = answer.segmentations.get(slice_index) if slice_index is not None else None
    reading = read_series(answer)
    fig = plt.figure(figsize=(8.27, 11.69), dpi=100)
    fig.suptitle("MedCLS series report", fontsize=16, fontweight="bold", y=0.975)
    fig.text(0.05, 0.935, textwrap.fill(summary.text, 90), fontsize=11, va="top",
             fontweight="bold", color="#b00000" if summary.run is not None else "#000000")
    ax = fig.add_axes([0.1, 0.66, 0.62, 0.2])
    strip_axes(ax, answer)
    if image01 is not None and slice_index is not None:
        gray = image01 if image01.ndim == 2 else image01.mean(axis=2)
        ax1 = fig.add_axes([0.05, 0.33, 0.43, 0.28])
        ax1.imshow(gray, cmap="gray", vmin=0, vmax=1)
        _draw_outline(ax1, shown_seg)
        ax1.set_title(f"Most suspicious slice: {slice_index + 1} of {len(series)}", fontsize=10)
        ax1.axis("off")
        ax2 = fig.add_axes([0.52, 0.33, 0.43, 0.28])
        if reading.withheld:
            ax2.text(0.5, 0.5, "No heatmap: the answer is withheld.", ha="center", va="center")
        elif explanation is not None:
            ax2.imshow(overlay(gray, explanation.heatmap, alpha))
            pred = answer.slices[slice_index].prediction
            region = _shown_region(explanation, pred, card) if pred is not None else None
            if region is not None:
                from matplotlib.patches import Rectangle

                x0, y0, x1, y1 = region.box
                ax2.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.5))
            ax2.set_title(f"Heatmap: {method_label or explanation.method} "
                          f"({class_name(card, explanation.class_name)})", fontsize=10)
        ax2.axis("off")
    lines = [
        reading.headline,
        f"Series: {series.label}; ordered by {series.ordered_by}"
        + (f"; slice spacing {series.slice_spacing:.2f} mm" if series.slice_spacing else ""),
        f"Answered slices: {summary.n_answered} of {summary.n_slices} (outside the training "
        f"distribution: {summary.n_outside}; unreadable: {summary.n_slices - summary.n_readable})",
    ]
    if answer.volume_mm3 is not None:
        lines.append(f"Suspicious region volume: {answer.volume_mm3:.0f} mm3 ({answer.volume_note})")
    elif summary.run is not None and answer.volume_note:
        lines.append(f"Suspicious region volume: {answer.volume_note}")
    if shown_seg is not None:
        lines.append(f"Slice {slice_index + 1}: " + size_line(shown_seg, None, card))
    lines += [f"Input findings: {f.message}" for f in series.findings]
    lines += [
        f"Rule: {summary.rule}",
        f"Model: {card['name']} v{card['version']} ({card['architecture']}), model SHA-256 "
        f"{card.get('model_sha256', '?')}",
        f"Input SHA-256 (all slices, in order): {series.sha256}",
        f"Generated: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        *verdict_lines(clinician, card),
    ]
    return _finish(fig, lines, top=0.3, fontsize=8.5, fmt=fmt)
