"""The typed model card (medcls.models.card.ModelCard): every shipped card reads back to the JSON it
came from, contract fields are typed and checked with a clear ModelPackageError, free-form and
unknown keys survive update_card unchanged. No model is loaded: cards only."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
from conftest import MODELS_DIR

from medcls.core.errors import ModelPackageError
from medcls.io.preprocess import PreprocessSpec
from medcls.models.card import EMBEDDING_LAYER, ModelCard
from medcls.models.package import CARD_FILE, copy_package, list_packages, read_card, update_card


def shipped_cards():
    found = list_packages(MODELS_DIR)
    if not found:
        pytest.skip(f"no model packages in {MODELS_DIR}")
    return found


def test_shipped_cards_are_typed_and_read_as_written():
    for folder, card in shipped_cards():
        written = json.loads((folder / CARD_FILE).read_text())
        assert card.to_dict() == written and dict(card) == written
        assert card.classes == tuple(written["classes"])
        assert isinstance(card.preprocessing, PreprocessSpec)
        assert card.preprocessing.to_dict() == written["preprocessing"]
        assert card.temperature == written["temperature"] > 0
        assert card.gate_threshold == written["input_gate"]["threshold"]
        assert card.region_threshold == written.get("region_threshold", 0.5)
        assert card["metrics"] == written["metrics"] and card.get("no such key") is None
        assert pickle.loads(pickle.dumps(card)) == card  # st.cache_data pickles cards
        with pytest.raises(AttributeError):
            card.temperature = 2.0  # frozen


def _card(folder):
    return json.loads((folder / CARD_FILE).read_text())


@pytest.fixture()
def card_folder(tmp_path):
    folder, _ = shipped_cards()[0]
    copy = tmp_path / folder.name
    copy.mkdir()
    shutil.copy(folder / CARD_FILE, copy / CARD_FILE)
    return copy


@pytest.mark.parametrize("change, match", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": "warm"}, "temperature"),
    ({"low_confidence_threshold": 1.5}, "low_confidence_threshold"),
    ({"region_threshold": 0}, "region_threshold"),
    ({"classes": ["only-one"]}, "classes"),
    ({"classes": ["a", "a"]}, "classes"),
    ({"cam_layer": ""}, "cam_layer"),
    ({"name": 7}, "name"),
    ({"output": "probabilities"}, "logits"),
    ({"schema": "medcls.card/99"}, "schema"),
    ({"preprocessing": {"input_size": 224, "channels": 2}}, "preprocessing"),
    ({"input_gate": {"threshold": "high"}}, "input_gate"),
])
def test_contract_errors_name_the_model_and_the_field(card_folder, change, match):
    (card_folder / CARD_FILE).write_text(json.dumps(_card(card_folder) | change))
    with pytest.raises(ModelPackageError, match=match) as info:
        read_card(card_folder)
    assert card_folder.name in str(info.value)


def test_missing_keys_and_bad_json_are_refused(card_folder):
    data = _card(card_folder)
    del data["temperature"], data["classes"]
    (card_folder / CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelPackageError, match="lacks classes, temperature"):
        read_card(card_folder)
    (card_folder / CARD_FILE).write_text("{not json")
    with pytest.raises(ModelPackageError, match="not valid JSON"):
        read_card(card_folder)
    with pytest.raises(ModelPackageError, match="not a JSON object"):
        ModelCard.from_dict(["a list"], where="x")


def test_update_card_keeps_unknown_keys_and_refuses_the_contract(card_folder):
    """Fields other tools add (scope, selective, segmentation, parent, ...) are not known to
    ModelCard: they are kept as read and written back unchanged."""
    newer = {"scope": {"glioma": {"sources": ["figshare"], "planes": ["axial"]}},
             "parent": {"name": "brain-mri-default", "model_sha256": "0" * 64}}
    (card_folder / CARD_FILE).write_text(json.dumps(_card(card_folder) | newer))
    before = _card(card_folder)
    card = update_card(card_folder, {"low_confidence_val_accuracy": 0.987})
    assert card.low_confidence_val_accuracy == 0.987
    assert _card(card_folder) == before | {"low_confidence_val_accuracy": 0.987}
    assert card["scope"] == newer["scope"] and card["parent"] == newer["parent"]
    for field in ("classes", "temperature", "model_sha256", "size_bytes"):
        with pytest.raises(ModelPackageError, match="does not rewrite"):
            update_card(card_folder, {field: 1})
    with pytest.raises(ModelPackageError, match="region_threshold"):
        update_card(card_folder, {"region_threshold": 3})  # an invalid result is not written
    assert read_card(card_folder) == card


def test_embedding_layer_is_the_one_every_architecture_names():
    from medcls.models.architectures import ARCHITECTURES

    for arch in ARCHITECTURES.values():
        model = arch.build(input_size=96 if arch.transfer else 64, n_classes=3)
        names = {layer.name for layer in model.layers}
        assert EMBEDDING_LAYER in names and arch.cam_layer in names
    assert [a.name for a in ARCHITECTURES.values() if a.transfer] == [
        "mobilenet-tl", "efficientnet-lite0-tl", "efficientnet-lite1-tl", "efficientnet-lite2-tl"]


def test_registries_refuse_unknown_names_with_a_typed_error():
    from medcls.core.errors import MedclsError, UnknownChoiceError
    from medcls.models.architectures import get_architecture
    from medcls.models.saliency import get_method

    for lookup, name in ((get_architecture, "resnet-9000"), (get_method, "lime")):
        with pytest.raises(UnknownChoiceError, match=name) as info:
            lookup(name)
        assert isinstance(info.value, MedclsError) and isinstance(info.value, ValueError)


def test_copy_package_keeps_the_model_and_figures_under_a_new_name(tmp_path):
    """The tool step for keeping a replaced default as a named model: the file and every figure
    are the source's, the card names its origin, nothing existing is overwritten."""
    folder = MODELS_DIR / "brain-mri-seed-cnn"
    if not folder.is_dir():
        pytest.skip("no seed-cnn package")
    card = copy_package(folder, tmp_path / "kept", "brain-mri-kept")
    source = _card(folder)
    assert card["name"] == "brain-mri-kept"
    assert card["renamed_from"] == {"name": source["name"], "version": source["version"]}
    assert {k: v for k, v in _card(tmp_path / "kept").items() if k != "renamed_from"} == source | {"name": "brain-mri-kept"}
    assert (tmp_path / "kept" / "model.keras").read_bytes() == (folder / "model.keras").read_bytes()
    with pytest.raises(ModelPackageError, match="never overwritten"):
        copy_package(folder, tmp_path / "kept", "other")
    with pytest.raises(ModelPackageError, match="not a model name"):
        copy_package(folder, tmp_path / "bad", "a/b")
    assert not (tmp_path / "bad").exists()
