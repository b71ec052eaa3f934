"""The acquisition read from a file's own tags (medcls.io.acquisition): plane and MR sequence on
the real series of ../shared/data/dicom, the rule on constructed tag sets, and the card's scope
rule (medcls.models.card.scope_note) that withholds a sequence or plane the model was not
validated on."""

from __future__ import annotations

import pytest
from conftest import require

from medcls.io.acquisition import FLAIR, PD, STIR, T1, T2, T2_STAR, Acquisition, acquisition_of, mr_sequence
from medcls.io.load import load_scan
from medcls.models.card import scope_note


@pytest.mark.parametrize("folder,plane,sequence", [
    ("volunteer2-axial-flair", "axial", FLAIR),  # IR, TI 2370 ms
    ("volunteer2-axial-t2gre", "axial", T2_STAR),  # GR, TE 18.9 ms
    ("volunteer2-sagittal-t1", "sagittal", T1),  # SE, TR 425 / TE 8.1 ms
    ("mprage-series", "axial", T1),  # GR+IR, TI 1100 ms
    ("volunteer-sagittal-t1", "sagittal", T1),  # spoiled GR, TE 2.46 ms
    ("volunteer-enhanced-t1", None, T1),  # enhanced: pulse sequence name *tfl3d (orientation per frame)
])
def test_real_series_plane_and_sequence(data_dir, folder, plane, sequence):
    path = sorted(require(data_dir / "dicom" / folder).iterdir())[0]
    scan = load_scan(path)
    a = acquisition_of(scan.metadata, scan.modality)
    assert (a.plane, a.sequence) == (plane, sequence), a.sequence_why


@pytest.mark.parametrize("tags,sequence", [
    ({"ScanningSequence": "SE", "RepetitionTime": 500, "EchoTime": 15}, T1),
    ({"ScanningSequence": "SE", "RepetitionTime": 4000, "EchoTime": 100}, T2),
    ({"ScanningSequence": "SE", "RepetitionTime": 3000, "EchoTime": 20}, PD),
    ({"ScanningSequence": ["SE", "IR"], "RepetitionTime": 9000, "EchoTime": 120, "InversionTime": 2500}, FLAIR),
    ({"ScanningSequence": ["SE", "IR"], "RepetitionTime": 4000, "EchoTime": 60, "InversionTime": 150}, STIR),
    ({"ScanningSequence": "GR", "RepetitionTime": 600, "EchoTime": 20}, T2_STAR),
    ({"ScanningSequence": "GR", "RepetitionTime": 20, "EchoTime": 4}, T1),
    ({"ScanningSequence": "EP", "RepetitionTime": 5000, "EchoTime": 90}, "DWI/EPI"),
    ({"SequenceName": "*tir2d1_16"}, None),  # inversion recovery without TI: not guessed
    ({"ScanningSequence": "SE"}, None),  # no timing: not guessed
    ({}, None),
])
def test_sequence_rule(tags, sequence):
    assert mr_sequence(tags)[0] == sequence


def test_plain_images_have_no_acquisition(data_dir):
    jpeg = sorted(require(data_dir / "brain-mri" / "glioma").glob("*.jpg"))[0]
    scan = load_scan(jpeg)
    assert acquisition_of(scan.metadata, scan.modality) == Acquisition()


def test_scope_rule_withholds_what_was_not_validated():
    card = {"name": "m", "scope": {"validated_planes": ["axial"], "validated_sequences": ["T1"]}}
    assert scope_note(card, Acquisition("axial", sequence=T1)) is None
    assert scope_note(card, Acquisition(None, sequence=None)) is None  # the file says nothing
    flair = scope_note(card, Acquisition("axial", sequence=FLAIR))
    assert "FLAIR" in flair and "T1-weighted" in flair
    assert "sagittal" in scope_note(card, Acquisition("sagittal", sequence=T1))
    assert scope_note({"name": "m"}, Acquisition("sagittal", sequence=FLAIR)) is None  # no scope, no rule
