"""A real Ray cluster of local processes for tests and benchmarks: a head and more nodes started
with ``ray start`` (each with its own CPU count, temporary directory and free ports), all on
the loopback address 127.0.0.2 (:data:`NODE_IP`), and stopped by the process ids it started.

Why not ``ray stop``: it stops every Ray process of the machine, including other users' clusters.
Here the processes are found by their temporary directory (on their command line) and their
children (Ray's workers are forked by the raylet), and only those are ended.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))  # the venv's ray: workers run this venv's python

#: The nodes' address: a loopback address other than 127.0.0.1, which Ray would turn into the
#: machine's own ("remotely reachable") address, binding its runtime-env agent there.
NODE_IP = "127.0.0.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_options() -> list[str]:
    """Free ports for every service a node opens (defaults would collide with other clusters)."""
    opts = []
    for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--runtime-env-agent-port", "--dashboard-agent-grpc-port",
                 "--dashboard-agent-listen-port"):
        opts += [flag, str(free_port())]
    return opts + ["--min-worker-port", "0", "--max-worker-port", "0"]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(entry)] = (ppid, cmd)
    return out


class LocalRayCluster:
    """``with LocalRayCluster(nodes=2) as c: ... c.address``: a head plus ``nodes - 1`` nodes, each
    with ``cpus`` CPUs and ``object_store_mb`` of shared memory."""

    def __init__(self, nodes: int = 2, cpus: int = 1, object_store_mb: int = 400):
        self.nodes, self.cpus, self.object_store = nodes, cpus, object_store_mb << 20
        self.root = Path(tempfile.mkdtemp(prefix="medcls-ray-"))
        self.port = free_port()
        self.address = f"{NODE_IP}:{self.port}"
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore")

    def _start(self, args: list[str], temp: Path) -> None:
        temp.mkdir(parents=True, exist_ok=True)
        cmd = [RAY, "start", *args, "--num-cpus", str(self.cpus), "--temp-dir", str(temp),
               "--node-ip-address", NODE_IP, "--object-store-memory", str(self.object_store),
               "--disable-usage-stats", *_port_options()]
        proc = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")

    def start(self) -> "LocalRayCluster":
        try:
            self._start(["--head", "--port", str(self.port), "--include-dashboard=false",
                         "--ray-client-server-port", str(free_port())], self.root / "head")
            for i in range(1, self.nodes):
                self._start(["--address", self.address], self.root / f"node{i}")
            self.wait_nodes(self.nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def alive_nodes(self) -> int:
        out = subprocess.run([RAY, "status", "--address", self.address], env=self.env,
                             capture_output=True, text=True, timeout=60).stdout
        return out.count("node_") if "Active:" in out else 0

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while self.alive_nodes() < n:
            if time.time() > deadline:
                raise RuntimeError(f"the Ray cluster did not reach {n} nodes")
            time.sleep(1)

    def pids(self) -> set[int]:
        """Every process of this cluster: those naming its directory, and their descendants."""
        procs = _processes()
        mine = {pid for pid, (_, cmd) in procs.items() if str(self.root) in cmd and pid != os.getpid()}
        grew = True
        while grew:
            kids = {pid for pid, (ppid, _) in procs.items() if ppid in mine} - mine
            grew = bool(kids)
            mine |= kids
        return mine

    def worker_pids(self, name: str) -> list[int]:
        """This cluster's worker processes whose title contains ``name`` (e.g. ``_Classifier``)."""
        procs = _processes()
        return sorted(pid for pid in self.pids() if pid in procs and "ray::" in procs[pid][1]
                      and name in procs[pid][1])

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 10
            while pids and time.time() < deadline:
                pids = {p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)}
                time.sleep(0.2)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalRayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
