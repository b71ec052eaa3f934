"""Every service the test suite starts listens on the loopback interface only: the listening
sockets of the processes the suite started (the test process and its descendants, and the Ray
cluster's daemons, which `ray start` detaches) are read from /proc while Orthanc (HTTP and
DICOM), PostgreSQL, the OpenID Connect provider, an app server and a Ray cluster run; any
address beyond 127.0.0.0/8 and ::1 (the wildcard included) fails."""

from __future__ import annotations

import os

import pytest
from oidcserver import oidc_provider
from raycluster import LocalRayCluster, _processes
from sockets import listening, not_loopback, process_tree


def _named(sockets) -> list[str]:
    procs = _processes()
    return [f"{proto} {addr}:{port} ({procs.get(pid, (0, '?'))[1].split(' ')[0].rsplit('/', 1)[-1]})"
            for pid, proto, addr, port in sockets]


@pytest.fixture(scope="module")
def suite_services(orthanc, pg_url, app_server):
    """The suite's services, all running at once."""
    with oidc_provider("http://127.0.0.1:9/oauth2callback") as issuer:
        srv = app_server()
        yield {"orthanc": orthanc, "postgresql": pg_url, "oidc": issuer, "app": srv}


def test_the_suites_services_listen_on_loopback_only(suite_services):
    sockets = listening(process_tree(os.getpid()))
    ports = {port for *_, port in sockets}
    urls = [suite_services["orthanc"].url, suite_services["postgresql"], suite_services["oidc"],
            suite_services["app"].url]
    for url in urls:  # each service was found among the sockets read
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
        assert port in ports, (url, _named(sockets))
    assert not_loopback(sockets) == [], _named(not_loopback(sockets))


@pytest.mark.xfail(strict=True, reason="Ray 2.60's gcs_server and raylet bind the wildcard address "
                   "(::) unless the node's address is exactly 127.0.0.1, which `ray start` "
                   "replaces with the machine's own address in any multi-node cluster (and "
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps it, refuses a second node); "
                   "the nodes run on 127.0.0.2, so the agents bind loopback")
def test_the_ray_cluster_listens_on_loopback_only():
    with LocalRayCluster(nodes=1) as cluster:
        sockets = listening(cluster.pids())
        assert sockets
        assert not_loopback(sockets) == [], _named(not_loopback(sockets))
