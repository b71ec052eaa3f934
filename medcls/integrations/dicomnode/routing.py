"""Which model answers an incoming series: the model the site chose for each task, taken for a
series of the modality its card names and of a body part of its task, and only when the card's
scope (:func:`medcls.models.card.scope_note`: plane, MR sequence) holds the series.

The site's models are, in order: the ``[listener] models`` setting (model folder names), else
each task's site default (:func:`medcls.learning.site.site_defaults`, set on the Adapt page),
else the task's ``*-default`` package. A card that names no modality answers nothing here: an
automatic answer needs the card to say what it was trained on.

Every "no" comes with its reason in words, recorded as "not answered: reason"; nothing is sent
for such a series.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medcls.core.errors import ListenerError, ModelPackageError
from medcls.integrations.dicomnode.jobs import NO_MODEL, model_key

log = logging.getLogger(__name__)

#: BodyPartExamined values (DICOM PS3.16 CID 4031 and common vendor values) of each task; a card
#: may name its own in ``scope.body_parts``. A series that names no body part is not held to it.
BODY_PARTS = {
    "brain-mri": ("BRAIN", "HEAD", "SKULL", "HEADNECK", "HEAD_NECK", "NEURO", "CEREBRUM"),
    "chest-xray": ("CHEST", "THORAX", "LUNG", "CHEST_LUNG"),
}

#: The manufacturer our own results carry (medcls.integrations.pacs.results.MANUFACTURER).
OWN_MANUFACTURER = "MedCLS"


@dataclass(frozen=True)
class SiteModel:
    """One model the site lets answer incoming series."""

    folder: Path
    card: object  # medcls.models.card.ModelCard

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def key(self) -> str:
        return model_key(self.card)

    @property
    def modality(self) -> str | None:
        scope = self.card.get("scope") or {}
        value = self.card.get("modality") or scope.get("modality")
        return str(value).upper() if value else None

    @property
    def body_parts(self) -> tuple[str, ...]:
        scope = self.card.get("scope") or {}
        parts = scope.get("body_parts") or BODY_PARTS.get(self.card["task"], ())
        return tuple(str(p).upper() for p in parts)


@dataclass(frozen=True)
class Route:
    """The model an arriving instance's series goes to, or why none."""

    model: SiteModel | None
    reason: str | None = None

    @property
    def key(self) -> str:
        return self.model.key if self.model is not None else NO_MODEL


def site_models(models_dir: str | Path, names: Sequence[str] = ()) -> list[SiteModel]:
    """The models the site chose (see the module's docstring)."""
    from medcls.learning.site import site_defaults
    from medcls.models.package import list_packages, read_card

    root = Path(models_dir)
    if names:
        out = []
        for name in names:
            folder = root / name
            try:
                out.append(SiteModel(folder, read_card(folder)))
            except ModelPackageError as exc:
                raise ListenerError(f"The listener's model {name!r} cannot be used: {exc}") from None
        return out
    packages = list_packages(root)
    chosen = site_defaults(root)
    out = []
    for task in dict.fromkeys(card.task for _, card in packages):
        mine = [(p, c) for p, c in packages if c.task == task]
        mine.sort(key=lambda pc: (pc[0].name != chosen.get(task),
                                  not pc[1].name.endswith("-default"), pc[1].name))
        out.append(SiteModel(*mine[0]))
    return out


class Router:
    """Routes instances to the site's models (cheap: cards only, no network loaded)."""

    def __init__(self, models: Sequence[SiteModel]):
        self.models = list(models)
        for m in self.models:
            if m.modality is None:
                log.warning("model %s names no modality in its card: it answers no incoming "
                            "series", m.name)

    def __repr__(self) -> str:
        return f"Router({', '.join(self.describe())})"

    def describe(self) -> list[str]:
        """"brain-mri-default (MR)" for each model that answers something."""
        return [f"{m.name} ({m.modality})" for m in self.models if m.modality]

    def by_key(self, key: str) -> SiteModel | None:
        return next((m for m in self.models if m.key == key), None)

    def route(self, ds) -> Route:
        """The model for the series of instance ``ds`` (a pydicom dataset): by modality, then
        body part; the scope is judged on the whole series (:meth:`scope`)."""
        if str(ds.get("Manufacturer", "") or "") == OWN_MANUFACTURER:
            return Route(None, "MedCLS's own results are never answered.")
        modality = str(ds.get("Modality", "") or "").upper()
        if not modality:
            return Route(None, "The series names no modality, so no model can be chosen for it.")
        same = [m for m in self.models if m.modality == modality]
        if not same:
            answers = self.describe()
            return Route(None, f"No model of this site answers {modality} series"
                         + (f" ({'; '.join(answers)} answer" + ("s" if len(answers) == 1 else "")
                            + " other modalities)." if answers else ": no model names a modality."))
        part = str(ds.get("BodyPartExamined", "") or "").upper().strip()
        fits = [m for m in same if not part or part in m.body_parts]
        if not fits:
            wanted = ", ".join(sorted({p for m in same for p in m.body_parts[:2]}))
            return Route(None, f"A {modality} series of the body part {part}: the site's "
                         f"{modality} model{'s' if len(same) > 1 else ''} answer{'' if len(same) > 1 else 's'} "
                         f"{wanted} series only.")
        return Route(fits[0])

    @staticmethod
    def scope(model: SiteModel, headers: Sequence) -> str | None:
        """Why the series (its image instances' headers) lies outside the model card's validated
        scope, or None: outside when more than half of its instances are (the series view's
        rule for a series withheld by scope)."""
        from medcls.io.acquisition import acquisition_of
        from medcls.io.dicom_tags import safe_metadata
        from medcls.models.card import scope_note

        notes = []
        for ds in headers:
            meta = safe_metadata(ds)
            notes.append(scope_note(model.card, acquisition_of(meta, meta.get("Modality"))))
        outside = [n for n in notes if n]
        if notes and len(outside) * 2 > len(notes):
            note = Counter(outside).most_common(1)[0][0]
            return note[0].upper() + note[1:] + "."
        return None
