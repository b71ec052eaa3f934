"""Speed on this CPU: one scan warm (decode + preprocess + predict + Grad-CAM) for DICOM and JPEG,
batch review throughput against a naive per-file ``model.predict`` loop, cold start, model size
and FLOPs, and the fraction of the CPU's measured matmul peak that batch inference reaches.

    python -m bench.speed [--data ../shared/data] [--quick]
    python -m bench.speed --app     # only the app in the browser: cold start, first upload, series
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from bench.common import ROOT, command, machine, parser, table, write

RUNS = 60


def flops_per_image(model) -> float:
    """Forward FLOPs of one image, counted by TensorFlow's profiler on the traced graph."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    from tensorflow.python.profiler import model_analyzer, option_builder

    shape = [1, *model.input_shape[1:]]
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    frozen = convert_variables_to_constants_v2(fn)
    opts = option_builder.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    info = model_analyzer.profile(frozen.graph, options=opts)
    return float(info.total_float_ops)


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    f = tf.function(lambda a, b: tf.matmul(a, b))
    f(a, b).numpy()
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).numpy()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def single_scan(predictor, data: bytes, runs: int) -> dict:
    from medcls.io.load import load_scan

    for _ in range(3):
        predictor.explain(load_scan(data), "gradcam")
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        predictor.explain(load_scan(data), "gradcam")
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": float(np.median(times)), "p95_ms": float(np.percentile(times, 95)), "runs": runs}


def batch_throughput(predictor, files) -> float:
    from medcls.engine.review import run_review
    from medcls.io.sources import Source

    sources = [Source(str(f), lambda f=f: f) for f in files]
    list(run_review(predictor, sources[:64]))  # warm
    t = time.perf_counter()
    n = sum(1 for _ in run_review(predictor, sources, batch_size=32, workers=2))
    return n / (time.perf_counter() - t)


def naive_throughput(predictor, files) -> float:
    """The loop a first script would write: load, preprocess, model.predict per file."""
    from medcls.io.load import load_scan
    from medcls.io.preprocess import preprocess

    model = predictor.model
    model.predict(np.zeros((1, *model.input_shape[1:]), np.float32), verbose=0)
    t = time.perf_counter()
    for f in files:
        x = preprocess(load_scan(f), predictor.spec).array[None]
        model.predict(x, verbose=0)
    return len(files) / (time.perf_counter() - t)


def cold_start(model_dir, file) -> float:
    code = ("import time; t=time.perf_counter(); from medcls.engine.inference import Predictor; "
            f"p=Predictor.from_path({str(model_dir)!r}); p.explain(__import__('medcls').load_scan({str(file)!r})); "
            "print(time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin"})
    return float(out.stdout.strip().splitlines()[-1])


SERIES_DONE = ("Tumour suspected", "No tumour seen", "Cannot answer")


def app_timings(data) -> dict:
    """The app as a user meets it, in headless Chromium against ``streamlit run app.py``:

    - ``cold_start_to_first_answer_s``: from ``streamlit run`` to the first answer, for a JPEG
      uploaded as soon as the uploader shows (the warm-up is still running then);
    - ``first_upload_to_answer_s``: a fresh server; the page is shown and the background
      warm-up (started by the first page view) has loaded the default model, as it does while a
      user picks a file; then the first upload of the server until its answer;
    - ``series_24_slices_s``: then the 24-slice MPRAGE folder in series mode, from the upload to
      the study summary with its strip;
    - then :func:`series_scroll`: a 30-slice series read in the browser's viewer.
    """
    import csv

    sys.path.insert(0, str(ROOT / "tests"))
    from appserver import AppServer, browser, verdict_alert

    with open(data / "brain-mri" / "labels.csv", newline="") as fh:
        jpeg = data / "brain-mri" / next(r["file"] for r in csv.DictReader(fh) if r["split"] == "test")
    series = data / "dicom" / "mprage-series"
    out: dict = {}
    timeout = 300_000
    with browser() as chromium:
        srv = AppServer().start()
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(srv.url, timeout=timeout)
            uploader = page.locator('[data-testid="stFileUploaderDropzoneInput"]').first
            uploader.wait_for(state="attached", timeout=timeout)
            out["page_ready_s"] = time.perf_counter() - srv.started_at
            t = time.perf_counter()
            uploader.set_input_files(str(jpeg))
            verdict_alert(page, timeout)
            out["immediate_upload_to_answer_s"] = time.perf_counter() - t
            out["cold_start_to_first_answer_s"] = time.perf_counter() - srv.started_at
        finally:
            srv.stop()
        srv = AppServer().start()
        try:
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(srv.url, timeout=timeout)
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').first.wait_for(
                state="attached", timeout=timeout)
            deadline = time.time() + timeout / 1000
            while "default model warm" not in srv.log_path.read_text() and time.time() < deadline:
                time.sleep(0.2)  # the background warm-up's line in the server log
            out["warm_up_done_s"] = time.perf_counter() - srv.started_at
            t = time.perf_counter()
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').first.set_input_files(str(jpeg))
            verdict_alert(page, timeout)
            out["first_upload_to_answer_s"] = time.perf_counter() - t
            page.get_by_text("A series", exact=True).click()
            page.get_by_text("A folder", exact=True).click()
            box = page.locator('[data-testid="stFileUploaderDropzoneInput"][webkitdirectory]').first
            box.wait_for(state="attached", timeout=timeout)
            t = time.perf_counter()
            box.set_input_files(str(series))
            page.locator('[data-testid="stAlert"]').filter(
                has_text=__import__("re").compile("|".join(SERIES_DONE))).first.wait_for(timeout=timeout)
            page.locator(".js-plotly-plot").first.wait_for(timeout=timeout)
            out["series_24_slices_s"] = time.perf_counter() - t
            out.update(series_scroll(page, data / "dicom" / "volunteer2-axial-flair", timeout))
        finally:
            srv.stop()
    return out


def _stack_frame(page, timeout: int):
    """The series viewer's frame (ui.stack), once every slice is decoded in the browser."""
    page.locator('iframe[src*="medcls_stack"]').first.wait_for(timeout=timeout)
    frame = next(f for f in page.frames if "medcls_stack" in f.url)
    frame.wait_for_function("() => window.medclsStack && window.medclsStack.state().n > 0 && "
                            "window.medclsStack.state().decoded === window.medclsStack.state().n",
                            timeout=timeout)
    return frame


def series_scroll(page, folder, timeout: int) -> dict:
    """Reading a series in the browser (issue 28): a 30-slice folder opened in place of the open
    series until every slice is in the viewer, then 30 slices stepped with the mouse wheel and
    30 with the arrow keys, each until the viewer shows the last one; the page's websocket
    frames and HTTP requests during the stepping are counted (0: no round trip per slice)."""
    out: dict = {}
    sent, requests = [], []
    page.on("websocket", lambda ws: ws.on("framesent", lambda _: sent.append(time.monotonic())))
    page.on("request", lambda r: requests.append(time.monotonic()))
    page.get_by_text("Open another series").first.click()
    page.get_by_text("A folder", exact=True).last.click()
    box = page.locator('[data-testid="stFileUploaderDropzoneInput"][webkitdirectory]').first
    box.wait_for(state="attached", timeout=timeout)
    t = time.perf_counter()
    box.set_input_files(str(folder))
    page.get_by_text("now open: 30 files").first.wait_for(timeout=timeout)
    frame = _stack_frame(page, timeout)
    out["series_30_slices_upload_to_viewer_s"] = time.perf_counter() - t
    page.wait_for_timeout(3000)  # the page has settled
    frame.locator("#root").focus()
    frame.locator("#root").press("Home")
    frame.wait_for_function("() => window.medclsStack.state().slice === 0", timeout=timeout)
    canvas = frame.locator("canvas.view").first.bounding_box()
    page.mouse.move(canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2)
    t0 = time.monotonic()
    for _ in range(29):
        page.mouse.wheel(0, 100)
    frame.wait_for_function("() => window.medclsStack.state().slice === 29", timeout=timeout)
    t1 = time.monotonic()
    for _ in range(29):
        frame.locator("#root").press("ArrowUp")
    frame.wait_for_function("() => window.medclsStack.state().slice === 0", timeout=timeout)
    t2 = time.monotonic()
    out["series_scroll_30_slices_wheel_s"] = t1 - t0
    out["series_scroll_30_slices_keys_s"] = t2 - t1
    out["series_scroll_messages_to_server"] = sum(1 for x in sent if t0 <= x <= t2) + \
        sum(1 for x in requests if t0 <= x <= t2)
    return out


def app_model() -> str:
    """Name, version and SHA-256 prefix of the model the app opens with (as
    ``ui.models.default_model_path`` picks it: the brain task's ``*-default`` in the models folder),
    plus its segmentation companion when the card names one."""
    from medcls.core.settings import load_settings
    from medcls.models.package import list_packages

    found = sorted((c for _, c in list_packages(load_settings().models_dir)
                    if c["task"] == "brain-mri"),
                   key=lambda c: (not c["name"].endswith("-default"), c["name"]))
    if not found:
        return "none"
    card = found[0]
    seg = card.get("segmentation")
    if seg:
        from medcls.models.segmenter import read_seg_card

        s = read_seg_card(load_settings().models_dir / seg)
        seg = f"{seg} {s['version']} (sha256 {s['model_sha256'][:12]})"
    return (f"{card['name']} {card['version']} (sha256 {card['model_sha256'][:12]})"
            + (f" with segmentation companion {seg}" if seg else ""))


def write_app_timings(data, out_dir) -> dict:
    """Run only :func:`app_timings` and merge its figures into speed.json / speed.md."""
    from bench.common import RESULTS

    path = (out_dir or RESULTS) / "speed.json"
    result = json.loads(path.read_text()) if path.is_file() else {"command": command()}
    load_before = os.getloadavg()[0]
    timings = app_timings(data)
    timings["load_average_1min"] = max(load_before, os.getloadavg()[0])  # 2 cores: 2 = busy
    timings["app_model"] = app_model()  # which model the figures were measured with
    print(json.dumps(timings), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = [r for r in result.get("app_timings_runs", []) if r.get("app_model") == timings["app_model"]]
    result.update(timings)
    result["app_timings_runs"] = runs + [timings]  # the runs of this same model, oldest first
    result["app_timings_command"] = "python -m bench.speed --app"
    md_path = path.with_suffix(".md")
    md = md_path.read_text() if md_path.is_file() else "# Speed (2-core CPU)\n"
    md = md.split("\n## App in the browser")[0].rstrip() + "\n\n" + "\n".join([
        "## App in the browser (`python -m bench.speed --app`)", "",
        table(["measure", "s"], [[k, v] for k, v in timings.items() if k != "app_model"]), "",
        f"Model: {timings['app_model']}.", "",
        "cold start: `streamlit run` to the first answer for an upload made as soon as the "
        "uploader shows; first upload: a fresh server, upload once the page is shown and the "
        "background warm-up is done (`warm_up_done_s` after `streamlit run`); series: the 24-slice MPRAGE folder in series mode, upload "
        "to summary and strip; then the 30-slice FLAIR folder opened in its place until every "
        "slice is in the viewer, 30 slices stepped with the wheel and 30 with the arrow keys "
        "(Playwright's input included), and the messages the page sent the server meanwhile. "
        "`load_average_1min`: the machine's load while measuring (2 "
        "cores: above 2 the figures are slower than on an idle machine)."])
    path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(md + "\n")
    print(json.dumps(timings, indent=2))
    return timings


def main(argv=None):
    import csv

    if argv is None and "--app" in sys.argv:
        p = parser(__doc__)
        p.add_argument("--app", action="store_true")
        args = p.parse_args()
        write_app_timings(args.data, args.out)
        return

    from medcls.engine.inference import Predictor
    from medcls.models.package import list_packages, update_card

    p = parser(__doc__)
    p.add_argument("--merge", action="store_true",
                   help="keep the other models' results of bench/results/speed.json")
    args = p.parse_args(argv)
    runs = 8 if args.quick else RUNS
    with open(args.data / "brain-mri" / "labels.csv", newline="") as fh:
        test = [args.data / "brain-mri" / r["file"] for r in csv.DictReader(fh) if r["split"] == "test"]
    dicom = args.data / "dicom" / "mprage-series" / "100.dcm"
    jpeg = test[0]
    if args.quick:
        test = test[:48]
    naive_files = test[:120]

    peak = matmul_peak_gflops()
    result = {"command": command(), "machine": machine(), "cpu_model": machine()["cpu_model"],
              "matmul_peak_gflops": peak, "models": {}}
    if args.merge and (args.out / "speed.json").is_file():
        previous = json.loads((args.out / "speed.json").read_text())
        result = previous | {"models": previous.get("models", {}),
                             "command": previous.get("command", "") + f"; {result['command']}"}
    rows = []
    for folder, card in list_packages(args.models):
        predictor = Predictor.from_path(folder).warmup()
        entry = {"size_mb": (folder / "model.keras").stat().st_size / 2**20,
                 "parameters": int(predictor.model.count_params()),
                 "flops_per_image": flops_per_image(predictor.model)}
        entry["single_scan_ms"] = {"jpeg": single_scan(predictor, jpeg.read_bytes(), runs),
                                   "dicom": single_scan(predictor, dicom.read_bytes(), runs)}
        if card["task"] == "brain-mri":
            entry["batch_scans_per_s"] = batch_throughput(predictor, test)
            entry["naive_scans_per_s"] = naive_throughput(predictor, naive_files)
            entry["batch_vs_naive"] = entry["batch_scans_per_s"] / entry["naive_scans_per_s"]
            achieved = entry["flops_per_image"] * entry["batch_scans_per_s"] / 1e9
            entry["inference_gflops_in_review"] = achieved
            entry["fraction_of_peak"] = achieved / peak
        entry["cold_start_s"] = cold_start(folder, jpeg)
        if not args.quick:  # the card's figures for the comparison page's table
            update_card(folder, {"speed": {
                "single_scan_ms_median": entry["single_scan_ms"]["jpeg"]["median_ms"],
                "single_scan_ms_p95": entry["single_scan_ms"]["jpeg"]["p95_ms"],
                "dicom_scan_ms_median": entry["single_scan_ms"]["dicom"]["median_ms"],
                "what": "decode + preprocess + predict + Grad-CAM of one scan, warm",
                "machine": f"{result['cpu_model']}, {machine()['cores']} cores",
                "command": "python -m bench.speed"}})
        result["models"][card["name"]] = entry
        print(card["name"], json.dumps(entry), flush=True)
    for name, entry in sorted(result["models"].items()):
        rows.append([name, entry["size_mb"], entry["flops_per_image"] / 1e9,
                     entry["single_scan_ms"]["jpeg"]["median_ms"], entry["single_scan_ms"]["jpeg"]["p95_ms"],
                     entry["single_scan_ms"]["dicom"]["median_ms"], entry["single_scan_ms"]["dicom"]["p95_ms"],
                     entry.get("batch_scans_per_s"), entry.get("naive_scans_per_s"), entry.get("batch_vs_naive"),
                     entry.get("fraction_of_peak"), entry["cold_start_s"]])
    default = result["models"].get("brain-mri-default")
    if default:  # the headline keys the README quotes
        result.update({
            "single_scan_ms_median": {k: v["median_ms"] for k, v in default["single_scan_ms"].items()},
            "single_scan_ms_p95": {k: v["p95_ms"] for k, v in default["single_scan_ms"].items()},
            "batch_scans_per_s": default["batch_scans_per_s"], "naive_scans_per_s": default["naive_scans_per_s"],
            "cold_start_s": default["cold_start_s"],
        })
    app = ROOT / "test-output" / "app_start.json"  # written by tests/test_browser.py
    if app.is_file():
        result["app_first_prediction_s"] = json.loads(app.read_text()).get("first_prediction_s")
    md = ["# Speed (2-core CPU)", "",
          f"CPU: {result['cpu_model']}; matmul peak {peak:.1f} GFLOP/s (float32, 2048x2048).", "",
          "Single scan = decode + preprocess + predict + Grad-CAM, warm, "
          f"median / p95 over {runs} runs. Batch = `medcls review` engine over the {len(test)} brain "
          f"test JPEGs; naive = load, preprocess and `model.predict` per file ({len(naive_files)} files).", "",
          table(["model", "MB", "GFLOPs/img", "JPEG ms", "JPEG p95", "DICOM ms", "DICOM p95",
                 "batch scans/s", "naive scans/s", "ratio", "peak fraction", "cold start s"], rows)]
    if "app_first_prediction_s" in result:
        md += ["", f"App: `streamlit run` to the first prediction in the browser: {result['app_first_prediction_s']:.1f} s."]
    md += ["", f"Command: `{result['command']}`; load average when written (1 / 5 / 15 min): "
           f"{' / '.join(str(x) for x in os.getloadavg())} on {os.cpu_count()} cores."]
    old_md = args.out / "speed.md"  # the app's timings (``--app``) are kept as they were written
    if old_md.is_file() and "\n## App in the browser" in old_md.read_text():
        md += ["", "## App in the browser" + old_md.read_text().split("\n## App in the browser", 1)[1].rstrip()]
    write("speed", result, "\n".join(md), args.out)


if __name__ == "__main__":
    main()
