"""One-page scan report (PNG or PDF): the image, the heatmap overlay, calibrated probabilities,
the model's name and version, the input file's hash and a "not a diagnosis" line.

Nothing identifying goes in: no patient tags, no file name (it may hold a patient's name),
only the content hash."""

from __future__ import annotations

import datetime as _dt
import io
import textwrap

import numpy as np

from .inference import Explanation, Prediction
from .render import overlay
from .segmentation import size_text

DISCLAIMER = ("Research tool - not a diagnosis. The result must be reviewed by a qualified "
              "clinician; the heatmap shows what drove the model, not a lesion boundary.")


def render_report(image01: np.ndarray, explanation: Explanation | None, prediction: Prediction,
                  card: dict, sha256: str, fmt: str = "png", method_label: str = "",
                  alpha: float = 0.4, segmentation=None) -> bytes:
    """The report as PNG or PDF bytes. With a ``segmentation`` (a tumour answer's
    :class:`medcls.segmentation.Segmentation`) the image carries its outline and the text its
    area and longest diameter, with the method named, instead of the heatmap's area."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if fmt not in ("png", "pdf"):
        raise ValueError("fmt must be 'png' or 'pdf'")
    fig = plt.figure(figsize=(8.27, 11.69), dpi=100)  # A4 portrait
    fig.suptitle("MedCLS scan report", fontsize=16, fontweight="bold", y=0.975)
    gray = image01 if image01.ndim == 2 else image01.mean(axis=2)
    ax1 = fig.add_axes([0.05, 0.55, 0.43, 0.38])
    ax1.imshow(gray, cmap="gray", vmin=0, vmax=1)
    if segmentation is not None:
        pts = np.array(segmentation.polygon + segmentation.polygon[:1])
        ax1.plot(pts[:, 0], pts[:, 1], color="gold", lw=1.2)
    ax1.set_title("Image" + (" and tumour outline" if segmentation is not None else ""))
    ax1.axis("off")
    ax2 = fig.add_axes([0.52, 0.55, 0.43, 0.38])
    if explanation is not None:
        ax2.imshow(overlay(gray, explanation.heatmap, alpha))
        if explanation.region is not None:
            x0, y0, x1, y1 = explanation.region.box
            ax2.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.5))
        ax2.set_title(f"Heatmap: {method_label or explanation.method} ({explanation.class_name})")
    else:
        ax2.text(0.5, 0.5, "no heatmap", ha="center", va="center")
    ax2.axis("off")

    ax3 = fig.add_axes([0.25, 0.33, 0.65, 0.17])
    classes = list(prediction.classes)
    probs = prediction.probabilities
    colors = ["#d62728" if i == prediction.index else "#7f7f7f" for i in range(len(classes))]
    ax3.barh(classes[::-1], probs[::-1], color=colors[::-1])
    ax3.set_xlim(0, 1)
    ax3.set_xlabel("calibrated probability")
    for i, p in enumerate(probs[::-1]):
        ax3.text(min(p + 0.01, 0.9), i, f"{p:.1%}", va="center")

    test = card.get("metrics", {}).get("test", {})
    lines = [
        f"Prediction: {prediction.label} ({prediction.confidence:.1%})"
        + ("  - LOW CONFIDENCE" if prediction.low_confidence else ""),
    ]
    if prediction.outside_training_distribution:
        lines.append("WARNING: this scan is outside what the model was trained on; "
                     "the prediction is not meaningful.")
    if segmentation is not None:
        lines.append(f"Tumour size, by {segmentation.method}: {size_text(segmentation)}")
    elif explanation is not None and explanation.region is not None and explanation.region.area_mm2 \
            and not card.get("segmentation"):  # a heatmap is no lesion boundary where a segmenter exists
        lines.append(f"Heatmap region area: {explanation.region.area_mm2:.0f} mm2")
    lines += [
        f"Model: {card['name']} v{card['version']} ({card['architecture']}), "
        f"trained {card['training'].get('date', '?')}",
        f"Test split: accuracy {test.get('accuracy', float('nan')):.3f}, "
        f"macro-F1 {test.get('macro_f1', float('nan')):.3f} (n={test.get('n', '?')})",
        f"Input file SHA-256: {sha256}",
        f"Generated: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ]
    fig.text(0.05, 0.27, "\n".join(textwrap.fill(x, 100, subsequent_indent="  ") for x in lines),
             fontsize=9.5, va="top", family="monospace")
    fig.text(0.05, 0.05, textwrap.fill(DISCLAIMER, 95), fontsize=10, color="#b00000", fontweight="bold")
    buf = io.BytesIO()
    # TrueType (Type 42) fonts: the PDF's words are real text a reader can select and search and a
    # PHI scan can read (matplotlib's default Type 3 fonts draw each glyph as a picture).
    with matplotlib.rc_context({"pdf.fonttype": 42, "svg.fonttype": "none"}):
        fig.savefig(buf, format=fmt)
    plt.close(fig)
    return buf.getvalue()
