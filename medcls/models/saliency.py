"""Saliency: the Grad-CAM family as a small registry over one mechanism, and heatmap -> region.

Saliency knows a network, its CAM layer and its input geometry, nothing of predictors,
cards or pages: :class:`medcls.engine.inference.Predictor` builds a :class:`CamEngine` from its
card and turns a :class:`CamResult` into an ``Explanation``. Drawing lives in
:mod:`medcls.engine.render`.

One compiled pass (:meth:`CamEngine.activations`) gives the logits, the embedding, the CAM
layer's activations and their gradient for the target class. Each method only says how to
weight the activation channels (like pytorch-grad-cam's ``get_cam_weights``):

- ``gradcam``: mean gradient per channel (Selvaraju et al. 2017);
- ``gradcam++``: the Grad-CAM++ alpha weighting of positive gradients (Chattopadhay et al. 2018);
- ``scorecam``: Faster Score-CAM (Wang et al. 2020): the class probability of the input masked
  by each of the ``max_n`` most varied activation maps.

The CAM is then ReLU'd, upsampled to the input with linear interpolation and min-max
normalised, exactly as tf-keras-vis does. tf-keras-vis (:func:`reference_cam`) stays the
reference implementation: the tests check the compiled path against it.

For display (:meth:`CamEngine.heatmap`) the heatmap is restricted to the foreground (the head:
background cannot hold a tumour) and mapped back onto the original image geometry;
:func:`heatmap_region` turns it into an outline, a bounding box and an area in mm^2.

A new method is one entry in :data:`METHODS`: a function that weights the activation channels
and, for the tests, its tf-keras-vis reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np
from scipy.ndimage import zoom

from medcls.core.errors import UnknownChoiceError
from medcls.io.preprocess import Preprocessed
from medcls.models.card import EMBEDDING_LAYER

EPS = 1e-7  # keras.backend.epsilon(), as tf-keras-vis normalises


# ----------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class CamMethod:
    """A CAM method: how to weight activation channels, and its tf-keras-vis reference."""

    name: str
    label: str
    needs_gradients: bool
    weights: Callable  # (engine, x, activations, grads, logits, class_index) -> (N, K) weights
    reference: Callable  # (model, x, class_index, layer) -> (N, S, S) tf-keras-vis CAM


def _gradcam_weights(engine, x, act, grads, logits, idx):
    return grads.mean(axis=(1, 2))


def _gradcam_pp_weights(engine, x, act, grads, logits, idx):
    # tf-keras-vis' Grad-CAM++: exponential score, second/third-order terms via powers of grads
    score = np.exp(logits[np.arange(len(idx)), idx])[:, None, None, None]
    first = score * grads
    second = first * grads
    third = second * grads
    global_sum = act.sum(axis=(1, 2), keepdims=True)
    denom = second * 2.0 + third * global_sum
    denom = denom + (second == 0.0)
    alphas = second / denom
    norm = alphas.sum(axis=(1, 2), keepdims=True)
    alphas = alphas / (norm + (norm == 0.0))
    return (np.maximum(first, 0.0) * alphas).sum(axis=(1, 2))


def _scorecam_weights(engine, x, act, grads, logits, idx):
    return engine.score_weights(x, act, idx)


def _reference(cls_name: str, **call_kwargs):
    def run(model, x, class_index, layer):
        import tf_keras_vis.gradcam as gc
        import tf_keras_vis.gradcam_plus_plus as gpp
        import tf_keras_vis.scorecam as sc
        from tf_keras_vis.utils.scores import CategoricalScore

        cls = {"Gradcam": gc.Gradcam, "GradcamPlusPlus": gpp.GradcamPlusPlus,
               "Scorecam": sc.Scorecam}[cls_name]
        viz = cls(model, clone=False)
        return np.asarray(viz(CategoricalScore(list(np.atleast_1d(class_index))), x,
                              penultimate_layer=layer, seek_penultimate_conv_layer=False,
                              **call_kwargs))

    return run


SCORECAM_MAX_N = 32

METHODS: dict[str, CamMethod] = {
    "gradcam": CamMethod("gradcam", "Grad-CAM", True, _gradcam_weights, _reference("Gradcam")),
    "gradcam++": CamMethod("gradcam++", "Grad-CAM++", True, _gradcam_pp_weights,
                           _reference("GradcamPlusPlus")),
    "scorecam": CamMethod("scorecam", "Score-CAM (Faster, top-32 maps)", False, _scorecam_weights,
                          _reference("Scorecam", max_N=SCORECAM_MAX_N)),
}


def get_method(name: str) -> CamMethod:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise UnknownChoiceError(f"Unknown saliency method {name!r}; choose from "
                                 f"{', '.join(sorted(METHODS))}.") from None


def reference_cam(model, x: np.ndarray, class_index, layer: str, method: str = "gradcam") -> np.ndarray:
    """tf-keras-vis' CAM (eager; slow): the reference the compiled path is tested against."""
    return get_method(method).reference(model, np.asarray(x, np.float32), class_index, layer)


# ----------------------------------------------------------------------------- engine

class CamEngine:
    """The shared mechanism: one compiled forward+backward pass per batch, for any method."""

    def __init__(self, model, cam_layer: str, input_size: int, channels: int):
        import keras
        import tensorflow as tf

        self.model = model
        self.cam_layer = cam_layer
        self.size = input_size
        grad_model = keras.Model(model.input, [model.output, model.get_layer(EMBEDDING_LAYER).output,
                                               model.get_layer(cam_layer).output])
        spec = [tf.TensorSpec([None, input_size, input_size, channels], tf.float32),
                tf.TensorSpec([None], tf.int32)]

        @tf.function(input_signature=spec, reduce_retracing=True)
        def activations(x, idx):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(x)
                logits, emb, act = grad_model(x, training=False)
                # idx < 0 means "the predicted class"
                target = tf.where(idx < 0, tf.argmax(logits, axis=1, output_type=tf.int32), idx)
                score = tf.gather(logits, target, batch_dims=1)
            grads = tape.gradient(score, act)
            return logits, emb, act, grads, target

        @tf.function(input_signature=[spec[0]], reduce_retracing=True)
        def probs(x):
            return tf.nn.softmax(model(x, training=False), axis=-1)

        self._activations = activations
        self._probs = probs

    def activations(self, x: np.ndarray, class_index=None):
        x = np.asarray(x, np.float32)
        idx = np.full(len(x), -1, np.int32) if class_index is None else \
            np.broadcast_to(np.asarray(class_index, np.int32), (len(x),)).copy()
        out = self._activations(x, idx)
        return tuple(t.numpy() for t in out)

    def score_weights(self, x: np.ndarray, act: np.ndarray, idx: np.ndarray,
                      max_n: int = SCORECAM_MAX_N, batch_size: int = 32) -> np.ndarray:
        """Faster Score-CAM weights, as tf-keras-vis computes them (top-``max_n`` channels by
        spatial standard deviation; the rest weigh 0)."""
        n, h, w, k = act.shape
        weights = np.zeros((n, k), np.float32)
        for i in range(n):
            a = act[i]
            top = np.argsort(-a.reshape(-1, k).std(axis=0), kind="stable")[:max_n]
            up = zoom(a[..., top], (self.size / h, self.size / w, 1), order=1, mode="nearest")
            lo, hi = up.min(axis=(0, 1), keepdims=True), up.max(axis=(0, 1), keepdims=True)
            masks = (up - lo) / (hi - lo + EPS)
            masked = x[i][None] * np.transpose(masks, (2, 0, 1))[..., None]
            p = np.concatenate([self._probs(masked[j:j + batch_size]).numpy()
                                for j in range(0, len(masked), batch_size)])
            weights[i, top] = p[:, idx[i]]
        return weights

    def cam(self, x: np.ndarray, method: str = "gradcam", class_index=None):
        """Normalised CAMs on the input grid (N, S, S), with logits, embeddings and the target
        class of each image."""
        m = get_method(method)
        logits, emb, act, grads, target = self.activations(x, class_index)
        w = m.weights(self, np.asarray(x, np.float32), act, grads, logits, target)
        raw = np.maximum(np.einsum("nhwk,nk->nhw", act, w), 0.0)
        cams = np.stack([_upsample_normalise(c, self.size) for c in raw])
        return cams, logits, emb, target

    def heatmap(self, pre: Preprocessed, method: str = "gradcam", class_index: int | None = None,
                mask_to_foreground: bool = True) -> "CamResult":
        """The CAM of one preprocessed scan (target: ``class_index`` or the predicted class), on
        the model grid and on the original image, with the pass's logits and embedding."""
        return self.heatmaps([pre], method, class_index, mask_to_foreground)[0]

    def heatmaps(self, pres: Sequence[Preprocessed], method: str = "gradcam", class_index=None,
                 mask_to_foreground: bool = True) -> list["CamResult"]:
        """:meth:`heatmap` of several preprocessed scans in one pass (``class_index``: one for
        all, one per scan, or None / -1 for each scan's predicted class)."""
        if not pres:
            return []
        cams, logits, emb, target = self.cam(np.stack([p.array for p in pres]), method, class_index)
        out = []
        for pre, grid, lo, em, t in zip(pres, cams, logits, emb, target):
            if mask_to_foreground and pre.mask.any():
                grid = grid * pre.mask
                if grid.max() > 0:
                    grid = grid / grid.max()
            out.append(CamResult(method=method, class_index=int(t), grid=grid.astype(np.float32),
                                 heatmap=pre.geometry.to_original(grid), logits=lo, embedding=em))
        return out


@dataclass(frozen=True)
class CamResult:
    """One scan's CAM and the outputs of the same forward pass."""

    method: str
    class_index: int  # the class the map explains
    grid: np.ndarray = field(repr=False)  # (S, S) in [0, 1] on the model input
    heatmap: np.ndarray = field(repr=False)  # (H, W) in [0, 1] on the original image
    logits: np.ndarray = field(repr=False)  # (K,)
    embedding: np.ndarray = field(repr=False)  # (D,)


def _upsample_normalise(cam: np.ndarray, size: int) -> np.ndarray:
    """Linear upsampling (scipy zoom, order 1) and min-max normalisation, as tf-keras-vis."""
    up = zoom(cam, (size / cam.shape[0], size / cam.shape[1]), order=1)
    return ((up - up.min()) / (up.max() - up.min() + EPS)).astype(np.float32)


# ----------------------------------------------------------------------------- regions

@dataclass(frozen=True)
class Region:
    """The hottest connected region of a heatmap, in original image pixels."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    polygon: list[tuple[int, int]]  # outline, (x, y) points
    area_px: int
    area_mm2: float | None
    threshold: float


def heatmap_region(heatmap: np.ndarray, threshold: float = 0.5,
                   pixel_spacing: tuple[float, float] | None = None) -> Region | None:
    """Threshold the heatmap at ``threshold`` x its maximum and keep the connected component
    that holds the maximum: its outline, bounding box and area (mm^2 when the pixel spacing is
    known). ``None`` for an empty heatmap."""
    hm = np.asarray(heatmap, np.float32)
    peak = float(hm.max()) if hm.size else 0.0
    if peak <= 0:
        return None
    binary = (hm >= threshold * peak).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    py, px = np.unravel_index(int(np.argmax(hm)), hm.shape)
    comp = int(labels[py, px]) or 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = (labels == comp).astype(np.uint8)
    x, y, w, h, area = (int(v) for v in stats[comp])
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    eps = 0.005 * cv2.arcLength(contour, True)
    polygon = [(int(p[0][0]), int(p[0][1])) for p in cv2.approxPolyDP(contour, eps, True)]
    mm2 = float(area * pixel_spacing[0] * pixel_spacing[1]) if pixel_spacing else None
    return Region(box=(x, y, x + w, y + h), polygon=polygon, area_px=area, area_mm2=mm2,
                  threshold=threshold)
