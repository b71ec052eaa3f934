"""Model packages: ``models/<name>/`` holds ``model.keras``, ``card.json`` and ``gate.npz``.

The card is the model's contract (classes, input size, preprocessing spec, temperature,
Grad-CAM layer, input-gate threshold) plus its provenance (training command and data) and
its figures on the fixed test split, read into a typed :class:`~medcls.models.card.ModelCard`.
:func:`load_package` validates the card against the model and refuses a package whose card
is missing or inconsistent, so inference never guesses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from medcls.core.errors import ModelPackageError
from medcls.io.preprocess import PreprocessSpec
from medcls.models.calibration import InputGate
from medcls.models.card import CARD_SCHEMA, EMBEDDING_LAYER, PROTECTED_KEYS, ModelCard

log = logging.getLogger(__name__)

COMPANION_SCHEMAS = ("medcls.seg-card/1",)  # packages a classifier's card points to, not pickable
MODEL_FILE = "model.keras"
CARD_FILE = "card.json"
GATE_FILE = "gate.npz"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelPackage:
    path: Path
    card: ModelCard
    model: Any  # keras.Model
    gate: InputGate | None

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    @property
    def spec(self) -> PreprocessSpec:
        return self.card.preprocessing

    @property
    def temperature(self) -> float:
        return self.card.temperature

    @property
    def class_bias(self) -> tuple[float, ...] | None:
        return self.card.class_bias

    @property
    def task(self) -> str:
        return self.card.task


def read_card(path: str | Path) -> ModelCard:
    """Read and check a card without loading the model (cheap: for model pickers)."""
    folder = Path(path)
    card_path = folder / CARD_FILE
    if not card_path.is_file():
        raise ModelPackageError(f"Model folder {folder.name!r} has no {CARD_FILE}; refusing to "
                                "load a model without its card.")
    try:
        data = json.loads(card_path.read_text())
    except (OSError, ValueError):
        raise ModelPackageError(f"The card of model {folder.name!r} is not valid JSON.") from None
    return ModelCard.from_dict(data, where=folder.name)


def list_packages(root: str | Path) -> list[tuple[Path, ModelCard]]:
    """Every valid package under ``root`` with its card, sorted by task then name. Invalid
    folders are skipped (with a log line naming the folder only)."""
    out = []
    root = Path(root)
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            out.append((folder, read_card(folder)))
        except ModelPackageError as exc:
            if not _is_companion(folder):  # a classifier's companion (segmentation) is no model to pick
                log.warning("skipping model folder %s: %s", folder.name, exc)
    return sorted(out, key=lambda fc: (fc[1].task, fc[1].name))


def _is_companion(folder: Path) -> bool:
    try:
        return json.loads((folder / CARD_FILE).read_text()).get("schema") in COMPANION_SCHEMAS
    except (OSError, ValueError, AttributeError):
        return False


def load_package(path: str | Path, verify_hash: bool = True) -> ModelPackage:
    """Load and validate a model package. Raises :class:`ModelPackageError`."""
    import keras

    folder = Path(path)
    card = read_card(folder)
    model_path = folder / MODEL_FILE
    if not model_path.is_file():
        raise ModelPackageError(f"Model folder {folder.name!r} has no {MODEL_FILE}.")
    if verify_hash and file_sha256(model_path) != card.model_sha256:
        raise ModelPackageError(f"Model {folder.name!r}: {MODEL_FILE} does not match the hash in "
                                "its card (the card describes another model).")
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelPackageError(f"Model {folder.name!r} could not be loaded "
                                f"({type(exc).__name__}).") from None
    shape = tuple(model.input_shape[1:])
    if shape != (card.input_size, card.input_size, card.channels):
        raise ModelPackageError(f"Model {folder.name!r}: the network's input {shape} disagrees "
                                "with the card.")
    if int(model.output_shape[-1]) != len(card.classes):
        raise ModelPackageError(f"Model {folder.name!r}: the network has {model.output_shape[-1]} "
                                f"outputs but the card lists {len(card.classes)} classes.")
    names = {layer.name for layer in model.layers}
    for layer in (card.cam_layer, EMBEDDING_LAYER):
        if layer not in names:
            raise ModelPackageError(f"Model {folder.name!r}: layer {layer!r} named by the card "
                                    "is not in the network.")
    gate = InputGate.load(folder / GATE_FILE) if (folder / GATE_FILE).is_file() else None
    return ModelPackage(path=folder, card=card, model=model, gate=gate)


def update_card(folder: str | Path, fields: dict[str, Any]) -> ModelCard:
    """Add or replace measured ``fields`` of a package's card (a region threshold, speed figures)
    without touching the model file; every other key is written back as read, and the result
    is checked like any card (nothing is written when it would not be valid)."""
    folder = Path(folder)
    if PROTECTED_KEYS & set(fields):
        raise ModelPackageError(f"update_card does not rewrite {sorted(PROTECTED_KEYS & set(fields))}.")
    data = read_card(folder).to_dict() | dict(fields)
    ModelCard.from_dict(data, where=folder.name)
    (folder / CARD_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return read_card(folder)


def save_weights_only(model, path: str | Path) -> None:
    """Save ``model`` as an uncompiled view of the same layers: the file holds the weights and
    the graph, not the optimizer state (Adam's two moments would triple it)."""
    import keras

    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelPackageError("A model package holds a network with one input and one output.")
    keras.Model(model.inputs[0], model.outputs[0], name=model.name).save(path)


def save_package(folder: str | Path, model, card: Mapping[str, Any], gate: InputGate | None) -> Path:
    """Write model, gate and card (the card last, with the model's hash)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / MODEL_FILE
    save_weights_only(model, model_path)
    if gate is not None:
        gate.save(folder / GATE_FILE)
    card = dict(card.to_dict() if isinstance(card, ModelCard) else card)
    card["schema"] = CARD_SCHEMA
    card["model_sha256"] = file_sha256(model_path)
    card["size_bytes"] = model_path.stat().st_size
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    read_card(folder)  # a package we cannot read back is not written silently
    return folder


def rename_classes(folder: str | Path, names: Mapping[str, str]) -> ModelCard:
    """Rename classes of a package's card (``{"no_tumor": "negative"}``) without touching the
    model file: the class list keeps its order and length (the network's outputs), and every
    key of the card that names a class (``negative_class``, ``class_names``) follows. For
    adapting a package to a site's vocabulary, and for tests of the one normal-class rule."""
    folder = Path(folder)
    data = read_card(folder).to_dict()
    new = [names.get(c, c) for c in data["classes"]]
    if len(set(new)) != len(new):
        raise ModelPackageError("Renaming would give two classes the same name.")
    data["classes"] = new
    if data.get("negative_class") is not None:
        data["negative_class"] = names.get(data["negative_class"], data["negative_class"])
    if isinstance(data.get("class_names"), Mapping):
        data["class_names"] = {names.get(k, k): v for k, v in data["class_names"].items()}
    ModelCard.from_dict(data, where=folder.name)
    (folder / CARD_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return read_card(folder)


def copy_package(source: str | Path, dest: str | Path, name: str,
                 description: str | None = None) -> ModelCard:
    """Keep a package under a new name (``brain-mri-default`` 2.0.0 kept as ``brain-mri-fast``
    when a slower default replaces it): the folder is copied whole, the model file's hash is
    checked against the card, and only the card's ``name`` (and, given, ``task_description``)
    change; every measured figure stays the source's, and the card records where it came from.
    An existing ``dest`` is never overwritten."""
    source, dest = Path(source), Path(dest)
    card = read_card(source)
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ModelPackageError(f"{name!r} is not a model name.")
    if dest.exists():
        raise ModelPackageError(f"{dest.name} exists already; a package is never overwritten.")
    if file_sha256(source / MODEL_FILE) != card["model_sha256"]:
        raise ModelPackageError(f"{source.name}: the model file does not match its card.")
    shutil.copytree(source, dest)
    data = card.to_dict() | {"name": name.strip(),
                             "renamed_from": {"name": card["name"], "version": card["version"]}}
    if description is not None:
        data["task_description"] = description
    try:
        ModelCard.from_dict(data, where=dest.name)
    except ModelPackageError:
        shutil.rmtree(dest)
        raise
    (dest / CARD_FILE).write_text(json.dumps(data, indent=2) + "\n")
    return read_card(dest)
