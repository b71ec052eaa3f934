"""The DICOM listener (`python -m medcls listen`, medcls.integrations.dicomnode) against a real
Orthanc (Debian's, loopback-only and strict, tests/orthanc.py) and real pynetdicom senders.

Orthanc routes series to the listener (its DicomModalities, and a Lua OnStableSeries script or
the REST call /modalities/{id}/store); the listener runs as its own process, answers each series
with the site's model and stores the SR and Secondary Capture back in the same study. The queue
lives in the audit trail's database: SQLite, and PostgreSQL for the kill-and-restart run."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from appserver import free_port, wait_for
from conftest import PROJECT_ROOT, require
from dicom_factory import copy_series
from pydicom.uid import generate_uid

NODE_AET, SCU_AET = "MEDCLSNODE", "TESTSCU"
SAMPLE_NAME, SAMPLE_ID = "Doe^John", "0123"  # the MPRAGE series' sample patient tags
MR_IMAGE, RAW_DATA = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.66"

#: Orthanc's routing rule (the README's): every stable series that is not a MedCLS result goes
#: to the listener, in one association (so its release ends the series at once).
ROUTING_LUA = """
function OnStableSeries(seriesId, tags, metadata)
  local description = tags['SeriesDescription'] or ''
  if tags['Modality'] == 'SR' or string.sub(description, 1, 6) == 'MedCLS' then
    return
  end
  RestApiPost('/modalities/medcls/store',
              '{"Resources": ["' .. seriesId .. '"], "Asynchronous": true, "Permissive": true}')
end
"""


# ----------------------------------------------------------------------------- helpers

def queue_rows(url: str) -> list[dict]:
    from medcls.integrations.dicomnode.jobs import open_queue

    return open_queue(url).rows()


def scu(port: int, calling: str = SCU_AET, called: str = NODE_AET, contexts=(MR_IMAGE,)):
    """A pynetdicom association to the listener (the caller releases it)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    for uid in contexts:  # a SOP class, or (SOP class, transfer syntax)
        uid, syntax = (uid, None) if isinstance(uid, str) else uid
        ae.add_requested_context(uid, [syntax] if syntax else
                                 [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


def echo_ok(port: int, called: str = NODE_AET) -> bool:
    assoc = scu(port, called=called)
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        if assoc.is_established:
            assoc.release()


def store_all(port: int, datasets, calling: str = SCU_AET, called: str = NODE_AET) -> list[int]:
    """C-STORE each dataset (or file path, sent as its raw bytes) in one association; the statuses."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import _config

    metas = [d.file_meta if isinstance(d, pydicom.Dataset) else read_file_meta_info(d)
             for d in datasets]
    pairs = {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}
    assoc = scu(port, calling, called, contexts=sorted(pairs))
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # a path goes as its bytes, undecoded
    try:
        return [assoc.send_c_store(d).Status for d in datasets]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


class Node:
    """``python -m medcls -v listen`` as its own process (DEBUG log kept for the PHI checks)."""

    def __init__(self, tmp: Path, db_url: str, models: Path, pacs_env: dict, aet: str = NODE_AET,
                 **listener):
        self.port, self.aet, self.db_url, self.tmp = free_port(), aet, db_url, tmp
        self.log = tmp / f"listener-{aet}.log"
        self.spool = tmp / f"spool-{aet}"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("MEDCLS_")},
                    "MEDCLS_DATABASE_URL": db_url, "MEDCLS_MODELS": str(models.parent),
                    "MEDCLS_LISTENER_MODELS": models.name, "MEDCLS_LISTENER_AE_TITLE": aet,
                    "MEDCLS_LISTENER_PORT": str(self.port),
                    "MEDCLS_LISTENER_ACCEPT_FROM": f"MEDCLSTEST,{SCU_AET}",
                    "MEDCLS_LISTENER_WHOLE_SERIES_FROM": "MEDCLSTEST",
                    "MEDCLS_LISTENER_SPOOL": str(self.spool), "MEDCLS_LISTENER_QUIET_S": "3",
                    "MEDCLS_LISTENER_BACKOFF_S": "0.5", "TF_CPP_MIN_LOG_LEVEL": "2", **pacs_env,
                    **{f"MEDCLS_LISTENER_{k.upper()}": str(v) for k, v in listener.items()}}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "Node":
        out = open(self.log, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "medcls", "-v", "listen"],
                                     cwd=PROJECT_ROOT, env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT)
        out.close()
        wait_for(lambda: self.alive() and echo_ok(self.port, self.aet), timeout, "the listener to answer C-ECHO")
        return self

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the listener exited ({self.proc.returncode}): {self.text()[-3000:]}")
        return True

    def warm(self, timeout: float = 240) -> None:
        wait_for(lambda: self.alive() and "model(s) ready" in self.text(), timeout,
                 "the listener's models to load")

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def jobs_by_series(url: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in queue_rows(url):
        out.setdefault(r["series_uid"], []).append(r)
    return out


def sr_and_sc(client, study: str) -> tuple[list, list]:
    """The MedCLS SR and capture instances in ``study`` (read back by WADO-RS)."""
    sr, sc = [], []
    for s in client.search_series(study):
        if s.description.startswith("MedCLS"):
            objs = [pydicom.dcmread(io.BytesIO(i.data)) for i in client.iter_series(study, s.series_uid)]
            (sr if s.modality == "SR" else sc).extend(objs)
    return sr, sc


def sr_source_series(sr) -> set[str]:
    return {str(s.SeriesInstanceUID) for item in sr.CurrentRequestedProcedureEvidenceSequence
            for s in item.ReferencedSeriesSequence}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def node_port():
    return free_port()


@pytest.fixture(scope="module")
def routing_orthanc(node_port):
    """An Orthanc that routes every stable series to the listener by Lua (as the README says)."""
    from orthanc import Orthanc

    server = Orthanc(modalities={"medcls": (NODE_AET, node_port)}, lua=ROUTING_LUA,
                     stable_age=1).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def node(tmp_path_factory, routing_orthanc, node_port, brain_model_dir):
    """The module's listener: SQLite queue, results by STOW-RS to the routing Orthanc."""
    tmp = tmp_path_factory.mktemp("listener")
    n = Node(tmp, f"sqlite:///{tmp / 'audit.sqlite'}", brain_model_dir, routing_orthanc.env())
    n.port = node_port
    n.env["MEDCLS_LISTENER_PORT"] = str(node_port)
    n.start()
    yield n
    n.stop()


# ----------------------------------------------------------------------------- fast: no listener process

def test_settings_section_and_refusal_without_senders(tmp_path):
    from medcls.core.errors import ListenerError, SettingsError
    from medcls.core.settings import load_settings
    from medcls.integrations.dicomnode.service import Listener

    s = load_settings({"MEDCLS_LISTENER_PORT": "4104"},
                      {"listener": {"ae_title": "AI_NODE", "accept_from": ["PACS1", "CT SCANNER"],
                                    "quiet_s": 2.5, "spool_budget_mb": 64}})
    cfg = s.listener
    assert (cfg.ae_title, cfg.port, cfg.bind, cfg.accept_from, cfg.quiet_s, cfg.spool_budget_mb) == (
        "AI_NODE", 4104, "127.0.0.1", ("PACS1", "CT SCANNER"), 2.5, 64.0)
    for bad in ({"MEDCLS_LISTENER_AE_TITLE": "A" * 17}, {"MEDCLS_LISTENER_PORT": "70000"},
                {"MEDCLS_LISTENER_ACCEPT_FROM": "OK,B@D"}, {"MEDCLS_LISTENER_QUIET_S": "0"}):
        with pytest.raises(SettingsError, match="listener|LISTENER"):
            load_settings(bad, {})
    with pytest.raises(ListenerError, match="accept_from"):
        Listener(load_settings({"MEDCLS_LISTENER_SPOOL": str(tmp_path / "s")}, {}))


def test_the_incoming_page_needs_the_reviewer_role():
    from medcls.core.access import User, may

    assert not may(User("c@h.test", "clinician"), "incoming")
    assert may(User("r@h.test", "reviewer"), "incoming") and may(User("a@h.test", "admin"), "incoming")


def test_spool_is_private_bounded_and_crash_safe(tmp_path, mprage_files):
    from medcls.integrations.dicomnode.spool import Spool

    old = os.umask(0o002)  # a permissive umask changes nothing
    try:
        root = tmp_path / "spool"
        root.mkdir(mode=0o755)  # made open by hand: closed before use
        data = mprage_files[0].read_bytes()
        spool = Spool(root, budget_bytes=2 * len(data) + 10)
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert spool.write("1.2.3", "1.2.3.1", data) and spool.write("1.2.3", "1.2.3.2", data)
        assert spool.write("1.2.3", "1.2.3.2", data)  # the same instance again: one copy
        assert not spool.write("1.2.3", "1.2.3.3", data)  # over the budget: refused, not written
        files = spool.files("1.2.3")
        assert len(files) == 2 and spool.used == 2 * len(data)
        for p in [*files, files[0].parent, root / "series", root / "results"]:
            assert stat.S_IMODE(p.stat().st_mode) in (0o600, 0o700), p
            assert "1.2.3" not in p.name  # files are named by hashes, never by UIDs
        (files[0].parent / "x.dcm.part").write_bytes(b"half")  # a crash mid-write
        again = Spool(root, budget_bytes=10 * len(data))
        assert again.used == 2 * len(data) and not list(root.rglob("*.part"))
        again.remove("1.2.3")
        assert again.used == 0 and again.files("1.2.3") == []
    finally:
        os.umask(old)


def test_routing_by_modality_body_part_and_the_cards_scope(data_dir, brain_model_dir):
    """The site's brain model takes MR brain series inside its validated scope; everything else
    gets its reason in words (real headers from the shared DICOM files)."""
    from medcls.integrations.dicomnode.routing import Router, site_models

    router = Router(site_models(brain_model_dir.parent, [brain_model_dir.name]))
    dicom = require(data_dir / "dicom")

    def headers(folder):
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((dicom / folder).glob("*"))
                if p.is_file() and p.suffix in ("", ".dcm") and "LICENSE" not in p.name]

    mprage = headers("mprage-series")
    route = router.route(mprage[0])
    assert route.model is not None and route.model.folder == brain_model_dir
    assert router.scope(route.model, mprage) is None
    flair = headers("volunteer2-axial-flair")
    note = router.scope(router.route(flair[0]).model, flair)
    assert note and "FLAIR" in note and "T1-weighted" in note
    sagittal = headers("volunteer2-sagittal-t1")
    note = router.scope(router.route(sagittal[0]).model, sagittal)
    assert note and "sagittal" in note and "axial" in note
    ct = pydicom.dcmread(dicom / "wg04" / "CT1_J2KR.dcm", stop_before_pixels=True)
    assert router.route(ct).model is None
    assert router.route(ct).reason.startswith("No model of this site answers CT series")
    chest = mprage[0].copy()
    chest.BodyPartExamined = "CHEST"
    assert "body part CHEST" in router.route(chest).reason
    ours = mprage[0].copy()
    ours.Manufacturer = "MedCLS"
    assert "own results" in router.route(ours).reason


@pytest.fixture()
def queue_url(audit_url):
    """The audit trail's database (SQLite, then PostgreSQL), the queue's tables dropped after."""
    yield audit_url
    import sqlalchemy as sa

    from medcls.integrations.dicomnode import jobs

    engine = sa.create_engine(audit_url.replace("postgresql://", "postgresql+psycopg://"))
    jobs.metadata.drop_all(engine)
    engine.dispose()


def test_queue_is_durable_and_answers_once(queue_url):
    """Job states on SQLite and PostgreSQL: a series is one job per model version; instances of
    an answered series are repeats; a restart answers an interrupted job again without any audit
    row of it, and sends kept results; the back-off; a person's retry."""
    from medcls.core.errors import ListenerError
    from medcls.integrations.audit.store import Answer, AuditStore
    from medcls.integrations.dicomnode import jobs as J
    from medcls.integrations.dicomnode.jobs import JobQueue

    store = AuditStore(queue_url)
    q = JobQueue(store, NODE_AET)
    with q.lock:
        a, joins = q.open_job("1.2.3", "1.2", "m 1 sha256-x", "m", "MR", 3, "PACS")
        q.count(a, True)
        assert joins and q.open_job("1.2.3", "1.2", "m 1 sha256-x", "m", "MR", 3, "PACS") == (a, True)
        q.count(a, True)
        b, _ = q.open_job("1.2.4", "1.2", J.NO_MODEL, None, "CT", 4, "PACS", "No model for CT.")
        q.count(b, True)
    assert q.complete([a]) == [(a, J.READY, "1.2.3")]
    assert q.complete_quiet(0.0) == [(b, J.NOT_ANSWERED, "1.2.4")]
    assert q.job(b)["state"] == J.NOT_ANSWERED and q.job(b)["reason"] == "No model for CT."
    job = q.claim()
    assert job["id"] == a and job["state"] == J.ANSWERING and job["n_instances"] == 2
    assert q.claim() is None
    # a late instance of a series being answered is a repeat, never a second job
    with q.lock:
        assert q.open_job("1.2.3", "1.2", "m 1 sha256-x", "m", "MR", 3, "PACS") == (a, False)
    # killed while answering: answered again after the restart (nothing of it was recorded)
    assert JobQueue(store, NODE_AET).resume() == 1 and q.job(a)["state"] == J.READY
    job = q.claim()
    answer = Answer(user="listener", page="listener", model_name="m", model_version="1",
                    model_sha256="x", predicted="no_tumor", confidence=0.9,
                    probabilities={"no_tumor": 0.9, "glioma": 0.1}, low_confidence=False,
                    withheld=False, input_source="pacs", sop_instance_uid="1.2.3.1")
    q.answered(a, [answer, answer], ["9.9.1", "9.9.2"], "not_seen", "no_tumor", 0.9, "answered")
    assert len(store.rows("answers")) == 2
    # the send fails: back-off, then failed after the retries
    assert q.send_failed(a, "PACS down", retries=1, backoff_s=0.2)
    row = q.job(a)
    assert row["state"] == J.SENDING and "next attempt in" in row["reason"]
    assert q.claim() is None  # not due yet
    time.sleep(0.3)
    assert q.claim()["id"] == a
    assert not q.send_failed(a, "PACS down", retries=1, backoff_s=0.2)
    assert q.job(a)["state"] == J.FAILED and "Not sent after 2 attempt(s)" in q.job(a)["reason"]
    # a restart never answers a failed job; a person's retry sends the kept results
    assert JobQueue(store, NODE_AET).resume() == 0
    assert q.retry(a) == J.SENDING
    with pytest.raises(ListenerError, match="Only a failed"):
        q.retry(a)
    assert q.claim()["id"] == a
    q.sent(a)
    assert q.job(a)["state"] == J.SENT and len(store.rows("answers")) == 2
    # a series whose instances were refused (spool full) fails as incomplete; no retry of it
    with q.lock:
        c, _ = q.open_job("1.2.5", "1.2", "m 1 sha256-x", "m", "MR", 5, "PACS")
        q.count(c, True)
        q.count(c, False)
    q.complete([c])
    assert q.job(c)["state"] == J.FAILED and "1 of 2 instance(s) were refused" in q.job(c)["reason"]
    with pytest.raises(ListenerError, match="incomplete"):
        q.retry(c)
    # the same series sent again reopens it
    with q.lock:
        assert q.open_job("1.2.5", "1.2", "m 1 sha256-x", "m", "MR", 5, "PACS") == (c, True)
    assert q.job(c)["state"] == J.RECEIVING and q.job(c)["n_refused"] == q.job(c)["n_instances"] == 0
    store.dispose()


# ----------------------------------------------------------------------------- Orthanc, strict

def test_orthanc_is_loopback_only_and_strict(routing_orthanc, mprage_files):
    """The test PACS listens on 127.0.0.1 only (HTTP and DICOM) and stores by C-STORE only from
    the modalities it knows, called by its own AE title."""
    from orthanc import listening_addresses
    from pynetdicom import AE

    addresses = listening_addresses(routing_orthanc.proc.pid)
    assert {p for _, p in addresses} >= {routing_orthanc.http_port, routing_orthanc.dicom_port}
    assert {a for a, _ in addresses} == {"127.0.0.1"}
    ds = pydicom.dcmread(mprage_files[0])
    for calling, called in (("STRANGER", routing_orthanc.aet), (NODE_AET, "NOTORTHANC")):
        ae = AE(ae_title=calling)
        ae.add_requested_context(MR_IMAGE)
        assoc = ae.associate("127.0.0.1", routing_orthanc.dicom_port, ae_title=called)
        if assoc.is_established:  # Orthanc may accept and refuse the store instead
            status = assoc.send_c_store(ds)
            assoc.release()
            assert status.Status != 0, (calling, called)
        else:
            assert assoc.is_rejected or assoc.is_aborted, (calling, called)
    assert routing_orthanc.rest("GET", "/instances") == []


# ----------------------------------------------------------------------------- the listener

def test_series_routed_by_orthanc_is_answered_in_the_same_study(node, routing_orthanc,
                                                                mprage_files, brain_predictor,
                                                                data_dir):
    """The 24-slice MPRAGE series stored in Orthanc is routed by its Lua OnStableSeries rule to
    the listener, answered as the series view answers it, and its SR and Secondary Capture
    appear in the same study: read back with highdicom and pydicom and checked; one audit row
    per answered instance; no patient data in the listener's log."""
    from medcls.engine.series import answer_series, series_verdict
    from medcls.integrations.audit.store import AuditStore
    from medcls.integrations.pacs.client import PacsClient
    from medcls.integrations.pacs.records import ModelIdentity
    from medcls.integrations.pacs.results import read_sr
    from medcls.io.dicom_tags import identifying_attributes
    from medcls.io.gather import gather
    from medcls.io.sources import bytes_source

    client = PacsClient(routing_orthanc.settings())
    datasets = [pydicom.dcmread(p) for p in mprage_files]
    study, series = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    client.store(datasets)  # the scanner's series reaches the PACS; the PACS does the rest
    job = wait_for(lambda: next((j for j in queue_rows(node.db_url) if j["series_uid"] == series
                                 and j["state"] in ("sent", "failed", "not_answered")), None),
                   300, "the MPRAGE series to be answered and sent")
    assert job["state"] == "sent", job["reason"]
    assert job["n_instances"] == 24 and job["n_refused"] == 0 and job["calling_ae"] == "MEDCLSTEST"
    assert job["n_answered"] == 24 and job["sent_at"] >= job["last_instance_at"]

    sr, sc = sr_and_sc(client, study)
    assert len(sr) == 1 and len(sc) == 1
    sr, sc = sr[0], sc[0]
    # the listener's answer is the series view's answer on the same files
    local = answer_series(brain_predictor, gather(
        [bytes_source(f"f{i}", p.read_bytes()) for i, p in enumerate(mprage_files)]).series[0])
    verdict = series_verdict(local)
    (group,) = read_sr(sr)
    model = ModelIdentity.of(brain_predictor)
    assert group["class"] == verdict.label == job["answer_label"] == "no_tumor"
    assert group["probability"] == pytest.approx(verdict.probability, abs=1e-6)
    assert group["algorithm"] == {"name": model.name, "version": model.version,
                                  "parameters": [f"sha256={model.sha256}"]}
    assert group["roi"] is False and group["area_mm2"] is None  # no tumour: no region
    assert sr_source_series(sr) == {series}
    evidence = {str(r.ReferencedSOPInstanceUID) for item in sr.CurrentRequestedProcedureEvidenceSequence
                for s in item.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert evidence == {str(d.SOPInstanceUID) for d in datasets}
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == study
    assert sr.PatientID == sc.PatientID == SAMPLE_ID and sr.SeriesInstanceUID != series
    assert sr.ContentQualification == sc.ContentQualification == "RESEARCH"
    assert "not for diagnosis" in sc.ImageComments and sc.BurnedInAnnotation == "YES"
    assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in evidence
    assert sc.pixel_array.ndim == 3 and sc.pixel_array.shape[2] == 3
    # Orthanc's rule does not route the results back, and the series is answered once; the
    # same objects stored again (a send resumed after a crash) stay one copy in the PACS
    client.store([sr, sc])
    time.sleep(3)
    assert [j["series_uid"] for j in queue_rows(node.db_url)].count(series) == 1
    assert [len(x) for x in sr_and_sc(client, study)] == [1, 1]
    # the audit trail: one row per answered instance, keyed by its SOP Instance UID's SHA-256
    # (as the PACS review keys them: UIDs embed the examination's date and time)
    from medcls.integrations.pacs.review import audit_key

    rows = [r for r in AuditStore(node.db_url).rows("answers") if r["page"] == "listener"]
    assert sorted(r["sop_instance_uid"] for r in rows) == sorted(audit_key(u) for u in evidence)
    assert all(r["user"] == f"listener {NODE_AET}" and r["series_outcome"] == "not_seen"
               for r in rows)
    sends = [r for r in AuditStore(node.db_url).rows("exports") if r["page"] == "listener"
             and str(sr.SOPInstanceUID) in (r["target"] or "")]
    assert len(sends) == 1 and sends[0]["kind"] == "pacs-send" and sends[0]["n_answers"] == 24
    # no identifying value of the 24 files in the listener's DEBUG log
    log_text = node.text()
    needles = {v.strip() for p in mprage_files for v in identifying_attributes(p).values()
               if len(v.strip()) >= 4}
    assert study in needles and [n for n in needles if n in log_text] == []
    assert SAMPLE_NAME not in log_text and "Doe" not in log_text


def test_refusals_get_their_dicom_status_and_the_listener_keeps_serving(node, data_dir,
                                                                        routing_orthanc, tmp_path):
    """An unknown AE title, a wrong called AE title, a malformed instance, missing UIDs, a
    non-image SOP class: each its DICOM status; a CT series and a FLAIR series (outside the
    card's validated sequences) are received and recorded "not answered: reason", nothing is
    sent; the listener answers C-ECHO after all of it, and the volunteer's real name never
    reaches its log."""
    from dicom_factory import new_dataset
    from pynetdicom import AE

    from medcls.integrations.dicomnode import receiver as R
    from medcls.integrations.pacs.client import PacsClient

    # associations: unknown calling AE, wrong called AE -> A-ASSOCIATE-RJ with the reason
    for calling, called, reason in (("STRANGER", NODE_AET, 0x03), (SCU_AET, "SOMEONE", 0x07)):
        ae = AE(ae_title=calling)
        ae.add_requested_context(MR_IMAGE)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=called)
        assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == reason
    mprage = sorted(require(data_dir / "dicom" / "mprage-series").glob("*.dcm"))
    # a malformed instance: valid file meta, a data set that cannot be decoded
    good = pydicom.dcmread(mprage[0])
    good.SOPInstanceUID = good.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    broken = tmp_path / "broken.dcm"
    good.save_as(broken)
    raw = broken.read_bytes()
    body = raw.index(b"\x08\x00\x05\x00") if b"\x08\x00\x05\x00" in raw else 200
    broken.write_bytes(raw[:body + 8] + b"\x10\x00\x10\x00PN\xff\x7f" + os.urandom(64))
    # an image without its series UID
    no_uid = pydicom.dcmread(mprage[1])
    no_uid.SOPInstanceUID = no_uid.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del no_uid.SeriesInstanceUID
    raw_data = new_dataset(sop_class=RAW_DATA, modality="MR")
    raw_data.StudyInstanceUID, raw_data.SeriesInstanceUID = generate_uid(), generate_uid()
    statuses = store_all(node.port, [broken, no_uid, raw_data])
    assert statuses == [R.CANNOT_UNDERSTAND, R.DOES_NOT_MATCH, R.SOP_CLASS_NOT_SUPPORTED]
    # another modality: received, not answered, with the reason
    ct = pydicom.dcmread(require(data_dir / "dicom" / "wg04" / "CT1_J2KR.dcm"))
    flair_files = sorted(require(data_dir / "dicom" / "volunteer2-axial-flair").glob("*.dcm"))
    flair = [pydicom.dcmread(p) for p in flair_files]
    assert store_all(node.port, [ct]) == [R.SUCCESS]
    assert set(store_all(node.port, flair)) == {R.SUCCESS}
    done = {}
    for name, uid in (("ct", ct.SeriesInstanceUID), ("flair", flair[0].SeriesInstanceUID)):
        done[name] = wait_for(lambda uid=uid: next(
            (j for j in queue_rows(node.db_url) if j["series_uid"] == str(uid)
             and j["state"] not in ("receiving", "ready", "answering")), None), 120, name)
    assert done["ct"]["state"] == "not_answered" and done["ct"]["model_key"] == "none"
    assert done["ct"]["reason"].startswith("No model of this site answers CT series")
    assert done["flair"]["state"] == "not_answered" and done["flair"]["n_instances"] == 30
    assert "FLAIR" in done["flair"]["reason"] and "T1-weighted" in done["flair"]["reason"]
    # nothing was sent for them, and their instances left the spool
    client = PacsClient(routing_orthanc.settings())
    for uid in (ct.StudyInstanceUID, flair[0].StudyInstanceUID):
        assert client.search_series(str(uid), modality="SR") == []
    assert not list((node.spool / "series").glob("*/*.dcm"))
    # still serving; the log has the statuses and never the volunteer's identity
    assert echo_ok(node.port)
    text = node.text()
    assert "0xC210" in text and "0xA900" in text and "0x0122" in text and "STRANGER" in text
    ident = {str(flair[0].PatientName), str(flair[0].get("PatientBirthDate", ""))} - {""}
    for part in {p for v in ident for p in str(v).replace("^", " ").split() if len(p) >= 4}:
        assert part not in text


@pytest.fixture()
def fresh_pg(pg_url):
    """A new, empty PostgreSQL database on the session's server (dropped after)."""
    import psycopg

    name = f"listener_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    admin = pg_url.replace("postgresql://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield pg_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_killed_mid_run_and_restarted_answers_every_series_once(fresh_pg, tmp_path, mprage_files,
                                                                brain_model_dir):
    """Five series routed back-to-back by Orthanc's REST /modalities/{id}/store; the listener
    (queue on PostgreSQL) is killed (SIGKILL) after the first is sent and before the last, then
    started again: every series is answered and sent exactly once (one SR and one capture per
    series in the PACS, one job each, one audit row per instance)."""
    from orthanc import Orthanc

    from medcls.integrations.audit.store import AuditStore
    from medcls.integrations.pacs.client import PacsClient

    port = free_port()
    pacs = Orthanc(modalities={"medcls": ("MEDCLSNODE2", port)}).start()
    try:
        node = Node(tmp_path, fresh_pg, brain_model_dir, pacs.env(), aet="MEDCLSNODE2")
        node.port = port
        node.env["MEDCLS_LISTENER_PORT"] = str(port)
        node.start()
        node.warm()
        client = PacsClient(pacs.settings())
        shared_study = generate_uid()  # two series share a study: one SR each, not one per study
        runs = [copy_series(mprage_files, shared_study if i < 2 else None) for i in range(5)]
        for r in runs:
            client.store(r)
        series = [str(r[0].SeriesInstanceUID) for r in runs]
        for uid in series:
            (found,) = pacs.rest("POST", "/tools/lookup", uid.encode())
            pacs.rest("POST", "/modalities/medcls/store", {"Resources": [found["ID"]],
                                                           "Asynchronous": True})

        def mid_run():
            jobs = jobs_by_series(fresh_pg)
            states = [j["state"] for js in jobs.values() for j in js]
            return (len(jobs) == 5 and "receiving" not in states
                    and 1 <= states.count("sent") < 5) and states
        states = wait_for(mid_run, 300, "the run to be half done", every=0.1)
        node.stop(kill=True)
        assert node.proc.returncode == -signal.SIGKILL
        node.start()
        wait_for(lambda: all(js[0]["state"] == "sent" for js in jobs_by_series(fresh_pg).values()),
                 400, "every series to be sent after the restart")
        assert "job(s) resumed" in node.text()
        jobs = jobs_by_series(fresh_pg)
        assert sorted(jobs) == sorted(series) and all(len(js) == 1 for js in jobs.values())
        assert all(js[0]["n_instances"] == 24 and js[0]["n_repeats"] == 0 for js in jobs.values())
        # exactly one SR and one capture per series, each in its own study
        for r, uid in zip(runs, series):
            study = str(r[0].StudyInstanceUID)
            srs, scs = sr_and_sc(client, study)
            mine = [sr for sr in srs if sr_source_series(sr) == {uid}]
            assert len(mine) == 1, (states, len(srs))
            assert len([sc for sc in scs if str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
                        in {str(d.SOPInstanceUID) for d in r}]) == 1
        # one audit row per answered instance: nothing answered twice
        rows = [x["sop_instance_uid"] for x in AuditStore(fresh_pg).rows("answers")]
        assert len(rows) == 5 * 24 and len(set(rows)) == 5 * 24
        node.stop()
    finally:
        pacs.cleanup()


def test_full_spool_and_a_failed_send_retried_from_the_page(tmp_path, mprage_files,
                                                            brain_model_dir, monkeypatch):
    """A listener with a 1 MB spool sending its results by C-STORE to a PACS that is down: the
    instances past the budget are refused with 0xA700 and the series fails as incomplete (no
    retry: the PACS must send it again); a small series is answered, its send retried with
    back-off and failed; on the Incoming page a reviewer presses Retry once the PACS is back,
    and the results arrive by C-STORE (from a modality the strict PACS knows)."""
    from orthanc import Orthanc
    from streamlit.testing.v1 import AppTest

    from medcls.integrations.dicomnode import receiver as R
    from medcls.integrations.pacs.client import PacsClient

    port = free_port()
    pacs = Orthanc(modalities={"medcls": ("MEDCLSNODE3", port)}).start()
    pacs.stop()  # down when the results are first sent
    db = f"sqlite:///{tmp_path / 'audit.sqlite'}"
    try:
        node = Node(tmp_path, db, brain_model_dir, {}, aet="MEDCLSNODE3", spool_mb=1,
                    send_retries=1, store_ae=f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}")
        node.port = port
        node.env["MEDCLS_LISTENER_PORT"] = str(port)
        node.env["MEDCLS_LISTENER_SPOOL_MB"] = "1"
        node.start()
        big = copy_series(mprage_files)
        statuses = store_all(port, big, called="MEDCLSNODE3")
        kept = statuses.count(R.SUCCESS)
        assert 0 < kept < 24 and set(statuses) == {R.SUCCESS, R.OUT_OF_RESOURCES}
        assert statuses == sorted(statuses)  # refused from the first that did not fit
        # the spool is private while it holds them
        spool = node.spool
        assert stat.S_IMODE(spool.stat().st_mode) == 0o700
        held = list((spool / "series").glob("*/*.dcm"))
        assert len(held) == kept and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in held)
        assert echo_ok(port, "MEDCLSNODE3")  # still serving
        big_uid = str(big[0].SeriesInstanceUID)
        incomplete = wait_for(lambda: next((j for j in queue_rows(db) if j["series_uid"] == big_uid
                                            and j["state"] == "failed"), None), 60, "incomplete")
        assert f"{24 - kept} of 24 instance(s) were refused" in incomplete["reason"]
        wait_for(lambda: not list((spool / "series").glob("*/*.dcm")), 30, "the spool to be freed")
        # a small series fits; its send fails twice (the PACS is down), then it is failed
        small = copy_series(mprage_files[10:14])
        assert store_all(port, small, called="MEDCLSNODE3") == [R.SUCCESS] * 4
        small_uid = str(small[0].SeriesInstanceUID)
        failed = wait_for(lambda: next((j for j in queue_rows(db) if j["series_uid"] == small_uid
                                        and j["state"] == "failed"), None), 300, "the failed send")
        assert "Not sent after 2 attempt(s)" in failed["reason"] and failed["result_uids"]
        assert failed["n_answered"] == 4
        # the Incoming page: health, the queue, both failures; Retry on the failed send
        pacs.start()
        monkeypatch.setenv("MEDCLS_DATABASE_URL", db)
        monkeypatch.syspath_prepend(str(PROJECT_ROOT))
        at = AppTest.from_file(str(PROJECT_ROOT / "pages" / "6_Incoming.py"),
                               default_timeout=120).run()
        assert not at.exception, [e.value for e in at.exception]
        text = "\n".join(str(e.value) for kind in ("success", "error", "info", "caption", "markdown")
                         for e in getattr(at, kind))
        assert "Up since" in text and "MEDCLSNODE3" in text and "from TESTSCU" in text
        table = at.dataframe[0].value
        assert set(table["state"]) == {"failed"} and len(table) == 2
        assert any(r.startswith("Incomplete: ") for r in table["reason"])
        assert [m.value for m in at.metric if m.label == "Failed"] == ["2"]
        at.selectbox(key="incoming_failed").set_value(failed["id"])
        at.button(key="incoming_retry").click().run()
        assert any("Queued again" in s.value for s in at.success), [e.value for e in at.error]
        sent = wait_for(lambda: next((j for j in queue_rows(db) if j["series_uid"] == small_uid
                                      and j["state"] == "sent"), None), 120, "the retried send")
        srs, scs = sr_and_sc(PacsClient(pacs.settings()), str(small[0].StudyInstanceUID))
        assert len(srs) == 1 and len(scs) == 1 and sr_source_series(srs[0]) == {small_uid}
        assert {str(srs[0].SOPInstanceUID), str(scs[0].SOPInstanceUID)} == set(sent["result_uids"].split())
        # the incomplete series cannot be retried: the page says why
        at.selectbox(key="incoming_failed").set_value(incomplete["id"])
        at.button(key="incoming_retry").click().run()
        assert any("send it again" in e.value for e in at.error)
        node.stop()
    finally:
        pacs.cleanup()


@pytest.mark.browser
def test_incoming_page_in_the_browser(node, routing_orthanc, data_dir, app_server, chromium):
    """The Incoming page in Chromium against the module's running listener: its health, the
    queue with a sent series (its latency) and a series not answered with its reason; no
    patient data on the screen."""
    import shutil

    from appserver import OUTPUT

    from medcls.integrations.pacs.client import PacsClient

    if not any(j["state"] == "sent" for j in queue_rows(node.db_url)):  # run on its own
        run = copy_series(sorted(require(data_dir / "dicom" / "mprage-series").glob("*.dcm")))
        PacsClient(routing_orthanc.settings()).store(run)
    ct = pydicom.dcmread(require(data_dir / "dicom" / "wg04" / "CT1_J2KR.dcm"))
    ct.SeriesInstanceUID, ct.SOPInstanceUID = generate_uid(), generate_uid()
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    assert store_all(node.port, [ct]) == [0]
    wait_for(lambda: {"sent", "not_answered"} <= {j["state"] for j in queue_rows(node.db_url)},
             300, "a sent and a not-answered series")
    srv = app_server(MEDCLS_DATABASE_URL=node.db_url)
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(srv.url + "/Incoming", timeout=180_000)
    page.get_by_text("Up since").first.wait_for(timeout=180_000)
    page.get_by_text("Last instance to results in the PACS: median").wait_for(timeout=60_000)
    page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(OUTPUT / "incoming.png"), full_page=True)
    body = page.inner_text("body")
    assert "Traceback" not in body and f"{NODE_AET} on 127.0.0.1" in body
    assert f"from {SCU_AET}" in body or "from MEDCLSTEST" in body  # the last association
    assert "Not answered" in body and "Sent" in body
    if os.environ.get("MEDCLS_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(OUTPUT / "incoming.png", PROJECT_ROOT / "docs" / "screenshots" / "incoming.png")
    # the table (a canvas grid): its cells as the page's CSV download would give them
    assert SAMPLE_NAME not in body and "Doe" not in body
    page.close()


def test_the_incoming_pages_words():
    """medcls.integrations.dicomnode.incoming: states in words, latency, reasons, health."""
    from medcls.integrations.dicomnode import incoming

    now = 1_800_000_000.0
    jobs = [
        {"id": 3, "state": "sent", "series_uid": "1.2.3", "first_instance_at": now - 60,
         "last_instance_at": now - 50, "sent_at": now - 47.5, "outcome": "suspected",
         "answer_label": "meningioma", "answer_probability": 0.9321, "answer_state": "answered",
         "model_key": "brain-mri-default 2.0.0 sha256-77116748b3db42e2", "model_folder": "x",
         "modality": "MR", "n_instances": 24},
        {"id": 2, "state": "not_answered", "series_uid": "1.2.4", "first_instance_at": now - 40,
         "reason": "No model of this site answers CT series.", "model_key": "none",
         "model_folder": None, "modality": "CT"},
        {"id": 1, "state": "sending", "series_uid": "1.2.5", "first_instance_at": now - 30,
         "reason": "Attempt 1 failed (down); next attempt in 2 s.", "outcome": "cannot_answer",
         "answer_label": None, "answer_state": "withheld", "model_key": "m", "model_folder": "m"},
    ]
    rows = incoming.job_rows(jobs)
    assert [r["state"] for r in rows] == ["sent to the PACS", "not answered", "sending to the PACS"]
    assert rows[0]["answer"] == "meningioma 93% (answered)" and rows[0]["model"] == "brain-mri-default 2.0.0"
    assert rows[0]["last instance → in PACS (s)"] == 2.5 and rows[0]["series"] != "1.2.3"
    assert rows[1]["reason"] == "No model of this site answers CT series." and rows[1]["model"] == "–"
    assert incoming.reason_text(jobs[1]) == "not answered: No model of this site answers CT series."
    assert rows[2]["answer"] == "no class (withheld)" and "next attempt" in rows[2]["reason"]
    assert incoming.counts(jobs) == {"received": 0, "answering": 1, "sent": 1, "not answered": 1,
                                     "failed": 0}
    assert incoming.latency(jobs).text.startswith("Last instance to results in the PACS: median 2.5 s")
    up = incoming.health_view({"listener": "NODE", "started_at": now - 3600, "heartbeat_at": now - 1,
                               "last_association_at": now - 12, "last_calling_ae": "ORTHANC",
                               "spool_bytes": 512 * 1024 * 1024, "spool_budget": 2048 * 1024 * 1024,
                               "address": "127.0.0.1:11112"}, now)
    assert up.up and up.status.startswith("Up since") and "(60 min ago)" in up.status
    assert up.last_association.endswith("(12 s ago) from ORTHANC")
    assert up.spool == "512.0 of 2048 MB (25%)" and up.spool_fraction == 0.25
    down = incoming.health_view({"listener": "NODE", "started_at": now - 3600,
                                 "heartbeat_at": now - 300}, now)
    assert not down.up and down.status.startswith("Not answering: last heard from")
    assert "none since it started" in down.last_association


def test_listen_command_refuses_to_start_without_senders(monkeypatch, capsys):
    from medcls.cli.main import main

    for k in [k for k in os.environ if k.startswith("MEDCLS_LISTENER_")]:
        monkeypatch.delenv(k)
    with pytest.raises(SystemExit):
        main(["listen", "--port", "70000"])
    assert "invalid port_number value" in capsys.readouterr().err
    assert main(["listen", "--ae-title", "AI_NODE"]) == 2
    err = capsys.readouterr().err
    assert "accepts no sender" in err and "Traceback" not in err
