"""Datasets: index a labelled folder, read its split, feed it to Keras with tf.data.

A dataset is one of
- a folder with ``labels.csv`` (columns ``file``, ``label``; optional ``split``,
  ``group``, ``source``, ``plane``, ``box_xc``/``box_yc``/``box_w``/``box_h``);
- a folder-per-class tree (``ROOT/<class>/<image>``; no split);
- a MedMNIST ``.npz`` file (``train_images``, ``train_labels``, ``val_*``, ``test_*``).

Every image goes through :func:`medcls.io.load.load_scan` and
:func:`medcls.io.preprocess.preprocess`, the same code inference uses.

Several folders combine into one dataset (:func:`load_datasets`), each row keeping its own
folder and ``source`` (the folder's name when the csv has no ``source`` column). A row's label
is a class, or a *partial label* naming a set of classes (:data:`PARTIAL_LABELS`: ``tumor`` is
"one of the tumour classes, type unknown"). That set is the training target
(:meth:`Dataset.targets`) and the unit of evaluation for such rows: this module is the one
place that knows which classes a label allows.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from medcls.core.errors import DatasetError, MedclsError
from medcls.io.load import load_scan, scan_from_array
from medcls.io.preprocess import Preprocessed, PreprocessSpec, preprocess
from medcls.io.scan import Scan
from medcls.models.card import normal_class_among

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ""}
SPLITS = ("train", "val", "test")

# Partial labels: a label naming a set of classes rather than one. ``tumor``: a tumour is
# present, its type is not given (Br35H) = every class but the negative one.
PARTIAL_LABELS = {"tumor": "every class but the negative class"}


def negative_class(classes: Sequence[str], named: str | None = None) -> str | None:
    """The task's "nothing found" class, if it has one: the model card's one rule
    (:func:`medcls.models.card.normal_class_among`: ``named``, e.g. a card's ``negative_class``,
    else a known normal name), so training's partial labels and the card agree."""
    return normal_class_among(classes, named)


def label_set(label: str, classes: Sequence[str], negative: str | None = None) -> frozenset[str]:
    """The classes a row's label allows: itself, or the set a partial label names (``negative``:
    the model card's normal class, when a card is known)."""
    if label in classes:
        return frozenset([label])
    if label in PARTIAL_LABELS:
        neg = negative_class(classes, negative)
        if neg is None:
            raise DatasetError(f"The partial label {label!r} needs a task with a negative class "
                               "(a 'nothing found' class).")
        return frozenset(c for c in classes if c != neg)
    raise DatasetError(f"The data has a label the model does not know: {label!r}.")


@dataclass(frozen=True)
class Record:
    """One labelled image of a dataset."""

    ref: str  # path relative to the dataset root, or "npz:<split>:<index>"
    label: str
    split: str | None = None
    group: str | None = None
    source: str | None = None
    box: tuple[float, float, float, float] | None = None  # normalised (xc, yc, w, h)
    plane: str | None = None  # axial / coronal / sagittal, where labels.csv says
    root: Path | None = None  # the record's own folder in a combined dataset

    @property
    def partial(self) -> bool:
        return self.label in PARTIAL_LABELS


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    records: list[Record]
    name: str = ""
    _arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def split(self, name: str | None) -> list[Record]:
        """Records of one split; ``None`` or a dataset without splits gives every record."""
        if name is None or not self.has_splits:
            return list(self.records)
        return [r for r in self.records if r.split == name]

    @property
    def has_splits(self) -> bool:
        return any(r.split for r in self.records)

    def path(self, record: Record) -> Path | None:
        return None if record.ref.startswith("npz:") else (record.root or self.root) / record.ref

    def scan(self, record: Record) -> Scan:
        if record.ref.startswith("npz:"):
            _, split, idx = record.ref.split(":")
            return scan_from_array(self._arrays[f"{split}_images"][int(idx)])
        return load_scan(self.path(record))

    def label_index(self, records: Sequence[Record]) -> np.ndarray:
        """Class indices of single-label records (a partial label has no single index)."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        partial = [r.label for r in records if r.label not in lookup]
        if partial:
            raise DatasetError(f"{len(partial)} rows carry a partial label ({partial[0]!r}): "
                               "use Dataset.targets for them.")
        return np.array([lookup[r.label] for r in records], dtype=np.int64)

    def targets(self, records: Sequence[Record]) -> np.ndarray:
        """(N, K) float32: 1 for each class a row's label allows (one-hot for a class label,
        several ones for a partial label)."""
        out = np.zeros((len(records), len(self.classes)), np.float32)
        for i, r in enumerate(records):
            for c in label_set(r.label, self.classes):
                out[i, self.classes.index(c)] = 1.0
        return out

    @property
    def negative_class(self) -> str | None:
        return negative_class(self.classes)

    def fingerprint(self, records: Sequence[Record]) -> str:
        h = hashlib.sha256(str(self.root.resolve()).encode())
        for r in records:
            h.update(f"{r.root.name + '/' if r.root else ''}{r.ref}|{r.label}".encode())
        return h.hexdigest()[:16]


def _box(row: dict) -> tuple[float, float, float, float] | None:
    try:
        vals = tuple(float(row[k]) for k in ("box_xc", "box_yc", "box_w", "box_h"))
    except (KeyError, TypeError, ValueError):
        return None
    return vals if vals[2] > 0 and vals[3] > 0 else None


def load_dataset(root: str | Path, classes: Sequence[str] | None = None) -> Dataset:
    """Index a dataset (labels.csv, folder-per-class tree or MedMNIST .npz)."""
    root = Path(root)
    if root.is_file() and root.suffix == ".npz":
        return _load_npz(root, classes)
    if not root.is_dir():
        raise DatasetError(f"No dataset folder at {root}.")
    labels = root / "labels.csv"
    records: list[Record] = []
    if labels.is_file():
        with labels.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
                raise DatasetError("labels.csv needs at least the columns 'file' and 'label'.")
            for row in reader:
                split = (row.get("split") or "").strip() or None
                if split is not None and split not in SPLITS:
                    raise DatasetError(f"labels.csv has an unknown split {split!r} "
                                       f"(expected one of {', '.join(SPLITS)}).")
                records.append(Record(ref=row["file"], label=row["label"], split=split,
                                      group=(row.get("group") or None),
                                      source=(row.get("source") or None), box=_box(row),
                                      plane=(row.get("plane") or None)))
    else:
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(sub.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                    records.append(Record(ref=str(f.relative_to(root)), label=sub.name))
    if not records:
        raise DatasetError(f"No labelled images found in {root} (expected labels.csv or one "
                           "folder per class).")
    found = sorted({r.label for r in records} - set(PARTIAL_LABELS))
    given_classes = classes is not None
    if classes is None:
        classes = found
    else:
        missing = set(found) - set(classes)
        if missing:
            raise DatasetError(f"The data has labels the model does not know: {sorted(missing)}.")
    dataset = Dataset(root=root, classes=list(classes), records=records, name=root.name)
    if given_classes:
        for r in records:
            if r.partial:
                label_set(r.label, dataset.classes)  # refuses a partial label the task cannot hold
    return dataset


def load_datasets(roots: Sequence[str | Path], classes: Sequence[str] | None = None) -> Dataset:
    """Several labelled folders as one dataset: each row keeps its folder (``Record.root``) and
    its ``source`` (the folder's name where labels.csv has none); the classes are the union of
    the folders' class labels (partial labels name sets of them)."""
    roots = [Path(r) for r in roots]
    if len(roots) == 1:
        ds = load_dataset(roots[0], classes)
        ds.records = [_with_root(r, ds.root) for r in ds.records]
        return ds
    parts = [load_dataset(r) for r in roots]
    if any(p.root.suffix == ".npz" for p in parts):
        raise DatasetError("MedMNIST .npz files cannot be combined with other datasets.")
    found = sorted(set().union(*(p.classes for p in parts)))
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        raise DatasetError(f"The data has labels the model does not know: "
                           f"{sorted(set(found) - set(classes))}.")
    records = [_with_root(r, p.root) for p in parts for r in p.records]
    dataset = Dataset(root=roots[0], classes=list(classes), records=records,
                      name="+".join(p.name for p in parts))
    for r in records:
        if r.partial:
            label_set(r.label, dataset.classes)
    return dataset


def _with_root(r: Record, root: Path) -> Record:
    from dataclasses import replace

    return replace(r, root=root, source=r.source or root.name)


def _load_npz(path: Path, classes: Sequence[str] | None) -> Dataset:
    arrays = dict(np.load(path))
    records = []
    for split in SPLITS:
        if f"{split}_images" not in arrays:
            continue
        labels = arrays[f"{split}_labels"].reshape(-1)
        for i, y in enumerate(labels):
            records.append(Record(ref=f"npz:{split}:{i}", label=str(int(y)), split=split))
    if not records:
        raise DatasetError(f"{path.name} holds no *_images arrays.")
    found = sorted({r.label for r in records}, key=int)
    return Dataset(root=path, classes=list(classes or found), records=records,
                   name=path.stem, _arrays=arrays)


# ----------------------------------------------------------------------------- arrays

def preprocess_records(dataset: Dataset, records: Sequence[Record], spec: PreprocessSpec,
                       workers: int = 2, on_error: str = "raise") -> tuple[np.ndarray, list[int]]:
    """Load and preprocess records in parallel: ``(N, S, S, C)`` float32 and the indices kept.

    With ``on_error='skip'`` unreadable files are left out (their indices are not returned).
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> tuple[int, Preprocessed | None]:
        try:
            return i, preprocess(dataset.scan(records[i]), spec)
        except MedclsError:
            if on_error == "raise":
                raise
            log.warning("skipping unreadable record #%d", i)
            return i, None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, range(len(records))))
    kept = [i for i, p in results if p is not None]
    arr = np.stack([p.array for _, p in results if p is not None]).astype(np.float32)
    return arr, kept


def cached_arrays(dataset: Dataset, records: Sequence[Record], spec: PreprocessSpec,
                  cache_dir: str | Path | None, workers: int = 2, as_gray: bool = False) -> np.ndarray:
    """:func:`preprocess_records` with an on-disk cache keyed by data and spec.

    The cache stores exactly what the pipeline produced (float16 would lose bits, so
    float32 single-channel arrays are stored; channels are re-expanded on load unless
    ``as_gray``, which keeps (N, S, S, 1) for :func:`tf_dataset` to expand per batch).
    """
    key = hashlib.sha256((dataset.fingerprint(records) + spec.to_json()).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{dataset.name[:60]}-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        gray = np.load(path)
    else:
        arr, kept = preprocess_records(dataset, records, spec, workers=workers)
        if len(kept) != len(records):  # pragma: no cover - raise mode keeps all or raises
            raise DatasetError("some records could not be read")
        gray = arr[..., :1]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, gray)
            tmp.replace(path)
    if spec.channels == 3 and not as_gray:
        return np.repeat(gray, 3, axis=-1)
    return gray


# ----------------------------------------------------------------------------- tf.data

def augmentation(seed: int = 0):
    """MRI-safe augmentation as two stages: geometric (horizontal flip, fine for axial slices;
    rotation up to about 15 degrees; shifts of 6%; zoom from 20% in to 15% out, which also
    jitters how much border and skull a slice shows), applied alike to the image and any extra
    channels stacked on it (a tumour-box mask), and photometric (contrast 20%, brightness 10%),
    applied to the image only. Images are in [0, 1]. The per-image source randomisation is
    :func:`medcls.learning.augment.source_randomise`."""
    import keras

    geometric = keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.04, fill_mode="constant", seed=seed + 1),
        keras.layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 2),
        keras.layers.RandomZoom((-0.2, 0.15), fill_mode="constant", seed=seed + 3),
    ], name="augment_geometric")
    photometric = keras.Sequential([
        keras.layers.RandomContrast(0.2, seed=seed + 4),
        keras.layers.RandomBrightness(0.1, value_range=(0.0, 1.0), seed=seed + 5),
    ], name="augment_photometric")
    return geometric, photometric


def stratum_weights(records: Sequence[Record]) -> tuple[np.ndarray, dict[tuple[str, str], float]]:
    """Balanced sampling over (source, label): each source weighs by the square root of its
    size (a small source is not drowned, a one-person source does not dominate either), and
    within a source its labels weigh alike (the 385 Br35H tumours as much as the 1,000 Br35H
    normals they must be told from). Returns each record's stratum index and the strata's
    sampling probabilities."""
    strata = sorted({(r.source or "", r.label) for r in records})
    by_source: dict[str, list[tuple[str, str]]] = {}
    for st in strata:
        by_source.setdefault(st[0], []).append(st)
    size = {src: sum(1 for r in records if (r.source or "") == src) for src in by_source}
    total = sum(np.sqrt(n) for n in size.values())
    weight = {st: float(np.sqrt(size[src]) / total / len(sts))
              for src, sts in by_source.items() for st in sts}
    index = {st: i for i, st in enumerate(strata)}
    return np.array([index[(r.source or "", r.label)] for r in records]), weight


def tf_dataset(x: np.ndarray, targets: np.ndarray, batch_size: int, training: bool,
               seed: int = 0, box_masks: np.ndarray | None = None, grid: int | None = None,
               clip: bool = True, strata: tuple[np.ndarray, dict] | None = None,
               source_augment: bool = False, channels: int = 3):
    """A tf.data pipeline over preprocessed arrays: batched, prefetched, map steps in parallel.

    ``x`` is (N, S, S, 1) gray (expanded to ``channels`` in the pipeline) or already
    (N, S, S, channels); ``targets`` (N, K) is one-hot, or multi-hot for partial labels
    (:meth:`Dataset.targets`). When training: shuffled (or, with ``strata`` from
    :func:`stratum_weights`, sampled by stratum for one epoch of ``len(x)`` images), source
    randomised per image (``source_augment``) and augmented per batch.

    With ``box_masks`` (N, S, S) the masks are augmented with the image and the labels become
    ``(targets, box_targets)``: per class channel on a ``grid`` x ``grid`` map, +1 inside the
    tumour box and -1 outside for the allowed classes, 0 elsewhere and for images without a box
    (see :func:`medcls.learning.train.box_energy_loss`).
    """
    import tensorflow as tf

    from medcls.learning.augment import source_randomise

    n = len(x)
    X = tf.constant(x)
    T = tf.constant(targets.astype(np.float32))
    M = tf.constant(box_masks.astype(np.uint8)[..., None]) if box_masks is not None else None
    if training and strata is not None:
        idx_of, weight = strata
        keys = sorted(weight)
        parts = [tf.data.Dataset.from_tensor_slices(np.nonzero(idx_of == k)[0])
                 .shuffle(int((idx_of == k).sum()), seed=seed + k).repeat() for k in range(len(keys))]
        ds = tf.data.Dataset.sample_from_datasets(parts, [weight[k] for k in keys], seed=seed).take(n)
    else:
        ds = tf.data.Dataset.range(n)
        if training:
            ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)

    def _one(i):
        img = tf.gather(X, i)
        if img.shape[-1] != channels:
            img = tf.repeat(img, channels, axis=-1)
        if training and source_augment:
            img = source_randomise(img)
        out = (img, tf.gather(T, i))
        return out + ((tf.cast(tf.gather(M, i), tf.float32),) if M is not None else ())

    ds = ds.map(_one, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=False)
    geometric, photometric = augmentation(seed)
    pool = x.shape[1] // grid if grid else 1

    def _batch(img, label, mask=None):
        if training:
            stacked = img if mask is None else tf.concat([img, mask], axis=-1)
            stacked = geometric(stacked, training=True)
            img = photometric(stacked[..., :channels], training=True)
            if clip:
                img = tf.clip_by_value(img, 0.0, 1.0)
            if mask is not None:
                mask = stacked[..., channels:]
        if mask is not None:
            cell = tf.nn.max_pool2d(tf.cast(mask > 0.5, tf.float32), pool, pool, "VALID")  # any overlap
            has_box = tf.cast(tf.reduce_max(cell, axis=[1, 2, 3]) > 0, tf.float32)[:, None, None, None]
            signed = (2.0 * cell - 1.0) * has_box  # +1 inside, -1 outside, 0 without a box
            label = (label, signed * label[:, None, None, :])
        return img, label

    ds = ds.map(_batch, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def box_masks(dataset: "Dataset", records: Sequence[Record], spec: PreprocessSpec,
              cache_dir: str | Path | None = None, workers: int = 2) -> np.ndarray:
    """(N, S, S) uint8 masks of the records' tumour boxes on the model grid (zeros without a
    box), through the same geometry as the preprocessed images; cached like the arrays."""
    from concurrent.futures import ThreadPoolExecutor

    key = hashlib.sha256((dataset.fingerprint(records) + spec.to_json() + "boxes").encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{dataset.name[:60]}-{key}-boxes.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path)
    S = spec.input_size

    def one(rec: Record) -> np.ndarray:
        m = np.zeros((S, S), np.uint8)
        if rec.box is None:
            return m
        g = preprocess(dataset.scan(rec), spec).geometry
        H, W = g.original_shape
        xc, yc, bw, bh = rec.box
        x0, y0, x1, y1 = g.box_to_grid(((xc - bw / 2) * W, (yc - bh / 2) * H,
                                        (xc + bw / 2) * W, (yc + bh / 2) * H))
        m[max(0, int(np.floor(y0))):min(S, int(np.ceil(y1))), max(0, int(np.floor(x0))):min(S, int(np.ceil(x1)))] = 1
        return m

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        masks = np.stack(list(pool.map(one, records)))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, masks)
    return masks


def iter_scans(dataset: Dataset, records: Iterable[Record]) -> Iterable[tuple[Record, Scan]]:
    for r in records:
        yield r, dataset.scan(r)
