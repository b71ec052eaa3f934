"""Shared plumbing of the benchmarks: arguments, results files, machine description."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from medcls.core.settings import load_settings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODELS = load_settings().models_dir
DEFAULT_DATA = Path(os.environ.get("MEDCLS_DATA", ROOT.parent / "shared" / "data"))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding brain-mri/, chest-xray/, ...")
    p.add_argument("--models", type=Path, default=MODELS)
    p.add_argument("--quick", action="store_true", help="a few images only (smoke run)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import tensorflow as tf

    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__,
            # the 1-, 5- and 15-minute load averages when the figures were written: this machine is shared
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def command() -> str:
    return "python -m " + Path(sys.argv[0]).with_suffix("").as_posix().split("/")[-2] + "." + \
        Path(sys.argv[0]).stem + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")


def write(name: str, result: dict, markdown: str, out: Path = RESULTS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
