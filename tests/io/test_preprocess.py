"""Tests of medcls.io.preprocess on real brain MRI (../shared/data/brain-mri) and DICOM files."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import require
from scipy.stats import ks_2samp

from medcls.io.load import load_scan, scan_from_array
from medcls.io.preprocess import (
    PreprocessSpec,
    foreground_mask,
    preprocess,
    preprocess_batch,
    preprocess_file,
)
from medcls.io.scan import Scan

# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def brain_dir(data_dir: Path) -> Path:
    return require(data_dir / "brain-mri")


@pytest.fixture(scope="module")
def labels(brain_dir: Path) -> list[dict[str, str]]:
    with open(require(brain_dir / "labels.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def colour_jpeg(brain_dir: Path, labels: list[dict[str, str]]) -> Path:
    """The first Br35H image (labels order) that really is colour (SOURCE.md: many are RGB)."""
    for row in labels:
        if row["source"] == "br35h":
            path = brain_dir / row["file"]
            if load_scan(path).is_color:
                return path
    pytest.fail("no colour JPEG among the Br35H images, contrary to SOURCE.md")


def _gray_u8(scan: Scan) -> np.ndarray:
    px = scan.pixels
    return cv2.cvtColor(px, cv2.COLOR_RGB2GRAY) if px.ndim == 3 else px


def _box_pixels(row: dict[str, str], shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """labels.csv box (normalised centre x, centre y, width, height) as x0, y0, x1, y1 pixels."""
    h, w = shape
    xc, yc, bw, bh = (float(row[k]) for k in ("box_xc", "box_yc", "box_w", "box_h"))
    return (xc - bw / 2) * w, (yc - bh / 2) * h, (xc + bw / 2) * w, (yc + bh / 2) * h


# ----------------------------------------------------------------------------- spec

def test_spec_json_round_trip() -> None:
    spec = PreprocessSpec(input_size=128, channels=1, clip_percentiles=(1, 99), crop=False,
                          crop_margin=0.1, denoise="bilateral", denoise_strength=7.5,
                          normalize="zscore", clahe=True, clahe_clip=3.0)
    text = spec.to_json()
    assert isinstance(json.loads(text), dict)  # plain JSON, storable in a model card
    back = PreprocessSpec.from_json(text)
    assert back == spec
    assert back.clip_percentiles == (1.0, 99.0)
    assert PreprocessSpec.from_json(PreprocessSpec().to_json()) == PreprocessSpec()
    assert back != PreprocessSpec()  # equality is not trivially true


def test_spec_rejects_unknown_and_invalid_values() -> None:
    d = json.loads(PreprocessSpec().to_json())
    with pytest.raises(ValueError):
        PreprocessSpec.from_json(json.dumps({**d, "sharpen": True}))
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict({**d, "denoise": "median"})
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict({**d, "channels": 2})
    with pytest.raises(ValueError):
        PreprocessSpec.from_dict({**d, "normalize": "histogram"})


def test_fixed_normalisation_keeps_absolute_intensity() -> None:
    """'minmax' stretches each image to [0, 1], so a dark and a bright copy of the same pattern
    look alike; 'fixed' keeps them (one scale for every 8-bit image) (echogenicity in ultrasound)."""
    pattern = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    dark = scan_from_array((40 + 40 * pattern).astype(np.uint8))
    bright = scan_from_array((160 + 40 * pattern).astype(np.uint8))
    common = dict(input_size=64, channels=1, crop=False)
    mm = [preprocess(s, PreprocessSpec(**common)).array for s in (dark, bright)]
    assert np.abs(mm[0] - mm[1]).max() < 0.02  # the brightness difference is gone
    win = [preprocess(s, PreprocessSpec(**common, normalize="fixed")).array for s in (dark, bright)]
    assert win[0].min() == pytest.approx(40 / 255, abs=0.01) and win[0].max() == pytest.approx(80 / 255, abs=0.01)
    assert win[1].mean() - win[0].mean() == pytest.approx(120 / 255, abs=0.01)


# ----------------------------------------------------------------------------- output contract

@pytest.mark.parametrize("size,channels", [(224, 3), (96, 1)])
def test_output_shape_dtype_range(brain_dir: Path, data_dir: Path, colour_jpeg: Path,
                                  size: int, channels: int) -> None:
    sources = {
        "figshare jpeg": brain_dir / "glioma" / "0901.jpg",
        "mprage dicom": require(data_dir / "dicom" / "mprage-series" / "100.dcm"),
        "colour jpeg": colour_jpeg,
    }
    spec = PreprocessSpec(input_size=size, channels=channels)
    for name, path in sources.items():
        scan = load_scan(require(path))
        if name == "colour jpeg":
            assert scan.is_color
        p = preprocess(scan, spec)
        a = p.array
        assert a.shape == (size, size, channels), name
        assert a.dtype == np.float32, name
        assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0, name
        assert a.max() > 0.9  # min-max really stretches (area resizing may average the peak)
        assert a[p.mask].std() > 0.05, name  # not blank
        if channels == 3:
            assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])
        assert p.mask.shape == (size, size) and p.mask.dtype == bool
        assert 0.1 < p.mask.mean() < 1.0, name  # a head, not everything or nothing
        assert p.geometry.original_shape == scan.shape


def test_preprocess_file_equals_load_then_preprocess(brain_dir: Path) -> None:
    path = brain_dir / "meningioma" / "0001.jpg"
    spec = PreprocessSpec(input_size=64)
    assert np.array_equal(preprocess_file(path, spec).array,
                          preprocess(load_scan(path), spec).array)


def test_batch_equals_one_by_one(brain_dir: Path, data_dir: Path, colour_jpeg: Path,
                                 labels: list[dict[str, str]]) -> None:
    paths = [brain_dir / r["file"] for r in labels[::500]] + [
        colour_jpeg, require(data_dir / "dicom" / "mprage-series" / "105.dcm")]
    scans = [load_scan(p) for p in paths]
    for spec in (PreprocessSpec(input_size=128), PreprocessSpec(input_size=64, channels=1,
                                                                 denoise="nlmeans", clahe=True)):
        batch = preprocess_batch(scans, spec, workers=2)
        single = [preprocess(s, spec) for s in scans]
        assert len(batch) == len(scans)
        for b, s in zip(batch, single):
            assert np.array_equal(b.array, s.array)
            assert np.array_equal(b.mask, s.mask)
            assert b.geometry == s.geometry


# ----------------------------------------------------------------------------- geometry

def test_geometry_maps_tumour_centre_back(brain_dir: Path, labels: list[dict[str, str]]) -> None:
    rows = [r for r in labels if r["box_xc"]][::200]  # 16 tumour images across the three classes
    assert len(rows) >= 15
    spec = PreprocessSpec(input_size=224, channels=1)
    for row in rows:
        scan = load_scan(brain_dir / row["file"])
        geom = preprocess(scan, spec).geometry
        box = _box_pixels(row, scan.shape)
        # the crop keeps the whole tumour
        x0, y0, x1, y1 = geom.crop_box
        assert x0 - 1 <= box[0] and y0 - 1 <= box[1] and box[2] <= x1 + 1 and box[3] <= y1 + 1, row
        # round trip of the box
        back = geom.box_to_original(geom.box_to_grid(box))
        assert np.allclose(back, box, atol=1e-6), (row["file"], back, box)
        # a delta on the grid at the box centre lands near the box centre in the original
        gb = geom.box_to_grid(box)
        gx, gy = (gb[0] + gb[2]) / 2, (gb[1] + gb[3]) / 2
        grid = np.zeros((spec.input_size, spec.input_size), np.float32)
        grid[int(gy), int(gx)] = 1.0
        heat = geom.to_original(grid)
        assert heat.shape == scan.shape
        iy, ix = np.unravel_index(int(np.argmax(heat)), heat.shape)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        cell = max((x1 - x0) / geom.scaled_size[0], (y1 - y0) / geom.scaled_size[1])
        # one grid cell is `cell` original pixels; argmax is a pixel index (centre at +0.5)
        assert abs(ix + 0.5 - cx) <= cell + 1 and abs(iy + 0.5 - cy) <= cell + 1, (
            row["file"], (ix, iy), (cx, cy), cell)


def test_geometry_with_vertical_padding(brain_dir: Path, labels: list[dict[str, str]]) -> None:
    """A wide crop is padded top and bottom: the mapping must hold on that axis too."""
    img = _gray_u8(load_scan(brain_dir / "meningioma" / "0001.jpg"))
    wide = cv2.resize(img, (img.shape[1] * 2, img.shape[0]))  # the head stretched 2x in width
    geom = preprocess(scan_from_array(wide), PreprocessSpec(input_size=224)).geometry
    x0, y0, x1, y1 = geom.crop_box
    assert x1 - x0 > 1.5 * (y1 - y0)
    assert geom.pad[1] > 0 and geom.pad[0] == 0
    box = (500.0, 200.0, 620.0, 260.0)
    assert np.allclose(geom.box_to_original(geom.box_to_grid(box)), box, atol=1e-6)
    grid = np.zeros((224, 224), np.float32)
    gb = geom.box_to_grid(box)
    grid[int((gb[1] + gb[3]) / 2), int((gb[0] + gb[2]) / 2)] = 1.0
    iy, ix = np.unravel_index(int(np.argmax(geom.to_original(grid))), wide.shape)
    cell = (x1 - x0) / geom.scaled_size[0]
    assert abs(ix + 0.5 - 560) <= cell + 1 and abs(iy + 0.5 - 230) <= cell + 1, (ix, iy, cell)


# ----------------------------------------------------------------------------- crop robustness

@pytest.mark.parametrize("rel", ["meningioma/0001.jpg", "glioma/2401.jpg", "no_tumor/3070.jpg"])
def test_crop_ignores_text_and_ruler(brain_dir: Path, rel: str) -> None:
    """Embed a real image (head not touching its border) in a black canvas with burned-in text in
    the lower right corner and a ruler along the left edge: the crop must be the same head."""
    img = _gray_u8(load_scan(brain_dir / rel))
    h, w = img.shape
    oy, ox = 150, 250
    canvas = np.zeros((h + 300, w + 400), np.uint8)
    canvas[oy:oy + h, ox:ox + w] = img
    ch, cw = canvas.shape
    cv2.putText(canvas, "ACME 2017-05-01 L", (cw - 330, ch - 30), cv2.FONT_HERSHEY_SIMPLEX, 1.0,
                255, 2, cv2.LINE_AA)
    text_box = (cw - 335, ch - 60, cw, ch)
    assert canvas[text_box[1]:, text_box[0]:].max() == 255  # the text is there
    canvas[10:ch - 10, 6:8] = 255  # ruler line with ticks every 40 px
    for y in range(10, ch - 10, 40):
        canvas[y:y + 2, 6:20] = 255

    spec = PreprocessSpec(input_size=224, channels=1)
    plain = preprocess(scan_from_array(img), spec)
    framed = preprocess(scan_from_array(canvas), spec)
    px0, py0, px1, py1 = plain.geometry.crop_box
    assert (px0, py0, px1, py1) != (0, 0, w, h), "precondition: the head lies inside the image"
    x0, y0, x1, y1 = framed.geometry.crop_box

    # the text corner and the ruler are outside the crop
    assert x1 <= text_box[0] or y1 <= text_box[1], framed.geometry.crop_box
    assert x0 > 20
    # the head: every clearly bright pixel of the original (skull, fat; median-filtered so that
    # single noisy pixels do not count) is inside the crop
    bright = cv2.medianBlur(img, 5) > 0.5 * np.percentile(img, 99.5)
    ys, xs = np.nonzero(bright)
    assert x0 <= xs.min() + ox and xs.max() + ox < x1 and y0 <= ys.min() + oy and ys.max() + oy < y1
    # the same crop as without the frame, shifted by the offset
    assert np.abs(np.subtract((x0 - ox, y0 - oy, x1 - ox, y1 - oy), (px0, py0, px1, py1))).max() <= 3
    diff = float(np.abs(framed.array - plain.array).mean())
    print(f"\n{rel}: crop {plain.geometry.crop_box} vs framed {framed.geometry.crop_box} "
          f"(offset {ox},{oy}); mean |diff| {diff:.4f}")
    assert diff < 0.05


# ----------------------------------------------------------------------------- source shift

def _iqr(a: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(a, [25, 75])
    return float(lo), float(hi)


def test_source_shift_reduced(brain_dir: Path, labels: list[dict[str, str]]) -> None:
    """SOURCE.md trap: tumour images (figshare) and no-tumour images (Br35H) differ in size and
    intensity. After preprocessing, sizes are equal and foreground intensities overlap."""
    rng = random.Random(1234)
    sample = {src: rng.sample(sorted((r for r in labels if r["source"] == src),
                                     key=lambda r: r["file"]), 60)
              for src in ("figshare", "br35h")}
    spec = PreprocessSpec(input_size=224, channels=1)
    stats: dict[str, dict[str, np.ndarray]] = {}
    sizes: dict[str, list[tuple[int, int]]] = {}
    for src, rows in sample.items():
        raw_fg, raw_mean, post_fg = [], [], []
        sizes[src] = []
        for row in rows:
            scan = load_scan(brain_dir / row["file"])
            sizes[src].append(scan.shape)
            g = _gray_u8(scan).astype(np.float32) / 255.0
            raw_mean.append(g.mean())
            raw_fg.append(g[foreground_mask(g)].mean())  # same foreground rule as preprocessing
            p = preprocess(scan, spec)
            assert p.array.shape == (224, 224, 1)
            post_fg.append(p.array[..., 0][p.mask].mean())
        stats[src] = {"raw_fg": np.array(raw_fg), "raw_mean": np.array(raw_mean),
                      "post_fg": np.array(post_fg)}

    # before: sizes differ (figshare all 512x512, Br35H varied)
    assert set(sizes["figshare"]) == {(512, 512)}
    assert len(set(sizes["br35h"])) >= 10 and (512, 512) not in set(sizes["br35h"])

    fig, br = stats["figshare"], stats["br35h"]
    ks = {k: ks_2samp(fig[k], br[k]) for k in ("raw_mean", "raw_fg", "post_fg")}
    br_sizes = np.array(sizes["br35h"])
    print("\nsource shift, 60 figshare vs 60 Br35H images (random.Random(1234) sample):")
    print(f"  sizes before: figshare {sorted(set(sizes['figshare']))}; Br35H "
          f"{len(set(sizes['br35h']))} distinct, H {br_sizes[:, 0].min()}-{br_sizes[:, 0].max()}, "
          f"W {br_sizes[:, 1].min()}-{br_sizes[:, 1].max()}; after: all 224x224")
    for k, label in (("raw_mean", "whole-image mean, before"),
                     ("raw_fg", "foreground mean, before"), ("post_fg", "foreground mean, after")):
        fl, fh = _iqr(fig[k])
        bl, bh = _iqr(br[k])
        print(f"  {label:26s} figshare median {np.median(fig[k]):.3f} IQR {fl:.3f}-{fh:.3f} | "
              f"Br35H median {np.median(br[k]):.3f} IQR {bl:.3f}-{bh:.3f} | "
              f"KS {ks[k].statistic:.3f} (p={ks[k].pvalue:.2g})")

    # before: intensities differ clearly (IQRs of the foreground means do not overlap)
    assert ks["raw_fg"].statistic > 0.5
    assert _iqr(fig["raw_fg"])[1] < _iqr(br["raw_fg"])[0]
    # after: the shift is smaller and the interquartile ranges overlap
    assert ks["post_fg"].statistic < ks["raw_fg"].statistic - 0.2
    (fl, fh), (bl, bh) = _iqr(fig["post_fg"]), _iqr(br["post_fg"])
    assert fl <= bh and bl <= fh


# ----------------------------------------------------------------------------- denoising

@pytest.mark.parametrize("rel", ["meningioma/0001.jpg", "no_tumor/3070.jpg"])
def test_denoise_reduces_added_noise(brain_dir: Path, rel: str) -> None:
    """Gaussian noise (sigma 20 of 255) on a real image: with the filter strength set to the noise
    level, both filters bring the preprocessed result closer to the clean preprocessed image.
    The crop is off so that the noisy and clean images share exactly the same geometry and only
    the denoising step differs."""
    img = _gray_u8(load_scan(brain_dir / rel))
    sigma = 20.0
    noisy = np.clip(img + np.random.default_rng(0).normal(0, sigma, img.shape), 0, 255).astype(np.uint8)
    base = dict(input_size=224, channels=1, crop=False)
    clean = preprocess(scan_from_array(img), PreprocessSpec(**base)).array

    def err(method: str | None) -> float:
        spec = PreprocessSpec(**base, denoise=method, denoise_strength=sigma)
        out = preprocess(scan_from_array(noisy), spec)
        return float(np.std(out.array - clean))

    e_none, e_nlm, e_bil = err(None), err("nlmeans"), err("bilateral")
    print(f"\n{rel}: std(noisy - clean) none {e_none:.4f}, nlmeans {e_nlm:.4f}, "
          f"bilateral {e_bil:.4f}")
    assert e_none > 0.01  # the noise is visible after preprocessing
    assert e_nlm < 0.9 * e_none
    assert e_bil < 0.9 * e_none
