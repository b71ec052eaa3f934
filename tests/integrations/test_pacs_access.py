"""Least privilege on the PACS (medcls.integrations.pacs.workspace, against the real Orthanc):
searching with empty or free filters, and so listing patients, is a reviewer's right; a
clinician opens a study by its accession number only; names, IDs, dates, accession numbers and
UIDs stay out of the tables and labels unless the "show identifying tags" switch asks."""

from __future__ import annotations

import copy

import pydicom
import pytest
from conftest import require
from pydicom.uid import generate_uid

from medcls.core.access import User
from medcls.core.errors import AccessDeniedError
from medcls.integrations.pacs.workspace import IDENTIFYING_COLUMNS, PacsWorkspace, study_rows

CLINICIAN, REVIEWER = User("c@hospital.test", "clinician"), User("r@hospital.test", "reviewer")
PATIENT, ACCESSION = "MEDCLS-ACCESS-1", "ACC-20260101-7"


@pytest.fixture(scope="module")
def access_study(orthanc, data_dir):
    from medcls.integrations.pacs.client import PacsClient

    client = PacsClient(orthanc.settings())
    study, series = generate_uid(), generate_uid()
    datasets = []
    for path in sorted(require(data_dir / "dicom" / "mprage-series").glob("*.dcm"))[10:12]:
        ds = copy.deepcopy(pydicom.dcmread(path))
        ds.PatientID, ds.AccessionNumber = PATIENT, ACCESSION
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(ds)
    client.store(datasets)
    return client, study, str(datasets[0].PatientName)


def test_a_clinician_cannot_list_the_pacs_patients(access_study):
    client, study, name = access_study
    ws = PacsWorkspace()
    for filters in ({}, {"patient_id": PATIENT}, {"modality": "MR"}, {"description": "x"},
                    {"accession": "*"}, {"accession": "ACC-*"}, {"accession": "  "},
                    {"accession": ACCESSION, "patient_id": PATIENT}):
        with pytest.raises(AccessDeniedError, match="accession number only"):
            ws.search_as(CLINICIAN, client, **filters)
        assert ws.studies == []
    # a reviewer lists every study; a clinician opens the one named by its accession number
    assert len(PacsWorkspace().search_as(REVIEWER, client)) >= 1
    found = ws.search_as(CLINICIAN, client, accession=ACCESSION)
    assert [s.study_uid for s in found] == [study] and found[0].accession == ACCESSION
    assert ws.search_as(CLINICIAN, client, accession="ACC-20260101") == []  # exact, no prefix


def test_identifying_columns_and_labels_only_on_request(access_study):
    client, study, name = access_study
    ws = PacsWorkspace()
    ws.search_as(REVIEWER, client, patient_id=PATIENT)
    hidden = study_rows(ws.studies, identifying=False)
    text = repr(hidden) + ws.label(study)
    for secret in (PATIENT, ACCESSION, name, study, ws.studies[0].study_date):
        assert secret and secret not in text, secret
    assert not set(IDENTIFYING_COLUMNS) & set(hidden[0])
    shown = repr(study_rows(ws.studies, identifying=True)) + ws.label(study, identifying=True)
    assert all(x in shown for x in (PATIENT, ACCESSION, name))
