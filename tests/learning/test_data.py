"""The data layer on the MedMNIST .npz files: official splits, labels, and the same
preprocessing as any scan."""

from __future__ import annotations

import numpy as np
from conftest import require

from medcls.io.preprocess import PreprocessSpec
from medcls.learning.data import cached_arrays, load_dataset


def test_medmnist_npz_splits_labels_and_pixels(data_dir, tmp_path):
    path = require(data_dir / "medmnist" / "breastmnist.npz")
    raw = np.load(path)
    ds = load_dataset(path)
    assert ds.classes == ["0", "1"]
    sizes = {s: len(ds.split(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 546, "val": 78, "test": 156}  # the official MedMNIST v2 split
    for split in ("train", "test"):
        recs = ds.split(split)
        assert np.array_equal(ds.label_index(recs), raw[f"{split}_labels"].reshape(-1))
    rec = ds.split("test")[17]
    scan = ds.scan(rec)
    assert scan.shape == (28, 28) and ds.path(rec) is None
    assert np.array_equal(scan.pixels, raw["test_images"][17])
    spec = PreprocessSpec(input_size=64, channels=3, crop=False)
    x = cached_arrays(ds, ds.split("val"), spec, str(tmp_path), workers=1)
    assert x.shape == (78, 64, 64, 3) and 0.0 <= x.min() and x.max() <= 1.0
    # the stored images are distinct, so the preprocessed ones are too
    assert len({hash(a.tobytes()) for a in x}) == 78
