"""``medcls adapt``: adapt a model to a site from its clinicians' confirmed cases, the recipe chosen
by cross-validation on them and kept only on a measured gain.
"""

from __future__ import annotations

import json
from pathlib import Path

from medcls.learning.adapt import RECIPES, REFERENCE_MARGIN, AdaptConfig, adapt
from medcls.learning.adapt_check import DEFAULT_FOLDS
from medcls.learning.adapt_recipes import DEFAULT_RECIPES
from medcls.learning.adapt_report import report_markdown
from medcls.learning.site import set_site_default


def add_adapt_parser(sub) -> None:
    a = sub.add_parser("adapt", help="adapt a model to a site from its clinicians' confirmed cases")
    a.add_argument("--model", required=True, help="the parent model package (left untouched)")
    a.add_argument("--data", required=True, help="confirmed local cases: labels.csv (file,label[,group]) "
                                                 "or one folder per class; label 'tumor' = type unknown")
    a.add_argument("--out", required=True, help="the adapted package folder to write (only when a "
                                                "recipe shows a gain)")
    a.add_argument("--unlabelled", help="the site's unlabelled scans (a folder, or a text file of paths): "
                                        "batch-norm alignment and the input gate's threshold")
    a.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                   help="cross-validation folds (a label needs this many patients to be checked)")
    a.add_argument("--repeats", type=int, default=1, help="repeats of the cross-validation (new folds each)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--reference", nargs="*", default=[],
                   help="the parent's training folders: a balanced sample is mixed in, and the first "
                        "folder's test split must not drop by more than %.2f" % REFERENCE_MARGIN)
    a.add_argument("--reference-test", type=int, help="at most this many reference test cases")
    a.add_argument("--reference-cv", type=int, default=150,
                   help="reference test cases each fold's model is measured on")
    a.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(DEFAULT_RECIPES),
                   help="the recipes compared (default: %(default)s)")
    a.add_argument("--epochs", type=int, help="override every fine-tuning recipe's epochs")
    a.add_argument("--name")
    a.add_argument("--cache-dir", default=".cache/medcls")
    a.add_argument("--report", help="also write the adaptation record (JSON) to this file")
    a.add_argument("--promote", action="store_true", help="make it the site default if accepted")
    a.set_defaults(func=_cmd_adapt)


def _cmd_adapt(args) -> int:
    from medcls.learning.train import command_line

    cfg = AdaptConfig(model=args.model, data=args.data, out=args.out, unlabelled=args.unlabelled,
                      folds=args.folds, repeats=args.repeats, seed=args.seed, reference=args.reference,
                      reference_test=args.reference_test, reference_cv=args.reference_cv,
                      recipes=args.recipes, epochs=args.epochs, name=args.name, cache_dir=args.cache_dir)
    record = adapt(cfg, command=command_line())
    print(report_markdown(record))
    if args.report:
        Path(args.report).write_text(json.dumps(record, indent=2) + "\n")
    if not record["accepted"]:
        kept = f"{args.out} is kept for inspection; " if record["package"] else "nothing was written; "
        print(f"error: not promoted ({record['verdict']}). {kept}the parent {args.model} is unchanged.")
        return 3
    if args.promote:
        set_site_default(args.out)
        print(f"{Path(args.out).name} is now the site default for its task.")
    return 0
