"""Scaling out: the local review engine against the Ray engine on one and two local Ray nodes,
over the brain MRI test split (595 JPEGs, read from disk), with the machine's load recorded.

    python -m bench.scale [--data ../shared/data] [--quick] [--repeat 3]

Each Ray run is measured end to end (connecting the driver, starting the model actors, which
import TensorFlow and load the model, then every scan) and in steady state (the second half of
the rows, with the pipeline full). Ray's overhead per scan is the difference of seconds per scan
against the local engine. The nodes are `ray start` processes on this machine (one CPU each),
so two nodes add no hardware here: the figures show Ray's cost, not a cluster's gain.
"""

from __future__ import annotations

import csv
import os
import sys
import time

from bench.common import ROOT, command, machine, parser, table, write

sys.path.insert(0, str(ROOT / "tests"))  # the local cluster launcher the tests use


def _sources(data, quick: bool):
    from medcls.review import Source

    brain = data / "brain-mri"
    with open(brain / "labels.csv", newline="") as fh:
        files = [r["file"] for r in csv.DictReader(fh) if r["split"] == "test"]
    files = files[:48] if quick else files
    return [Source(f, lambda p=brain / f: p) for f in files]


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def local_run(model, sources) -> dict:
    from medcls.inference import Predictor
    from medcls.review import run_review

    predictor = Predictor.from_path(model)
    list(run_review(predictor, sources[:32]))  # warm: traced forward pass
    load = _load()
    t0 = time.perf_counter()
    rows = list(run_review(predictor, sources))
    wall = time.perf_counter() - t0
    return {"engine": "local", "nodes": None, "scans": len(rows), "wall_s": round(wall, 2),
            "scans_per_s": round(len(rows) / wall, 2), "steady_scans_per_s": None,
            "load_before": load, "load_after": _load()}


def ray_run(model, sources, nodes: int) -> dict:
    import ray

    from medcls import cluster
    from raycluster import LocalRayCluster

    with LocalRayCluster(nodes=nodes, cpus=1) as c:
        load = _load()
        t0 = time.perf_counter()
        cluster.connect(c.address)
        times = [time.perf_counter() for _ in cluster.run_review(model, sources, address=c.address)]
        end = time.perf_counter()
        ray.shutdown()
    n = len(times)
    first = times[0] if times else end
    # steady state: the second half of the rows (the pipeline full, the actors warm); rows come
    # in bursts of a batch, so the first row's time alone would overstate the rate
    half = times[n // 2] if n > 1 else end
    steady = (n - n // 2) / (end - half) if n > 1 and end > half else None
    return {"engine": "ray", "nodes": nodes, "scans": n, "wall_s": round(end - t0, 2),
            "scans_per_s": round(n / (end - t0), 2),
            "first_row_s": round(first - t0, 2),
            "steady_scans_per_s": round(steady, 2) if steady else None,
            "load_before": load, "load_after": _load()}


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model package (default: models/brain-mri-default)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each configuration")
    args = p.parse_args(argv)
    model = args.model or str(args.models / "brain-mri-default")
    sources = _sources(args.data, args.quick)
    runs = []
    for _ in range(args.repeat):
        runs.append(local_run(model, sources))
        for nodes in (1, 2):
            runs.append(ray_run(model, sources, nodes))
        print(runs[-3:], flush=True)

    def best(engine, nodes):
        rs = [r for r in runs if r["engine"] == engine and r["nodes"] == nodes]
        return max(rs, key=lambda r: r["scans_per_s"])

    local = best("local", None)
    summary = []
    for nodes in (1, 2):
        r = best("ray", nodes)
        summary.append({
            "nodes": nodes, "scans_per_s": r["scans_per_s"], "steady_scans_per_s": r["steady_scans_per_s"],
            "startup_s": r["first_row_s"],
            "overhead_ms_per_scan": round(1000 * (1 / r["scans_per_s"] - 1 / local["scans_per_s"]), 1),
            "steady_overhead_ms_per_scan": (round(1000 * (1 / r["steady_scans_per_s"] - 1 / local["scans_per_s"]), 1)
                                            if r["steady_scans_per_s"] else None)})
    result = {"command": command(), "machine": machine(), "model": os.path.basename(model),
              "scans": len(sources), "runs": runs, "local_scans_per_s": local["scans_per_s"],
              "ray": summary}
    md = [f"# Scaling out: local engine vs Ray ({len(sources)} brain MRI test JPEGs)", "",
          f"`{result['command']}` on {result['machine']['cpu_model']} ({result['machine']['cores']} cores, "
          "shared with other jobs: the 1/5/15-minute load averages are recorded with every run). "
          "Ray nodes are `ray start` processes on this same machine, one CPU each.", "",
          table(["engine", "nodes", "scans/s (end to end)", "steady scans/s", "first row after s",
                 "wall s", "load before", "load after"],
                [[r["engine"], r["nodes"] or "", r["scans_per_s"], r["steady_scans_per_s"],
                  r.get("first_row_s", ""), r["wall_s"], " / ".join(map(str, r["load_before"])),
                  " / ".join(map(str, r["load_after"]))] for r in runs]), "",
          "Ray's overhead per scan against the best local run (milliseconds; end to end includes "
          "starting the actors, steady state excludes it; the local engine, warm, has no start-up "
          "in its figure):", "",
          table(["nodes", "overhead ms/scan (end to end)", "overhead ms/scan (steady)", "startup s"],
                [[s["nodes"], s["overhead_ms_per_scan"], s["steady_overhead_ms_per_scan"], s["startup_s"]]
                 for s in summary])]
    write("scale", result, "\n".join(md), args.out)
    return result


if __name__ == "__main__":
    main()
