"""Heatmap localisation and faithfulness on the brain MRI test split.

For every brain model and saliency method, on all test tumour images (boxes from labels.csv):
pointing game (peak inside the box, 2% margin), energy inside the box, IoU of medcls' region box
with the tumour box; deletion / insertion AUC on a fixed subset (every 4th image) against a
random-heatmap baseline. Ablations for the default model: heatmap layer and head masking.

    python -m bench.localization [--data ../shared/data] [--quick]
"""

from __future__ import annotations

import time

import numpy as np

from bench.common import command, machine, parser, table, write

MARGIN = 0.02
FAITHFULNESS_EVERY = 4
ROAD_EVERY = 8  # ROAD imputes 2 x 5 images per heatmap: every 8th tumour image
STEPS = 25


def tumour_rows(data_dir, split="test"):
    import csv

    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == split and r["box_w"]]


def measure(predictor, rows, data_dir, method, faithfulness=True, mask=True, layer=None,
            seed=0):
    from medcls.io.load import load_scan
    from medcls.learning.localization import (
        box_iou,
        deletion_insertion,
        energy_in_box,
        normalised_box_to_pixels,
        pointing_hit,
        road,
    )
    from medcls.models.calibration import probabilities
    from medcls.models.saliency import CamEngine

    if layer is not None:  # ablation: another CAM layer through the same mechanism
        engine = CamEngine(predictor.model, layer, predictor.spec.input_size, predictor.spec.channels)
        predictor._explainers["engine"], saved = engine, predictor.cam_engine()
    rng = np.random.default_rng(seed)
    hits, energy, iou, dels, ins, rdels, rins = [], [], [], [], [], [], []
    roads, rroads = [], []
    t0 = time.perf_counter()

    def proba(batch):
        logits, _ = predictor.forward(batch)
        return probabilities(logits, predictor.package.temperature)

    try:
        for i, r in enumerate(rows):
            scan = load_scan(data_dir / "brain-mri" / r["file"])
            pre = predictor.preprocess(scan)
            e = predictor.explain(scan, method, pre=pre, mask_to_foreground=mask)
            box = normalised_box_to_pixels(*(float(r[k]) for k in ("box_xc", "box_yc", "box_w", "box_h")),
                                           scan.shape)
            hits.append(pointing_hit(e.heatmap, box, MARGIN))
            energy.append(energy_in_box(e.heatmap, box))
            iou.append(box_iou(e.region.box if e.region is not None else None, box) or 0.0)
            if faithfulness and i % FAITHFULNESS_EVERY == 0:
                d, n, _, _ = deletion_insertion(proba, pre.array, e.grid, e.class_index, STEPS)
                dels.append(d)
                ins.append(n)
                rand = rng.random(e.grid.shape)
                d, n, _, _ = deletion_insertion(proba, pre.array, rand, e.class_index, STEPS)
                rdels.append(d)
                rins.append(n)
            if faithfulness and i % ROAD_EVERY == 0:
                roads.append(road(proba, pre.array, e.grid, e.class_index, seed=i))
                rroads.append(road(proba, pre.array, rng.random(e.grid.shape), e.class_index, seed=i))
    finally:
        if layer is not None:
            predictor._explainers["engine"] = saved
    out = {"n": len(rows), "pointing_game": float(np.mean(hits)), "energy_in_box": float(np.mean(energy)),
           "box_iou": float(np.mean(iou)), "ms_per_image": (time.perf_counter() - t0) * 1000 / max(1, len(rows))}
    if dels:
        out.update({"deletion_auc": float(np.mean(dels)), "insertion_auc": float(np.mean(ins)),
                    "random_deletion_auc": float(np.mean(rdels)), "random_insertion_auc": float(np.mean(rins)),
                    "faithfulness_n": len(dels)})
    if roads:
        out.update({"road_morf": float(np.mean([r["morf_mean"] for r in roads])),
                    "road_lerf": float(np.mean([r["lerf_mean"] for r in roads])),
                    "random_road_morf": float(np.mean([r["morf_mean"] for r in rroads])),
                    "random_road_lerf": float(np.mean([r["lerf_mean"] for r in rroads])),
                    "road_n": len(roads), "road_percentiles": roads[0]["percentiles"]})
    return out


def main(argv=None):
    from medcls.engine.inference import Predictor
    from medcls.models.package import list_packages
    from medcls.models.saliency import METHODS

    p = parser(__doc__)
    p.add_argument("--merge", action="store_true",
                   help="keep the other models' results of bench/results/localization.json")
    args = p.parse_args(argv)
    rows = tumour_rows(args.data)
    if args.quick:
        rows = rows[:8]
    result = {"margin": MARGIN, "steps": STEPS, "split": "test", "images": len(rows),
              "command": command(), "machine": machine(), "models": {}, "ablations": {}}
    if args.merge and (args.out / "localization.json").is_file():
        import json

        previous = json.loads((args.out / "localization.json").read_text())
        result["models"].update(previous.get("models", {}))
        result["ablations"].update(previous.get("ablations", {}))
        result["command"] = previous["command"] + f"; {result['command']}"
    for folder, card in list_packages(args.models):
        if card["task"] != "brain-mri":
            continue
        predictor = Predictor.from_path(folder)
        per = {}
        for method in METHODS:
            per[method] = measure(predictor, rows, args.data, method)
            m = per[method]
            print(card["name"], method, {k: round(v, 3) for k, v in m.items() if isinstance(v, float)}, flush=True)
        result["models"][card["name"]] = per
        if card["name"].endswith("-default"):
            layers = [card["cam_layer"]] + [n for n in ("out_relu",) if n in {l.name for l in predictor.model.layers}]
            for layer in layers:
                for mask in (True, False):
                    key = (f"{card['name']} {card.get('version', '')}: gradcam layer={layer} "
                           f"mask={'head' if mask else 'none'}")
                    result["ablations"][key] = measure(predictor, rows, args.data, "gradcam",
                                                       faithfulness=False, mask=mask, layer=layer)
                    print(key, result["ablations"][key], flush=True)
    write("localization", result, markdown(result), args.out)


def markdown(result: dict) -> str:
    md_rows = [[name, method, m["pointing_game"], m["energy_in_box"], m["box_iou"], m.get("deletion_auc"),
                m.get("random_deletion_auc"), m.get("insertion_auc"), m.get("random_insertion_auc"),
                m.get("road_morf"), m.get("random_road_morf"), m.get("road_lerf"), m.get("random_road_lerf"),
                m["ms_per_image"]]
               for name, per in sorted(result["models"].items()) for method, m in per.items()]
    md = [f"# Heatmap localisation and faithfulness (brain MRI test split, {result['images']} tumour images)", "",
          f"Pointing game: peak inside the tumour box grown by {MARGIN:.0%} of the image size. "
          f"Energy: share of heatmap mass in the box. IoU: medcls' region box vs the tumour box. "
          f"Deletion/insertion AUC over {STEPS} steps on every {FAITHFULNESS_EVERY}th image "
          "(deletion lower is better, insertion higher), with a random heatmap for comparison. "
          "Zeroing pixels makes out-of-distribution images, so deletion rates every heatmap worse than "
          f"random; ROAD (Rong et al. 2022) on every {ROAD_EVERY}th image imputes the removed pixels "
          "from their neighbours (noisy linear imputation) and reads the class probability after "
          "removing the most relevant (MoRF, lower is better) or least relevant (LeRF, higher is better) "
          "10/30/50/70/90% of pixels, averaged over the percentiles.", "",
          table(["model", "method", "pointing", "energy", "box IoU", "deletion", "del. random",
                 "insertion", "ins. random", "ROAD MoRF", "MoRF random", "ROAD LeRF", "LeRF random",
                 "ms/image"], md_rows), "",
          "Ablations (default models, Grad-CAM, no faithfulness):", "",
          table(["variant", "pointing", "energy", "box IoU"],
                [[k, v["pointing_game"], v["energy_in_box"], v["box_iou"]] for k, v in result["ablations"].items()]),
          "", f"Command: `{result['command']}`; CPU: {result['machine']['cpu_model']}"]
    return "\n".join(md + ([f"\n{result['note']}"] if result.get("note") else []))


if __name__ == "__main__":
    main()
