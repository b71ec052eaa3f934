"""What an answer may claim: which class means "nothing found", how likely a finding is, and
whether a heatmap region (outline, box, area) may be shown.

The rule for regions: an outline, a box and an area read as "here is the lesion". They are shown
only for an answer that names a finding (a tumour class, pneumonia) and is inside what the model
was trained on. For a no-finding answer, or an answer withheld by the input gate, no region is
shown: the heatmap then only says what drove the answer. A user may ask explicitly for the
strongest evidence of a finding class (:func:`strongest_finding_class`); that region is then shown,
named as such.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from medcls.core.errors import ModelPackageError

#: Class names that mean "no finding", when the card does not say (``normal_class``).
NORMAL_CLASS_NAMES = ("no_tumor", "no_tumour", "normal", "healthy", "no_finding")


def normal_class(card: Mapping) -> str | None:
    """The card's "nothing found" class: ``card["normal_class"]``, else a known name among its
    classes, else None (a task without one: every class is a finding)."""
    classes = list(card["classes"])
    named = card.get("normal_class")
    if named in classes:
        return named
    return next((c for c in classes if c.lower() in NORMAL_CLASS_NAMES), None)


def finding_noun(card: Mapping) -> str:
    """What a finding is called in sentences: "tumour" for the brain task."""
    normal = normal_class(card) or ""
    return "tumour" if "tumo" in normal.lower() else "finding"


def finding_indices(card: Mapping) -> list[int]:
    """Indices of the finding classes (every class but the normal one)."""
    normal = normal_class(card)
    return [i for i, c in enumerate(card["classes"]) if c != normal]


def finding_probability(probabilities: np.ndarray, card: Mapping) -> np.ndarray:
    """P(finding) = 1 - P(normal class), per row of ``probabilities`` (N, C) or for one (C,)."""
    p = np.asarray(probabilities, dtype=float)
    normal = normal_class(card)
    if normal is None:
        raise ModelPackageError("This model has no 'no finding' class, so it cannot say whether "
                                "a finding is present.")
    return 1.0 - p[..., list(card["classes"]).index(normal)]


def strongest_finding_class(probabilities: Sequence[float], card: Mapping) -> int:
    """The finding class with the highest probability: what to explain when the user asks for
    the strongest evidence of a finding on a no-finding answer."""
    idx = finding_indices(card)
    p = np.asarray(probabilities, dtype=float)
    return int(idx[int(np.argmax(p[idx]))])


def is_finding_answer(prediction, card: Mapping) -> bool:
    """True when the answer names a finding class and is inside the training distribution."""
    return (not prediction.outside_training_distribution
            and prediction.label != normal_class(card))


def may_show_region(prediction, card: Mapping, requested: bool = False) -> bool:
    """Whether an outline, box and area may be drawn for ``prediction``: for a finding answer
    inside the training distribution, or when the user asked explicitly (``requested``)."""
    return bool(requested or is_finding_answer(prediction, card))


def heatmap_meaning(prediction, card: Mapping, class_name: str) -> str:
    """One sentence on what the heatmap shows, for answers where no region is drawn."""
    if prediction.outside_training_distribution:
        return ("The answer is withheld (the scan is outside what the model was trained on), so "
                "no region is outlined; the heatmap only shows what the network reacted to.")
    if prediction.label == normal_class(card):
        return (f"The answer is “{prediction.label}”: the heatmap shows what supported that "
                f"answer, not a lesion, so no region or area is given. Ask for the strongest "
                f"{finding_noun(card)} evidence to see where a {finding_noun(card)} class looked.")
    return f"Red: the image regions that drove “{class_name}” most."
