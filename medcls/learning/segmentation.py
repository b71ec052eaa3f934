"""Tumour segmentation: the outline and size of a tumour, from a small U-Net.

The classifier answers *which* class; this module answers *where exactly* and *how large*:
a light U-Net decoder over a MobileNetV2 (alpha 0.35) encoder (ImageNet's weights, or the
brain classifier's own backbone with :func:`copy_encoder`), trained on the
figshare authors' own tumour borders (``brain-mri/masks``). It ships as a companion package
(``models/brain-mri-seg/``: ``model.keras`` + ``card.json``) that a classifier's card names
with ``"segmentation": "<folder>"``; the classifier is untouched, so its accuracy is too.

Reading order:

1. masks: read a mask, bring it onto the model grid through the image's own preprocessing
   geometry (crop to the head, resize, pad);
2. the network (:func:`build_unet`, :func:`copy_encoder`) and its loss (Dice + BCE, with a per-pixel weight so that
   images known only by a tumour box teach "no tumour outside the box" and nothing inside);
3. the training data: arrays cached once, a tf.data pipeline whose augmentation moves image,
   mask and weight together;
4. training (:func:`train_segmentation`), choosing the epoch by validation Dice, then the
   threshold (:func:`fit_threshold`; :func:`refit` also switches flip averaging) on the
   validation split at the original image's resolution;
5. inference (:class:`Segmenter`): probabilities on the grid (averaged with the mirror image's
   when the card says ``flip_average``), mapped back to the original image
   (crop and padding undone), thresholded; outline, area, longest diameter, confidence;
6. measurements: Dice, IoU, 95% Hausdorff distance, longest diameter.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from medcls.core.errors import DatasetError, ModelPackageError
from medcls.io.load import load_scan
from medcls.io.preprocess import Geometry, PreprocessSpec, preprocess
from medcls.models.measures import dice, longest_diameter
from medcls.models.package import CARD_FILE, MODEL_FILE, file_sha256, save_weights_only
from medcls.models.segmenter import FLIP_KEY, SEG_SCHEMA, Segmenter, postprocess, read_seg_card

log = logging.getLogger(__name__)


SKIP_LAYERS = ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu",
               "block_13_expand_relu")  # MobileNetV2 features at strides 2, 4, 8, 16
BOTTLENECK = "block_16_project"  # stride 32
ENCODER_NAMES = {"mobilenet_v2": "MobileNetV2 (alpha 0.35)", "efficientnet-lite0": "EfficientNet-Lite0"}
TUMOUR_PIXEL_PRIOR = 0.02  # share of tumour pixels in a training image, roughly: the output's starting bias


def read_mask(path: str | Path) -> np.ndarray:
    """A binary mask PNG (255 inside) as a bool (H, W) array."""
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DatasetError(f"Mask {Path(path).name} could not be read.")
    return m > 127


def mask_index(root: str | Path) -> dict[str, str]:
    """``masks.csv`` of a dataset: image file -> mask file (both relative to ``root``); empty
    when the dataset has no masks."""
    path = Path(root) / "masks.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {row["file"]: row["mask"] for row in csv.DictReader(fh)}


def mask_to_grid(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """An original-geometry mask on the model grid: the image's crop, resize and padding.
    Area interpolation then 0.5, so a grid cell is tumour when most of it is."""
    x0, y0, x1, y1 = geometry.crop_box
    w, h = geometry.scaled_size
    left, top = geometry.pad
    inner = cv2.resize(mask[y0:y1, x0:x1].astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    grid = np.zeros((geometry.input_size, geometry.input_size), np.float32)
    grid[top:top + h, left:left + w] = inner
    return grid >= 0.5


def build_unet(input_size: int = 160, weights: str | Path | None = None,
               decoder: Sequence[int] = (96, 64, 48, 32, 16), freeze_until: str | None = None,
               convs_per_stage: int = 1, encoder: str = "mobilenet_v2"):
    """U-Net over MobileNetV2 (alpha 0.35): the encoder's features at strides 32, 16, 8, 4, 2
    are upsampled step by step, each step concatenated with the skip of its stride and fused by
    a depthwise-separable convolution; a 1x1 sigmoid gives the tumour probability per pixel.
    One flat graph, input the preprocessed image in [0, 1] (3 channels). ``freeze_until``: the
    encoder layers before this one keep their ImageNet weights (the high-resolution stem: most
    of the backward pass's cost, and edges transfer as they are). ``convs_per_stage``: how many
    separable convolutions fuse each decoder stage (the first graphs used one). ``encoder``:
    ``mobilenet_v2`` (``weights``: the Keras application's no-top .h5) or ``efficientnet-lite0``
    (``weights``: its legacy .pth or the weight package's name; the skips are the expansion
    activations before each downsampling block, the bottleneck the top features)."""
    import keras
    from keras import layers

    inputs = keras.Input((input_size, input_size, 3), name="image")
    if weights is not None and not encoder.startswith("efficientnet-lite") and not Path(weights).is_file():
        raise FileNotFoundError(f"ImageNet weights file not found: {weights}")
    if encoder.startswith("efficientnet-lite"):
        x, skips, encoder_layers = _lite_encoder(inputs, encoder.split("-")[1], weights)
    else:
        x = layers.Rescaling(2.0, offset=-1.0, name="to_mobilenet_range")(inputs)
        base = keras.applications.MobileNetV2(input_tensor=x, include_top=False, alpha=0.35,
                                              weights=str(weights) if weights else None)
        encoder_layers = base.layers
        x = base.get_layer(BOTTLENECK).output
        skips = [base.get_layer(n).output for n in reversed(SKIP_LAYERS)] + [None]
    frozen = True if freeze_until else False
    for layer in encoder_layers:  # pretrained statistics stay (inference-mode batch norm)
        frozen = frozen and layer.name != freeze_until
        if isinstance(layer, layers.BatchNormalization) or frozen:
            layer.trainable = False
    for i, (filters, skip) in enumerate(zip(decoder, skips)):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"dec{i}_up")(x)
        if skip is not None:
            x = layers.Concatenate(name=f"dec{i}_concat")([x, skip])
        for j in range(convs_per_stage):
            tag = "" if j == 0 else f"_{j + 1}"  # the first conv keeps the first graphs' names
            x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"dec{i}_conv{tag}")(x)
            x = layers.BatchNormalization(name=f"dec{i}_bn{tag}")(x)
            x = layers.ReLU(name=f"dec{i}_relu{tag}")(x)
    # the bias starts at the prior log-odds of a tumour pixel (about 2%), not at p = 0.5: from
    # 0.5 an untrained decoder spends its first epochs only learning that most pixels are not
    # tumour (Lin et al. 2017, focal loss, section 4.1)
    prior = keras.initializers.Constant(float(np.log(TUMOUR_PIXEL_PRIOR / (1 - TUMOUR_PIXEL_PRIOR))))
    outputs = layers.Conv2D(1, 1, activation="sigmoid", bias_initializer=prior,
                            name="tumour_probability")(x)
    return keras.Model(inputs, outputs, name=f"{encoder.replace('-', '_')}_unet")


def _lite_encoder(inputs, variant: str, weights):
    """EfficientNet-Lite as the U-Net's encoder: (bottleneck, skips from stride 16 to 2 then
    None, the encoder's layers). The same layer names as the classifier's backbone, so
    :func:`copy_encoder` can start it from a fine-tuned classifier."""
    from keras import layers

    from medcls.models import efficientnet_lite as lite
    from medcls.models.architectures import lite_weights_file
    from medcls.models.torch_legacy import read_state_dict

    x = layers.Rescaling(255.0 / 128.0, offset=-127.0 / 128.0, name="to_lite_range")(inputs)
    net = lite.build_efficientnet_lite(variant, x)
    if weights is not None:
        lite.load_torch_state_dict(net, read_state_dict(lite_weights_file(weights, variant)))
    skips = [net.layers[net.taps[f"stride{s}"]].output for s in (16, 8, 4, 2)] + [None]
    return net.output, skips, list(net.layers.values())


def copy_encoder(model, classifier_dir: str | Path) -> int:
    """Start the U-Net's encoder from a brain classifier's fine-tuned MobileNetV2 backbone (the
    segmentation head then sits on the classifier's own features): every layer of the same name
    and weight shapes is copied. Returns the number of layers copied; none is an error."""
    import keras

    source = keras.saving.load_model(Path(classifier_dir) / MODEL_FILE, compile=False, safe_mode=True)
    theirs = {layer.name: layer for layer in source.layers}
    copied = 0
    for layer in model.layers:
        other = theirs.get(layer.name)
        if other is None or not layer.weights or layer.name.startswith("dec"):
            continue
        if [w.shape for w in layer.get_weights()] == [w.shape for w in other.get_weights()]:
            layer.set_weights(other.get_weights())
            copied += 1
    if not copied:
        raise ValueError(f"{classifier_dir}: no encoder layer matches the U-Net's backbone")
    return copied


def dice_bce_loss(empty_dice: bool = True):
    """Soft Dice (per image) + binary cross-entropy, both weighted per pixel.

    ``y_true`` stacks the mask and a weight map: 1 where the truth is known, 0 where it is not
    (inside the box of a tumour known only by its box). With ``empty_dice`` an image without
    tumour has Dice ``1 / (1 + sum p)``, so predicting nothing is its only zero loss; without it
    only cross-entropy speaks for those images (Dice over tumour images only: an empty-image
    Dice that strong taught the first run to miss faint tumours)."""
    import keras.ops as ops

    def loss(y_true, y_pred):
        y, w = y_true[..., :1], y_true[..., 1:2]
        p = ops.clip(y_pred, 1e-6, 1.0 - 1e-6)
        bce = -(y * ops.log(p) + (1.0 - y) * ops.log(1.0 - p))
        bce = ops.sum(w * bce) / (ops.sum(w) + 1e-6)
        inter = ops.sum(w * p * y, axis=(1, 2, 3))
        truth = ops.sum(w * y, axis=(1, 2, 3))
        dice = (2.0 * inter + 1.0) / (ops.sum(w * p, axis=(1, 2, 3)) + truth + 1.0)
        counts = ops.ones_like(truth) if empty_dice else ops.cast(truth > 0, "float32")
        return bce + ops.sum(counts * (1.0 - dice)) / (ops.sum(counts) + 1e-6)

    return loss


@dataclass(frozen=True)
class Sample:
    """One training image: its file, and where its truth comes from."""

    root: str
    file: str
    mask: str | None  # mask file (relative to root); None: no tumour, or a box-only tumour
    box: tuple[float, float, float, float] | None = None  # box-only tumour: (xc, yc, w, h)


def samples(root: str | Path, split: str, use_boxes: bool = False) -> list[Sample]:
    """The ``split`` of a dataset folder (by its labels.csv): tumours with a mask, images labelled
    ``no_tumor`` (empty mask) and, with ``use_boxes``, tumours known only by a box."""
    root = Path(root)
    masks = mask_index(root)
    out = []
    with (root / "labels.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("split") != split:
                continue
            if row["file"] in masks:
                out.append(Sample(str(root), row["file"], masks[row["file"]]))
            elif row["label"] == "no_tumor":
                out.append(Sample(str(root), row["file"], None))
            elif use_boxes and row.get("box_w"):
                box = tuple(float(row[k]) for k in ("box_xc", "box_yc", "box_w", "box_h"))
                out.append(Sample(str(root), row["file"], None, box))
    return out


def prepare(sample: Sample, spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image (S, S) in the model's range, mask and weight map on the same grid."""
    pre = preprocess(load_scan(Path(sample.root) / sample.file), spec)
    g = pre.geometry
    S = spec.input_size
    weight = np.ones((S, S), np.float32)
    if sample.mask is not None:
        mask = read_mask(Path(sample.root) / sample.mask)
        if mask.shape != g.original_shape:
            raise DatasetError(f"Mask of {sample.file} has another size than its image.")
        grid = mask_to_grid(mask, g)
    else:
        grid = np.zeros((S, S), bool)
        if sample.box is not None:  # unknown inside the box (grown by 10%): no loss there
            H, W = g.original_shape
            xc, yc, bw, bh = sample.box
            bw, bh = bw * 1.1, bh * 1.1
            x0, y0, x1, y1 = g.box_to_grid(((xc - bw / 2) * W, (yc - bh / 2) * H,
                                            (xc + bw / 2) * W, (yc + bh / 2) * H))
            weight[max(0, int(y0)):int(np.ceil(y1)), max(0, int(x0)):int(np.ceil(x1))] = 0.0
    return pre.array[..., 0], grid, weight


def cached_training_arrays(items: Sequence[Sample], spec: PreprocessSpec,
                           cache_dir: str | Path | None, workers: int = 2) -> dict[str, np.ndarray]:
    """``x`` (N, S, S) float16, ``y`` (N, S, S) uint8, ``w`` (N, S, S) uint8 for the samples,
    cached on disk by content of the list and the spec (float16 halves the memory; the
    difference to float32 is below 1e-3 in [0, 1])."""
    key = hashlib.sha256((json.dumps([asdict(s) for s in items]) + spec.to_json()).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"seg-{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        out = list(pool.map(lambda s: prepare(s, spec), items))
    arrays = {"x": np.stack([o[0] for o in out]).astype(np.float16),
              "y": np.stack([o[1] for o in out]).astype(np.uint8),
              "w": np.stack([o[2] for o in out]).astype(np.uint8)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path.with_suffix(".tmp.npz"), **arrays)
        path.with_suffix(".tmp.npz").replace(path)
    return arrays


def seg_dataset(arrays: dict[str, np.ndarray], batch_size: int, training: bool, seed: int = 0):
    """tf.data over cached arrays: images as 3 channels, targets as (mask, weight). When
    training, shuffled, and the geometric augmentation (flip, rotation, shift, zoom) moves image,
    mask and weight together; contrast and brightness touch the image only."""
    import tensorflow as tf

    from medcls.learning.data import augmentation

    geometric, photometric = augmentation(seed)
    ds = tf.data.Dataset.from_tensor_slices((arrays["x"], arrays["y"], arrays["w"]))
    if training:
        ds = ds.shuffle(len(arrays["x"]), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def _map(x, y, w):
        stacked = tf.stack([tf.cast(x, tf.float32), tf.cast(y, tf.float32), tf.cast(w, tf.float32)], -1)
        if training:
            stacked = geometric(stacked, training=True)
        img = stacked[..., :1]
        if training:
            img = tf.clip_by_value(photometric(img, training=True), 0.0, 1.0)
        target = tf.stack([tf.cast(stacked[..., 1] > 0.5, tf.float32),
                           tf.cast(stacked[..., 2] > 0.5, tf.float32)], -1)
        return tf.repeat(img, 3, axis=-1), target

    return ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


@dataclass
class SegTrainConfig:
    data: str  # brain-mri folder (labels.csv + masks.csv)
    out: str  # companion package folder to write, e.g. models/brain-mri-seg
    weights: str | None = None  # MobileNetV2 0.35 ImageNet *_no_top.h5
    negatives: list[str] = field(default_factory=list)  # folders whose no_tumor train images add empty masks
    box_data: list[str] = field(default_factory=list)  # folders whose tumours have boxes only
    input_size: int = 160
    freeze_until: str | None = "block_4_expand"  # encoder layers before it stay ImageNet's
    negative_every: int = 3  # every n-th image without a mask (no tumour, box-only tumour)
    epochs: int = 8
    batch_size: int = 16
    lr: float = 1e-3
    patience: int = 4
    seed: int = 1234
    cache_dir: str | None = ".cache/medcls"
    max_train: int | None = None  # smoke runs only
    max_minutes: float | None = None  # stop after the epoch that passes this wall time
    name: str = "brain-mri-seg"
    init: str | None = None  # continue from this companion package's weights (a second stage)
    empty_dice: bool = True  # Dice also on images without tumour (see dice_bce_loss)
    decoder: tuple[int, ...] = (96, 64, 48, 32, 16)  # filters per decoder stage, stride 16 -> 1
    convs_per_stage: int = 1
    encoder_from: str | None = None  # classifier package whose backbone starts the encoder
    flip_average: bool = False  # the package averages each image with its mirror image
    encoder: str = "mobilenet_v2"  # or "efficientnet-lite0" (see build_unet)


def training_spec(input_size: int) -> PreprocessSpec:
    """The classifier's preprocessing contract (head crop, min-max, pad) at the network's size."""
    return PreprocessSpec(input_size=input_size, channels=3)


def dice_scores(prob: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per-image Dice of thresholded probabilities (N, ...) against boolean truths."""
    pred = prob >= threshold
    axes = tuple(range(1, truth.ndim))
    inter = (pred & truth).sum(axes)
    denom = pred.sum(axes) + truth.sum(axes)
    return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), 1.0)


def train_segmentation(cfg: SegTrainConfig, command: str = "") -> Path:
    """Train, keep the epoch with the best validation Dice (tumour images), fit the threshold on
    the validation split in the original geometry, write the companion package."""
    import keras
    import tensorflow as tf

    t_start = time.time()
    keras.utils.set_random_seed(cfg.seed)
    spec = training_spec(cfg.input_size)
    # every tumour with a mask; a share of the images without one (the budget goes to outlines)
    train = samples(cfg.data, "train") + [s for d in cfg.negatives for s in samples(d, "train")] \
        + [s for d in cfg.box_data for s in samples(d, "train", use_boxes=True)]
    unmasked = [s for s in train if s.mask is None]
    train = [s for s in train if s.mask is not None] + unmasked[::max(1, cfg.negative_every)]
    val = samples(cfg.data, "val")
    if cfg.max_train:
        rng = np.random.default_rng(cfg.seed)
        train = [train[i] for i in sorted(rng.choice(len(train), cfg.max_train, replace=False))]
        val = val[::max(1, len(val) // max(8, cfg.max_train // 4))]
    log.info("segmentation data: %d train (%d with masks), %d val", len(train),
             sum(s.mask is not None for s in train), len(val))
    tr = cached_training_arrays(train, spec, cfg.cache_dir)
    va = cached_training_arrays(val, spec, cfg.cache_dir)
    log.info("arrays ready after %.0f s", time.time() - t_start)
    tumour = va["y"].reshape(len(va["y"]), -1).any(1)

    model = build_unet(cfg.input_size, cfg.weights, decoder=cfg.decoder, freeze_until=cfg.freeze_until,
                       convs_per_stage=cfg.convs_per_stage, encoder=cfg.encoder)
    if cfg.encoder_from:
        log.info("encoder from %s: %d layers", cfg.encoder_from, copy_encoder(model, cfg.encoder_from))
    if cfg.init:  # same graph: the weights of an earlier stage
        model.set_weights(Segmenter(cfg.init).model.get_weights())
    steps = int(np.ceil(len(train) / cfg.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(cfg.lr * 0.05, decay_steps=steps * cfg.epochs,
                                                      warmup_target=cfg.lr, warmup_steps=steps // 2,
                                                      alpha=0.02)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=dice_bce_loss(cfg.empty_dice),
                  jit_compile=False)
    val_x = np.repeat(va["x"].astype(np.float32)[..., None], 3, axis=-1)
    history: list[dict] = []
    best = {"dice": -1.0, "weights": None, "epoch": 0}

    class ValDice(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            prob = self.model.predict(val_x, batch_size=32, verbose=0)[..., 0]
            d = dice_scores(prob, va["y"].astype(bool))
            neg_fp = float((prob[~tumour] >= 0.5).reshape((~tumour).sum(), -1).any(1).mean()) \
                if (~tumour).any() else 0.0
            row = {"epoch": epoch + 1, "loss": float(logs["loss"]),
                   "val_dice_tumour": float(d[tumour].mean()),
                   "val_no_tumour_any_pixel": neg_fp, "minutes": (time.time() - t_start) / 60}
            history.append(row)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" for k, v in row.items()))
            if row["val_dice_tumour"] > best["dice"]:
                best.update(dice=row["val_dice_tumour"], weights=self.model.get_weights(), epoch=epoch + 1)
            if epoch + 1 - best["epoch"] >= cfg.patience or \
                    (cfg.max_minutes and row["minutes"] > cfg.max_minutes):
                self.model.stop_training = True

    model.fit(seg_dataset(tr, cfg.batch_size, True, cfg.seed), epochs=cfg.epochs,
              callbacks=[ValDice()], verbose=2)
    model.set_weights(best["weights"])
    card = {
        "schema": SEG_SCHEMA, "name": cfg.name, "version": "1.0.0", "task": "brain-mri",
        "kind": "segmentation",
        "description": f"Tumour mask of a brain MRI slice: U-Net decoder over {ENCODER_NAMES[cfg.encoder]} "
                       f"({encoder_origin(cfg)}), a companion of the brain classifier, which is "
                       "unchanged (its class accuracy is the same with or without this package).",
        "input_size": cfg.input_size, "channels": 3, "preprocessing": spec.to_dict(),
        "output": "sigmoid tumour probability per pixel of the model grid",
        "threshold": 0.5, "postprocess": "largest",
        "parameters": int(model.count_params()),
        "training": {
            "command": command, "data": f"{len(train)} train images ({sum(s.mask is not None for s in train)} "
                                        f"with masks), {len(val)} val images",
            "sources": {"masks": cfg.data, "negatives": cfg.negatives, "box_only": cfg.box_data},
            "loss": f"soft Dice (per image{'' if cfg.empty_dice else ', tumour images only'}) + "
                    "binary cross-entropy; box-only tumours: no loss inside the box (grown 10%), "
                    "background outside",
            "input_size": cfg.input_size, "frozen_before": cfg.freeze_until, "init": cfg.init,
            "encoder": cfg.encoder, "encoder_from": cfg.encoder_from, "decoder": list(cfg.decoder),
            "convs_per_stage": cfg.convs_per_stage,
            "images_without_mask_kept": f"every {cfg.negative_every}", "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "peak_lr": cfg.lr,
            "augmentation": "flip, rotation, shift, zoom moving image and mask together; "
                            "contrast and brightness on the image",
            "best_epoch": best["epoch"], "best_val_dice_tumour": best["dice"], "history": history,
            "date": _dt.date.today().isoformat(), "duration_s": round(time.time() - t_start, 1),
            "environment": f"python {platform.python_version()}, tensorflow {tf.__version__}, "
                           f"keras {keras.__version__}, CPU only",
        },
        "intended_use": "Outline and size of a tumour the classifier has found, for a "
                        "clinician's review; not a diagnosis.",
        "limits": ["Trained on figshare T1 contrast-enhanced slices with tumour masks; other "
                   "sequences and tumour types are not measured.",
                   "2-D slice only; sizes are in-plane."],
    }
    folder = save_segmenter(cfg.out, model, card)
    fit = refit(folder, cfg.data, cfg.flip_average, val)
    log.info("companion written to %s: %s", folder, fit)
    return folder


def encoder_origin(cfg: SegTrainConfig) -> str:
    """Where the encoder's weights came from, in words for the card."""
    if cfg.init:
        return f"continued from the package {Path(cfg.init).name}"
    if cfg.encoder_from:
        return f"encoder started from the classifier {Path(cfg.encoder_from).name}'s backbone"
    return "ImageNet"


DICE_TIE = 0.005  # validation Dice differences below this are noise: the diameter decides


def fit_threshold(segmenter: "Segmenter", items: Sequence[Sample], spec: PreprocessSpec,
                  thresholds=(0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7)) -> dict:
    """The threshold and post-processing for the validation tumour images, measured in the
    original image geometry (what a clinician sees): the best mean Dice, and among the settings
    within ``DICE_TIE`` of it the one with the smallest median longest-diameter error (the
    size a radiologist reads off the outline)."""
    tumours = [s for s in items if s.mask is not None]
    probs, truths = [], []
    for s in tumours:
        pre = preprocess(load_scan(Path(s.root) / s.file), spec)
        probs.append(segmenter.probability(pre))
        truths.append(read_mask(Path(s.root) / s.mask))
    true_diameters = [longest_diameter(m) for m in truths]
    rows = []
    for post in ("largest", "all"):
        for t in thresholds:
            masks = [postprocess(p >= t, post) for p in probs]
            rows.append({"threshold": t, "postprocess": post,
                         "dice_tumour": float(np.mean([dice(m, x) for m, x in zip(masks, truths)])),
                         "diameter_error_px_median": float(np.median(
                             [abs(longest_diameter(m) - d) for m, d in zip(masks, true_diameters)])),
                         "n": len(tumours)})
    top = max(r["dice_tumour"] for r in rows)
    best = min((r for r in rows if r["dice_tumour"] >= top - DICE_TIE),
               key=lambda r: (r["diameter_error_px_median"], -r["dice_tumour"]))
    return {**best, "rule": f"best Dice; within {DICE_TIE} of it, the smallest median diameter error"}


def refit(folder: str | Path, data: str | Path, flip_average: bool,
          items: Sequence[Sample] | None = None) -> dict:
    """Set a package's test-time flip averaging and refit its threshold and post-processing on
    the validation split of ``data`` (what ``train-seg`` does at its end): the choice between
    with and without flip averaging is made on validation, never on test."""
    update_seg_card(folder, {FLIP_KEY: bool(flip_average)})
    segmenter = Segmenter(folder)
    fit = fit_threshold(segmenter, samples(data, "val") if items is None else items, segmenter.spec)
    update_seg_card(folder, {"threshold": fit["threshold"], "postprocess": fit["postprocess"],
                             "metrics": {"val": {**fit, FLIP_KEY: bool(flip_average)}}})
    return fit


def save_segmenter(folder: str | Path, model, card: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights_only(model, folder / MODEL_FILE)  # Adam's moments made the Lite0 U-Net 45 MB, not 15
    card = dict(card, schema=SEG_SCHEMA, model_sha256=file_sha256(folder / MODEL_FILE),
                size_bytes=(folder / MODEL_FILE).stat().st_size)
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return folder


def update_seg_card(folder: str | Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Add measured fields (threshold, figures) without touching the model or its hash."""
    card = read_seg_card(folder)
    if {"model_sha256", "input_size", "preprocessing"} & set(fields):
        raise ModelPackageError("update_seg_card does not rewrite the contract.")
    card.update(fields)
    (Path(folder) / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card
