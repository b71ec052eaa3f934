"""Scaling out: the local review engine against the Ray engine on one and two local Ray nodes,
in steady state, with the start-up costs apart and the machine's load recorded.

    nice -n 5 python -m bench.scale [--data ../shared/data] [--scans 2975] [--quick] [--repeat 1] [--append]

The input is the brain MRI test split (595 JPEGs, read from disk), cycled to ``--scans``.
Every configuration reviews them once while the arrival time of every row is recorded:

- **start-up** (reported apart, never in the rates): for Ray, starting the cluster (``ray start``
  of each node), connecting the driver, and the run's time to its first row (Ray Data planning,
  the model actors' start: a worker process, TensorFlow's import, the model's load; then the
  first batch decoded and classified); for the local engine, the model's load and the time to
  the first row (the first batch, with the traced forward pass). A worker's model load is also
  timed alone, in a task on the idle cluster after the run;
- **steady state**: rows per second between the rows at 10% and 90% of the run (the first
  batches and the draining tail left out). Ray Data releases rows in input order, in bursts of
  a batch, so a window of hundreds of rows is needed (one burst is at most a few % of it);
- Ray's **overhead per scan**: its steady ms/scan minus the local engine's.

The nodes are ``ray start`` processes on this machine (tests/raycluster.py), one CPU each: two
nodes add no hardware here, so the figures show Ray's cost, not a cluster's gain. The 1-minute
load average is sampled every 2 s during each configuration (the machine is shared).
"""

from __future__ import annotations

import csv
import os
import sys
import threading
import time

from bench.common import ROOT, command, machine, parser, table, write

sys.path.insert(0, str(ROOT / "tests"))  # the local cluster launcher the tests use

WINDOW = (0.10, 0.90)  # share of the rows between which the steady rate is read


def _sources(data, n: int):
    from medcls.io.sources import Source

    brain = data / "brain-mri"
    with open(brain / "labels.csv", newline="") as fh:
        files = [r["file"] for r in csv.DictReader(fh) if r["split"] == "test"]
    return [Source(f"{k // len(files)}/{f}", lambda p=brain / f: p)
            for k, f in ((k, files[k % len(files)]) for k in range(n))]


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class LoadSampler:
    """The 1-minute load average every ``period`` seconds while running (a shared machine)."""

    def __init__(self, period: float = 2.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period):
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"min": round(min(s), 2), "mean": round(sum(s) / len(s), 2), "max": round(max(s), 2),
                "samples": len(s)}


def _timed_rows(rows) -> tuple[list[float], float]:
    """Arrival time of every row (s since the run started) and the run's wall time."""
    t0 = time.perf_counter()
    times = [time.perf_counter() - t0 for _ in rows]
    return times, time.perf_counter() - t0


def steady(times: list[float], window=WINDOW) -> dict:
    """Steady rate from row arrival times: rows a..b (10%..90%) over the time between them."""
    n = len(times)
    a, b = int(window[0] * n), int(window[1] * n) - 1
    span = times[b] - times[a]
    rate = (b - a) / span if span > 0 else None
    return {"first_row_s": round(times[0], 2), "wall_s": round(times[-1], 2),
            "end_to_end_scans_per_s": round(n / times[-1], 2),
            "steady_rows": [a, b], "steady_s": round(span, 2),
            "steady_scans_per_s": round(rate, 2) if rate else None,
            "steady_ms_per_scan": round(1000 / rate, 2) if rate else None}


def local_run(model, sources, batch_size: int) -> dict:
    from medcls.engine.inference import Predictor
    from medcls.engine.review import run_review

    load = _load()
    with LoadSampler() as sampler:
        t = time.perf_counter()
        predictor = Predictor.from_path(model)
        model_load_s = time.perf_counter() - t
        times, _ = _timed_rows(run_review(predictor, sources, batch_size=batch_size))
    assert len(times) == len(sources)
    return {"engine": "local", "nodes": None, "scans": len(sources),
            "startup": {"model_load_s": round(model_load_s, 2)}, **steady(times),
            "load_before": load, "load_after": _load(), "load_1min_during": sampler.summary()}


def _worker_model_load(model) -> float:
    """Seconds for a fresh task on the cluster to load the model (TensorFlow's import included)."""
    import ray

    from medcls.integrations.ray.cluster import package_files, predictor_from_files

    @ray.remote(num_cpus=0.5, max_calls=1)  # max_calls=1: a new worker process, as an actor gets
    def load(files):
        t = time.perf_counter()
        predictor_from_files(files)
        return time.perf_counter() - t

    t = time.perf_counter()
    inside = ray.get(load.remote(package_files(model)))
    return round(inside, 2), round(time.perf_counter() - t, 2)


def ray_run(model, sources, nodes: int, batch_size: int) -> dict:
    import ray
    from raycluster import LocalRayCluster

    from medcls.integrations.ray import cluster
    from medcls.integrations.ray import review as ray_review

    load = _load()
    with LoadSampler() as sampler:
        c = LocalRayCluster(nodes=nodes, cpus=1)
        t = time.perf_counter()
        c.start()
        try:
            cluster_start_s = time.perf_counter() - t
            t = time.perf_counter()
            cluster.connect(c.address)
            connect_s = time.perf_counter() - t
            try:
                times, _ = _timed_rows(ray_review.run_review(model, sources, address=c.address,
                                                          batch_size=batch_size))
                load_inside, load_task = _worker_model_load(model)
            finally:
                ray.shutdown()
        finally:
            c.stop()
    assert len(times) == len(sources)
    return {"engine": "ray", "nodes": nodes, "scans": len(sources),
            "startup": {"cluster_start_s": round(cluster_start_s, 2), "connect_s": round(connect_s, 2),
                        "worker_model_load_s": load_inside, "worker_model_load_task_s": load_task},
            **steady(times), "load_before": load, "load_after": _load(),
            "load_1min_during": sampler.summary()}


def _median(values):
    v = sorted(values)
    return None if not v else (v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2)


def _break_even(ray: dict, local: dict, local_startup: float) -> int | None:
    """Scans from which a Ray run beats the local engine, start-up included: its extra start-up
    over the steady time it saves per scan; None: never (not faster in steady state)."""
    gain_ms = local["steady_ms_per_scan"] - ray["steady_ms_per_scan"]
    extra = ray["first_row_s"] + ray["startup"]["connect_s"] - local_startup
    if gain_ms <= 0:
        return None
    return max(0, round(1000 * extra / gain_ms))


def summarise(runs: list[dict]) -> dict:
    """Each Ray run against the local run of the same repeat (minutes apart, under about the
    same load: the machine is shared, so unpaired bests would compare different loads), and a
    projection to several machines."""
    sessions: dict[str, float] = {}
    for r in runs:  # a fresh `medcls review` pays the cold start-up: its session's first local run
        if r["engine"] == "local":
            cold = r["startup"]["model_load_s"] + r["first_row_s"]
            sessions[r["session"]] = max(sessions.get(r["session"], 0.0), cold)
    locals_ = {(r["session"], r["repeat"]): r for r in runs if r["engine"] == "local"}
    out = {"local_steady_scans_per_s": sorted(r["steady_scans_per_s"] for r in locals_.values()),
           "local_cold_startup_s": {k: round(v, 2) for k, v in sessions.items()}, "ray": []}
    for nodes in (1, 2):
        pairs = []
        for r in runs:
            local = locals_.get((r["session"], r["repeat"]))
            if r["engine"] != "ray" or r["nodes"] != nodes or local is None:
                continue
            cold = sessions[r["session"]]
            pairs.append({
                "session": r["session"], "repeat": r["repeat"],
                "local_scans_per_s": local["steady_scans_per_s"],
                "ray_scans_per_s": r["steady_scans_per_s"],
                "overhead_ms_per_scan": round(r["steady_ms_per_scan"] - local["steady_ms_per_scan"], 2),
                "first_row_s": r["first_row_s"], "connect_s": r["startup"]["connect_s"],
                "cluster_start_s": r["startup"]["cluster_start_s"],
                "extra_startup_s": round(r["first_row_s"] + r["startup"]["connect_s"] - cold, 2),
                "break_even_scans": _break_even(r, local, cold),
                "load_1min_mean": r["load_1min_during"]["mean"]})
        if pairs:
            out["ray"].append({
                "nodes": nodes, "pairs": pairs,
                "median_overhead_ms_per_scan": _median([x["overhead_ms_per_scan"] for x in pairs]),
                "median_ratio_to_local": round(_median([x["ray_scans_per_s"] / x["local_scans_per_s"]
                                                        for x in pairs]), 3),
                "median_extra_startup_s": _median([x["extra_startup_s"] for x in pairs]),
                "median_cluster_start_s": _median([x["cluster_start_s"] for x in pairs])})
    one = next((x for x in out["ray"] if x["nodes"] == 1), None)
    if one is not None:
        # Projection, not a measurement: k machines like this one, each a node at the median
        # one-node steady rate relative to the local engine, against the local engine on one.
        local_rate = _median(out["local_steady_scans_per_s"])
        proj = []
        for k in (2, 4, 8):
            rate = k * one["median_ratio_to_local"] * local_rate
            gain = 1 / local_rate - 1 / rate  # s saved per scan
            proj.append({"machines": k, "projected_scans_per_s": round(rate, 1),
                         "break_even_scans": (round(one["median_extra_startup_s"] / gain)
                                              if gain > 0 else None)})
        out["projection"] = {"local_scans_per_s": local_rate, "machines": proj}
    return out


def report(result: dict) -> str:
    runs, s = result["runs"], result["summary"]

    def startup(r):
        st = r["startup"]
        if r["engine"] == "local":
            return f"model load {st['model_load_s']}"
        return (f"cluster start {st['cluster_start_s']}, connect {st['connect_s']}, worker model "
                f"load {st['worker_model_load_s']} ({st['worker_model_load_task_s']} as a task)")

    md = [f"# Scaling out: local engine vs Ray, steady state ({result['scans']} scans a run)", "",
          "Sessions (each under `nice -n 5`): " + "; ".join(f"{k}: `{v}`" for k, v in
                                                          result["commands"].items()) +
          f", on {result['machine']['cpu_model']} ({result['machine']['cores']} cores), **shared "
          "with other jobs** (a model training, other engineers' tests): the 1-minute load average "
          "sampled every 2 s during each run is in the table. Input: the brain MRI test split "
          f"(595 JPEGs) cycled to {result['scans']} scans, batch size {result['batch_size']}. Ray "
          "nodes are `ray start` processes on this same machine, one CPU each: two nodes add no "
          "hardware here. Each repeat runs local, Ray 1 node, Ray 2 nodes, minutes apart.", "",
          "Steady state: rows/s between the rows at 10% and 90% of the run. Start-up (not in the "
          "rates): the cluster's start and the driver's connection (once per cluster), the time "
          "to the first row (per run: the model actors' start, i.e. a worker, TensorFlow's "
          "import and the model's load, and the first batch), and, timed alone after the run, one "
          "worker's model load. The local engine's model load includes TensorFlow's import in a "
          "session's first run only.", "",
          table(["session", "repeat", "engine", "nodes", "steady scans/s", "steady ms/scan",
                 "first row s", "end-to-end scans/s", "start-up s (apart)",
                 "load 1-min during (min/mean/max)"],
                [[r["session"], r["repeat"], r["engine"], r["nodes"] or "", r["steady_scans_per_s"],
                  r["steady_ms_per_scan"], r["first_row_s"], r["end_to_end_scans_per_s"], startup(r),
                  "{min} / {mean} / {max}".format(**r["load_1min_during"])] for r in runs]), "",
          "Each Ray run against the local run of its repeat. Overhead: Ray's steady ms/scan minus "
          "the local engine's (negative: Ray was faster). Extra start-up: Ray's connection and "
          "first row minus the cold start-up of a fresh `medcls review` (TensorFlow's import, the "
          "model's load, the first batch: " + ", ".join(
              f"{v} s in {k}" for k, v in s["local_cold_startup_s"].items()) + "). Break-even: the "
          "run size from which Ray's steady gain pays that back (cluster start not counted: once "
          "per cluster); blank: never (Ray was not faster).", ""]
    for x in s["ray"]:
        md += [f"**{x['nodes']} node(s)**: median overhead {x['median_overhead_ms_per_scan']} ms/scan, "
               f"median rate {x['median_ratio_to_local']} x the local engine's, median extra start-up "
               f"{x['median_extra_startup_s']} s per run, cluster start {x['median_cluster_start_s']} s.", "",
               table(["session", "repeat", "local scans/s", "Ray scans/s", "overhead ms/scan",
                      "first row s", "extra start-up s", "break-even scans", "load 1-min mean"],
                     [[p["session"], p["repeat"], p["local_scans_per_s"], p["ray_scans_per_s"],
                       p["overhead_ms_per_scan"], p["first_row_s"], p["extra_startup_s"],
                       p["break_even_scans"], p["load_1min_mean"]] for p in x["pairs"]]), ""]
    if s.get("projection"):
        pr = s["projection"]
        md += ["Projection (not measured): k machines like this one, each a Ray node at the median "
               f"one-node rate relative to the local engine (local median {pr['local_scans_per_s']} "
               "scans/s), against the local engine on one machine, with the median extra start-up; "
               "it assumes linear scaling and storage that keeps up.", "",
               table(["machines", "projected scans/s", "break-even scans"],
                     [[m["machines"], m["projected_scans_per_s"], m["break_even_scans"]]
                      for m in pr["machines"]])]
    return "\n".join(md)


def main(argv=None):
    import json

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model package (default: models/brain-mri-default)")
    p.add_argument("--scans", type=int, default=2975, help="scans per run (the test split cycled)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=1, help="repeats of the three configurations")
    p.add_argument("--append", action="store_true",
                   help="keep the runs already in bench/results/scale.json (a new session)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the runs in bench/results/scale.json")
    args = p.parse_args(argv)
    model = args.model or str(args.models / "brain-mri-default")
    n = 96 if args.quick else args.scans
    old = json.loads((args.out / "scale.json").read_text()) if args.append or args.report_only else None
    if args.report_only:
        old["summary"] = summarise(old["runs"])
        write("scale", old, report(old), args.out)
        return old
    session = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    sources = _sources(args.data, n)
    runs = []
    for i in range(args.repeat):
        runs.append(local_run(model, sources, args.batch_size))
        for nodes in (1, 2):
            runs.append(ray_run(model, sources, nodes, args.batch_size))
        for r in runs[-3:]:
            r.update(session=session, repeat=i + 1)
            print(r, flush=True)
    result = {"commands": {**(old or {}).get("commands", {}), session: command()},
              "machine": machine(), "model": os.path.basename(model), "scans": n,
              "batch_size": args.batch_size, "niceness": os.nice(0),
              "runs": (old or {}).get("runs", []) + runs}
    result["summary"] = summarise(result["runs"])
    write("scale", result, report(result), args.out)
    return result


if __name__ == "__main__":
    main()
