"""The model card: a model's contract, checked once when read.

``card.json`` holds two kinds of content:

- the **contract** inference relies on (classes, task, input size, channels, preprocessing
  spec, temperature, CAM layer, thresholds, the model file's hash): typed, validated fields
  of the frozen :class:`ModelCard`. A card that breaks the contract raises
  :class:`~medcls.core.errors.ModelPackageError` with a message naming the model and the field;
- **free-form** provenance and figures (``metrics``, ``training``, ``limits``, ``speed``, and
  any key a newer tool adds): kept exactly as read. ``card["metrics"]`` / ``card.get(key)``
  read the card as written (a :class:`ModelCard` is a read-only mapping over it), and
  :meth:`ModelCard.to_dict` gives it back unchanged, so a tool that rewrites a card
  (:func:`medcls.models.package.update_card`) never drops a key it does not know.

Adding a typed field: one line in :class:`ModelCard` (with its default when older cards
lack it), one line in :func:`ModelCard.from_dict` reading it through ``_number``/``_text``.

The names of the layers every network has live here too, so that the architectures, the
loader and saliency agree on them without importing each other.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

from medcls.core.errors import ModelPackageError
from medcls.io.acquisition import SEQUENCE_NAMES
from medcls.io.preprocess import PreprocessSpec

CARD_SCHEMA = "medcls.card/1"

EMBEDDING_LAYER = "embedding"  # pooled penultimate features: the input gate's space
LOGITS_LAYER = "logits"  # the network's output: class logits (no softmax)

REQUIRED_KEYS = ("schema", "name", "version", "task", "classes", "architecture", "input_size",
                 "channels", "preprocessing", "cam_layer", "temperature", "output",
                 "low_confidence_threshold", "metrics", "training", "intended_use", "limits",
                 "model_sha256")
# fields that only training writes: update_card refuses to change them
PROTECTED_KEYS = frozenset(REQUIRED_KEYS) | {"size_bytes"}

DEFAULT_REGION_THRESHOLD = 0.5  # fraction of the heatmap's peak, when none was fitted

#: Class names that mean "nothing found", for a card (or a data set) that does not name its
#: normal class: the card's ``negative_class`` always wins (:func:`normal_class_among`).
NORMAL_CLASS_NAMES = ("no_tumor", "no_tumour", "normal", "healthy", "no_finding", "negative")


@dataclass(frozen=True, eq=False)
class ModelCard(Mapping):
    """A validated card: typed contract fields, plus the card as read (``card[key]``)."""

    name: str
    version: str
    task: str
    classes: tuple[str, ...]
    architecture: str
    input_size: int
    channels: int
    preprocessing: PreprocessSpec
    cam_layer: str
    temperature: float
    low_confidence_threshold: float  # below it a prediction is called uncertain
    model_sha256: str
    intended_use: str
    task_description: str = ""
    region_threshold: float = DEFAULT_REGION_THRESHOLD  # heatmap region, fraction of the peak
    gate_threshold: float | None = None  # input gate distance (gate.npz holds the statistics)
    # validation accuracy of the predictions at or above low_confidence_threshold, when the
    # calibration recorded it; the app quotes no figure without it
    low_confidence_val_accuracy: float | None = None
    size_bytes: int | None = None
    # the "nothing found" class (card key ``negative_class``; older cards: a known name among
    # the classes); None for a task where every class is a finding. Read it with normal_class().
    normal_class: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    # -------------------------------------------------------------- the card as read
    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def __eq__(self, other) -> bool:
        if isinstance(other, ModelCard):
            return self.raw == other.raw
        return isinstance(other, Mapping) and dict(self.raw) == dict(other)

    __hash__ = None  # a card is a value, but its free-form part is mutable JSON

    def to_dict(self) -> dict[str, Any]:
        """The card as read (a deep copy: JSON to write back)."""
        return copy.deepcopy(self.raw)

    @property
    def spec(self) -> PreprocessSpec:
        return self.preprocessing

    def scope_note(self, acquisition) -> str | None:
        """Why a scan lies outside what this model was validated on, or None: see
        :func:`scope_note`."""
        return scope_note(self, acquisition)

    # -------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> "ModelCard":
        """Check ``data`` (a card's JSON) and build the card; ``where`` names the model in
        messages (default: the card's own name). Raises :class:`ModelPackageError`."""
        if not isinstance(data, Mapping):
            raise ModelPackageError(f"The card of model {where!r} is not a JSON object.")
        raw = copy.deepcopy(dict(data))
        who = where or str(raw.get("name", "?"))

        def bad(what: str) -> ModelPackageError:
            return ModelPackageError(f"Model {who!r}: {what}")

        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise ModelPackageError(f"The card of model {who!r} lacks {', '.join(missing)}.")
        if raw["schema"] != CARD_SCHEMA:
            raise bad(f"unknown card schema {raw['schema']!r}.")
        try:
            spec = PreprocessSpec.from_dict(raw["preprocessing"])
        except (TypeError, ValueError, AttributeError) as exc:
            raise bad(f"invalid preprocessing spec ({exc}).") from None
        if spec.input_size != raw["input_size"] or spec.channels != raw["channels"]:
            raise bad("the preprocessing spec disagrees with the card's input size or channels.")
        classes = raw["classes"]
        if not (isinstance(classes, list) and len(classes) >= 2
                and all(isinstance(c, str) and c for c in classes)
                and len(set(classes)) == len(classes)):
            raise bad("the card needs two or more distinct classes.")
        if raw["output"] != LOGITS_LAYER:
            raise bad("only models that output logits are supported.")

        def _number(key: str, lo: float = -math.inf, hi: float = math.inf, default=None,
                    open_low: bool = False) -> float | None:
            value = raw.get(key, default)
            if value is None and default is None and key not in REQUIRED_KEYS:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value > hi or value < lo \
                    or (open_low and value == lo):
                raise bad(f"the card's {key} must be a number in "
                          f"{'(' if open_low else '['}{lo:g}, {hi:g}].")
            return float(value)

        def _text(key: str, default: str | None = None) -> str:
            value = raw.get(key, default)
            if not isinstance(value, str) or (default is None and not value):
                raise bad(f"the card's {key} must be a non-empty text.")
            return value

        gate = raw.get("input_gate")
        gate_threshold = None
        if isinstance(gate, Mapping) and gate.get("threshold") is not None:
            gate_threshold = gate["threshold"]
            if isinstance(gate_threshold, bool) or not isinstance(gate_threshold, (int, float)):
                raise bad("the card's input_gate threshold must be a number.")
            gate_threshold = float(gate_threshold)
        size = raw.get("size_bytes")
        negative = raw.get("negative_class")
        if negative is not None and negative not in classes:
            raise bad("the card's negative_class must be one of its classes.")
        return cls(
            name=_text("name"), version=_text("version"), task=_text("task"),
            classes=tuple(classes), architecture=_text("architecture"),
            input_size=spec.input_size, channels=spec.channels, preprocessing=spec,
            cam_layer=_text("cam_layer"),
            temperature=_number("temperature", 0.0, open_low=True),
            low_confidence_threshold=_number("low_confidence_threshold", 0.0, 1.0),
            model_sha256=_text("model_sha256"),
            intended_use=_text("intended_use", ""),
            task_description=_text("task_description", ""),
            region_threshold=_number("region_threshold", 0.0, 1.0, DEFAULT_REGION_THRESHOLD,
                                     open_low=True),
            gate_threshold=gate_threshold,
            low_confidence_val_accuracy=_number("low_confidence_val_accuracy", 0.0, 1.0),
            size_bytes=int(size) if isinstance(size, int) and not isinstance(size, bool) else None,
            normal_class=normal_class_among(classes, negative),
            raw=raw,
        )


# ----------------------------------------------------------------------------- normal class

def normal_class_among(classes, named: str | None = None) -> str | None:
    """The "nothing found" class of a class list: ``named`` (a card's ``negative_class``) when it
    is one of them, else the first known normal name (:data:`NORMAL_CLASS_NAMES`), else None.
    The one rule: the card reads it once (:attr:`ModelCard.normal_class`), training's partial
    labels read it for a data set's classes (:func:`medcls.learning.data.negative_class`)."""
    classes = list(classes)
    if named in classes:
        return named
    return next((c for c in classes if str(c).lower() in NORMAL_CLASS_NAMES), None)


def normal_class(card: Mapping | None) -> str | None:
    """The one reader of a model's "nothing found" class: :attr:`ModelCard.normal_class`, or, for
    a plain mapping (a card as JSON), the same rule on its ``negative_class`` and classes. Used by
    the findings rule, the screen's words, the reports, the DICOM SR, the audit trail and the
    segmentation's outline decision."""
    if card is None:
        return None
    if isinstance(card, ModelCard):
        return card.normal_class
    if "classes" not in card:
        return None
    return normal_class_among(card["classes"], card.get("negative_class"))


# ----------------------------------------------------------------------------- scope

def scope_note(card: Mapping, acquisition) -> str | None:
    """The one scope rule: why a scan (its :class:`~medcls.io.acquisition.Acquisition`, read from
    its own DICOM tags) lies outside what the model was validated on, or None.

    The card's ``scope.validated_planes`` and ``scope.validated_sequences`` name what was
    validated; a scan whose plane or MR sequence is known and not among them is outside. What a
    file does not say (a plain image has no orientation or sequence) is not held against it: the
    input gate and the low-confidence threshold judge it."""
    scope = card.get("scope") or {}
    name = card.get("name", "this model")
    planes, sequences = scope.get("validated_planes"), scope.get("validated_sequences")
    if acquisition is None:
        return None
    if acquisition.sequence and sequences and acquisition.sequence not in sequences:
        validated = " and ".join(SEQUENCE_NAMES.get(s, s) for s in sequences)
        return (f"a {acquisition.sequence_text} image: {name} was validated on {validated} "
                f"images only")
    if acquisition.plane and planes and acquisition.plane not in planes:
        return (f"a {acquisition.plane} slice: {name} was validated on normal anatomy in "
                f"{' and '.join(planes)} slices only")
    return None
