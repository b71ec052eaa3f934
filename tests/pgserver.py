"""A real PostgreSQL for the tests: Debian's server binaries, a fresh cluster in a temporary
folder, on a free loopback port, stopped afterwards. PostgreSQL refuses to run as root, so
under root the cluster belongs to the ``postgres`` system user the package creates."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from appserver import free_port


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    return Path(found[-1]).parent


@contextlib.contextmanager
def postgres_server():
    """Yields a SQLAlchemy URL of a running, empty PostgreSQL database ``medcls``."""
    bindir = pg_bin()
    as_root = os.geteuid() == 0
    user = "postgres" if as_root else None
    tmp = Path(tempfile.mkdtemp(prefix="medcls-pg-"))
    data, sock = tmp / "data", tmp / "sock"
    sock.mkdir()
    if as_root:
        shutil.chown(tmp, "postgres")
        shutil.chown(sock, "postgres")
    port = free_port()
    proc = None
    try:
        subprocess.run([bindir / "initdb", "-D", data, "-U", "medcls", "--auth=trust",
                        "--no-sync", "-E", "UTF8"], user=user, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log = open(tmp / "postgres.log", "w")
        proc = subprocess.Popen([bindir / "postgres", "-D", data, "-p", str(port), "-k", sock,
                                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                                 "-c", "max_connections=60"],
                                user=user, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while subprocess.run([bindir / "pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                             stdout=subprocess.DEVNULL).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("PostgreSQL did not start: " + (tmp / "postgres.log").read_text())
            time.sleep(0.2)
        subprocess.run([bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "medcls",
                        "medcls"], check=True)
        yield f"postgresql://medcls@127.0.0.1:{port}/medcls"
    finally:
        if proc is not None:
            proc.terminate()  # smart shutdown; clients are gone by now
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
