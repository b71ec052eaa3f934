"""``medcls clean``: the cleaning report of a data set (duplicates, leaks, unreadable files) and a
grouped split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medcls.core.errors import DatasetError
from medcls.learning.cleaning import (
    DEFAULT_NEAR_THRESHOLD,
    HASH_SIZE,
    JSON_EXAMPLES,
    clean_dataset,
    grouped_split,
    write_split_csv,
)
from medcls.learning.data import SPLITS, load_dataset


def cmd_clean(args: argparse.Namespace) -> int:
    """``medcls clean``: print the summary, write the reports and optionally a grouped split."""
    dataset = load_dataset(args.data)
    if args.write_split and not dataset.root.is_dir():
        raise DatasetError("--write-split needs a dataset folder (file paths), not an .npz file.")
    report = clean_dataset(dataset, near_threshold=args.near_threshold, workers=args.workers)
    print(report.to_markdown())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cleaning.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        (out / "cleaning.md").write_text(report.to_markdown(max_examples=JSON_EXAMPLES))
        print(f"Wrote {out / 'cleaning.json'} and {out / 'cleaning.md'}.")
    if args.write_split:
        skipped = report.unreadable_refs
        readable = [r for r in dataset.records if r.ref not in skipped]
        split = grouped_split(readable, seed=args.seed, keep_together=report.keep_together())
        path = write_split_csv(split, args.write_split)
        sizes = ", ".join(f"{name} {sum(r.split == name for r in split)}" for name in SPLITS)
        print(f"Wrote a grouped split of {len(split)} images ({sizes}) to {path}"
              + (f"; {len(skipped)} unreadable file(s) left out." if skipped else "."))
    return 0


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def add_clean_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``clean`` subcommand on the ``medcls`` command line."""
    c = subparsers.add_parser("clean", help="find unreadable files, duplicates and label/split "
                                            "leaks; optionally write a grouped split")
    c.add_argument("data", help="dataset folder (labels.csv or one folder per class) or .npz")
    c.add_argument("--out", help="folder to write cleaning.json and cleaning.md to")
    c.add_argument("--near-threshold", type=_non_negative_int, default=DEFAULT_NEAR_THRESHOLD,
                   help=f"near duplicate: at most this many of the {HASH_SIZE * HASH_SIZE} "
                        "hash bits differ (default %(default)s)")
    c.add_argument("--write-split", metavar="FILE.csv",
                   help="write a grouped, stratified train/val/test split (file,label,split,group)")
    c.add_argument("--seed", type=int, default=0, help="seed of the grouped split")
    c.add_argument("--workers", type=int, default=2, help="decoding threads (default 2)")
    c.set_defaults(func=cmd_clean)
    return c
