"""Start Debian's Orthanc (with its DICOMweb plugin) for the PACS tests: free loopback ports,
a temporary storage folder, a generated configuration with authentication on and one test
user. Debian's own service is not used: ``Orthanc config.json`` runs as a child process.

Loopback only and strict: HTTP refuses other hosts (``RemoteAccessAllowed`` false), the DICOM
server answers only when called by its own AE title (``DicomCheckCalledAet``) and stores only
from the modalities it knows, at their registered address (``DicomAlwaysAllowStore`` false,
``DicomCheckModalityHost``). Orthanc 1.10 (Debian 12) has no option to choose the address it
listens on, so both servers are bound to 127.0.0.1 by a tiny ``bind()`` shim loaded with
``LD_PRELOAD`` (compiled here once with the system's C compiler; a wildcard address becomes the
loopback one). ``listening_addresses`` reads the kernel's table to check it.

``modalities`` ({id: (AE title, port)} on 127.0.0.1) and ``lua`` (a script's text) route series
to a DICOM node such as MedCLS's listener (see the README's "Wire it to the PACS")."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from appserver import free_port

PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                "/usr/lib/orthanc/libOrthancDicomWeb.so")
USER, PASSWORD = "medcls-test", "orthanc-test-password"
AET = "MEDCLSTEST"

LOOPBACK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
/* bind(): a wildcard address (0.0.0.0, ::) becomes the loopback one */
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static int (*real)(int, const struct sockaddr *, socklen_t);
  if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
  if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
    struct sockaddr_in a; memcpy(&a, addr, sizeof a);
    if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real(fd, (const struct sockaddr *)&a, sizeof a);
    }
  } else if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 a; memcpy(&a, addr, sizeof a);
    if (!memcmp(&a.sin6_addr, &in6addr_any, sizeof a.sin6_addr)) {
      a.sin6_addr = in6addr_loopback;
      return real(fd, (const struct sockaddr *)&a, sizeof a);
    }
  }
  return real(fd, addr, len);
}
"""


def orthanc_binary() -> str:
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if exe is None:
        pytest.fail("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb); "
                    ".ci/run installs it")
    return exe


def dicomweb_plugin() -> str:
    for p in PLUGIN_PATHS:
        if Path(p).exists():
            return p
    pytest.fail("the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")


def loopback_shim() -> str:
    """The compiled bind() shim (cached by its source's hash in the temporary folder)."""
    digest = hashlib.sha256(LOOPBACK_SHIM.encode()).hexdigest()[:12]
    lib = Path(tempfile.gettempdir()) / f"medcls-loopback-{digest}.so"
    if not lib.exists():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.fail("a C compiler is needed to bind Orthanc to 127.0.0.1 (apt-get install "
                        "gcc libc6-dev; .ci/run installs it)")
        # per-process names: two test workers may compile at once
        src = lib.with_name(f"{lib.stem}.{os.getpid()}.c")
        src.write_text(LOOPBACK_SHIM)
        tmp = lib.with_name(lib.name + f".{os.getpid()}.{time.time_ns()}")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(src), "-ldl"],
                       check=True, capture_output=True, timeout=120)
        tmp.replace(lib)
    return str(lib)


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on (from /proc)."""
    import socket
    import struct

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = fd.readlink().as_posix()
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)
            if family == socket.AF_INET:
                raw = struct.pack("<I", int(addr, 16))
            else:
                raw = b"".join(struct.pack("<I", int(addr[i:i + 8], 16)) for i in range(0, 32, 8))
            out.add((socket.inet_ntop(family, raw), int(port, 16)))
    return out


class Orthanc:
    """One Orthanc process; ``url`` is its DICOMweb root."""

    def __init__(self, modalities: dict[str, tuple[str, int]] | None = None, lua: str | None = None,
                 stable_age: int = 2):
        self.dir = Path(tempfile.mkdtemp(prefix="medcls-orthanc-"))
        self.http_port, self.dicom_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.url = self.base + "/dicom-web"
        self.user, self.password = USER, PASSWORD
        self.aet = AET
        self.proc: subprocess.Popen | None = None
        config = {
            "Name": "MEDCLS-TEST", "DicomAet": AET,
            "StorageDirectory": str(self.dir / "db"), "IndexDirectory": str(self.dir / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True,
            "DicomModalities": {
                mid: {"AET": aet, "Host": "127.0.0.1", "Port": port, "AllowStore": True,
                      "AllowEcho": True, "AllowFind": False, "AllowMove": False,
                      "AllowGet": False}
                for mid, (aet, port) in (modalities or {}).items()},
            "DicomModalitiesInDatabase": False, "ExecuteLuaEnabled": False,
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "StorageCompression": False, "SaveJobs": False, "HttpTimeout": 30,
            "StableAge": stable_age,
        }
        if lua:
            (self.dir / "route.lua").write_text(lua)
            config["LuaScripts"] = [str(self.dir / "route.lua")]
        (self.dir / "config.json").write_text(json.dumps(config, indent=1))

    def settings(self, **overrides):
        from medcls.core.settings import PacsSettings

        values = {"url": self.url, "user": self.user, "password": self.password, "timeout": 10.0,
                  **overrides}
        return PacsSettings(**values)

    def env(self) -> dict:
        """The environment that points MedCLS at this Orthanc."""
        return {"MEDCLS_PACS_URL": self.url, "MEDCLS_PACS_USER": self.user,
                "MEDCLS_PACS_PASSWORD": self.password}

    def rest(self, method: str, path: str, body=None, timeout: float = 30):
        """Orthanc's REST API (JSON in, JSON out)."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.base + path, data=data, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        if data is not None:
            req.add_header("Content-Type", "application/dicom" if isinstance(body, bytes)
                           else "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw

    def start(self, timeout: float = 30) -> "Orthanc":
        self._log = open(self.dir / "orthanc.log", "w")
        self.proc = subprocess.Popen([orthanc_binary(), str(self.dir / "config.json")],
                                     cwd=self.dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "LD_PRELOAD": loopback_shim()})
        auth = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        auth.add_password(None, self.base, self.user, self.password)
        opener = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(auth))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited early; see {self.dir / 'orthanc.log'}")
            with contextlib.suppress(OSError):
                with opener.open(self.base + "/system", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer in time")

    def stop(self, graceful: bool = True) -> None:
        """Stop the process (graceful: SIGTERM, about 3 s for Orthanc to close; else SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            if graceful:
                self.proc.terminate()
            else:
                self.proc.kill()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if hasattr(self, "_log"):
            self._log.close()

    def cleanup(self) -> None:
        """Stop and delete the storage (killed: nothing of it is kept anyway)."""
        self.stop(graceful=False)
        shutil.rmtree(self.dir, ignore_errors=True)
