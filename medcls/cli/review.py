"""``medcls review``: every scan of a folder (or a list file, or PACS series) into a CSV
worklist, one row per scan or, with ``--by-series``, per series; on this machine or, with
``--engine ray``, on a Ray cluster (Parquet beside the CSV)."""

from __future__ import annotations

from pathlib import Path

from medcls.engine.inference import Predictor
from medcls.engine.review import Progress, ReviewRow, run_review, summary, write_csv
from medcls.integrations.ray import review as ray_review
from medcls.io.sources import cli_sources
from medcls.models.package import read_card


def add_review_parser(sub) -> None:
    r = sub.add_parser("review", help="classify every scan in a folder into a CSV worklist")
    r.add_argument("folder", help="a folder tree, or a text file listing one path a line")
    r.add_argument("--model", required=True, help="model package folder")
    r.add_argument("--out", required=True, help="CSV file to write")
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--by-series", action="store_true",
                   help="one row per DICOM series / NIfTI volume with its study summary "
                        "(every slice and frame answered)")
    r.add_argument("--slices", help="with --by-series: also write one row per slice to this CSV")
    _add_cluster_options(r)
    r.set_defaults(func=cmd_review)
    return r


def cmd_review(args) -> int:
    if args.engine == "ray":
        return _cmd_review_ray(args)
    from tqdm import tqdm

    sources = cli_sources(args.folder)
    predictor = Predictor.from_path(args.model)
    if args.by_series:
        return _cmd_review_by_series(args, predictor, sources)
    rows: list[ReviewRow] = []
    with tqdm(total=len(sources), unit="scan", desc="review") as bar:
        for row in run_review(predictor, sources, args.batch_size, args.workers):
            rows.append(row)
            bar.update(1)
    write_csv(rows, predictor.classes, args.out)
    s = summary(rows, predictor.classes)
    print(f"{s['total']} scans -> {args.out}: " + ", ".join(f"{k} {v}" for k, v in s["per_class"].items())
          + f"; unreadable {s['unreadable']}, low confidence {s['low_confidence']}, "
            f"outside distribution {s['outside_distribution']}")
    return 0


def _cmd_review_by_series(args, predictor: Predictor, sources) -> int:
    from medcls.engine.series import review_by_series, write_records_csv

    study, answers = review_by_series(predictor, sources)
    write_records_csv([a.as_record() for a in answers], args.out)
    if args.slices:
        write_records_csv([r for a in answers for r in a.slice_records()], args.slices)
    for f in study.findings:
        print(f.message)
    for a in answers:
        print(f"{a.series.label}: {a.summary.text}")
    print(f"{len(answers)} series -> {args.out}")
    return 0


# ----------------------------------------------------------------------------- on a Ray cluster


def _add_cluster_options(parser) -> None:
    """``--engine``/``--address``/``--actors`` on ``medcls review``."""
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local (default): this machine; ray: a Ray cluster (Ray Data)")
    parser.add_argument("--address", help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 "
                                          "(default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--actors", type=int, help="model actors on the cluster (default: one per node)")


def _cmd_review_ray(args) -> int:
    """``medcls review SOURCE --engine ray``: CSV at ``--out`` and Parquet beside it; with
    ``--by-series`` the local engine's by-series CSV (and ``--slices``)."""
    from tqdm import tqdm

    from medcls.engine.review import summary, write_csv

    sources = ray_review.cluster_sources(args.folder)
    if args.by_series:
        return _cmd_review_by_series_ray(args, sources)
    classes = tuple(read_card(args.model)["classes"])
    rows: list[ReviewRow] = []
    with tqdm(total=len(sources), unit="scan", desc="review (ray)") as bar:
        for row in ray_review.run_review(args.model, sources, args.address, args.batch_size,
                                         args.actors, on_progress=lambda p: bar.update(p.done - bar.n)):
            rows.append(row)
    out = Path(args.out)
    write_csv(rows, classes, out)
    parquet = out.with_suffix(".parquet")
    ray_review.write_parquet(rows, classes, parquet)
    s = summary(rows, classes)
    print(f"{s['total']} scans -> {out}, {parquet}: "
          + ", ".join(f"{k} {v}" for k, v in s["per_class"].items())
          + f"; unreadable {s['unreadable']}, low confidence {s['low_confidence']}, "
            f"outside distribution {s['outside_distribution']}")
    return 0


def _cmd_review_by_series_ray(args, sources) -> int:
    """The local ``--by-series`` output (same CSV columns, same printed lines) from the cluster."""
    from tqdm import tqdm

    from medcls.engine.series import write_records_csv

    with tqdm(unit="series", desc="review by series (ray)") as bar:
        def progress(p: Progress) -> None:
            bar.total = p.total
            bar.update(p.done - bar.n)
        result = ray_review.review_by_series(args.model, sources, args.address, args.actors,
                                             on_progress=progress)
    write_records_csv([a["record"] for a in result.answers], args.out)
    if args.slices:
        write_records_csv([r for a in result.answers for r in a["slices"]], args.slices)
    for message in result.findings:
        print(message)
    for a in result.answers:
        print(f"{a['record']['series']}: {a['record']['summary']}")
    print(f"{len(result.answers)} series -> {args.out}")
    return 0
