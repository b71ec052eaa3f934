"""Tumour outline and size against the figshare authors' masks, on the brain MRI test split.

For the segmentation companion (``models/brain-mri-seg``) and, beside it, today's heatmap region
(Grad-CAM of the brain classifier for the true class, thresholded at its card's
``region_threshold``, the component holding the peak): Dice and IoU per class, 95% Hausdorff
distance, area error (% and px / mm^2), longest-diameter error (px / mm), each with a 95%
bootstrap interval over images; Grad-CAM's pointing game and energy inside the true mask; the
segmenter's false outlines on no-tumour images; one scan with class + mask + heatmap, timed.

Pixel spacing: the figshare JPEGs carry none and ``brain-mri/SOURCE.md`` documents none, so
every size is reported in pixels of the 512 px JPEGs; the mm figures assume 0.49 mm/px, the
in-plane pixel size Cheng et al. (PLoS ONE 2015) give for this dataset (an assumption: stated
with every mm figure, and wrong for any slice acquired at another field of view).

    python -m bench.segmentation [--data ../shared/data] [--quick]
"""

from __future__ import annotations

import csv
import json
import os
import time

import cv2
import numpy as np

from bench.common import ROOT, command, machine, parser, table, write

ASSUMED_MM_PER_PX = 0.49
CLASSES = ("glioma", "meningioma", "pituitary")
BOOTSTRAP = 1000
RUNS = 40
CAM_CACHE = ROOT / ".cache" / "medcls" / "bench-segmentation-heatmaps.json"  # per classifier hash


def ci(values, stat=np.mean, n=BOOTSTRAP, seed=0) -> dict:
    """The statistic with a 95% percentile bootstrap interval over images (nan-free values)."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if not len(v):
        return {"value": None, "ci95": [None, None], "n": 0}
    rng = np.random.default_rng(seed)
    boots = [stat(v[rng.integers(0, len(v), len(v))]) for _ in range(n)]
    return {"value": float(stat(v)), "ci95": [float(np.percentile(boots, 2.5)),
                                              float(np.percentile(boots, 97.5))], "n": int(len(v))}


def region_mask(region, shape) -> np.ndarray:
    """The heatmap region as shown (its outline polygon, filled)."""
    m = np.zeros(shape, np.uint8)
    if region is not None:
        cv2.fillPoly(m, [np.array(region.polygon, np.int32).reshape(-1, 1, 2)], 1)
    return m.astype(bool)


def compare(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Per-image figures of a predicted mask against the true one (pixels)."""
    from medcls.models.measures import dice, hausdorff95, iou, longest_diameter

    a_p, a_t = int(pred.sum()), int(truth.sum())
    d_t = longest_diameter(truth)
    d_p = longest_diameter(pred) if a_p else 0.0
    return {"dice": dice(pred, truth), "iou": iou(pred, truth), "hd95_px": hausdorff95(pred, truth),
            "area_err_pct": 100.0 * abs(a_p - a_t) / a_t, "area_err_px": float(abs(a_p - a_t)),
            "diam_err_px": abs(d_p - d_t), "diam_true_px": d_t, "empty": a_p == 0}


def summarise(rows: list[dict]) -> dict:
    mm, mm2 = ASSUMED_MM_PER_PX, ASSUMED_MM_PER_PX ** 2
    col = lambda k, f=1.0: [r[k] * f for r in rows]  # noqa: E731
    return {
        "n": len(rows),
        "dice_mean": ci(col("dice")), "iou_mean": ci(col("iou")),
        "hd95_px_median": ci(col("hd95_px"), np.median), "hd95_mm_median": ci(col("hd95_px", mm), np.median),
        "area_err_pct_median": ci(col("area_err_pct"), np.median),
        "area_err_px_median": ci(col("area_err_px"), np.median),
        "area_err_mm2_median": ci(col("area_err_px", mm2), np.median),
        "diam_err_px_median": ci(col("diam_err_px"), np.median),
        "diam_err_mm_median": ci(col("diam_err_px", mm), np.median),
        "diam_err_mm_mean": ci(col("diam_err_px", mm)),
        "no_outline": int(sum(r["empty"] for r in rows)),
    }


def load_rows(data_dir, split="test"):
    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == split]


def heatmap_figures(predictor, scan, row, truth) -> dict:
    """Today's heatmap region and Grad-CAM's pointing and energy against one true mask, and
    whether the classifier's answer is a tumour (so the page would show an outline)."""
    from medcls.learning.localization import normalised_box_to_pixels, pointing_hit
    e = predictor.explain(scan, "gradcam", class_index=predictor.classes.index(row["label"]))
    hm = np.clip(e.heatmap, 0, None)
    py, px = np.unravel_index(int(np.argmax(hm)), hm.shape)
    box = normalised_box_to_pixels(*(float(row[k]) for k in ("box_xc", "box_yc", "box_w", "box_h")),
                                   scan.shape)
    answer = e.prediction  # the class answer does not depend on the heatmap's target
    return {"region": compare(region_mask(e.region, scan.shape), truth),
            "pointing_mask": bool(truth[py, px]), "pointing_box": pointing_hit(e.heatmap, box, 0.02),
            "energy_in_mask": float(hm[truth].sum() / max(hm.sum(), 1e-9)),
            "shown": answer.label != "no_tumor" and not answer.outside_training_distribution}


def timed_scan(predictor, segmenter, data: bytes, runs: int) -> dict:
    """One scan as the main page answers it: decode, class + Grad-CAM, mask (tumour answer);
    alternated with the same scan without the mask, so that the mask's own cost is measured in
    the same conditions (this CPU is shared: absolute times vary with the load)."""
    from medcls.io.load import load_scan
    from medcls.models.segmenter import outline_for

    def once(with_mask: bool):
        scan = load_scan(data)
        e = predictor.explain(scan, "gradcam")
        if with_mask:
            outline_for(e.prediction, segmenter, scan, card=predictor.card)
        return e.prediction

    for _ in range(3):
        answer = once(True)
    # a tumour answer, so the segmentation runs and is part of what is timed
    assert answer.label != "no_tumor" and not answer.outside_training_distribution
    times: dict[bool, list] = {True: [], False: []}
    for i in range(2 * runs):
        t = time.perf_counter()
        once(i % 2 == 0)
        times[i % 2 == 0].append((time.perf_counter() - t) * 1000)
    full, base = np.array(times[True]), np.array(times[False])
    return {"median_ms": float(np.median(full)), "p95_ms": float(np.percentile(full, 95)),
            "min_ms": float(full.min()), "without_mask_median_ms": float(np.median(base)),
            "without_mask_min_ms": float(base.min()), "runs": runs,
            "load_average_1min": float(os.getloadavg()[0])}


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--segmenter", default=None, help="companion folder (default models/brain-mri-seg)")
    p.add_argument("--classifier", default=None, help="classifier folder (default models/brain-mri-default)")
    args = p.parse_args(argv)
    from medcls.engine.inference import Predictor
    from medcls.io.load import load_scan
    from medcls.io.preprocess import preprocess
    from medcls.learning.segmentation import mask_index, read_mask
    from medcls.models.segmenter import Segmenter

    seg_dir = args.segmenter or args.models / "brain-mri-seg"
    segmenter = Segmenter(seg_dir).warmup()
    predictor = Predictor.from_path(args.classifier or args.models / "brain-mri-default").warmup()
    root = args.data / "brain-mri"
    masks = mask_index(root)
    rows = load_rows(args.data)
    if args.quick:
        rows = rows[::20]
    thr = predictor.card.region_threshold
    cam_cache = json.loads(CAM_CACHE.read_text()) if CAM_CACHE.is_file() else {}
    seg_rows: dict[str, list] = {c: [] for c in CLASSES}
    cam_rows: dict[str, list] = {c: [] for c in CLASSES}
    pointing, pointing_box, energy, no_tumour_fp, shown, shown_files = [], [], [], [], [], []
    t0 = time.perf_counter()
    for r in rows:
        scan = load_scan(root / r["file"])
        seg = segmenter.segment(scan, preprocess(scan, segmenter.spec))
        pred = seg.mask if seg is not None else np.zeros(scan.shape, bool)
        if r["label"] == "no_tumor":
            no_tumour_fp.append(bool(pred.any()))
            continue
        truth = read_mask(root / masks[r["file"]])
        seg_rows[r["label"]].append(compare(pred, truth))
        key = f"{predictor.card['model_sha256'][:16]}:{r['file']}"
        if key not in cam_cache:  # the classifier's figures do not depend on the segmenter
            cam_cache[key] = heatmap_figures(predictor, scan, r, truth)
        c = cam_cache[key]
        cam_rows[r["label"]].append(c["region"])
        pointing.append(c["pointing_mask"])
        pointing_box.append(c["pointing_box"])
        energy.append(c["energy_in_mask"])
        shown.append(c["shown"])
        if c["shown"]:
            shown_files.append(root / r["file"])
    CAM_CACHE.parent.mkdir(parents=True, exist_ok=True)
    CAM_CACHE.write_text(json.dumps(cam_cache))
    elapsed = time.perf_counter() - t0
    allrows = lambda d: [x for c in CLASSES for x in d[c]]  # noqa: E731

    tumour_file = shown_files[0]  # the first test tumour the classifier answers as a tumour
    speed = timed_scan(predictor, segmenter, tumour_file.read_bytes(), 5 if args.quick else RUNS)
    result = {
        "command": command(), "machine": machine(), "seconds": round(elapsed, 1),
        "segmenter": {"name": segmenter.name, "threshold": segmenter.threshold,
                      "postprocess": segmenter.card["postprocess"],
                      "input_size": segmenter.spec.input_size,
                      "size_bytes": segmenter.card.get("size_bytes")},
        "classifier": predictor.name, "region_threshold": thr,
        "pixel_spacing": {"unit": "px of the 512 px JPEGs", "assumed_mm_per_px": ASSUMED_MM_PER_PX,
                          "note": "no spacing in the JPEGs or SOURCE.md; mm figures assume the "
                                  "0.49 mm pixel size Cheng et al. 2015 give for this dataset"},
        "segmentation": {"all": summarise(allrows(seg_rows)),
                         **{c: summarise(seg_rows[c]) for c in CLASSES}},
        "heatmap_region": {"all": summarise(allrows(cam_rows)),
                           **{c: summarise(cam_rows[c]) for c in CLASSES}},
        "gradcam_vs_mask": {"pointing_game_mask": ci(pointing), "pointing_game_box_2pct": ci(pointing_box),
                            "energy_in_mask": ci(energy)},
        "no_tumour_images_with_an_outline": ci(no_tumour_fp),
        "tumour_answers_showing_an_outline": ci(shown),
        "one_scan_class_mask_heatmap_ms": speed,
        "targets": {"dice_mean_min": 0.80, "diameter_error_median_mm_max": 3.0, "one_scan_ms_max": 100},
    }
    segmenter_card_fields(seg_dir, result)
    write("segmentation", result, markdown(result), args.out)


def segmenter_card_fields(folder, result) -> None:
    """The companion's own test figures go into its card (measured fields only)."""
    from medcls.learning.segmentation import update_seg_card

    s = result["segmentation"]["all"]
    update_seg_card(folder, {"metrics": {**_card_metrics(folder), "test": {
        "n_tumour_images": s["n"], "dice_tumour": {"mean": s["dice_mean"]["value"], "ci95": s["dice_mean"]["ci95"]},
        "dice_per_class": {c: result["segmentation"][c]["dice_mean"]["value"] for c in CLASSES},
        "iou_tumour_mean": s["iou_mean"]["value"],
        "hd95_px_median": s["hd95_px_median"]["value"],
        "diameter_error_px_median": s["diam_err_px_median"]["value"],
        "diameter_error_mm_median_at_0.49mm_per_px": s["diam_err_mm_median"]["value"],
        "area_error_pct_median": s["area_err_pct_median"]["value"],
        "no_tumour_images_with_an_outline": result["no_tumour_images_with_an_outline"]["value"],
        "one_scan_class_mask_heatmap_ms_median": result["one_scan_class_mask_heatmap_ms"]["median_ms"],
        "measured_by": "python -m bench.segmentation"}}})


def _card_metrics(folder) -> dict:
    from medcls.models.segmenter import read_seg_card

    return {k: v for k, v in read_seg_card(folder).get("metrics", {}).items() if k != "test"}


def fmt(d: dict, digits: int = 3) -> str:
    if d["value"] is None:
        return ""
    lo, hi = d["ci95"]
    return f"{d['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(res: dict) -> str:
    def rows(kind):
        out = []
        for c in ("all",) + CLASSES:
            s = res[kind][c]
            out.append([c, s["n"], fmt(s["dice_mean"]), fmt(s["iou_mean"]), fmt(s["hd95_px_median"], 1),
                        fmt(s["hd95_mm_median"], 1), fmt(s["area_err_pct_median"], 1),
                        fmt(s["area_err_mm2_median"], 0), fmt(s["diam_err_px_median"], 1),
                        fmt(s["diam_err_mm_median"], 1), s["no_outline"]])
        return rows_table(out)

    def rows_table(out):
        return table(["class", "n", "Dice (mean)", "IoU (mean)", "HD95 px (median)",
                      "HD95 mm*", "area error % (median)", "area error mm²* (median)",
                      "longest-diameter error px (median)", "diameter error mm* (median)",
                      "no outline"], out)

    g = res["gradcam_vs_mask"]
    sp = res["one_scan_class_mask_heatmap_ms"]
    seg = res["segmenter"]
    return f"""# Tumour outline and size (brain-mri test split, figshare masks)

`{res['command']}` · {res['machine']['cpu_model']}, {res['machine']['cores']} cores ·
{res['seconds']:.0f} s. 95% bootstrap intervals over images ({BOOTSTRAP} resamples) in brackets.

\\* mm: the JPEGs carry no pixel spacing and SOURCE.md documents none; mm figures **assume
{ASSUMED_MM_PER_PX} mm/px** (the pixel size Cheng et al. 2015 give for this dataset). The pixel
figures are the measured ones.

## Segmentation companion `{seg['name']}` (threshold {seg['threshold']}, {seg['postprocess']} component, {seg['input_size']} px input)

{rows('segmentation')}

## Today's heatmap region ({res['classifier']}, Grad-CAM for the true class, region threshold {res['region_threshold']:.2f})

{rows('heatmap_region')}

## Grad-CAM against the masks ({res['classifier']})

| pointing game (peak in the mask) | pointing game (peak in the box, 2% margin) | energy in the mask |
|---|---|---|
| {fmt(g['pointing_game_mask'])} | {fmt(g['pointing_game_box_2pct'])} | {fmt(g['energy_in_mask'])} |

## No outline where there is no tumour; speed

- No-tumour test images on which the segmenter alone would draw an outline: {fmt(res['no_tumour_images_with_an_outline'])}
  (the page draws none for them when the classifier answers no tumour).
- Tumour test images whose classifier answer is a tumour (so the page shows the outline):
  {fmt(res['tumour_answers_showing_an_outline'])}.
- One scan with class, mask and heatmap (decode, preprocess, predict, Grad-CAM, segment; JPEG,
  warm): median {sp['median_ms']:.1f} ms (fastest {sp['min_ms']:.1f}), p95 {sp['p95_ms']:.1f} ms over
  {sp['runs']} runs; the same scan without the mask, alternated with it: median
  {sp['without_mask_median_ms']:.1f} ms (fastest {sp['without_mask_min_ms']:.1f}). Load average
  during the run: {sp['load_average_1min']:.1f} on {res['machine']['cores']} cores.

Targets: Dice >= 0.80 mean over tumour images; longest-diameter error median <= 3 mm; one scan
<= 100 ms.
"""


if __name__ == "__main__":
    main()
