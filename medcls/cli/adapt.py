"""``medcls adapt``: adapt a model to a site from its clinicians' confirmed cases.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from medcls.learning.adapt import RECIPES, REFERENCE_MARGIN, AdaptConfig, adapt, report_markdown
from medcls.learning.site import set_site_default


def add_adapt_parser(sub) -> None:
    a = sub.add_parser("adapt", help="adapt a model to a site from its clinicians' confirmed cases")
    a.add_argument("--model", required=True, help="the parent model package (left untouched)")
    a.add_argument("--data", required=True, help="confirmed local cases: labels.csv (file,label[,group]) "
                                                 "or one folder per class; label 'tumor' = type unknown")
    a.add_argument("--out", required=True, help="the adapted package folder to write")
    a.add_argument("--holdout", type=float, default=0.3, help="share of the local cases kept to check on")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--reference", nargs="*", default=[],
                   help="the parent's training folders: a balanced sample is mixed in, and the first "
                        "folder's test split must not drop by more than %.2f" % REFERENCE_MARGIN)
    a.add_argument("--reference-test", type=int, help="at most this many reference test cases")
    a.add_argument("--recipe", choices=sorted(RECIPES), default="mixed")
    a.add_argument("--epochs", type=int, help="override the recipe's epochs")
    a.add_argument("--lr", type=float, help="override the recipe's learning rate")
    a.add_argument("--reference-n", type=int, help="override the recipe's reference sample size")
    a.add_argument("--name")
    a.add_argument("--cache-dir", default=".cache/medcls")
    a.add_argument("--promote", action="store_true", help="make it the site default if accepted")
    a.set_defaults(func=_cmd_adapt)


def _cmd_adapt(args) -> int:
    from medcls.learning.train import command_line

    overrides = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr),
                                   ("reference_n", args.reference_n)) if v is not None}
    cfg = AdaptConfig(model=args.model, data=args.data, out=args.out, holdout=args.holdout,
                      seed=args.seed, reference=args.reference, reference_test=args.reference_test,
                      recipe=replace(RECIPES[args.recipe], **overrides), name=args.name,
                      cache_dir=args.cache_dir)
    record = adapt(cfg, command=command_line())
    print(report_markdown(record))
    if not record["accepted"]:
        print(f"error: not promoted: {'; '.join(record['reasons'])}. {args.out} is kept for "
              f"inspection; the parent {args.model} is unchanged.")
        return 3
    if args.promote:
        set_site_default(args.out)
        print(f"{Path(args.out).name} is now the site default for its task.")
    return 0
