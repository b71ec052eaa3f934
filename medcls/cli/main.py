"""The ``medcls`` command line: ``python -m medcls {train,evaluate,fit-region,train-seg,fit-seg,
clean,review,pacs,adapt,audit} ...``. One module of :mod:`medcls.cli` per command group parses
its arguments and prints; the work is done by the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from medcls.cli.train import add_train_parsers

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _setup_logging(log_file: str | None, verbose: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")



def main(argv: list[str] | None = None) -> int:
    from medcls.core.errors import MedclsError

    p = argparse.ArgumentParser(prog="medcls", description="Medical image classification toolkit")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--log", help="also write the log to this file")
    sub = p.add_subparsers(dest="command", required=True)

    add_train_parsers(sub)

    # a broken import must fail loudly here, not silently remove a subcommand
    from medcls.cli.adapt import add_adapt_parser
    from medcls.cli.clean import add_clean_parser
    from medcls.cli.pacs import add_pacs_parser
    from medcls.cli.review import add_review_parser

    add_clean_parser(sub)
    add_review_parser(sub)
    add_pacs_parser(sub)
    add_adapt_parser(sub)

    from medcls.cli.audit import add_audit_parser
    add_audit_parser(sub)
    from medcls.cli.listen import add_listen_parser; add_listen_parser(sub)  # noqa: E702

    args = p.parse_args(argv)
    _setup_logging(args.log, args.verbose)
    try:
        return args.func(args)
    except MedclsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
