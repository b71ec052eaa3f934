"""Run every benchmark: ``make bench`` or ``python -m bench.all``."""

from __future__ import annotations

import sys

from bench import accuracy, gate, localization, segmentation, speed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    for mod in (accuracy, gate, localization, segmentation, speed):
        mod.main(argv)


if __name__ == "__main__":
    main()
