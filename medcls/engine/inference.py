"""Inference: a :class:`Predictor` loads a model package once and answers for one scan, a
batch, or a stream of files.

The model's contract comes from its card (classes, preprocessing spec, temperature, CAM
layer, input gate); nothing is guessed. The forward pass is one ``tf.function`` with a
fixed signature returning logits and the penultimate embedding (no ``model.predict`` per
image). :meth:`Predictor.explain` adds a heatmap: it builds the model's
:class:`~medcls.models.saliency.CamEngine` from the card (CAM layer, input geometry) and answers with
an :class:`Explanation` (prediction, heatmap, region) from one pass.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from medcls.core.errors import MedclsError, WrongModalityError
from medcls.io.acquisition import Acquisition, acquisition_of
from medcls.io.load import load_scan
from medcls.io.preprocess import Preprocessed, preprocess
from medcls.io.scan import Scan
from medcls.models.calibration import probabilities
from medcls.models.card import EMBEDDING_LAYER, scope_note
from medcls.models.package import ModelPackage, load_package
from medcls.models.saliency import CamEngine, Region, heatmap_region

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    classes: tuple[str, ...]
    probabilities: np.ndarray  # calibrated, sums to 1
    logits: np.ndarray
    gate_score: float | None
    gate_threshold: float | None
    low_confidence_threshold: float
    embedding: np.ndarray | None = field(default=None, repr=False)
    scope_note: str | None = None  # why the scan lies outside the card's validated scope

    @property
    def index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def label(self) -> str:
        return self.classes[self.index]

    @property
    def confidence(self) -> float:
        return float(self.probabilities[self.index])

    @property
    def low_confidence(self) -> bool:
        return self.confidence < self.low_confidence_threshold

    @property
    def gate_outside(self) -> bool:
        """The input gate's verdict alone: the embedding is far from every training class."""
        return (self.gate_score is not None and self.gate_threshold is not None
                and self.gate_score > self.gate_threshold)

    @property
    def outside_scope(self) -> bool:
        return self.scope_note is not None

    @property
    def outside_training_distribution(self) -> bool:
        """Outside what the model was trained and validated on, so its answer is withheld: the
        input gate flags the scan, or the scan lies outside the card's validated scope (a DICOM
        slice in a plane whose normal anatomy the model was never validated on)."""
        return self.gate_outside or self.outside_scope

    def as_dict(self) -> dict:
        return {"label": self.label, "confidence": self.confidence,
                "probabilities": dict(zip(self.classes, map(float, self.probabilities))),
                "low_confidence": self.low_confidence,
                "outside_training_distribution": self.outside_training_distribution,
                "gate_score": self.gate_score, "scope_note": self.scope_note}


@dataclass(frozen=True)
class Explanation:
    """A prediction with the heatmap of one CAM method and its hottest region."""

    method: str
    class_index: int
    class_name: str
    grid: np.ndarray = field(repr=False)  # (S, S) in [0, 1] on the model input, head only
    heatmap: np.ndarray = field(repr=False)  # (H, W) in [0, 1] on the original image
    region: Region | None
    prediction: Prediction | None = None


class Predictor:
    """Loads a model package once; predicts and explains scans. Thread-safe for reads: the
    model is shared read-only across sessions."""

    def __init__(self, package: ModelPackage, batch_size: int = 32):
        import keras
        import tensorflow as tf

        self.package = package
        self.card = package.card
        self.model = package.model
        self.spec = package.spec
        self.classes = tuple(package.classes)
        self.batch_size = batch_size
        s, c = self.spec.input_size, self.spec.channels
        self._features = keras.Model(self.model.input,
                                     [self.model.output, self.model.get_layer(EMBEDDING_LAYER).output])
        self._forward = tf.function(lambda x: self._features(x, training=False),
                                    input_signature=[tf.TensorSpec([None, s, s, c], tf.float32)],
                                    reduce_retracing=True)
        self._explainers: dict = {}
        self._lock = threading.Lock()

    def warmup(self) -> "Predictor":
        """Trace the compiled forward and saliency passes once, so the first user does not wait."""
        x = np.zeros((1, self.spec.input_size, self.spec.input_size, self.spec.channels), np.float32)
        self.forward(x)
        self.cam_engine().cam(x, "gradcam")
        _ = self.segmenter  # loads and traces the segmentation companion, if the card names one
        return self

    @classmethod
    def from_path(cls, path: str | Path, **kwargs) -> "Predictor":
        return cls(load_package(path), **kwargs)

    @property
    def name(self) -> str:
        return self.card.name

    # ------------------------------------------------------------------ forward
    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits and embeddings of a preprocessed batch (N, S, S, C)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        logits, emb = [], []
        for i in range(0, len(x), self.batch_size):
            lo, em = self._forward(x[i:i + self.batch_size])
            logits.append(lo.numpy())
            emb.append(em.numpy())
        return np.concatenate(logits), np.concatenate(emb)

    def predict_arrays(self, x: np.ndarray) -> list[Prediction]:
        logits, emb = self.forward(x)
        return self.predictions(logits, emb)

    def predictions(self, logits: np.ndarray, emb: np.ndarray) -> list[Prediction]:
        """Calibrated predictions (temperature, input gate, confidence) from raw model outputs."""
        probs = probabilities(logits, self.package.temperature)
        gate = self.package.gate
        scores = gate.score(emb) if gate is not None else [None] * len(logits)
        thr = gate.threshold if gate is not None else None
        low = self.card.low_confidence_threshold
        return [Prediction(self.classes, p, lo, None if s is None else float(s), thr, low, e)
                for p, lo, s, e in zip(probs, logits, scores, emb)]

    def preprocess(self, scan: Scan) -> Preprocessed:
        """The model's input for ``scan``, after checking the scan is of the card's modality."""
        check_modality(scan, self.card.get("modality"), self.name)
        return preprocess(scan, self.spec)

    def predict(self, scan: Scan | Sequence[Scan]) -> Prediction | list[Prediction]:
        """Calibrated prediction for one scan (or a list of scans), with the card's scope."""
        if isinstance(scan, Scan):
            return self.within_scope(self.predict_arrays(self.preprocess(scan).array)[0],
                                     acquisition_of(scan.metadata, scan.modality))
        scans = list(scan)
        items = [self.preprocess(s) for s in scans]
        if not items:
            return []
        preds = self.predict_arrays(np.stack([p.array for p in items]))
        return [self.within_scope(p, acquisition_of(s.metadata, s.modality)) for p, s in zip(preds, scans)]

    def within_scope(self, prediction: Prediction, acquisition: Acquisition | None) -> Prediction:
        """``prediction`` with a scope note when the scan's plane or MR sequence (known for DICOM
        from its own tags) is outside the card's validated scope (:func:`medcls.models.card.scope_note`):
        normal anatomy in other planes or sequences was not validated, so an answer there cannot
        be trusted and is withheld."""
        note = scope_note(self.card, acquisition)
        return prediction if note is None else replace(prediction, scope_note=note)

    def predict_file(self, source) -> Prediction:
        return self.predict(load_scan(source))

    # ------------------------------------------------------------------ saliency
    def cam_engine(self) -> CamEngine:
        """The compiled saliency engine for this model (built once, on first use)."""
        with self._lock:
            if "engine" not in self._explainers:
                self._explainers["engine"] = CamEngine(self.model, self.card.cam_layer,
                                                       self.spec.input_size, self.spec.channels)
            return self._explainers["engine"]

    # ------------------------------------------------------------------ segmentation
    @property
    def segmenter(self):
        """The tumour segmentation companion the card names (``"segmentation"``), loaded once;
        ``None`` when the card names none. See :mod:`medcls.models.segmenter`."""
        with self._lock:
            if "segmenter" not in self._explainers:
                from medcls.models.segmenter import companion_segmenter

                seg = companion_segmenter(self.package.path, self.card)
                self._explainers["segmenter"] = seg.warmup() if seg is not None else None
            return self._explainers["segmenter"]

    def outline(self, scan: Scan, prediction: Prediction):
        """The tumour's segmentation (outline, area, longest diameter, confidence) for a tumour
        answer; ``None`` for a no-tumour or withheld answer, or without a companion."""
        from medcls.models.segmenter import outline_for

        return outline_for(prediction, self.segmenter, scan, card=self.card)

    def explain(self, scan: Scan, method: str = "gradcam", class_index: int | None = None,
                pre: Preprocessed | None = None, mask_to_foreground: bool = True,
                region_threshold: float | None = None) -> Explanation:
        """Prediction and heatmap of ``method`` for ``class_index`` (default: the predicted
        class), on both the model grid and the original image geometry, from one pass; the
        region is cut at the card's ``region_threshold`` unless one is given."""
        pre = pre or self.preprocess(scan)
        cam = self.cam_engine().heatmap(pre, method, class_index, mask_to_foreground)
        threshold = self.card.region_threshold if region_threshold is None else region_threshold
        region = heatmap_region(cam.heatmap, threshold, scan.pixel_spacing)
        prediction = self.predictions(cam.logits[None], cam.embedding[None])[0]
        return Explanation(method=method, class_index=cam.class_index,
                           class_name=self.classes[cam.class_index], grid=cam.grid,
                           heatmap=cam.heatmap, region=region, prediction=prediction)

    # ------------------------------------------------------------------ streams
    def predict_stream(self, sources: Iterable, batch_size: int | None = None, workers: int = 2,
                       loader=load_scan) -> Iterator["StreamItem"]:
        """Predict a stream of sources (paths, bytes, or anything ``loader`` accepts) in batches,
        decoding the next batch on worker threads while the model runs the current one.

        Yields a :class:`StreamItem` per source, in input order; an unreadable file gives an item
        with ``error`` set and the stream goes on. Memory is bounded by two batches, however
        long the stream."""
        bs = batch_size or self.batch_size

        def load(src):
            return load_stream_item(src, self.preprocess, loader)

        def chunks():
            buf = []
            for src in sources:
                buf.append(src)
                if len(buf) == bs:
                    yield buf
                    buf = []
            if buf:
                yield buf

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending = None
            for chunk in chunks():
                futures = [pool.submit(load, s) for s in chunk]
                if pending is not None:
                    yield from self._run_batch([f.result() for f in pending])
                pending = futures
            if pending is not None:
                yield from self._run_batch([f.result() for f in pending])

    def _run_batch(self, loaded):
        ok = [i for i, (_, pre) in enumerate(loaded) if pre is not None]
        preds: dict[int, Prediction] = {}
        if ok:
            batch = np.stack([loaded[i][1].array for i in ok])
            preds = dict(zip(ok, self.predict_arrays(batch)))
        for i, (item, _) in enumerate(loaded):
            pred = preds.get(i)
            if pred is not None:
                pred = self.within_scope(pred, acquisition_from_info(item.info))
            yield StreamItem(item.source, pred, item.error, item.info)


@dataclass(frozen=True)
class StreamItem:
    source: object
    prediction: Prediction | None
    error: str | None
    info: dict


# Standard DICOM modality codes named in messages; any other value is not quoted (it is read
# from the file and could carry anything).
_MODALITY_NAMES = {"MR": "an MR scan", "CT": "a CT scan", "CR": "a radiograph (CR)",
                   "DX": "a radiograph (DX)", "US": "an ultrasound image", "PT": "a PET scan",
                   "NM": "a nuclear medicine image", "MG": "a mammogram", "XA": "an angiogram",
                   "SR": "a structured report", "SC": "a secondary capture", "OT": "another kind of image"}


def check_modality(scan: Scan, expected: str | None, model_name: str = "this model") -> None:
    """Refuse a DICOM whose Modality differs from the card's (a CT given to an MR model).
    Plain images (PNG, JPEG...) carry no modality and pass: the input gate judges them."""
    if not expected or scan.source_format != "dicom" or scan.modality in (expected, "OT", ""):
        return
    what = _MODALITY_NAMES.get(scan.modality, "another modality")
    raise WrongModalityError(f"This is {what}; {model_name} was trained on {expected} images "
                             "only, so it gives no answer.")


def load_stream_item(src, prepare, loader=load_scan) -> tuple[StreamItem, Preprocessed | None]:
    """Load one source of a stream and ``prepare`` it (Scan -> model input, e.g.
    :meth:`Predictor.preprocess`): the item (with ``error`` set when the file cannot be read or
    is refused: one bad file never stops a run) and the model input, or None. Shared by
    :meth:`Predictor.predict_stream` and the Ray engine (:mod:`medcls.integrations.ray`)."""
    scan = None
    try:
        scan = loader(src)
        return StreamItem(src, None, None, scan_info(scan)), prepare(scan)
    except MedclsError as exc:  # a scan that loaded but was refused keeps its facts (modality...)
        return StreamItem(src, None, str(exc), scan_info(scan) if scan is not None else {}), None
    except Exception as exc:  # noqa: BLE001 - one bad file never stops the run
        log.warning("unexpected %s while reading a file", type(exc).__name__)
        return StreamItem(src, None, "The file could not be read.", {}), None


def scan_info(scan: Scan) -> dict:
    """Non-identifying facts of a scan for worklists: modality, size, series/instance number."""
    meta = scan.metadata
    return {"modality": scan.modality, "rows": scan.shape[0], "columns": scan.shape[1],
            "series_number": meta.get("SeriesNumber"), "instance_number": meta.get("InstanceNumber"),
            "frames": scan.n_frames, "sha256": scan.sha256, **acquisition_info(scan)}


def acquisition_info(scan: Scan) -> dict:
    """The scan's acquisition as plain values (a stream item's ``info`` crosses processes)."""
    a = acquisition_of(scan.metadata, scan.modality)
    return {"plane": a.plane, "oblique": a.oblique, "sequence": a.sequence, "contrast": a.contrast}


def acquisition_from_info(info: dict) -> Acquisition:
    return Acquisition(plane=info.get("plane"), oblique=bool(info.get("oblique")),
                       sequence=info.get("sequence"), contrast=info.get("contrast"))


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - t) * 1000.0
