"""The DICOM listener against a real Orthanc: how soon a routed series' results are in the PACS,
a run of series back-to-back with a restart in the middle, and the listener's memory.

    flock /work/heavy.lock python -m bench.listener [--data ../shared/data] [--quick]

Orthanc (Debian's, loopback-only, tests/orthanc.py) holds copies of the 24-slice MPRAGE series
(new UIDs each) and routes each to the listener (``python -m medcls listen``, its own process)
with its REST call ``/modalities/medcls/store``, one association per series (whose release ends
the series). Measured:

- latency: from the series' last instance reaching the listener (its queue's
  ``last_instance_at``) to the SR being retrievable from Orthanc (QIDO-RS polled every 0.1 s),
  one series at a time once the listener is warm (two series answered first, not counted);
- a run of ``--run`` series routed back-to-back (asynchronous store jobs) with one listener
  restart (SIGTERM, then started again) when half of them are sent: every series answered, none
  twice (one job, one SR and one capture per series; one audit row per instance);
- the listener's peak resident memory (its own getrusage, reported in its health row) and the
  spool's peak use against its budget.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, command, machine, parser, table, write

sys.path.insert(0, str(ROOT / "tests"))  # the Orthanc launcher the tests use
from appserver import wait_for  # the tests' polling loop and series copies, from the path above
from dicom_factory import copy_series

NODE = "MEDCLSBENCH"
SPOOL_MB = 256
POLL_S = 0.1  # polling period of every wait (the latency's resolution)


def proc_memory(pid: int) -> dict:
    """VmRSS (now) and VmHWM (peak) of a process, in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def copies(files, n: int) -> list[list]:
    """``n`` copies of the series, each a new study and series (tests/dicom_factory.py)."""
    return [copy_series(files) for _ in range(n)]


class Node:
    def __init__(self, tmp: Path, port: int, db: str, models: Path, pacs_env: dict):
        self.log = tmp / "listener.log"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEDCLS_")},
                    **pacs_env, "MEDCLS_DATABASE_URL": db, "MEDCLS_MODELS": str(models),
                    "MEDCLS_LISTENER_AE_TITLE": NODE, "MEDCLS_LISTENER_PORT": str(port),
                    "MEDCLS_LISTENER_ACCEPT_FROM": "MEDCLSTEST",
                    "MEDCLS_LISTENER_WHOLE_SERIES_FROM": "MEDCLSTEST",
                    "MEDCLS_LISTENER_SPOOL": str(tmp / "spool"),
                    "MEDCLS_LISTENER_SPOOL_MB": str(SPOOL_MB), "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.proc = None
        self.starts = 0

    def start(self) -> float:
        """Start and wait for the models to be loaded; seconds it took."""
        t = time.time()
        before = self.log.read_text().count("model(s) ready") if self.log.exists() else 0
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "medcls", "listen"], cwd=ROOT,
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is None and
                 self.log.read_text().count("model(s) ready") > before, 300, "the listener", every=POLL_S)
        self.starts += 1
        return time.time() - t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)


def main(argv=None) -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--latency", type=int, default=10, help="series timed one at a time")
    p.add_argument("--run", type=int, default=20, help="series routed back-to-back")
    args = p.parse_args(argv)
    if args.quick:
        args.latency, args.run = 2, 4
    from appserver import free_port
    from orthanc import Orthanc

    from medcls.integrations.audit.store import AuditStore
    from medcls.integrations.pacs.review import audit_key
    from medcls.integrations.dicomnode.jobs import open_queue
    from medcls.integrations.pacs.client import PacsClient

    load_before = [round(x, 2) for x in os.getloadavg()]
    files = sorted((args.data / "dicom" / "mprage-series").glob("*.dcm"))
    assert len(files) == 24, "the MPRAGE sample series (24 slices) is needed"
    tmp = Path(tempfile.mkdtemp(prefix="medcls-bench-listener-"))
    port = free_port()
    pacs = Orthanc(modalities={"medcls": (NODE, port)}).start()
    db = f"sqlite:///{tmp / 'audit.sqlite'}"
    node = Node(tmp, port, db, args.models, pacs.env())
    client = PacsClient(pacs.settings())
    queue = open_queue(db)
    peaks = {"rss": [], "spool": 0, "baseline": [], "hwm": []}

    def route(run, asynchronous=False):
        (found,) = pacs.rest("POST", "/tools/lookup", str(run[0].SeriesInstanceUID).encode())
        pacs.rest("POST", "/modalities/medcls/store", {"Resources": [found["ID"]],
                                                       "Asynchronous": asynchronous})

    def job_of(run):
        uid = str(run[0].SeriesInstanceUID)
        return [j for j in queue.rows() if j["series_uid"] == uid]

    def sample():
        for h in queue.health():
            peaks["spool"] = max(peaks["spool"], int(h["spool_bytes"] or 0))
        mem = proc_memory(node.proc.pid)
        if mem:
            peaks["last_hwm"] = mem.get("VmHWM", 0)

    def baseline():
        peaks["baseline"].append(proc_memory(node.proc.pid).get("VmRSS", 0))

    try:
        cold_s = node.start()
        baseline()
        warm, timed, run = copies(files, 2), copies(files, args.latency), copies(files, args.run)
        for r in warm + timed + run:
            client.store(r)
        # ------------------------------------------------------------ latency, one at a time
        latencies, listener_side = [], []
        for i, r in enumerate(warm + timed):
            route(r)
            study = str(r[0].StudyInstanceUID)
            wait_for(lambda: any(s.modality == "SR" for s in client.search_series(study)), 300,
                     "the SR", every=POLL_S)
            seen = time.time()
            (job,) = wait_for(lambda: [j for j in job_of(r) if j["state"] == "sent"], 60, "sent", every=POLL_S)
            sample()
            if i >= len(warm):
                latencies.append(seen - job["last_instance_at"])
                listener_side.append(job["sent_at"] - job["last_instance_at"])
        # ------------------------------------------------------------ back-to-back, one restart
        t0 = time.time()
        for r in run:
            route(r, asynchronous=True)

        def sent_count():
            sample()
            return sum(1 for r in run for j in job_of(r) if j["state"] == "sent")
        wait_for(lambda: sent_count() >= len(run) // 2, 900, "half the run", every=POLL_S)
        at_restart = sent_count()
        for h in queue.health():
            peaks["rss"].append(int(h["peak_rss_bytes"] or 0))
        sample()
        peaks["hwm"].append(peaks.get("last_hwm", 0))
        node.stop()
        restart_s = node.start()
        baseline()
        wait_for(lambda: sent_count() == len(run), 900, "the whole run", every=0.5)
        run_s = time.time() - t0
        time.sleep(2.5)  # one more heartbeat of the second process
        for h in queue.health():
            peaks["rss"].append(int(h["peak_rss_bytes"] or 0))
        sample()
        peaks["hwm"].append(peaks.get("last_hwm", 0))
        # none twice
        jobs = {str(r[0].SeriesInstanceUID): job_of(r) for r in run}
        one_job = all(len(js) == 1 for js in jobs.values())
        srs = {}
        for r in run:
            study = str(r[0].StudyInstanceUID)
            srs[study] = sum(1 for s in client.search_series(study) if s.modality == "SR")
        sent = {audit_key(str(d.SOPInstanceUID)) for r in run for d in r}  # rows keyed by hash
        audit = [a["sop_instance_uid"] for a in AuditStore(db).rows("answers")
                 if a["sop_instance_uid"] in sent]
        node.stop()
    finally:
        node.stop()
        pacs.cleanup()

    lat = {"median_s": round(statistics.median(latencies), 2), "min_s": round(min(latencies), 2),
           "max_s": round(max(latencies), 2), "n": len(latencies),
           "runs_s": [round(x, 2) for x in latencies],
           "listener_sent_median_s": round(statistics.median(listener_side), 2)}
    result = {
        "command": command(), "machine": machine(), "load_average_before": load_before,
        "series": "MPRAGE sample, 24 slices of 224x224 (copies with new UIDs)",
        "model": "brain-mri-default (site default for MR)",
        "latency_last_instance_to_sr_retrievable": lat, "target_median_s": 10.0,
        "meets_target": lat["median_s"] <= 10.0,
        "run": {"series": len(run), "restarts": 1, "sent_at_restart": at_restart,
                "all_answered": all(js and js[0]["state"] == "sent" for js in jobs.values()),
                "one_job_per_series": one_job, "sr_per_study": sorted(set(srs.values())),
                "audit_rows": len(audit), "audit_rows_unique": len(set(audit)),
                "expected_audit_rows": 24 * len(run), "wall_s": round(run_s, 1),
                "series_per_minute": round(60 * len(run) / run_s, 1)},
        "listener": {"cold_start_to_models_ready_s": round(cold_s, 1),
                     "restart_to_models_ready_s": round(restart_s, 1),
                     "peak_rss_mb": [round(x / 1e6) for x in peaks["rss"]],
                     "rss_models_ready_mb": [round(x / 1e6) for x in peaks["baseline"]],
                     "vm_hwm_mb": [round(x / 1e6) for x in peaks["hwm"]],
                     "growth_over_models_ready_mb": [round((h - b) / 1e6) for h, b in
                                                     zip(peaks["hwm"], peaks["baseline"])],
                     "spool_budget_mb": SPOOL_MB, "spool_peak_mb": round(peaks["spool"] / 1e6, 1)},
    }
    r = result["run"]
    md = "\n".join([
        "# Listener: PACS -> MedCLS -> PACS", "",
        f"`{result['command']}` on {result['machine']['cpu_model']} ({result['machine']['cores']} "
        f"cores), load average {load_before} before and {result['machine']['load_average']} after "
        "(the 2 cores are shared: the load average says how busy they were).", "",
        table(["measure", "value", "target"], [
            ["last instance -> SR retrievable from Orthanc, median (s)", lat["median_s"], "<= 10"],
            ["  min / max over the timed series (s)", f"{lat['min_s']} / {lat['max_s']}", ""],
            ["  listener's own: last instance -> STOW-RS done, median (s)",
             lat["listener_sent_median_s"], ""],
            [f"back-to-back run: series answered / sent, of {r['series']}",
             f"{sum(1 for js in jobs.values() if js and js[0]['state'] == 'sent')}", "all"],
            ["  jobs per series; SRs per study", f"{'1' if one_job else '>1'}; {r['sr_per_study']}",
             "1; [1]"],
            ["  audit rows (unique) / expected", f"{r['audit_rows']} ({r['audit_rows_unique']}) / "
             f"{r['expected_audit_rows']}", "equal"],
            ["  restarts (series sent before it)", f"1 ({r['sent_at_restart']})", "1"],
            ["  wall time (s); series per minute", f"{r['wall_s']}; {r['series_per_minute']}", ""],
            ["listener peak resident memory, each process (MB)", result["listener"]["peak_rss_mb"], ""],
            ["  resident once its models were loaded (MB)", result["listener"]["rss_models_ready_mb"], ""],
            ["  growth over that while answering the series (MB)",
             result["listener"]["growth_over_models_ready_mb"], "flat: one series at a time"],
            ["spool peak / budget (MB)", f"{result['listener']['spool_peak_mb']} / {SPOOL_MB}", ""],
            ["cold start to models ready; after the restart (s)",
             f"{result['listener']['cold_start_to_models_ready_s']}; "
             f"{result['listener']['restart_to_models_ready_s']}", ""],
        ]), "",
        "Memory is bounded by the spool budget, not by the traffic: instances go to the spool on "
        "disk as they arrive (one instance per association in memory) and the spool refuses what "
        "would exceed its budget (0xA700); the worker answers one series at a time. So the "
        "listener's memory is its models (resident once loaded) plus the working memory of one "
        "series being answered (TensorFlow's batch of slices, Grad-CAM, the segmentation, the SR "
        "and capture), the same after 2 series or 20, whatever waits in the spool.",
    ])
    write("listener", result, md, args.out)


if __name__ == "__main__":
    main()
