"""Start Debian's Orthanc (with its DICOMweb plugin) for the PACS tests: free loopback ports,
a temporary storage folder, a generated configuration with authentication on and one test
user. Debian's own service is not used: ``Orthanc config.json`` runs as a child process."""

from __future__ import annotations

import contextlib
import json
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


class Orthanc:
    """One Orthanc process; ``url`` is its DICOMweb root."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="medcls-orthanc-"))
        self.http_port, self.dicom_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.url = self.base + "/dicom-web"
        self.user, self.password = USER, PASSWORD
        self.proc: subprocess.Popen | None = None
        config = {
            "Name": "MEDCLS-TEST", "DicomAet": "MEDCLSTEST",
            "StorageDirectory": str(self.dir / "db"), "IndexDirectory": str(self.dir / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "StorageCompression": False, "SaveJobs": False, "HttpTimeout": 30,
        }
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

    def start(self, timeout: float = 30) -> "Orthanc":
        self._log = open(self.dir / "orthanc.log", "w")
        self.proc = subprocess.Popen([orthanc_binary(), str(self.dir / "config.json")],
                                     cwd=self.dir, stdout=self._log, stderr=subprocess.STDOUT)
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
