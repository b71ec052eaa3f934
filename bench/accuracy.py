"""Every shipped model on its fixed test split, with 95% bootstrap confidence intervals, and the
MedMNIST pipeline check beside the published MedMNIST v2 figures.

    python -m bench.accuracy [--data ../shared/data] [--bootstrap 1000]
"""

from __future__ import annotations

import json
import time

from bench.common import RESULTS, command, machine, parser, table, write

DATA_OF_TASK = {"brain-mri": "brain-mri", "chest-xray": "chest-xray"}
PUBLISHED = {  # MedMNIST v2 (Yang et al. 2023), test AUC / ACC, from shared/data/medmnist/SOURCE.md
    "ResNet-18 (28)": {"pneumoniamnist": (0.944, 0.854), "breastmnist": (0.901, 0.863)},
    "ResNet-50 (224)": {"pneumoniamnist": (0.962, 0.884), "breastmnist": (0.866, 0.842)},
    "AutoKeras": {"pneumoniamnist": (0.947, 0.878), "breastmnist": (0.871, 0.831)},
    "Google AutoML Vision": {"pneumoniamnist": (0.991, 0.946), "breastmnist": (0.919, 0.861)},
}


def main(argv=None):
    from medcls.learning.evaluate import evaluate_model
    from medcls.models.package import list_packages

    p = parser(__doc__)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    result = {"command": command(), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "models": {}}
    rows = []
    for folder, card in list_packages(args.models):
        data = args.data / DATA_OF_TASK[card["task"]]
        rep = evaluate_model(folder, data, split="test", bootstrap=0 if args.quick else args.bootstrap)
        ci = rep.get("ci95", {})
        result["models"][card["name"]] = {k: rep[k] for k in ("n", "accuracy", "macro_f1", "roc_auc", "ece",
                                                               "ece_uncalibrated", "per_class")} | {"ci95": ci}

        def with_ci(key):
            v = rep[key]
            return f"{v:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if key in ci else f"{v:.3f}"

        recalls = ", ".join(f"{c} {m['recall']:.3f}" for c, m in rep["per_class"].items())
        rows.append([card["name"], card["task"], rep["n"], with_ci("accuracy"), with_ci("macro_f1"),
                     with_ci("roc_auc"), with_ci("ece"), recalls])
        print(card["name"], rows[-1], flush=True)
    md = ["# Accuracy on the fixed test splits", "",
          "95% percentile-bootstrap intervals over test images in brackets; ECE after temperature scaling.", "",
          table(["model", "task", "n", "accuracy", "macro-F1", "ROC AUC", "ECE", "recall per class"], rows)]
    medmnist = RESULTS / "medmnist.json"
    if medmnist.is_file():
        mm = json.loads(medmnist.read_text())
        result["medmnist"] = mm
        mrows = [["MedCLS (this pipeline)", mm["pneumoniamnist"]["auc"], mm["pneumoniamnist"]["acc"],
                  mm["breastmnist"]["auc"], mm["breastmnist"]["acc"]]]
        mrows += [[k, v["pneumoniamnist"][0], v["pneumoniamnist"][1], v["breastmnist"][0], v["breastmnist"][1]]
                  for k, v in PUBLISHED.items()]
        md += ["", "## MedMNIST v2 (28x28, official splits; test AUC / ACC)", "",
               table(["method", "PneumoniaMNIST AUC", "ACC", "BreastMNIST AUC", "ACC"], mrows)]
    md += ["", f"Command: `{result['command']}`"]
    write("accuracy", result, "\n".join(md), args.out)


if __name__ == "__main__":
    main()
