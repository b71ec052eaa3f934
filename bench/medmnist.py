"""The MedCLS training and evaluation pipeline on MedMNIST v2 (PneumoniaMNIST, BreastMNIST; 28x28,
official splits), compared with the published MedMNIST v2 table. Benchmark runs, not shipped
models: packages go to runs/medmnist-<dataset>.

    python -m bench.medmnist [--data ../shared/data] [--arch mobilenet-tl] [--input-size 128]
"""

from __future__ import annotations

import json
import shlex
import sys

from bench.common import RESULTS, ROOT, parser, table, write

WEIGHTS = "weights/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"


def main(argv=None):
    from medcls.train import TrainConfig, train

    p = parser(__doc__)
    p.add_argument("--arch", default="mobilenet-tl")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--fine-tune-epochs", type=int, default=15)
    p.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    args = p.parse_args(argv)
    weights = args.data.parent / WEIGHTS
    existing = json.loads((RESULTS / "medmnist.json").read_text()) if (RESULTS / "medmnist.json").is_file() else {}
    result = dict(existing)
    for name in args.datasets:
        out = ROOT / "runs" / f"medmnist-{name}"
        cfg = TrainConfig(data=str(args.data / "medmnist" / f"{name}.npz"), arch=args.arch, out=str(out),
                          task=name, epochs=2 if args.quick else args.epochs,
                          fine_tune_epochs=1 if args.quick else args.fine_tune_epochs,
                          input_size=args.input_size, weights=str(weights) if args.arch == "mobilenet-tl" else None,
                          preprocess={"crop": False}, max_train=200 if args.quick else None, patience=5)
        cmd = "python -m bench.medmnist " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        pkg = train(cfg, command=cmd)
        card = json.loads((pkg / "card.json").read_text())
        test = card["metrics"]["test"]
        result[name] = {"auc": test["roc_auc"], "acc": test["accuracy"], "n": test["n"],
                        "arch": args.arch, "input_size": args.input_size, "command": cmd,
                        "epochs_run": card["training"]["epochs_run"]}
        print(name, result[name], flush=True)
    rows = [[k, v["auc"], v["acc"], v["n"], v["arch"], v["input_size"]] for k, v in result.items()]
    md = ["# MedMNIST v2 with the MedCLS pipeline (official test splits)", "",
          table(["dataset", "test AUC", "test ACC", "n", "architecture", "input px"], rows), "",
          "Published (MedMNIST v2, AUC / ACC): PneumoniaMNIST ResNet-18 (28) 0.944 / 0.854, ResNet-50 (224) "
          "0.962 / 0.884, AutoML Vision 0.991 / 0.946; BreastMNIST ResNet-18 (28) 0.901 / 0.863, "
          "ResNet-50 (224) 0.866 / 0.842, AutoML Vision 0.919 / 0.861.", "",
          "Commands: " + "; ".join(f"`{v['command']}`" for v in result.values())]
    write("medmnist", result, "\n".join(md), args.out)


if __name__ == "__main__":
    main()
