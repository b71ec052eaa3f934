"""Hardening figures (issue 15) on this CPU: the 7999x7999 RGB 16-bit PNG through `medcls review`
(wall time and peak RSS) and the main page (time, what the session keeps), the decode plan it
gets; the cost of decoding compressed DICOM in the limited worker process (per slice, against
pydicom in-process) and one compressed DICOM scan end to end; the zip-bomb check.

    python -m bench.hardening [--data ../shared/data] [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.common import ROOT, command, machine, parser, table, write

sys.path.insert(0, str(ROOT / "tests"))  # the attack files are built by the tests' own builders

COMPRESSED = ["transfer-syntaxes/4.dcm", "transfer-syntaxes/5.dcm", "transfer-syntaxes/6.dcm",
              "transfer-syntaxes/7.dcm", "transfer-syntaxes/8.dcm", "transfer-syntaxes/9.dcm",
              "wg04/MR4_RLE.dcm", "wg04/MR1_JPLL.dcm", "wg04/CT1_J2KR.dcm", "wg04/RG3_J2KI.dcm",
              "wg04/RG3_JLSN.dcm"]


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def review_cli(png: Path, model: Path, runs: int) -> dict:
    from test_hardening import _child_peak_rss_mb

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        (folder / png.name).write_bytes(png.read_bytes())
        walls, peaks = [], []
        for _ in range(runs):
            t = time.perf_counter()
            proc, peak = _child_peak_rss_mb(
                [sys.executable, "-m", "medcls", "review", str(folder), "--model", str(model),
                 "--out", str(Path(tmp) / "out.csv")], cwd=ROOT, timeout=900,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            walls.append(time.perf_counter() - t)
            peaks.append(peak)
            assert proc.returncode == 0, proc.stderr[-2000:]
        answer = (Path(tmp) / "out.csv").read_text().splitlines()[1]
    return {"wall_s": [round(w, 1) for w in walls], "peak_rss_mb": [round(p) for p in peaks],
            "row": answer}


def main_page(png: Path, jpeg: Path, model: Path) -> dict:
    os.environ["MEDCLS_MODELS"] = str(model.parent)
    sys.path.insert(0, str(ROOT))
    from streamlit.testing.v1 import AppTest
    from test_hardening import _held_bytes

    def run(data: bytes):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=900)
        at.session_state["scan_bytes"] = data
        t = time.perf_counter()
        at.run()
        return at, time.perf_counter() - t

    run(jpeg.read_bytes())  # TensorFlow and the model, once per process
    at, seconds = run(png.read_bytes())
    held = _held_bytes({k: at.session_state[k] for k in ("scan_bytes", "_scan_cache", "_results")
                        if k in at.session_state})
    heads = [h.value for h in at.subheader if h.value.startswith("Prediction")]
    return {"seconds": round(seconds, 1), "session_mb": round(held / 2**20, 1),
            "answer": heads[0] if heads else [e.value for e in at.error]}


def decoder_overhead(data_dir: Path, runs: int) -> list[dict]:
    from medcls.io import dicom as dicom_module
    from medcls.io.budget import decode_budget, decode_timeout
    from medcls.io.dicom_tags import read_dataset
    from medcls.io.load import load_scan

    pool = dicom_module._decoder_pool()
    rows = []
    for rel in COMPRESSED:
        path = data_dir / "dicom" / rel
        if not path.is_file():
            continue
        data = path.read_bytes()

        def in_process():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return read_dataset(data).pixel_array

        def worker():
            return pool.decode(data, 0, 1, decode_budget(), decode_timeout())

        try:
            worker()  # warm
            in_process()
        except Exception as exc:  # noqa: BLE001 - a codec this machine lacks: say so
            rows.append({"file": rel, "error": type(exc).__name__})
            continue
        a, b = _median_ms(in_process, runs), _median_ms(worker, runs)
        shape = load_scan(data).shape
        rows.append({"file": rel, "size": f"{shape[1]}x{shape[0]}", "in_process_ms": round(a, 1),
                     "worker_ms": round(b, 1), "overhead_ms": round(b - a, 1)})
    return rows


def single_compressed_scan(data_dir: Path, model: Path, runs: int) -> dict:
    from medcls.engine.inference import Predictor
    from medcls.io.load import load_scan

    predictor = Predictor.from_path(model).warmup()
    out = {}
    for rel in ("wg04/MR4_RLE.dcm", "wg04/MR1_JPLL.dcm", "mprage-series/100.dcm"):
        data = (data_dir / "dicom" / rel).read_bytes()
        predictor.explain(load_scan(data), "gradcam")
        out[rel] = round(_median_ms(lambda: predictor.explain(load_scan(data), "gradcam"), runs), 1)
    return out


def zip_check() -> dict:
    from test_hardening import _zip_of_zeros

    from medcls.core.errors import ArchiveRejectedError
    from medcls.io.sources import zip_sources

    with tempfile.TemporaryDirectory() as tmp:
        data = _zip_of_zeros(Path(tmp) / "bomb.zip", 3000, 1 << 20).read_bytes()
    t = time.perf_counter()
    try:
        zip_sources(data)
        refused = None
    except ArchiveRejectedError as exc:
        refused = str(exc)
    return {"zip_mb": round(len(data) / 1e6, 1), "declared_gib": 3000 / 1024,
            "check_ms": round((time.perf_counter() - t) * 1000, 1), "refused": refused}


def main(argv=None):
    from test_hardening import bomb_png

    from medcls.io.budget import decode_budget
    from medcls.io.load import load_scan

    args = parser(__doc__).parse_args(argv)
    runs = 3 if args.quick else 15
    model = args.models / "brain-mri-default"
    jpeg = sorted((args.data / "brain-mri" / "glioma").glob("*.jpg"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "bomb.png"
        png.write_bytes(bomb_png())
        scan = load_scan(png)
        load_ms = _median_ms(lambda: load_scan(png), 3)
        result = {
            "png": {"file_kb": round(png.stat().st_size / 1024), "decoded": "7999x7999 RGB 16-bit",
                    "decoded_at": list(scan.shape), "scan_mb": round(scan.nbytes / 2**20, 1),
                    "load_scan_ms": round(load_ms)},
            "decode_budget_mb": decode_budget() >> 20,
            "review_cli": review_cli(png, model, 1 if args.quick else 3),
            # the same command on one 512x512 JPEG: TensorFlow's start and the model's load, which
            # dominate on a busy machine
            "review_cli_one_jpeg": review_cli(jpeg, model, 1 if args.quick else 3),
            "main_page": main_page(png, jpeg, model),
        }
    result["decoder_overhead"] = decoder_overhead(args.data, runs)
    result["single_scan_ms"] = single_compressed_scan(args.data, model, runs)
    result["zip"] = zip_check()
    result["machine"], result["command"] = machine(), command()

    r, m, z = result["review_cli"], result["main_page"], result["zip"]
    base = result["review_cli_one_jpeg"]

    def joined(values) -> str:
        return " / ".join(str(v) for v in values)

    over = [d for d in result["decoder_overhead"] if "overhead_ms" in d]
    md = [f"# Hardening (issue 15)\n\n`{result['command']}` on {result['machine']['cpu_model']} "
          f"({result['machine']['cores']} cores, shared; load average "
          f"{' / '.join(str(x) for x in result['machine'].get('load_average', []))} over 1 / 5 / 15 min "
          f"when written).\n",
          f"## The {result['png']['file_kb']} KB PNG that decodes to 7999x7999 RGB 16-bit\n",
          f"Decode budget {result['decode_budget_mb']} MB: decoded at "
          f"{scan.shape[1]}x{scan.shape[0]} (16-bit colour kept), {result['png']['scan_mb']} MB held "
          f"by the Scan, `load_scan` {result['png']['load_scan_ms']} ms.\n",
          table(["", "before (issue 15)", "now", "target"], [
              ["`medcls review` peak RSS (MB)", "3400", joined(r["peak_rss_mb"]), "<= 2560"],
              ["`medcls review` wall time (s, incl. TensorFlow start)", "32", joined(r["wall_s"]), "<= 15"],
              ["the same on one 512x512 JPEG (s; MB)", "", f"{joined(base['wall_s'])}; "
               f"{joined(base['peak_rss_mb'])}", ""],
              ["main page: time after the model is loaded (s)", "46.7", str(m["seconds"]), ""],
              ["main page: what the session keeps (MB)", "3700", str(m["session_mb"]), "<= 300"],
          ]),
          f"\nReview row: `{r['row']}`; main page: {m['answer']}.\n",
          "## Compressed DICOM in the worker process\n",
          table(["file", "size", "pydicom in-process ms", "worker ms", "overhead ms"],
                [[d["file"], d["size"], str(d["in_process_ms"]), str(d["worker_ms"]),
                  str(d["overhead_ms"])] for d in over]),
          f"\nMedian overhead per compressed slice: "
          f"{statistics.median(d['overhead_ms'] for d in over):.1f} ms (warm worker, median of {runs}).\n",
          "One scan end to end (decode + preprocess + predict + Grad-CAM, brain-mri-default, "
          f"median of {runs}): " + ", ".join(f"{k} {v} ms" for k, v in result["single_scan_ms"].items())
          + " (target <= 100 ms).\n",
          "## Zip of 3,000 members of 1 MiB of zeros\n",
          f"{z['zip_mb']} MB declaring {z['declared_gib']:.2f} GiB: refused in {z['check_ms']} ms "
          f"without expanding anything: \"{z['refused']}\"\n"]
    write("hardening", result, "\n".join(md), args.out)


if __name__ == "__main__":
    main()
