"""Scaling out: the local review engine against the Ray engine on one and two local Ray nodes,
over the brain MRI test split (595 JPEGs, read from disk), with the machine's load recorded.

    python -m bench.scale [--data ../shared/data] [--quick] [--repeat 3]

Each configuration reviews the scans and then twice as many: the difference of the two wall
times is the steady cost of a scan, the rest the fixed cost of a run (for Ray: connecting the
driver and starting the model actors, which import TensorFlow and load the model). Ray's
overhead per scan is the difference against the local engine, end to end and steady. The nodes are `ray start` processes on this machine (one CPU each),
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


def _timed(run, sources) -> float:
    t0 = time.perf_counter()
    n = sum(1 for _ in run(sources))
    assert n == len(sources)
    return time.perf_counter() - t0


def _measure(engine: str, nodes, run, sources) -> dict:
    """End-to-end seconds for the scans and for twice as many (the same files again): the
    difference is the steady cost of one scan, the rest the fixed cost of a run (for Ray:
    connecting, starting the actors). Arrival times of single rows cannot give the steady rate:
    Ray Data releases rows in input order, in bursts."""
    load = _load()
    t1 = _timed(run, sources)
    t2 = _timed(run, list(sources) * 2)
    return _derive({"engine": engine, "nodes": nodes, "scans": len(sources), "wall_s": round(t1, 2),
                    "wall_2x_s": round(t2, 2), "load_before": load, "load_after": _load()})


def _derive(r: dict) -> dict:
    """Rates from the two wall times. When the doubled run was not clearly slower (the machine's
    load changed between the runs) the steady figures are left out rather than made up."""
    n, t1, t2 = r["scans"], r["wall_s"], r["wall_2x_s"]
    r = dict(r, scans_per_s=round(n / t1, 2), scans_per_s_2x=round(2 * n / t2, 2),
             steady_scans_per_s=None, ms_per_scan=None, fixed_s=None)
    per_scan = (t2 - t1) / n
    if t2 > 1.2 * t1 and t1 - n * per_scan >= 0:
        r.update(steady_scans_per_s=round(1 / per_scan, 2), ms_per_scan=round(1000 * per_scan, 1),
                 fixed_s=round(t1 - n * per_scan, 1))
    return r


def local_run(model, sources) -> dict:
    from medcls.inference import Predictor
    from medcls.review import run_review

    predictor = Predictor.from_path(model)
    list(run_review(predictor, sources[:32]))  # warm: traced forward pass
    return _measure("local", None, lambda src: run_review(predictor, src), sources)


def ray_run(model, sources, nodes: int) -> dict:
    import ray

    from medcls import cluster
    from raycluster import LocalRayCluster

    with LocalRayCluster(nodes=nodes, cpus=1) as c:
        cluster.connect(c.address)
        try:
            return _measure("ray", nodes, lambda src: cluster.run_review(model, src, address=c.address),
                            sources)
        finally:
            ray.shutdown()


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model package (default: models/brain-mri-default)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each configuration")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from the runs in bench/results/scale.json")
    args = p.parse_args(argv)
    model = args.model or str(args.models / "brain-mri-default")
    sources = _sources(args.data, args.quick)
    runs = []
    if args.report_only:
        import json

        runs = [_derive(r) for r in json.loads((args.out / "scale.json").read_text())["runs"]]
    for _ in range(0 if args.report_only else args.repeat):
        runs.append(local_run(model, sources))
        for nodes in (1, 2):
            runs.append(ray_run(model, sources, nodes))
        print(runs[-3:], flush=True)

    def best(engine, nodes):
        rs = [r for r in runs if r["engine"] == engine and r["nodes"] == nodes]
        return max(rs, key=lambda r: r["scans_per_s"])

    local = best("local", None)

    def diff(a, b):
        return None if a is None or b is None else round(a - b, 1)

    summary = []
    for nodes in (1, 2):
        r = best("ray", nodes)
        summary.append({
            "nodes": nodes, "scans_per_s": r["scans_per_s"], "steady_scans_per_s": r["steady_scans_per_s"],
            "fixed_s": r["fixed_s"],
            "overhead_ms_per_scan_end_to_end": round(1000 * (1 / r["scans_per_s"] - 1 / local["scans_per_s"]), 1),
            "overhead_ms_per_scan_steady": diff(r["ms_per_scan"], local["ms_per_scan"])})
    result = {"command": command(), "machine": machine(), "model": os.path.basename(model),
              "scans": len(sources), "runs": runs, "local_scans_per_s": local["scans_per_s"],
              "ray": summary}
    md = [f"# Scaling out: local engine vs Ray ({len(sources)} brain MRI test JPEGs)", "",
          f"`{result['command']}` on {result['machine']['cpu_model']} ({result['machine']['cores']} cores, "
          "shared with other jobs: the 1/5/15-minute load averages are recorded with every run). "
          "Ray nodes are `ray start` processes on this same machine, one CPU each: two nodes add "
          "no hardware here. Each configuration reviews the scans, then twice as many (the same "
          "files again): the difference gives the steady cost of a scan, the rest is the fixed "
          "cost of a run (for Ray: connecting and starting the model actors).", "",
          table(["engine", "nodes", "scans/s end to end (1x)", "(2x)", "steady scans/s", "ms/scan steady",
                 "fixed s", "wall s (1x / 2x)", "load before", "load after"],
                [[r["engine"], r["nodes"] or "", r["scans_per_s"], r["scans_per_s_2x"], r["steady_scans_per_s"],
                  r["ms_per_scan"], r["fixed_s"], f"{r['wall_s']} / {r['wall_2x_s']}",
                  " / ".join(map(str, r["load_before"])), " / ".join(map(str, r["load_after"]))]
                 for r in runs]), "",
          "Ray's overhead against the best local run (a blank steady figure: the doubled run was "
          "not clearly slower than the single one, i.e. the machine's load changed in between, so "
          "no steady cost can be read from that pair):", "",
          table(["nodes", "overhead ms/scan (end to end)", "overhead ms/scan (steady)", "fixed s per run"],
                [[s["nodes"], s["overhead_ms_per_scan_end_to_end"], s["overhead_ms_per_scan_steady"],
                  s["fixed_s"]] for s in summary])]
    write("scale", result, "\n".join(md), args.out)
    return result


if __name__ == "__main__":
    main()
