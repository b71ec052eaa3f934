"""Site adaptation: recipes compared on sites built from the shared data, with 60 confirmed
local cases and every other case of the site to check on.

Sites (labels.csv files written under ``.cache/medcls/sites``; the images stay where they are):
- ``br35h`` (brain-mri models): Br35H slices of another scanner set than the tumour classes
  were trained on: the 217 br35h-tumour test tumours (partial label ``tumor``) and the 225
  Br35H no-tumour slices of brain-mri's test split, scored as tumour-vs-none. Reference: the
  parent's training folders.
- ``pneumoniamnist`` (chest models): the chest X-rays' test split as MedMNIST stores it, 28 x 28
  pixels (a low-resolution archive), written as PNGs. Reference: chest-xray.

    python -m bench.adaptation [--models models] [--recipes plain last-blocks mixed] [--seeds 0 1]

Each (site, recipe, seed) runs ``medcls.learning.adapt.adapt`` with a hold-out leaving 60 cases to
adapt on; the figures are the check part's, before (parent) and after, with 95% bootstrap CIs,
and the reference test accuracy before and after.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, command, machine, parser, table, write

SITES_DIR = ROOT / ".cache" / "medcls" / "sites"
N_LOCAL = 60


def build_br35h(data: Path, out: Path) -> Path:
    rows = []
    for folder, label in (("br35h-tumour", "tumor"), ("brain-mri", "no_tumor")):
        with (data / folder / "labels.csv").open(newline="") as fh:
            for r in csv.DictReader(fh):
                if r["split"] == "test" and r["label"] == label and r.get("source") == "br35h":
                    rows.append({"file": str((data / folder / r["file"]).resolve()), "label": label,
                                 "group": r.get("group") or r["file"]})
    return _write(out / "br35h", rows)


def build_pneumoniamnist(data: Path, out: Path) -> Path:
    from PIL import Image

    site = out / "pneumoniamnist"
    z = np.load(data / "medmnist" / "pneumoniamnist.npz")
    rows = []
    (site / "img").mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(z["test_images"], z["test_labels"].reshape(-1))):
        path = site / "img" / f"{i:04d}.png"
        if not path.is_file():
            Image.fromarray(img).save(path)
        rows.append({"file": f"img/{i:04d}.png", "label": ("normal", "pneumonia")[int(y)], "group": str(i)})
    return _write(site, rows)


def _write(site: Path, rows: list[dict]) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    with (site / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return site


def sites(data: Path, models: Path) -> list[dict]:
    brain = [str(data / d) for d in ("brain-mri", "br35h-tumour", "normal-ixi", "normal-volunteers")]
    return [{"name": "br35h", "build": build_br35h, "model": models / "brain-mri-default",
             "reference": brain[:1] if "brain-mri+" not in _card(models / "brain-mri-default")["training"]["data"] else brain,
             "scored": "tumour-vs-none"},
            {"name": "pneumoniamnist", "build": build_pneumoniamnist, "model": models / "chest-xray-default",
             "reference": [str(data / "chest-xray")], "scored": "normal-vs-pneumonia"}]


def _card(folder: Path) -> dict:
    return json.loads((folder / "card.json").read_text())


def main() -> None:
    from medcls.learning.adapt import RECIPES, AdaptConfig, adapt

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--sites", nargs="+", default=["br35h", "pneumoniamnist"])
    p.add_argument("--reference-test", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/medcls-adapt-bench"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = []
    for site in [s for s in sites(args.data, args.models) if s["name"] in args.sites]:
        folder = site["build"](args.data, SITES_DIR)
        n = sum(1 for _ in open(folder / "labels.csv")) - 1
        holdout = 1 - N_LOCAL / n
        for recipe in args.recipes:
            for seed in args.seeds:
                t0 = time.time()
                rec = adapt(AdaptConfig(model=str(site["model"]), data=str(folder),
                                        out=str(args.work / f"{site['name']}-{recipe}-{seed}"),
                                        holdout=holdout, seed=seed, reference=site["reference"],
                                        reference_test=args.reference_test, recipe=RECIPES[recipe]),
                            command=command())
                runs.append({"site": site["name"], "scored": site["scored"], "parent": rec["parent"],
                             "recipe": recipe, "seed": seed, "local_cases": rec["split"]["adapt"],
                             "check_cases": rec["split"]["check"], "before": rec["before"],
                             "after": rec["after"], "reference": rec["reference"],
                             "accepted": rec["accepted"], "reasons": rec["reasons"],
                             "wall_s": round(time.time() - t0, 1)})
                print(json.dumps(runs[-1]["after"]["accuracy"]), recipe, seed, flush=True)
                _report(runs, args.out)


def _merged(runs: list[dict], out: Path) -> list[dict]:
    """This invocation's runs over those already in ``out`` (same site, parent, recipe and seed
    replaced), so sites and parents can be run one at a time."""
    def key(r):
        return r["site"], r["parent"]["model_sha256"], r["recipe"], r["seed"]

    try:
        old = json.loads((out / "adaptation.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        old = []
    mine = {key(r) for r in runs}
    return [r for r in old if key(r) not in mine] + runs


def _report(runs: list[dict], out: Path) -> None:
    runs = _merged(runs, out)
    def ci(fig: dict, key: str) -> str:
        c = fig.get(key + "_ci95")
        return f"{fig[key]:.3f}" + (f" [{c[0]:.2f}, {c[1]:.2f}]" if c else "")

    rows = [[r["site"], f"{r['parent']['name']} {r['parent']['version']} ({r['parent']['model_sha256'][:8]})",
             r["recipe"], r["seed"],
             f"{r['local_cases']} / {r['check_cases']}", ci(r["before"], "accuracy"), ci(r["after"], "accuracy"),
             f"{r['after']['accuracy'] - r['before']['accuracy']:+.3f}",
             " / ".join(f"{k[7:]} {r['before'][k]:.2f}->{r['after'][k]:.2f}" for k in r["after"]
                        if k.startswith("recall_") and not k.endswith("_ci95")),
             (f"{r['reference']['accuracy_before']:.3f} -> {r['reference']['accuracy_after']:.3f}"
              if r["reference"] else "n/a"), "yes" if r["accepted"] else "no", r["wall_s"]] for r in runs]
    md = ("# Site adaptation: recipes compared\n\nAccuracy on the site's check cases (every case "
          "but the 60 adapted on), parent vs adapted, 95% bootstrap CIs; reference = the "
          "reference folder's test split (largest accepted drop 0.02).\n\n"
          + table(["site", "parent", "recipe", "seed", "adapt / check", "parent acc", "adapted acc",
                   "gain", "recall per label", "reference acc", "accepted", "wall s"], rows))
    write("adaptation", {"command": command(), "machine": machine(), "runs": runs}, md, out)


if __name__ == "__main__":
    main()
