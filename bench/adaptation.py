"""Site adaptation: every recipe cross-validated on a site's confirmed cases, the chosen one
trained on all of them, and the result measured on every other case of the site.

Sites (labels.csv files written under ``.cache/medcls/sites``; the images stay where they are):
- ``br35h``: the 442 Br35H test slices (the 217 br35h-tumour test tumours, partial label
  ``tumor``, and brain-mri's 225 Br35H no-tumour test slices), scored as tumour vs none.
  ``--cases`` of them (default 80, half per label, drawn by near-duplicate group with the seed)
  are the confirmed cases; the rest are measured. Unlabelled scans: the 99 br35h-tumour
  validation tumours and brain-mri's 222 Br35H no-tumour validation slices (a list file).
- ``br35h-shuffled``: the same confirmed cases with their labels shuffled: a site where
  adaptation cannot help, which must be refused.

The parent should be a model that never saw a Br35H tumour (``--parent``; for the issue's
target, train one without br35h-tumour, see the README). Its reference data are the folders its
card names.

    python -m bench.adaptation --parent runs/naive-parent [--sites br35h br35h-shuffled] [--seeds 0]
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, command, machine, parser, table, write

SITES_DIR = ROOT / ".cache" / "medcls" / "sites"


def _rows(data: Path, folder: str, split: str, label: str) -> list[dict]:
    with (data / folder / "labels.csv").open(newline="") as fh:
        return [{"file": str((data / folder / r["file"]).resolve()), "label": label,
                 "group": f"{folder}:{r.get('group') or r['file']}"}
                for r in csv.DictReader(fh)
                if r["split"] == split and r["label"] == label and r.get("source") == "br35h"]


def build_br35h(data: Path, n_cases: int, seed: int, shuffled: bool) -> tuple[Path, Path, Path]:
    """(confirmed cases folder, the rest's folder, unlabelled list file)."""
    pool = _rows(data, "br35h-tumour", "test", "tumor") + _rows(data, "brain-mri", "test", "no_tumor")
    rng = np.random.default_rng(seed)
    chosen: list[dict] = []
    for label in ("tumor", "no_tumor"):
        groups: dict[str, list[dict]] = {}
        for r in pool:
            if r["label"] == label:
                groups.setdefault(r["group"], []).append(r)
        keys = sorted(groups)
        rng.shuffle(keys)
        taken: list[dict] = []
        for k in keys:  # whole groups (near-duplicates stay on one side), exactly n_cases // 2
            if len(taken) + len(groups[k]) <= n_cases // 2:
                taken += groups[k]
        chosen += taken
    rest = [r for r in pool if r not in chosen]
    if shuffled:
        labels = [r["label"] for r in chosen]
        rng.shuffle(labels)
        chosen = [r | {"label": lab} for r, lab in zip(chosen, labels)]
    name = f"br35h{'-shuffled' if shuffled else ''}-{n_cases}-s{seed}"
    site, rest_dir = _write(SITES_DIR / name, chosen), _write(SITES_DIR / f"{name}-rest", rest)
    unl = SITES_DIR / "br35h-unlabelled.txt"
    unl.write_text("\n".join(r["file"] for r in _rows(data, "br35h-tumour", "val", "tumor")
                             + _rows(data, "brain-mri", "val", "no_tumor")) + "\n")
    return site, rest_dir, unl


def _write(site: Path, rows: list[dict]) -> Path:
    site.mkdir(parents=True, exist_ok=True)
    with (site / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "label", "group"])
        w.writeheader()
        w.writerows(rows)
    return site


def reference_folders(data: Path, parent: Path) -> list[str]:
    """The parent's training folders, from its card ("brain-mri+normal-ixi+...: ...")."""
    names = json.loads((parent / "card.json").read_text())["training"]["data"].split(":")[0].split("+")
    return [str(data / n) for n in names]


def measure_rest(model: Path, rest: Path, seed: int) -> dict:
    from medcls.learning.adapt_check import site_figures
    from medcls.learning.adapt_recipes import forward
    from medcls.learning.data import cached_arrays, load_datasets
    from medcls.models.calibration import probabilities
    from medcls.models.package import load_package

    pkg = load_package(model)
    ds = load_datasets([rest], classes=pkg.card.classes)
    x = cached_arrays(ds, ds.records, pkg.card.spec, ROOT / ".cache" / "medcls", 2, as_gray=True)
    probs = probabilities(forward(pkg.model, x)[0], pkg.card.temperature)
    return site_figures(probs, ds.targets(ds.records), [r.label for r in ds.records], pkg.card.classes,
                        1000, seed)


def main() -> None:
    from medcls.learning.adapt import AdaptConfig, adapt
    from medcls.learning.adapt_recipes import DEFAULT_RECIPES

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--parent", type=Path, required=True)
    p.add_argument("--sites", nargs="+", default=["br35h", "br35h-shuffled"])
    p.add_argument("--cases", type=int, default=80)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--no-unlabelled", action="store_true")
    p.add_argument("--work", type=Path, default=Path("/tmp/medcls-adapt-bench"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = []
    for site in args.sites:
        for seed in args.seeds:
            folder, rest, unl = build_br35h(args.data, args.cases, seed, shuffled=site.endswith("shuffled"))
            out = args.work / f"{args.parent.name}-{site}-{seed}"
            load_before, t0 = os.getloadavg(), time.time()
            rec = adapt(AdaptConfig(model=str(args.parent), data=str(folder), out=str(out),
                                    unlabelled=None if args.no_unlabelled else str(unl), folds=args.folds,
                                    seed=seed, reference=reference_folders(args.data, args.parent),
                                    recipes=args.recipes), command=command())
            run = {"site": site, "seed": seed, "parent": rec["parent"], "record": rec,
                   "rest": {"cases": sum(1 for _ in open(rest / "labels.csv")) - 1,
                            "parent": measure_rest(args.parent, rest, seed),
                            "adapted": measure_rest(out, rest, seed) if rec["package"] else None},
                   "wall_s": round(time.time() - t0, 1),
                   "load_average": {"start": [round(x, 2) for x in load_before],
                                    "end": [round(x, 2) for x in os.getloadavg()]}}
            runs.append(run)
            _report(runs, args.out)


def _merged(runs: list[dict], out: Path) -> list[dict]:
    """This invocation's runs over those already in ``out`` (same site, parent and seed
    replaced), so sites and parents can be run one at a time."""
    def key(r):
        return r["site"], r["parent"]["model_sha256"], r["seed"], r["record"]["cases"]["n"]

    try:
        old = [r for r in json.loads((out / "adaptation.json").read_text())["runs"] if "record" in r]
    except (OSError, ValueError, KeyError):
        old = []
    mine = {key(r) for r in runs}
    return [r for r in old if key(r) not in mine] + runs


def _ci(fig: dict | None, key: str = "accuracy") -> str:
    if not fig or fig.get(key) is None:
        return "n/a"
    c = fig.get(key + "_ci95")
    return f"{fig[key]:.3f}" + (f" [{c[0]:.2f}, {c[1]:.2f}]" if c else "")


def _report(runs: list[dict], out: Path) -> None:
    from medcls.learning.adapt_report import recipes_table

    runs = _merged(runs, out)
    md = ["# Site adaptation: every recipe cross-validated, the chosen one measured on the rest of the site", "",
          "Each run: the confirmed cases are dealt into grouped, label-stratified folds; every recipe is "
          "trained on the other folds and predicts the held-out one (gain over the parent with a 95% "
          "bootstrap interval over patients; the acceptance bound is adjusted for the number of recipes "
          "compared), each fold model is measured on a sample of the reference test split; the best "
          "recipe with a gain shown and the reference kept is trained on every confirmed case and "
          "measured on every other case of the site (*rest*) and on the whole reference test split.", ""]
    summary = []
    for r in runs:
        rec, rest = r["record"], r["rest"]
        ref = rec.get("reference") or {}
        gain = (rest["adapted"]["accuracy"] - rest["parent"]["accuracy"]) if rest["adapted"] else None
        summary.append([r["site"], f"{r['parent']['name']} {r['parent']['version']} ({r['parent']['model_sha256'][:8]})",
                        r["seed"], f"{rec['cases']['n']} + {rec['cases']['unlabelled_scans']} unlabelled",
                        rec["verdict"], rec["chosen"] or "none", rest["cases"], _ci(rest["parent"]),
                        _ci(rest["adapted"]), "n/a" if gain is None else f"{gain:+.3f}",
                        f"{ref.get('accuracy_before', float('nan')):.3f} -> "
                        + ("n/a" if ref.get("accuracy_after") is None else f"{ref['accuracy_after']:.3f}"),
                        round(r["wall_s"] / 60, 1), " / ".join(map(str, r["load_average"]["start"]))])
    md += [table(["site", "parent", "seed", "confirmed cases", "verdict", "chosen", "rest cases",
                  "parent acc (rest)", "adapted acc (rest)", "gain (rest)", "reference test",
                  "minutes", "load average at start (1/5/15 min)"], summary), ""]
    for r in runs:
        rec = r["record"]
        md += [f"## {r['site']}, seed {r['seed']}, parent {r['parent']['name']} {r['parent']['version']}: "
               f"every recipe on the held-out folds ({rec['check']['method']}, {rec['check']['scored_cases']} cases)", ""]
        rows = recipes_table(rec)
        for row, full in zip(rows, rec["recipes"]):
            g = full.get("gain") or {}
            row["adjusted lower bound"] = None if g.get("gain_lower_adjusted") is None else round(g["gain_lower_adjusted"], 3)
        md += [table(list(rows[0]), [list(x.values()) for x in rows]), ""]
    write("adaptation", {"command": command(), "machine": machine(), "runs": runs}, "\n".join(md), out)


if __name__ == "__main__":
    main()
