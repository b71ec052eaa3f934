"""Series in the core (medcls.io.gather) and the series answer (medcls.engine.series): ordering,
findings, enhanced multi-frame and NIfTI input, the aggregation rule, the region rule."""

from __future__ import annotations

import gzip
import random

import numpy as np
import pytest
from conftest import require
from dicom_factory import mr_slice, series_files, to_bytes

from medcls.engine.findings import may_show_region, normal_class, strongest_finding_class
from medcls.engine.inference import Prediction
from medcls.engine.series import MIN_RUN, Outcome, answer_series, summarise
from medcls.io.gather import gather
from medcls.io.series import FindingKind
from medcls.io.sources import bytes_source

CARD = {"name": "t", "version": "1", "classes": ["glioma", "meningioma", "no_tumor", "pituitary"],
        "low_confidence_threshold": 0.9}


def marked(n: int, size: int = 32) -> list[np.ndarray]:
    """n small slices, slice i filled with the value 100 + i (its identity after reordering)."""
    return [np.full((size, size), 100 + i, np.uint16) for i in range(n)]


def identities(series) -> list[int]:
    return [int(series.scan(i).pixels[0, 0]) - 100 for i in range(len(series))]


def shuffled(files: list[bytes], seed: int = 3) -> list:
    """Sources in a random order under names that do not follow the body order."""
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    return [bytes_source(f"img{k:02d}.dcm", files[i]) for k, i in enumerate(order)]


def kinds(study) -> set:
    return {f.kind for f in study.all_findings}


# ----------------------------------------------------------------------------- ordering

@pytest.mark.parametrize("orientation,plane", [((1, 0, 0, 0, 1, 0), "axial"),
                                               ((0, 1, 0, 0, 0, -1), "sagittal"),
                                               ((1, 0, 0, 0, 0, -1), "coronal")])
def test_shuffled_files_without_instance_numbers_are_ordered_by_position(orientation, plane):
    files = series_files(marked(9), 3.0, orientation=orientation, instance_numbers=False)
    study = gather(shuffled(files))
    assert len(study) == 1 and not study.all_findings
    s = study.series[0]
    assert identities(s) == list(range(9))
    assert s.ordered_by == "position" and s.plane == plane
    assert s.slice_spacing == pytest.approx(3.0) and np.allclose(np.diff(s.positions), 3.0)
    assert s.pixel_spacing == (1.0, 1.0) and s.scan(0).pixel_spacing == (1.0, 1.0)


@pytest.mark.parametrize("orientation,plane,oblique", [
    ((1, 0, 0, 0, 1, 0), "axial", False), ((0, 1, 0, 0, 0, -1), "sagittal", False),
    ((1, 0, 0, 0, 0, -1), "coronal", False),
    ((1, 0, 0, 0, np.cos(0.3), -np.sin(0.3)), "axial", False),  # tilted 17°: still axial
    ((1, 0, 0, 0, np.cos(0.7), -np.sin(0.7)), "axial", True)])  # tilted 40°: oblique
def test_one_plane_rule_for_a_scan_and_its_series(orientation, plane, oblique):
    """The card's scope (one scan's acquisition, medcls.io.acquisition) and the series
    (medcls.io.gather) decide the plane by the same function (medcls.io.geometry.plane_of_normal)."""
    from medcls.io import geometry as scan_module
    from medcls.io.acquisition import acquisition_of

    s = gather(shuffled(series_files(marked(3), 3.0, orientation=orientation))).series[0]
    assert (s.plane, s.oblique) == (plane, oblique)
    for i in range(len(s)):
        a = acquisition_of(s.scan(i).metadata, "MR")
        assert (a.plane, a.oblique) == (plane, oblique) and scan_module.scan_plane(s.scan(i)) == plane
    assert scan_module.plane_of_normal(s.slices[0].normal) == (plane, oblique)
    assert scan_module.plane_of_normal(None) == (None, False)
    assert scan_module.slice_normal([1, 0, 0, 1, 0, 0]) is None  # degenerate: no plane


def test_position_beats_instance_number_and_instance_number_is_the_fallback():
    files = series_files(marked(6), instance_numbers=True)
    # instance numbers that contradict the positions: the positions win
    wrong = [to_bytes(_renumber(f, 6 - i)) for i, f in enumerate(files)]
    assert identities(gather(shuffled(wrong)).series[0]) == list(range(6))
    no_pos = series_files(marked(6), positions=False)
    study = gather(shuffled(no_pos))
    s = study.series[0]
    assert identities(s) == list(range(6)) and s.ordered_by == "instance number"
    assert s.positions is None and FindingKind.NO_POSITION in kinds(study)
    bare = series_files(marked(4), positions=False, instance_numbers=False)
    assert FindingKind.NO_ORDER in kinds(gather(shuffled(bare)))


def _renumber(data: bytes, n: int):
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.InstanceNumber = n
    return ds


def test_gap_duplicate_and_two_series_are_reported():
    files = series_files(marked(10), 2.0)
    del files[6]  # a missing slice
    first = series_files(marked(3), 4.0, orientation=(0, 1, 0, 0, 0, -1), series_number=7)
    sources = shuffled(files + first) + [bytes_source("copy-of-slice.dcm", files[2])]
    study = gather(sources)
    assert len(study) == 2
    assert FindingKind.SEVERAL_SERIES in {f.kind for f in study.findings}
    main = max(study.series, key=len)
    assert identities(main) == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    gaps = [f for f in main.findings if f.kind == FindingKind.GAP]
    assert len(gaps) == 1 and gaps[0].slices == (5, 6) and "1 slice" in gaps[0].message
    dups = [f for f in main.findings if f.kind == FindingKind.DUPLICATE]
    assert len(dups) == 1 and len(dups[0].files) == 1
    other = min(study.series, key=len)
    assert other.plane == "sagittal" and "Series 7" in other.label and len(other) == 3


def test_mixed_orientations_in_one_series_become_stacks_of_their_own():
    from pydicom.uid import generate_uid

    study_uid, series_uid = generate_uid(), generate_uid()
    files = [to_bytes(mr_slice(a, (0, 0, 5.0 * i), (1, 0, 0, 0, 1, 0), instance=i + 1,
                               study_uid=study_uid, series_uid=series_uid))
             for i, a in enumerate(marked(4))]
    files += [to_bytes(mr_slice(a, (5.0 * i, 0, 0), (0, 1, 0, 0, 0, -1), instance=10 + i,
                                study_uid=study_uid, series_uid=series_uid))
              for i, a in enumerate(marked(3))]
    study = gather(shuffled(files))
    assert sorted(len(s) for s in study.series) == [3, 4]
    assert {s.plane for s in study.series} == {"axial", "sagittal"}
    assert all(f.kind == FindingKind.MIXED_ORIENTATION for s in study.series for f in s.findings)


def test_unreadable_and_plain_images_are_findings(data_dir):
    jpeg = next((data_dir / "brain-mri" / "glioma").glob("*.jpg")).read_bytes()
    study = gather(shuffled(series_files(marked(3))) + [bytes_source("notes.txt", b"hello"),
                                                        bytes_source("a.jpg", jpeg)])
    assert kinds(study) >= {FindingKind.UNREADABLE, FindingKind.NOT_A_SERIES}
    assert [s.kind for s in study.series].count("image") == 1
    assert next(s for s in study.series if s.kind == "image").scan(0).source_format == "jpeg"


# ----------------------------------------------------------------------------- real series

def _dir_sources(folder):
    return [bytes_source(p.name, p.read_bytes()) for p in sorted(folder.iterdir())
            if p.name != "LICENSE"]


def test_real_series_load_ordered(data_dir):
    mprage = gather(_dir_sources(require(data_dir / "dicom" / "mprage-series")))
    s = mprage.series[0]
    assert len(mprage) == 1 and len(s) == 24 and s.ordered_by == "position"
    assert np.all(np.diff(s.positions) > 0) and s.slice_spacing == pytest.approx(1.0, abs=0.05)
    # ordered by position, the instance numbers of this series run 93..116 in order
    assert [r.instance for r in s.slices] == list(range(93, 117))
    sag = gather(_dir_sources(require(data_dir / "dicom" / "volunteer-sagittal-t1")))
    s = sag.series[0]
    assert len(s) == 35 and s.plane == "sagittal" and s.slice_spacing == pytest.approx(4.8, abs=0.01)
    assert sorted(r.instance for r in s.slices) == list(range(1, 36))
    assert abs(np.corrcoef([r.instance for r in s.slices], s.positions)[0, 1]) > 0.99


def test_enhanced_multiframe_volume_is_one_series_with_spacing(data_dir):
    study = gather(_dir_sources(require(data_dir / "dicom" / "volunteer-enhanced-t1")))
    assert len(study) == 1
    s = study.series[0]
    assert len(s) == 96 and s.ordered_by == "position" and not s.findings
    assert s.pixel_spacing == (2.0, 2.0) and s.slice_spacing == pytest.approx(2.0, abs=1e-3)
    scan = s.scan(40)
    assert scan.pixel_spacing == (2.0, 2.0) and scan.shape == (128, 128)
    assert len({s.scan(i).pixels.tobytes() for i in (0, 40, 95)}) == 3  # different frames
    assert scan.sha256 == s.slices[40].content_hash  # the file's hash, not the slim copy's


# ----------------------------------------------------------------------------- NIfTI

def nifti_of(arrays, spacing_mm: float, gz: bool) -> bytes:
    """The NIfTI a converter would write for the axial DICOM series of ``series_files``: the
    DICOM geometry as an affine (LPS -> RAS), then reordered to RAS+ as most tools store it."""
    import nibabel as nib

    vol = np.stack(arrays, axis=-1)  # (rows, cols, slices) = DICOM (r, c) per slice
    lps = np.eye(4)
    lps[:3, 0] = [0, 1.0, 0]  # rows step along the column direction (0, 1, 0)
    lps[:3, 1] = [1.0, 0, 0]  # columns step along the row direction (1, 0, 0)
    lps[:3, 2] = [0, 0, spacing_mm]
    lps[:3, 3] = [-100, -100, -40]
    img = nib.as_closest_canonical(nib.Nifti1Image(vol, np.diag([-1, -1, 1, 1]) @ lps))
    data = img.to_bytes()
    return gzip.compress(data) if gz else data


@pytest.mark.parametrize("gz", [False, True])
def test_nifti_gives_the_dicom_slices(gz):
    arrays = [np.random.default_rng(i).integers(0, 4000, (24, 20)).astype(np.uint16)
              for i in range(5)]
    dicom = gather(shuffled(series_files(arrays, 3.0))).series[0]
    nii = gather([bytes_source("vol.nii.gz" if gz else "vol.nii", nifti_of(arrays, 3.0, gz))])
    s = nii.series[0]
    assert s.kind == "nifti" and s.plane == "axial" and len(s) == 5
    assert s.slice_spacing == pytest.approx(3.0) and s.pixel_spacing == (1.0, 1.0)
    np.testing.assert_allclose(s.positions, dicom.positions)
    for i in range(5):
        np.testing.assert_array_equal(s.scan(i).values, dicom.scan(i).values)


def test_nifti_and_dicom_of_the_same_slices_give_the_same_answers(built_series, brain_predictor):
    dicom = gather(shuffled(built_series.dicom())).series[0]
    nii = gather([bytes_source("s.nii.gz", nifti_of(built_series.arrays, 5.0, True))]).series[0]
    a, b = answer_series(brain_predictor, dicom), answer_series(brain_predictor, nii)
    np.testing.assert_allclose(a.probabilities(), b.probabilities(), atol=1e-5)
    assert a.summary.text == b.summary.text and a.summary.outcome == Outcome.SUSPECTED


def test_damaged_nifti_is_a_typed_refusal():
    study = gather([bytes_source("x.nii.gz", b"\x1f\x8b" + b"\x00" * 64)])
    assert not study.series and FindingKind.UNREADABLE in kinds(study)


# ----------------------------------------------------------------------------- the rule

def probs_for(p_tumour, cls=0):
    """Rows of class probabilities with P(tumour) = p on class ``cls``, the rest no_tumor."""
    out = np.zeros((len(p_tumour), 4))
    out[:, cls] = p_tumour
    out[:, 2] = 1 - np.asarray(p_tumour)
    return out


def test_rule_needs_k_consecutive_confident_in_distribution_slices():
    assert MIN_RUN == 3
    p = [0.1, 0.95, 0.97, 0.92, 0.2, 0.99, 0.1]
    s = summarise(probs_for(p, cls=1), [False] * 7, CARD)
    assert s.outcome == Outcome.SUSPECTED and (s.run.start, s.run.stop) == (1, 4)
    assert s.class_name == "meningioma" and s.most_suspicious == 2
    assert s.run.mean_p_finding == pytest.approx(np.mean([0.95, 0.97, 0.92]))
    # an out-of-distribution slice breaks the run: two slices are not enough
    s = summarise(probs_for(p), [False, False, True, False, False, False, False], CARD)
    assert s.outcome == Outcome.NOT_SEEN and s.run is None
    assert s.text.startswith("No tumour seen on 6 answered slice(s)") and "3 slice(s) above" in s.text
    # just below the threshold is not positive
    s = summarise(probs_for([0.89] * 7), [False] * 7, CARD)
    assert s.outcome == Outcome.NOT_SEEN and s.n_positive == 0
    assert summarise(probs_for([0.89] * 7), [False] * 7, CARD, threshold=0.85).outcome == \
        Outcome.SUSPECTED


def test_rule_class_is_the_highest_mean_over_the_run_and_the_longest_run_wins():
    p = np.zeros((8, 4))
    p[:, 2] = 1.0
    p[0:3] = [0.6, 0.35, 0.05, 0.0]  # glioma run of 3
    p[4:8] = [[0.5, 0.45, 0.05, 0], [0.2, 0.75, 0.05, 0], [0.4, 0.55, 0.05, 0], [0.3, 0.65, 0.05, 0]]
    s = summarise(p, [False] * 8, CARD)
    assert (s.run.start, s.run.stop, s.class_name) == (4, 8, "meningioma")
    assert len(s.other_runs) == 1 and s.other_runs[0].class_name == "glioma"


def test_rule_cannot_answer_when_most_slices_are_outside():
    p = probs_for([0.99] * 5)
    s = summarise(p, [True, True, True, False, False], CARD)
    assert s.outcome == Outcome.CANNOT_ANSWER and "most slices are outside" in s.text
    s = summarise(p, [False] * 5, CARD, readable=[False] * 5)
    assert s.outcome == Outcome.CANNOT_ANSWER and "could be read" in s.text
    # exactly half outside: still answered
    assert summarise(probs_for([0.1] * 4), [True, True, False, False], CARD).outcome == \
        Outcome.NOT_SEEN


def test_rule_short_series_needs_every_slice():
    assert summarise(probs_for([0.95, 0.99]), [False] * 2, CARD).outcome == Outcome.SUSPECTED
    assert summarise(probs_for([0.95]), [False], CARD).min_run == 1
    assert summarise(probs_for([0.95, 0.2]), [False] * 2, CARD).outcome == Outcome.NOT_SEEN


def test_built_tumour_series_finds_the_run_where_the_tumour_slices_are(built_series,
                                                                       brain_predictor):
    files = built_series.dicom()
    study = gather(shuffled(files) + [bytes_source("dup.dcm", files[1])])
    s = study.series[0]
    a = answer_series(brain_predictor, s)
    run = a.summary.run
    assert a.summary.outcome == Outcome.SUSPECTED, a.summary.text
    assert set(range(run.start, run.stop)) == set(built_series.tumour)
    assert run.class_name == built_series.tumour_class
    assert a.summary.most_suspicious in built_series.tumour
    # the default model's card names a segmentation companion: the volume is the sum of the
    # run slices' mask areas times the slice spacing, and says so
    assert brain_predictor.card.get("segmentation") and brain_predictor.segmenter is not None
    assert a.volume_method == "segmentation" and "method: segmentation" in a.volume_note
    assert set(a.segmentations) == set(built_series.tumour) and not a.regions
    segs = [a.segmentations[i] for i in built_series.tumour]
    assert sum(x is not None for x in segs) >= 3  # the masks found the tumour on most slices
    for i in built_series.tumour:  # each area is the slice's own segmentation
        alone = brain_predictor.outline(s.scan(i), a.slices[i].prediction)
        assert (alone is None and a.segmentations[i] is None) or \
            alone.area_mm2 == pytest.approx(a.segmentations[i].area_mm2)
    areas = [x.area_mm2 if x is not None else 0.0 for x in segs]
    assert all(x is None or x.area_mm2 == x.area_px * 1.0 for x in segs)  # 1 mm pixels
    assert a.volume_mm3 is not None and a.volume_mm3 > 0
    assert a.volume_mm3 == pytest.approx(sum(areas) * 5.0)
    rec = a.as_record()
    assert rec["volume_method"] == "segmentation"
    assert rec["run_first_slice"] == built_series.tumour.start + 1 and rec["outcome"] == "suspected"
    assert "duplicate" in rec["findings"]
    slices = a.slice_records()
    assert [r["in_suspicious_run"] for r in slices].count(True) == len(built_series.tumour)
    # the normal slices alone: no tumour seen
    normal = gather(shuffled(series_files(built_series.arrays[:6]))).series[0]
    b = answer_series(brain_predictor, normal)
    assert b.summary.outcome == Outcome.NOT_SEEN and b.volume_mm3 is None


def test_series_volume_from_heatmap_regions_without_a_segmentation_companion(built_series,
                                                                             brain_predictor):
    """A model whose card names no segmentation companion: the volume comes from the run
    class's Grad-CAM regions, and is named so."""
    files = built_series.dicom()
    s = gather(shuffled(files)).series[0]
    saved = brain_predictor._explainers.get("segmenter", "unset")
    brain_predictor._explainers["segmenter"] = None  # as if the card named none
    try:
        a = answer_series(brain_predictor, s)
    finally:
        if saved == "unset":
            brain_predictor._explainers.pop("segmenter", None)
        else:
            brain_predictor._explainers["segmenter"] = saved
    assert a.summary.outcome == Outcome.SUSPECTED and not a.segmentations
    areas = [a.regions[i].area_mm2 for i in built_series.tumour]
    assert a.volume_method == "Grad-CAM region" and "Grad-CAM region" in a.volume_note
    assert a.volume_mm3 == pytest.approx(sum(areas) * 5.0)


def test_series_verdict_codes_the_summary(built_series, brain_predictor):
    """The series' one coded answer (what the PACS SR, the CLI and the audit carry)."""
    from medcls.engine.series import series_verdict

    files = built_series.dicom()
    a = answer_series(brain_predictor, gather(shuffled(files)).series[0])
    v = series_verdict(a)
    run = a.summary.run
    assert (v.outcome, v.label, v.slice, v.text) == (Outcome.SUSPECTED, built_series.tumour_class,
                                                     a.summary.most_suspicious, a.summary.text)
    assert v.probability == pytest.approx(np.mean([a.slices[i].prediction.probabilities[
        run.class_index] for i in built_series.tumour]))
    assert v.state == ("answered" if v.probability >= a.summary.threshold else "low-confidence")
    assert v.is_finding
    normal = answer_series(brain_predictor, gather(shuffled(series_files(
        built_series.arrays[:6]))).series[0])
    n = series_verdict(normal)
    assert (n.outcome, n.label, n.slice) == (Outcome.NOT_SEEN, "no_tumor",
                                             normal.summary.most_suspicious)
    assert n.probability == pytest.approx(np.mean([x.prediction.probabilities[2]
                                                   for x in normal.slices]))
    assert not n.is_finding


def test_series_verdict_on_constructed_summaries():
    from medcls.engine.series import SeriesAnswer, SliceAnswer, series_verdict

    def answer(p_tumour, outside=None):
        probs = probs_for(p_tumour)
        outside = outside or [False] * len(p_tumour)
        slices = [SliceAnswer(i, float(i), _pred(pr, gate=20.0 if o else 1.0), None,
                              float(1 - pr[2])) for i, (pr, o) in enumerate(zip(probs, outside))]
        return SeriesAnswer(None, slices, summarise(probs, outside, CARD), CARD)

    v = series_verdict(answer([0.1, 0.95, 0.97, 0.96, 0.1]))
    assert (v.outcome, v.label, v.state, v.slice) == (Outcome.SUSPECTED, "glioma", "answered", 2)
    quiet = series_verdict(answer([0.02, 0.03, 0.01]))
    assert (quiet.label, quiet.state) == ("no_tumor", "answered")
    blip = series_verdict(answer([0.02, 0.95, 0.01]))  # one positive slice: not a run
    assert (blip.outcome, blip.label, blip.state) == (Outcome.NOT_SEEN, "no_tumor", "low-confidence")
    none = series_verdict(answer([0.5, 0.5, 0.5], outside=[True] * 3))
    assert (none.outcome, none.label, none.probability, none.state, none.slice) == (
        Outcome.CANNOT_ANSWER, None, None, "withheld", None)


# ----------------------------------------------------------------------------- region rule

def _pred(probs, gate=1.0):
    p = np.asarray(probs, float)
    return Prediction(tuple(CARD["classes"]), p, np.log(p + 1e-9), gate, 10.0, 0.9)


def test_no_region_on_a_no_tumour_or_withheld_answer_unless_asked():
    assert normal_class(CARD) == "no_tumor"
    assert normal_class({"classes": ["normal", "pneumonia"]}) == "normal"
    tumour, normal = _pred([0.7, 0.1, 0.1, 0.1]), _pred([0.1, 0.25, 0.6, 0.05])
    withheld = _pred([0.7, 0.1, 0.1, 0.1], gate=20.0)
    assert may_show_region(tumour, CARD)
    assert not may_show_region(normal, CARD) and not may_show_region(withheld, CARD)
    assert may_show_region(normal, CARD, requested=True)
    assert strongest_finding_class(normal.probabilities, CARD) == 1  # meningioma, not no_tumor


def test_review_by_series_command_line(built_series, brain_model_dir, tmp_path):
    """``medcls review --by-series``: one CSV row per series (summary, run, volume), the slice
    rows with --slices, over a folder holding the tumour series and a NIfTI of its first 6
    slices."""
    import csv

    from medcls.cli.main import main

    folder = tmp_path / "in"
    folder.mkdir()
    for k, data in enumerate(built_series.dicom()):
        (folder / f"s{(k * 7) % 16:02d}.dcm").write_bytes(data)
    (folder / "normal.nii.gz").write_bytes(nifti_of(built_series.arrays[:6], 5.0, True))
    out, slices = tmp_path / "series.csv", tmp_path / "slices.csv"
    assert main(["review", str(folder), "--model", str(brain_model_dir), "--out", str(out),
                 "--by-series", "--slices", str(slices)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert sorted(r["kind"] for r in rows) == ["dicom", "nifti"]
    dicom = next(r for r in rows if r["kind"] == "dicom")
    assert dicom["outcome"] == "suspected" and dicom["suspected_class"] == "meningioma"
    assert (int(dicom["run_first_slice"]), int(dicom["run_last_slice"])) == (7, 11)
    assert float(dicom["volume_mm3"]) > 0
    assert next(r for r in rows if r["kind"] == "nifti")["outcome"] == "not_seen"
    assert len(list(csv.DictReader(open(slices)))) == 16 + 6


def test_series_volume_rule_names_why_there_is_none():
    """One volume rule for segmentation and heatmap areas: a run slice whose measurement failed
    cancels the volume and says so (not "no pixel spacing"); a slice without mm or a series
    without slice spacing gives its own reason; otherwise the areas' sum × the spacing."""
    from types import SimpleNamespace

    from medcls.engine.series import UNMEASURED, _set_volume

    def volume(areas, spacing=2.0):
        a = SimpleNamespace(series=SimpleNamespace(slice_spacing=spacing), volume_mm3=None,
                            volume_method=None, volume_note="")
        _set_volume(a, areas, "segmentation", f"{len(areas)} areas", "segmentation")
        return a

    failed = volume([10.0, UNMEASURED, 0.0])
    assert failed.volume_mm3 is None and failed.volume_note.startswith("1 of 3 run slices could not")
    assert "pixel spacing" in volume([10.0, None]).volume_note and volume([10.0, None]).volume_mm3 is None
    assert "slice spacing" in volume([10.0, 5.0], spacing=None).volume_note
    ok = volume([10.0, 5.0])
    assert ok.volume_mm3 == 30.0 and ok.volume_method == "segmentation"
