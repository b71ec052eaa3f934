"""How a model is adapted to a site: the recipes compared (the head and last blocks or the whole
network fine-tuned, with or without the parent's reference data mixed in, batch-norm statistics
aligned on the site's own scans first) and the mechanics each one uses.

A :class:`Recipe` is data (recorded in the card); :func:`apply_recipe` turns a copy of the
parent into the adapted network in place. :mod:`medcls.learning.adapt` compares the recipes by
cross-validation on the site's confirmed cases and keeps the one with the best measured gain.

Batch-norm alignment (:func:`align_batch_norm`) costs no labels: the shipped networks normalise
with statistics fixed at training time, so a scanner whose images differ in contrast or noise
moves every channel's activations. For each batch-norm layer, in network order, the site's
channel means and spreads (of the site's scans, labelled or not) are mapped onto the reference
data's (the parent's training images), so the layers above see site images the way they saw the
images they were trained on. Nothing is trained; a site like the reference leaves the network
unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


# The first layer fine-tuned by the "last blocks" recipes, per architecture: the head and the
# network's last stage (stride 32).
TRAINABLE_FROM = {"mobilenet-tl": "block_13_expand", "compact-cnn": "block5_sep1",
                  "seed-cnn": "last_conv",
                  **{f"efficientnet-lite{v}-tl": "block6a_expand_conv" for v in (0, 1, 2)}}
WHOLE_NETWORK = ""  # trainable_from: every layer (batch norm stays frozen)

BN_MAX_IMAGES = 64  # site scans the alignment measures at most (one batch)
BN_MAX_RATIO = 4.0  # a channel's site spread is mapped with a ratio within [1/4, 4]


@dataclass(frozen=True)
class Recipe:
    """How a model is adapted (recorded in the card). :data:`RECIPES` holds the named ones."""

    name: str = "mixed"
    description: str = "head and last blocks, reference mixed in"
    epochs: int = 8  # 0: no fine-tuning (batch-norm alignment alone)
    lr: float = 3e-4
    batch_size: int = 16
    trainable_from: str | None = None  # None: TRAINABLE_FROM[architecture]; "" = every layer
    reference_n: int = 160  # reference training cases mixed in (0: the local cases alone)
    local_share: float = 0.5  # share of each batch drawn from the local cases
    source_augment: bool = True
    label_smoothing: float = 0.1
    align_bn: bool = False  # batch-norm statistics aligned on the site's scans first

    @property
    def mixes_reference(self) -> bool:
        return self.epochs > 0 and self.reference_n > 0 and self.local_share < 1.0

    @property
    def needs_reference(self) -> bool:
        """Mixing reference cases in, and aligning batch norm onto the reference statistics,
        both need the parent's training data."""
        return self.mixes_reference or self.align_bn

    def steps_per_epoch(self, n_local: int) -> int:
        # an epoch draws twice as many images as there are local cases (half of them local when
        # the reference is mixed in)
        return max(4, int(np.ceil(2 * n_local / self.batch_size)))


RECIPES = {r.name: r for r in (
    Recipe("last-blocks", "head and last blocks, the local cases alone", reference_n=0,
           local_share=1.0, source_augment=False),
    Recipe("mixed", "head and last blocks, reference mixed in"),
    Recipe("mixed-long", "head and last blocks, reference mixed in, 14 epochs", epochs=14, local_share=0.6),
    Recipe("whole-mixed", "whole network, reference mixed in", epochs=10, lr=1.5e-4,
           trainable_from=WHOLE_NETWORK),
    Recipe("bn-align", "batch-norm statistics aligned on the site's scans, nothing trained",
           epochs=0, reference_n=0, align_bn=True),
    Recipe("bn-mixed", "batch norm aligned, then head and last blocks with the reference mixed in",
           align_bn=True),
    Recipe("plain", "whole network, the local cases alone (forgets: for comparison)", lr=3e-4,
           trainable_from=WHOLE_NETWORK, reference_n=0, local_share=1.0, source_augment=False,
           label_smoothing=0.0),
)}
# compared by default: every recipe but "plain" (it forgets the reference; measured in the bench)
DEFAULT_RECIPES = ("last-blocks", "mixed", "mixed-long", "whole-mixed", "bn-align", "bn-mixed")


def trainable_from(arch: str, recipe: Recipe) -> str:
    return TRAINABLE_FROM.get(arch, WHOLE_NETWORK) if recipe.trainable_from is None \
        else recipe.trainable_from


def set_trainable(model, arch: str, recipe: Recipe) -> int:
    """Layers from the recipe's first layer on are trained; every batch norm stays frozen (its
    statistics from tens of cases would be noise). Returns the number of trainable weights.
    An architecture whose named layer is missing is an error, never a silent whole-network run."""
    import keras

    start_name = trainable_from(arch, recipe)
    names = [layer.name for layer in model.layers]
    if start_name and start_name not in names:
        raise ValueError(f"{arch}: no layer {start_name!r} to fine-tune from")
    start = names.index(start_name) if start_name else 0
    for i, layer in enumerate(model.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return len(model.trainable_weights)


def forward(model, x_gray: np.ndarray, batch_size: int = 32, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Logits and embeddings of gray arrays: training's one forward pass
    (:func:`medcls.learning.train.model_outputs`, which keeps the network's two-output view)."""
    from medcls.learning.train import model_outputs

    return model_outputs(model, x_gray, batch_size=batch_size, chunk=chunk)


# ----------------------------------------------------------------------------- batch norm

def batch_norm_layers(model) -> list:
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def _moment_outputs(tensors):
    """Per image: each tensor's channel means and variances over the image's positions."""
    from keras import ops

    outs = []
    for t in tensors:
        axes = tuple(range(1, len(t.shape) - 1))
        outs += [ops.mean(t, axis=axes), ops.var(t, axis=axes)]
    return outs


def _moments(probe, x_gray: np.ndarray, channels: int, chunk: int = 32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Channel (mean, variance) over every image and position: the per-image variances'
    mean plus the variance of the per-image means (images have the same size)."""
    per_image: list[list[np.ndarray]] = []
    for i in range(0, len(x_gray), chunk):
        part = x_gray[i:i + chunk]
        if part.shape[-1] != channels:
            part = np.repeat(part, channels, axis=-1)
        per_image.append([np.asarray(v, np.float64) for v in probe(part, training=False)])
    cols = [np.concatenate(c) for c in zip(*per_image)]
    return [(cols[j].mean(0), cols[j + 1].mean(0) + cols[j].var(0)) for j in range(0, len(cols), 2)]


def batch_norm_moments(model, x_gray: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mean, variance) per channel of every batch-norm layer's input over the images, in one
    forward pass (the per-image channel means of x and x**2 are reduced in the graph)."""
    import keras

    layers = batch_norm_layers(model)
    probe = keras.Model(model.input, _moment_outputs([layer.input for layer in layers]))
    return _moments(probe, x_gray, model.input.shape[-1])


def align_batch_norm(model, x_site: np.ndarray, reference: list[tuple[np.ndarray, np.ndarray]],
                     max_images: int = BN_MAX_IMAGES, seed: int = 0) -> dict:
    """Map each batch-norm layer's site statistics onto the reference's, in place.

    ``reference``: :func:`batch_norm_moments` of the reference images under the *parent*. With
    the parent's statistics (mu_p, s_p), the reference's (mu_r, s_r) and the site's (mu_s, s_s)
    under the network aligned so far, the layer gets s' = s_s * s_p / s_r and
    mu' = mu_s - (s_s / s_r) (mu_r - mu_p): a site activation is then normalised exactly as the
    reference activation at the same standardised position was by the parent. A layer's site
    statistics depend on every layer below it, so one forward pass of the site scans (at most
    ``max_images``, as one batch) runs through the graph in order, and each batch-norm layer is
    aligned on its input just before it is applied. A channel the reference leaves constant
    keeps the parent's statistics."""
    import tensorflow as tf

    layers = batch_norm_layers(model)
    if not layers:
        return {"layers": 0}
    if len(x_site) > max_images:
        x_site = x_site[np.sort(np.random.default_rng(seed).choice(len(x_site), max_images, replace=False))]
    channels = model.input.shape[-1]
    x = x_site if x_site.shape[-1] == channels else np.repeat(x_site, channels, axis=-1)
    targets = {id(lay): ref for lay, ref in zip(layers, reference)}
    shift: list[float] = []

    def aligned(op):
        if id(op) not in targets:
            return op
        mu_r, var_r = targets[id(op)]

        def call(t, *args, **kwargs):
            axes = list(range(len(t.shape) - 1))
            mu_s = tf.reduce_mean(t, axes).numpy().astype(np.float64)
            var_s = tf.math.reduce_variance(t, axes).numpy().astype(np.float64)
            eps = float(op.epsilon)
            mu_p = np.asarray(op.moving_mean, np.float64)
            s_p = np.sqrt(np.asarray(op.moving_variance, np.float64) + eps)
            s_r, s_s = np.sqrt(var_r), np.sqrt(var_s)
            live = s_r > 1e-3 * s_p
            ratio = np.where(live, np.clip(s_s / np.where(live, s_r, 1.0), 1 / BN_MAX_RATIO, BN_MAX_RATIO), 1.0)
            new_mu = np.where(live, mu_s - ratio * (mu_r - mu_p), mu_p)
            shift.append(float(np.median(np.abs(new_mu - mu_p) / s_p)))
            op.moving_mean.assign(new_mu.astype(np.float32))
            op.moving_variance.assign(np.maximum((ratio * s_p) ** 2 - eps, 0.0).astype(np.float32))
            return op(t, *args, **kwargs)
        return call

    # Keras' own graph walk (the functional model's call), with the batch-norm layers wrapped
    model._run_through_graph(tf.constant(x, tf.float32), operation_fn=aligned)
    log.info("batch norm aligned on %d site scans: %d layers, largest shift %.3f sd", len(x_site),
             len(layers), max(shift))
    # a layer's shift: the median over its channels of |mean moved| / parent spread
    return {"layers": len(shift), "site_scans": int(len(x_site)),
            "largest_mean_shift_sd": round(max(shift), 4), "median_mean_shift_sd": round(float(np.median(shift)), 4)}


# ----------------------------------------------------------------------------- fine-tuning

class FineTuner:
    """Fine-tunes one network with one recipe, compiled once and reused across the folds (the
    weights and the optimizer state are reset by :meth:`reset`)."""

    def __init__(self, model, arch: str, recipe: Recipe, seed: int):
        self.model, self.arch, self.recipe, self.seed = model, arch, recipe, seed
        self.compiled = False

    def fit(self, x_local: np.ndarray, t_local: np.ndarray, ref: dict | None,
            progress: Callable[[float], None] = lambda f: None) -> None:
        """Batches drawn ``local_share`` from the local cases (their labels alike) and the rest
        from the reference sample (its (source, label) strata alike)."""
        import keras

        from medcls.learning.data import tf_dataset
        from medcls.learning.train import label_set_loss

        recipe, model = self.recipe, self.model
        keys_local = [f"local|{np.flatnonzero(t).tolist()}" for t in t_local]
        x, t, keys = x_local, t_local, keys_local
        use_ref = ref is not None and recipe.mixes_reference and len(ref["x_train"])
        if use_ref:
            keys_ref = [f"ref|{s}|{lab}" for s, lab in zip(ref["sources_train"], ref["labels_train"])]
            x = np.concatenate([x_local, ref["x_train"]])
            t = np.concatenate([t_local, ref["t_train"]])
            keys = keys_local + keys_ref
        strata_keys = sorted(set(keys))
        idx = np.array([strata_keys.index(k) for k in keys])
        local_k = [k for k in strata_keys if k.startswith("local|")]
        ref_k = [k for k in strata_keys if k.startswith("ref|")]
        share = recipe.local_share if use_ref else 1.0
        weight = {i: (share / len(local_k) if k.startswith("local|") else (1 - share) / len(ref_k))
                  for i, k in enumerate(strata_keys)}
        steps = recipe.steps_per_epoch(len(x_local))
        ds = tf_dataset(x, t, recipe.batch_size, training=True, seed=self.seed, strata=(idx, weight),
                        source_augment=recipe.source_augment).repeat()
        if not self.compiled:
            set_trainable(model, self.arch, recipe)
            # the schedule's length follows the first fit; later folds differ by a few cases
            schedule = keras.optimizers.schedules.CosineDecay(recipe.lr, decay_steps=steps * recipe.epochs,
                                                              alpha=0.05)
            model.compile(optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=1e-4),
                          loss=label_set_loss(recipe.label_smoothing))
            self.compiled = True

        class _Progress(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                log.debug("adapt epoch %d/%d: loss %.4f", epoch + 1, recipe.epochs,
                          (logs or {}).get("loss", np.nan))
                progress((epoch + 1) / recipe.epochs)

        model.fit(ds, epochs=recipe.epochs, steps_per_epoch=steps, callbacks=[_Progress()], verbose=0)

    def reset(self, weights: list[np.ndarray]) -> None:
        """Back to the parent: its weights (batch-norm statistics included) and a fresh optimizer."""
        self.model.set_weights(weights)
        if self.compiled:
            for v in self.model.optimizer.variables:
                v.assign(np.zeros(v.shape, str(v.dtype)))


def apply_recipe(tuner: FineTuner, parent_weights: list[np.ndarray], x_local, t_local, x_site,
                 ref: dict | None, progress: Callable[[float], None] = lambda f: None) -> dict:
    """The parent's weights, then the recipe: batch norm aligned on ``x_site`` (the site's
    scans: unlabelled ones and the local cases, no labels used) and/or fine-tuning on the local
    cases. Returns what the alignment did (empty without it)."""
    tuner.reset(parent_weights)
    info: dict = {}
    if tuner.recipe.align_bn:
        info = align_batch_norm(tuner.model, x_site, ref["bn_moments"])
    if tuner.recipe.epochs > 0:
        tuner.fit(x_local, t_local, ref, progress)
    return info
