"""What an answer may claim: which class means "nothing found", how likely a finding is, and
whether a heatmap region (outline, box, area) may be shown.

The rule for regions: an outline, a box and an area read as "here is the lesion". They are shown
only for an answer that names a finding (a tumour class, pneumonia) and is inside what the model
was trained on. For a no-finding answer, or an answer withheld by the input gate, no region is
shown: the heatmap then only says what drove the answer. A user may ask explicitly for the
strongest evidence of a finding class (:func:`strongest_finding_class`); that region is then shown,
named as such. The normal class itself is the card's (:func:`medcls.models.card.normal_class`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from medcls.core.errors import ModelPackageError
from medcls.models.card import normal_class

__all__ = ["normal_class", "finding_noun", "finding_indices", "finding_probability",
           "strongest_finding_class", "is_finding_answer", "is_finding_class", "may_show_region"]


def finding_noun(card: Mapping) -> str:
    """What a finding is called in sentences: "tumour" for the brain task."""
    normal = normal_class(card) or ""
    return "tumour" if "tumo" in normal.lower() else "finding"


def finding_indices(card: Mapping) -> list[int]:
    """Indices of the finding classes (every class but the normal one)."""
    normal = normal_class(card)
    return [i for i, c in enumerate(card["classes"]) if c != normal]


def is_finding_class(card: Mapping, cls: str) -> bool:
    """True for a class that names a finding (every class but the card's normal class)."""
    return cls != normal_class(card)


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
            and is_finding_class(card, prediction.label))


def may_show_region(prediction, card: Mapping, requested: bool = False,
                    class_name: str | None = None) -> bool:
    """The one region rule: whether an outline, box and area may be drawn on the heatmap of
    ``class_name`` (default: the answer's class) for ``prediction``. Never for a withheld answer;
    for a finding class's map: the answer's own, or another finding class's that the user asked
    for (``requested``, e.g. the strongest finding evidence on a no-finding answer). A map of
    the normal class is never a lesion."""
    if prediction.outside_training_distribution:
        return False
    if class_name is None:  # the answer's own map, or the strongest finding map asked for
        return bool(requested or is_finding_class(card, prediction.label))
    return is_finding_class(card, class_name)
