"""MedCLS against a real PACS: Debian's Orthanc with its DICOMweb plugin and authentication on
(started once per session by the ``orthanc`` fixture of conftest.py).

The shared DICOM files (the MPRAGE series, the WG04 samples) and a series built from brain-mri
test images are stored by STOW-RS, searched back by QIDO-RS, retrieved by WADO-RS, classified,
and the results (TID 1500 SR, heatmap Secondary Capture) stored and read back."""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import threading
import time

import cv2
import numpy as np
import pydicom
import pytest
from conftest import require
from dicom_factory import new_dataset, to_bytes
from pydicom.uid import generate_uid

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
RAW_DATA = "1.2.840.10008.5.1.4.1.1.66"
SAMPLE_NAME, SAMPLE_ID = "Doe^John", "0123"  # the MPRAGE series' sample patient tags
BUILT_PATIENT, BUILT_DATE, SPACING = "MEDCLS-TEST-7", "20240102", 0.5


def no_sample_phi(text: str) -> None:
    """The MPRAGE sample's name and id appear nowhere in ``text`` (the id as a whole value:
    not as digits inside a UID)."""
    assert "Doe^John" not in text and "Doe" not in text
    assert not re.search(r"(?<![\d.])0123(?![\d.])", text)


def dciodvfy_errors(ds, path) -> None:
    """Validate with dciodvfy (Debian's dicom3tools) when it is installed: no errors."""
    if not shutil.which("dciodvfy"):
        return
    ds.save_as(path)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], (path.name, errors)


# ----------------------------------------------------------------------------- data in the PACS

def pacs_series(built) -> tuple[list[bytes], dict]:
    """The conftest's built tumour series (6 normal, 5 meningioma slices the default model
    answers confidently, 5 normal; 5 mm apart) as one MR series of a study with patient tags,
    0.5 mm pixels, plus a non-image object in the same series."""
    study, series = generate_uid(), generate_uid()
    files = []
    for n, data in enumerate(built.dicom(), start=1):
        ds = _identified(pydicom.dcmread(io.BytesIO(data)), study, series, n)
        ds.PixelSpacing = [SPACING, SPACING]
        files.append(to_bytes(ds))
    raw = _identified(new_dataset(sop_class=RAW_DATA, modality="MR"), study, series, 99)
    files.append(to_bytes(raw))
    return files, {"study": study, "series": series, "n_images": len(built.arrays),
                   "tumour": built.tumour, "tumour_class": built.tumour_class}


def _identified(ds, study, series, number):
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Built", BUILT_PATIENT, "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = BUILT_DATE, "101500", "1", ""
    ds.ReferringPhysicianName, ds.StudyDescription = "", "MedCLS test study"
    ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 2, number, "built from brain-mri"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study])
    return ds


@pytest.fixture(scope="module")
def client(orthanc):
    from medcls.integrations.pacs.client import PacsClient

    return PacsClient(orthanc.settings())


@pytest.fixture(scope="module")
def stored(client, data_dir, built_series):
    """Everything uploaded once by STOW-RS; returns what the tests need to know of it."""
    mprage = sorted(require(data_dir / "dicom" / "mprage-series").glob("*.dcm"))
    wg04 = sorted(require(data_dir / "dicom" / "wg04").glob("*.dcm"))
    built, info = pacs_series(built_series)
    datasets = [pydicom.dcmread(p) for p in mprage + wg04] + \
        [pydicom.dcmread(io.BytesIO(b)) for b in built]
    t = time.perf_counter()
    uids = client.store(datasets)
    info["store_s"] = time.perf_counter() - t
    assert len(uids) == len(datasets)
    info["mprage_study"] = pydicom.dcmread(mprage[0], stop_before_pixels=True).StudyInstanceUID
    info["mprage_sops"] = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in mprage}
    info["built_bytes"] = built
    return info


# ----------------------------------------------------------------------------- search

def test_search_by_patient_id_date_modality_and_description(client, stored):
    found = client.search_studies(patient_id=SAMPLE_ID)
    assert [s.study_uid for s in found] == [stored["mprage_study"]]
    assert found[0].patient_name == SAMPLE_NAME and found[0].n_instances == 24
    assert "MR" in found[0].modalities

    by_date = client.search_studies(date_from="2024-01-01", date_to="2024-01-31")
    assert [s.study_uid for s in by_date] == [stored["study"]]
    assert by_date[0].patient_id == BUILT_PATIENT
    assert client.search_studies(date_from="2024-01-03") == []
    wg04_day = client.search_studies(date_from="20040826", date_to="20040826")
    assert {s.patient_id for s in wg04_day} == {"1CT1", "4MR1", "11RG3"}
    assert {s.patient_id for s in client.search_studies(modality="CR")} == {"11RG3"}
    assert [s.patient_id for s in client.search_studies(description="medcls TEST")] == [BUILT_PATIENT]

    series = client.search_series(stored["study"])
    assert [(s.modality, s.n_instances) for s in series] == [("MR", stored["n_images"] + 1)]


def test_study_not_found(client):
    from medcls.core.errors import StudyNotFoundError
    from medcls.integrations.pacs.review import review_study

    with pytest.raises(StudyNotFoundError, match="no study"):
        client.search_series(generate_uid())
    with pytest.raises(StudyNotFoundError):
        review_study(client, None, generate_uid())


# ----------------------------------------------------------------------------- review and send

@pytest.fixture(scope="module")
def built_review(client, stored, brain_predictor):
    from medcls.integrations.pacs.review import review_study

    return review_study(client, brain_predictor, stored["study"])


def test_series_answer_is_the_series_views_answer_and_the_non_image_is_listed(
        built_review, stored, brain_predictor):
    """The PACS answers a series as the series view does (medcls.engine.series: the aggregation
    rule, the suspicious run, the per-slice strip): the same summary, run and probabilities as
    answer_series on the same files; the coded answer is the run's class, shown on the most
    suspicious slice, with the segmentation's region."""
    from medcls.engine.series import Outcome, answer_series, series_verdict
    from medcls.io.gather import gather
    from medcls.io.sources import bytes_source

    (series,) = built_review.series
    answer = series.answer
    assert len(answer.slices) == stored["n_images"]
    # the non-image object is skipped and listed, with its kind and a reason
    assert [(k.sop_class, "no image" in k.reason) for k in series.skipped] == [("Raw Data Storage", True)]
    # the series view's answer on the very files
    local = answer_series(brain_predictor, gather(
        [bytes_source(f"f{i}.dcm", b) for i, b in enumerate(stored["built_bytes"][:-1])]).series[0])
    assert answer.summary.text == local.summary.text
    assert (answer.summary.run.start, answer.summary.run.stop) == (local.summary.run.start,
                                                                   local.summary.run.stop)
    assert np.allclose(answer.probabilities(), local.probabilities(), atol=1e-5)
    assert series.verdict == series_verdict(local)
    # the suspicious run is where the tumour slices are; the answer is its class
    run = answer.summary.run
    assert answer.summary.outcome == Outcome.SUSPECTED
    assert range(run.start, run.stop) == stored["tumour"]
    assert series.verdict.label == stored["tumour_class"] == "meningioma"
    assert series.driving == answer.summary.most_suspicious and series.driving in stored["tumour"]
    assert int(series.driving_header.InstanceNumber) == series.driving + 1  # body order
    assert series.state == ("answered" if series.verdict.probability >= answer.summary.threshold
                            else "low-confidence")
    # the region: the segmentation companion's outline on the shown slice (the card names one)
    assert brain_predictor.segmenter is not None
    seg = brain_predictor.outline(series.scan, answer.slices[series.driving].prediction)
    assert series.roi is not None and series.roi.source == "segmentation"
    assert series.roi.method == "segmentation"
    assert series.roi.area_mm2 == pytest.approx(seg.area_px * SPACING * SPACING)
    assert series.roi.diameter_mm == pytest.approx(seg.diameter_mm)
    # the volume over the run comes from the segmentation too
    assert answer.volume_method == "segmentation" and answer.volume_mm3 > 0
    assert not built_review.already_sent


def test_send_sr_and_sc_then_read_them_back(client, stored, built_review, brain_predictor,
                                            tmp_path):
    from appserver import OUTPUT

    from medcls.engine.present import class_name, fmt_prob
    from medcls.integrations.pacs.records import ModelIdentity
    from medcls.integrations.pacs.results import BANNER, _with_banner, read_sr, sr_outline
    from medcls.integrations.pacs.review import send_results

    outcome = send_results(client, built_review)
    assert outcome.sent and len(outcome.sop_instance_uids) == 2 and len(outcome.series_uids) == 2

    # query them back (QIDO-RS) and retrieve them (WADO-RS)
    series = {s.modality: s for s in client.search_series(stored["study"])}
    assert set(series) == {"MR", "SR", "OT"}
    sr_ds, = [pydicom.dcmread(io.BytesIO(i.data))
              for i in client.iter_series(stored["study"], series["SR"].series_uid)]
    sc_ds, = [pydicom.dcmread(io.BytesIO(i.data))
              for i in client.iter_series(stored["study"], series["OT"].series_uid)]

    # the SR, read with highdicom
    model = ModelIdentity.of(brain_predictor)
    (group,) = read_sr(sr_ds)
    src = built_review.series[0]
    verdict = src.verdict
    assert group["class"] == verdict.label == "meningioma"
    assert group["probability"] == pytest.approx(verdict.probability, abs=1e-9)
    assert group["state"] == src.state
    assert group["algorithm"] == {"name": model.name, "version": model.version,
                                  "parameters": [f"sha256={model.sha256}"]}
    assert group["roi"] and group["area_unit"] == "mm2" and group["diameter_unit"] == "mm"
    # the region is the segmentation's (the card names a companion): its area and longest
    # diameter replace the heatmap's, and the SR names the method
    assert brain_predictor.card["segmentation"] == "brain-mri-seg"
    seg = brain_predictor.outline(src.scan, src.answer.slices[src.driving].prediction)
    assert group["area_mm2"] == pytest.approx(seg.area_px * SPACING ** 2)
    assert group["area_mm2"] == pytest.approx(seg.area_mm2)
    assert group["diameter_mm"] == pytest.approx(seg.diameter_mm)
    assert group["method"] == group["diameter_method"] == "segmentation"
    heat = src.explanation.region  # the heatmap's area is not what the SR carries
    assert heat is not None and heat.area_mm2 != pytest.approx(group["area_mm2"])
    driving_uid = str(src.driving_header.SOPInstanceUID)
    assert group["referenced_sop_instance_uids"] == [driving_uid]
    evidence = {str(r.ReferencedSOPInstanceUID)
                for item in sr_ds.CurrentRequestedProcedureEvidenceSequence
                for s in item.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert evidence == {str(h.SOPInstanceUID) for h in src.headers}
    assert len(evidence) == stored["n_images"]
    # patient and study identity copied from the source; new series in the same study
    assert sr_ds.PatientID == sc_ds.PatientID == BUILT_PATIENT
    assert sr_ds.StudyInstanceUID == sc_ds.StudyInstanceUID == stored["study"]
    assert sr_ds.ContentQualification == sc_ds.ContentQualification == "RESEARCH"
    assert model.tag in sr_ds.SeriesDescription

    # the SC: research label in text and pixels, the overlay in colour on the slice
    assert "not for diagnosis" in sc_ds.ImageComments and "not for diagnosis" in sc_ds.SeriesDescription
    assert sc_ds.BurnedInAnnotation == "YES"
    assert sc_ds.SourceImageSequence[0].ReferencedSOPInstanceUID == driving_uid
    rgb = sc_ds.pixel_array
    h, w = src.scan.shape
    banner = rgb.shape[0] - round(h * rgb.shape[1] / w)
    assert banner > 20 and (rgb[:banner] > 128).any()  # burned-in text above the image
    image = rgb[banner:].astype(int)
    chroma = image.max(axis=2) - image.min(axis=2)
    x0, y0, x1, y1 = (v * rgb.shape[1] / w for v in src.explanation.region.box)
    inside = chroma[int(y0):int(y1), int(x0):int(x1)]
    assert inside.mean() > 40  # the heatmap colours the region ...
    assert np.median(chroma) < inside.mean() / 2  # ... more than the rest of the slice
    # the banner holds exactly the research label and the answer, rendered as text
    # (the class by its name and the one probability text the series view and the SR use)
    lines = [BANNER, f"MedCLS {model.name} {model.version}: {class_name(None, verdict.label)} "
                     f"{fmt_prob(verdict.probability, 1)} ({src.state})"]
    expected = _with_banner(np.zeros((1, rgb.shape[1], 3), np.uint8), lines)[:-1]
    assert BANNER == "RESEARCH USE - NOT FOR DIAGNOSIS" and np.array_equal(rgb[:banner], expected)

    dciodvfy_errors(sr_ds, tmp_path / "sr.dcm")
    dciodvfy_errors(sc_ds, tmp_path / "sc.dcm")

    # the content tree as people read it (kept for the README)
    outline = sr_outline(sr_ds)
    assert f"Predicted class: {class_name(None, verdict.label)}" in outline and f"sha256={model.sha256}" in outline
    assert "Measurement Method: segmentation" in outline and "Long axis" in outline
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "pacs-sr.txt").write_text(outline + "\n\nread_sr: " + repr(group) + "\n")
    cv2.imwrite(str(OUTPUT / "pacs-sc.png"), rgb[:, :, ::-1])

    # a second send of the same study by the same model version stores nothing
    again = send_results(client, built_review)
    assert not again.sent and again.sop_instance_uids == ()
    assert again.series_uids == (series["SR"].series_uid,)
    assert [s.modality for s in client.search_series(stored["study"])].count("SR") == 1


def test_mprage_review_logs_no_patient_data(client, stored, brain_predictor, data_dir, caplog,
                                            capfd):
    """The sample's name and id never reach the logs or the output, through search, review
    and send (they do reach the SR, which belongs to the PACS)."""
    from medcls.integrations.pacs.review import review_study, send_results
    from medcls.integrations.pacs.workspace import series_rows
    from medcls.io.dicom_tags import identifying_attributes

    caplog.set_level(logging.DEBUG)
    (study,) = client.search_studies(patient_id=SAMPLE_ID)
    review = review_study(client, brain_predictor, study.study_uid)
    (series,) = review.series
    assert len(series.answer.slices) == 24 and series.skipped == []
    assert series_rows(review)[0]["slices"] == 24
    outcome = send_results(client, review)
    assert outcome.sent
    out, err = capfd.readouterr()
    text = caplog.text + out + err + repr(review) + repr(study)
    no_sample_phi(text)
    # nor any other identifying value of the 24 files (dates, descriptions, UIDs ...)
    needles = {v.strip() for f in sorted((data_dir / "dicom" / "mprage-series").glob("*.dcm"))
               for v in identifying_attributes(f).values() if len(v.strip()) >= 4}
    assert len(needles) > 50 and study.study_uid in needles
    assert [n for n in needles if n in text] == []
    sr = client._web.retrieve_instance(study.study_uid, outcome.series_uids[0],
                                       outcome.sop_instance_uids[0])
    assert str(sr.PatientName) == SAMPLE_NAME and sr.PatientID == SAMPLE_ID
    # no tumour seen: the SR says so, with no region, area or diameter
    from medcls.integrations.pacs.results import read_sr

    (group,) = read_sr(sr)
    assert series.answer.summary.outcome.value == "not_seen" and series.roi is None
    assert (group["class"], group["roi"], group["area_mm2"], group["diameter_mm"]) == (
        "no_tumor", False, None, None)


def test_wg04_compressed_instances_are_retrieved_and_classified_or_listed(client, stored,
                                                                          brain_predictor, tmp_path):
    from medcls.integrations.pacs.results import read_sr
    from medcls.integrations.pacs.review import review_study, send_results

    states, reviews = {}, {}
    for patient in ("4MR1", "7MR4", "1CT1"):
        (study,) = client.search_studies(patient_id=patient)
        review = review_study(client, brain_predictor, study.study_uid)
        (series,) = review.series
        n = len(series.answer.slices)
        readable = [s for s in series.answer.slices if s.prediction is not None]
        # every instance is either classified or listed with a reason (12-bit lossy JPEG
        # cannot be decoded here)
        assert len(readable) + len([k for k in series.skipped if k.reason]) == n
        # MR slices are classified; the CT is either classified (outside the training data) or,
        # when the model's card names its modality, refused slice by slice with a reason
        assert readable or patient == "1CT1", patient
        states[patient] = series.state
        reviews[patient] = review
    # a CT is far from the brain-MRI training data: the answer is withheld, and the SR says so
    # (no class, no probability, no region; it references the CT instance) with no capture
    assert states["1CT1"] == "withheld"
    outcome = send_results(client, reviews["1CT1"])
    assert outcome.sent and len(outcome.sop_instance_uids) == 1
    (sr_ds,) = [pydicom.dcmread(io.BytesIO(i.data)) for i in client.iter_series(
        reviews["1CT1"].study_uid, outcome.series_uids[0])]
    (group,) = read_sr(sr_ds)
    ct_uid = str(reviews["1CT1"].series[0].headers[0].SOPInstanceUID)
    assert (group["state"], group["class"], group["probability"], group["area_mm2"],
            group["roi"], group["referenced_sop_instance_uids"]) == (
        "withheld", None, None, None, False, [ct_uid])
    dciodvfy_errors(sr_ds, tmp_path / "withheld-sr.dcm")


# ----------------------------------------------------------------------------- failures

def test_orthanc_stopped_gives_a_clear_error_within_the_timeout(orthanc):
    from orthanc import Orthanc

    from medcls.core.errors import PacsUnreachableError
    from medcls.integrations.pacs.client import PacsClient

    other = Orthanc().start()
    settings = other.settings(timeout=2.0, retries=2)
    PacsClient(settings).check()
    other.stop()
    client = PacsClient(settings)
    t = time.perf_counter()
    with pytest.raises(PacsUnreachableError, match="did not answer") as err:
        client.search_studies(patient_id=SAMPLE_ID)
    assert time.perf_counter() - t < settings.timeout * (settings.retries + 1)
    assert "3 attempt(s)" in str(err.value) and SAMPLE_ID not in str(err.value)

    # a transient failure: the PACS comes back while the client is retrying (back-off 0.5 s
    # doubling: 7.5 s of waiting over 5 attempts) and the call succeeds
    restart = threading.Timer(0.2, other.start)
    restart.start()
    try:
        assert PacsClient(other.settings(timeout=2.0, retries=4)).search_studies() == []
    finally:
        restart.join()
        other.cleanup()
    # the running PACS still answers (nothing is left broken)
    PacsClient(orthanc.settings()).check()


def test_wrong_password_is_not_authorised(orthanc):
    from medcls.core.errors import PacsAuthError
    from medcls.integrations.pacs.client import PacsClient

    with pytest.raises(PacsAuthError, match="not authorised"):
        PacsClient(orthanc.settings(password="wrong")).search_studies()
    with pytest.raises(PacsAuthError):
        PacsClient(orthanc.settings(user=None, password=None)).check()
    with pytest.raises(PacsAuthError):  # a Bearer token this Orthanc does not accept
        PacsClient(orthanc.settings(user=None, password=None, token="not-a-token")).check()


def test_settings_from_environment_then_secrets(tmp_path):
    from medcls.core.errors import SettingsError
    from medcls.core.settings import load_settings, read_secrets_file
    from medcls.integrations.pacs.client import pacs_settings

    secrets = tmp_path / "secrets.toml"
    assert pacs_settings(load_settings({}, {})) is None
    secrets.write_text('[pacs]\nurl = "http://pacs.example:8042/dicom-web/"\nuser = "reader"\n'
                       'password = "pw"\ntimeout = 3\n')
    s = pacs_settings(load_settings({}, read_secrets_file(secrets)))
    assert (s.url, s.user, s.password, s.timeout, s.retries) == (
        "http://pacs.example:8042/dicom-web", "reader", "pw", 3.0, 2)
    assert "pw" not in repr(s)
    s = pacs_settings(load_settings({"MEDCLS_PACS_URL": "https://other/dicom-web",
                                     "MEDCLS_PACS_TOKEN": "tok", "MEDCLS_PACS_RETRIES": "0"},
                                    read_secrets_file(secrets)))
    assert (s.url, s.token, s.user, s.retries) == ("https://other/dicom-web", "tok", "reader", 0)
    assert "tok" not in repr(s)
    with pytest.raises(SettingsError):
        pacs_settings(load_settings({"MEDCLS_PACS_URL": "http://x", "MEDCLS_PACS_RETRIES": "-1"}, {}))
    secrets.write_text("[pacs\n")
    with pytest.raises(SettingsError):
        read_secrets_file(secrets)


# ----------------------------------------------------------------------------- CLI

def test_cli_search_and_review(orthanc, stored, monkeypatch, capsys, brain_model_dir,
                               brain_predictor):
    from medcls.cli.main import main
    from medcls.engine.inference import Predictor
    from medcls.integrations.pacs.client import PacsClient

    for k, v in orthanc.env().items():
        monkeypatch.setenv(k, v)
    # the module's Predictor of the same package, instead of loading it a second time (10 s)
    loaded = []
    monkeypatch.setattr(Predictor, "from_path", classmethod(
        lambda cls, path, **kw: loaded.append(path) or brain_predictor))
    assert main(["pacs", "search", "--patient-id", SAMPLE_ID]) == 0
    out = capsys.readouterr().out
    assert stored["mprage_study"] in out and "20180501" in out
    no_sample_phi(out.replace(stored["mprage_study"], ""))
    assert main(["pacs", "search", "--patient-id", SAMPLE_ID, "--show-patient"]) == 0
    assert SAMPLE_NAME in capsys.readouterr().out

    assert main(["pacs", "review", "--study", stored["study"], "--model", str(brain_model_dir),
                 "--send"]) == 0
    out = capsys.readouterr().out
    assert loaded == [str(brain_model_dir)]
    assert "Meningioma" in out and "Raw Data Storage" in out and "Tumour suspected" in out
    assert "segmentation" in out  # the region's method
    # sent by the library test before (then not duplicated), or now when run alone
    assert "already in the PACS" in out or "Stored 2 object(s)" in out
    assert [s.modality for s in PacsClient(orthanc.settings()).search_series(
        stored["study"])].count("SR") == 1
    # the command line's answers are in the audit trail (the settings' database), one per
    # answered instance, by SOP Instance UID
    import os

    from medcls.integrations.audit.store import AuditStore

    images = {str(pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True).SOPInstanceUID)
              for b in stored["built_bytes"][:-1]}
    audited = [r for r in AuditStore(os.environ["MEDCLS_DATABASE_URL"]).rows("answers")
               if r["page"] == "pacs-cli"]
    from medcls.integrations.pacs.review import audit_key

    assert {r["sop_instance_uid"] for r in audited} >= {audit_key(u) for u in images}
    assert all(r["user"].endswith("(command line)") for r in audited)

    monkeypatch.setenv("MEDCLS_PACS_PASSWORD", "wrong")
    assert main(["pacs", "search"]) == 2
    assert "not authorised" in capsys.readouterr().err


def test_workspace_search_run_send(client, stored, brain_predictor):
    """The page's state: a search, a run over two studies (one unknown), a send that is
    recognised as done already."""
    from medcls.integrations.pacs.workspace import PacsWorkspace

    ws = PacsWorkspace()
    assert [s.study_uid for s in ws.search(client, patient_id=BUILT_PATIENT)] == [stored["study"]]
    assert BUILT_PATIENT in ws.label(stored["study"], identifying=True)
    assert BUILT_PATIENT not in ws.label(stored["study"])  # behind the switch
    missing = generate_uid()
    done = []
    ws.run(client, brain_predictor, [stored["study"], missing], progress=lambda i, n: done.append(i))
    assert done == [1, 2] and list(ws.reviews) == [stored["study"]]
    assert "no study" in ws.errors[missing]
    before = ws.reviews[stored["study"]].already_sent  # sent by an earlier test of the module?
    outcome = ws.send(client, stored["study"])
    assert outcome.sent == (not before) and ws.outcomes[stored["study"]] is outcome
    again = ws.send(client, stored["study"])
    assert not again.sent and ws.reviews[stored["study"]].already_sent


def test_page_keeps_working_when_the_pacs_is_down(orthanc, stored, monkeypatch, brain_model_dir):
    """AppTest of pages/4_PACS.py: a PACS that does not answer gives a message, not a trace;
    in the same session, the running PACS is then searched normally."""
    from appserver import free_port
    from conftest import PROJECT_ROOT
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MEDCLS_MODELS", str(brain_model_dir.parent))
    monkeypatch.setenv("MEDCLS_PACS_URL", f"http://127.0.0.1:{free_port()}/dicom-web")
    monkeypatch.setenv("MEDCLS_PACS_TIMEOUT", "2")
    monkeypatch.setenv("MEDCLS_PACS_RETRIES", "0")
    monkeypatch.syspath_prepend(str(PROJECT_ROOT))
    at = AppTest.from_file(str(PROJECT_ROOT / "pages" / "4_PACS.py"), default_timeout=60).run()
    next(t for t in at.text_input if t.label == "Patient ID").set_value(SAMPLE_ID)
    at.button[0].click().run()
    assert not at.exception
    assert any("did not answer" in e.value for e in at.error)

    for k, v in orthanc.env().items():
        monkeypatch.setenv(k, v)
    at.toggle(key="pacs_show_phi").set_value(True)  # names and dates shown on request only
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert any("Studies (1)" in h.value for h in at.subheader)
    (option,) = at.multiselect[0].options  # the study, named by date, patient and description
    assert option.startswith("20180501 · 0123 · Doe^John")


def test_results_from_a_bare_source_without_patient_tags_or_spacing(brain_predictor, data_dir,
                                                                    tmp_path):
    """Some archives leave Type 2 patient/study attributes out and give no pixel spacing: the
    SR and SC are still valid; the region is there, without an area or diameter in mm."""
    from medcls.engine.findings import finding_probability
    from medcls.engine.series import answer_series, series_verdict, slice_explanation
    from medcls.integrations.pacs.client import SeriesInfo
    from medcls.integrations.pacs.records import ModelIdentity, SeriesReview, StudyReview
    from medcls.integrations.pacs.results import build_results, heatmap_roi, read_sr
    from medcls.integrations.pacs.review import _header
    from medcls.io.gather import gather
    from medcls.io.sources import bytes_source

    card = brain_predictor.card
    for path in sorted((require(data_dir / "brain-mri") / "glioma").glob("*.jpg")):
        pred = brain_predictor.predict_file(path)
        if not pred.outside_training_distribution and \
                finding_probability(pred.probabilities, card) >= card["low_confidence_threshold"]:
            break  # one slice the model calls a tumour: a series of one is "suspected"
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    ds = new_dataset(sop_class=MR_IMAGE, modality="MR")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = gray.tobytes()
    data = to_bytes(ds)
    stack = gather([bytes_source("0", data)]).series[0]
    answer = answer_series(brain_predictor, stack)
    review = SeriesReview(SeriesInfo(ds.StudyInstanceUID, ds.SeriesInstanceUID, "MR", None, ""),
                          answer, [_header(data)], slice_instances=[(0, 0)],
                          verdict=series_verdict(answer))
    assert review.verdict.is_finding and review.driving == 0
    review.scan = stack.scan(0)
    review.explanation = slice_explanation(brain_predictor, answer, 0)
    review.roi = heatmap_roi(brain_predictor, review.explanation, review.scan)
    sr, sc = build_results(StudyReview(ds.StudyInstanceUID, ModelIdentity.of(brain_predictor),
                                       [review]))
    (group,) = read_sr(sr)
    assert group["roi"] and group["area_mm2"] is None and group["diameter_mm"] is None
    assert group["class"] == review.verdict.label
    assert sr.PatientID == "" and sc.StudyInstanceUID == ds.StudyInstanceUID
    dciodvfy_errors(sr, tmp_path / "bare-sr.dcm")
    dciodvfy_errors(sc, tmp_path / "bare-sc.dcm")


# ----------------------------------------------------------------------------- audit

def test_pacs_answers_are_audited_per_sop_instance_uid(audit_url, client, stored, built_review,
                                                       brain_predictor):
    """Every answered instance of the PACS review in the audit store (SQLite and a real
    PostgreSQL), keyed by its SOP Instance UID: the model's identity, the slice's answer and
    state, the series' outcome; the region's size and method on the slice that shows the
    tumour answer only; no patient name, ID or date anywhere."""
    import sqlalchemy as sa

    from medcls.integrations.audit import store as audit
    from medcls.integrations.audit.store import AuditStore
    from medcls.integrations.pacs.review import record_review

    store = AuditStore(audit_url)
    try:
        ids = record_review(store, built_review, brain_predictor, "rev@hospital.test")
        (src,) = built_review.series
        image_uids = [str(h.SOPInstanceUID) for h in src.headers]
        assert len(ids) == len(image_uids) == stored["n_images"]
        rows = [r for r in store.answers_with_verdicts() if r["id"] in ids]
        from medcls.integrations.pacs.review import audit_key  # a hash: UIDs embed dates

        assert sorted(r["sop_instance_uid"] for r in rows) == sorted(map(audit_key, image_uids))
        assert built_review.answer_ids == {r["sop_instance_uid"]: r["id"] for r in rows}
        card = brain_predictor.card
        by_uid = {r["sop_instance_uid"]: r for r in rows}
        for i, header in src.answered_instances:
            r = by_uid[audit_key(header.SOPInstanceUID)]
            pred = src.answer.slices[i].prediction
            assert (r["model_name"], r["model_version"], r["model_sha256"]) == (
                card["name"], str(card["version"]), card["model_sha256"])
            assert (r["input_source"], r["page"], r["input_sha256"], r["frame"]) == (
                "pacs", "pacs", None, None)
            assert r["predicted"] == pred.label
            assert r["confidence"] == pytest.approx(pred.confidence)
            assert r["probabilities"] == pytest.approx(dict(zip(pred.classes,
                                                                map(float, pred.probabilities))))
            assert (r["low_confidence"], r["withheld"]) == (pred.low_confidence,
                                                           pred.outside_training_distribution)
            assert r["series_outcome"] == "suspected"
            if i == src.driving:  # the tumour answer's region: the segmentation's size
                assert r["region_method"] == "segmentation" and r["heatmap_method"] == "gradcam"
                assert r["region_area_mm2"] == pytest.approx(src.roi.area_mm2)
                assert r["region_diameter_mm"] == pytest.approx(src.roi.diameter_mm)
            else:
                assert (r["region_method"], r["region_area_mm2"], r["region_diameter_mm"]) == (
                    None, None, None)
        # a verdict attaches to an instance's answer
        store.record_verdict(by_uid[audit_key(image_uids[src.driving])]["id"], "rev@hospital.test", "agree")
        # no patient name, ID or date in any table
        with store.engine.connect() as c:
            text = repr([list(row) for t in audit.metadata.sorted_tables
                         for row in c.execute(sa.select(t))])
        for value in (BUILT_PATIENT, "Test^Built", "Built", BUILT_DATE, stored["study"],
                      stored["series"]):
            assert value not in text, value
    finally:
        if store.engine.dialect.name == "postgresql":
            audit.metadata.drop_all(store.engine)
        store.dispose()


def test_a_no_tumour_or_withheld_answer_carries_no_region_in_the_audit(brain_predictor):
    from medcls.engine.inference import Prediction
    from medcls.integrations.audit.store import Answer
    from medcls.models.segmenter import measure

    prob = np.zeros((64, 64), np.float32)
    prob[20:40, 20:40] = 0.9
    seg = measure(prob, 0.5, pixel_spacing=(0.5, 0.5))
    card = brain_predictor.card
    classes = tuple(card["classes"])

    def pred(p, gate=1.0):
        return Prediction(classes, np.asarray(p, float), np.zeros(4), gate, 10.0, 0.9)

    common = dict(user="u", page="main", input_sha256="0" * 64, region=seg)
    tumour = Answer.of(pred([0.95, 0.02, 0.02, 0.01]), card, **common)
    assert (tumour.region_method, tumour.region_area_mm2) == ("segmentation", 100.0)
    assert tumour.region_diameter_mm == pytest.approx(seg.diameter_mm)
    normal = Answer.of(pred([0.02, 0.02, 0.95, 0.01]), card, **common)
    withheld = Answer.of(pred([0.95, 0.02, 0.02, 0.01], gate=20.0), card, **common)
    for a in (normal, withheld):
        assert (a.region_method, a.region_area_mm2, a.region_diameter_mm) == (None, None, None)
