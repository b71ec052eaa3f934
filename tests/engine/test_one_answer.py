"""One answer, one object (issue 26 point 2, issue 28 points 2 and 3): what the screen, the PDF
report, the worklist CSV, the DICOM SR and the audit row say about a scan comes from one
:class:`medcls.engine.reading.Reading` through the same rules.

The model is the shipped brain-MRI default copied to a tmp folder with its normal class renamed
"unremarkable" (medcls.models.package.rename_classes: the card changes, the model file does
not), a name no built-in list knows: only the card's typed normal class can tell the rules that
"unremarkable" means nothing found. Before the rule had one home, the segmenter (hard-coded
"no_tumor") drew a tumour outline on such an answer while the screen hid it.
"""

from __future__ import annotations

import csv
import io
import shutil

import pytest
from conftest import PROJECT_ROOT, pdf_text, require, split_rows
from dicom_factory import series_files

NORMAL = "unremarkable"


@pytest.fixture(scope="module")
def renamed(tmp_path_factory):
    """(predictor, card) of brain-mri-default whose card calls its normal class "unremarkable"."""
    from medcls.engine.inference import Predictor
    from medcls.models.package import file_sha256, rename_classes

    root = tmp_path_factory.mktemp("models")
    for name in ("brain-mri-default", "brain-mri-seg"):  # the classifier and its segmenter
        shutil.copytree(require(PROJECT_ROOT / "models" / name), root / name)
    folder = root / "brain-mri-default"
    before = file_sha256(folder / "model.keras")
    card = rename_classes(folder, {"no_tumor": NORMAL})
    assert file_sha256(folder / "model.keras") == before  # the model file is unchanged
    assert card.classes == ("glioma", "meningioma", NORMAL, "pituitary")
    assert card.normal_class == NORMAL and card["negative_class"] == NORMAL
    predictor = Predictor.from_path(folder)
    assert predictor.segmenter is not None
    return predictor, predictor.card


def confident(predictor, data_dir, label: str, finding: bool):
    """A test-split image of ``label`` the model answers confidently (as the renamed class)."""
    import cv2

    from medcls.io.load import load_scan

    want = NORMAL if label == "no_tumor" else label
    for row in split_rows(data_dir, "brain-mri", label=label)[:200]:
        scan = load_scan(row["path"])
        pred = predictor.predict(scan)
        if pred.label == want and not pred.low_confidence and not pred.outside_training_distribution:
            return scan, pred, cv2.imread(str(row["path"]), cv2.IMREAD_GRAYSCALE)
    pytest.fail(f"no confident {label} in the test split")


def series_review(predictor, gray):
    """A 3-slice DICOM series of ``gray`` (0.5 mm pixels) answered as the PACS answers it, with
    its SR read back: (review, SR groups)."""
    import numpy as np

    from medcls.engine.series import answer_series, series_verdict, slice_explanation
    from medcls.integrations.pacs.client import SeriesInfo
    from medcls.integrations.pacs.records import ModelIdentity, SeriesReview, StudyReview
    from medcls.integrations.pacs.results import build_results, default_roi, read_sr
    from medcls.integrations.pacs.review import _header
    from medcls.io.gather import gather
    from medcls.io.sources import bytes_source

    files = series_files([np.asarray(gray, np.uint16) * 16] * 3)
    stack = gather([bytes_source(str(i), b) for i, b in enumerate(files)]).series[0]
    answer = answer_series(predictor, stack)
    heads = [_header(b) for b in files]
    review = SeriesReview(SeriesInfo(str(heads[0].StudyInstanceUID), str(heads[0].SeriesInstanceUID),
                                     "MR", 1, ""), answer, heads,
                          slice_instances=[(int(r.name), 0) for r in stack.slices],
                          verdict=series_verdict(answer))
    if review.driving is not None:
        review.scan = stack.scan(review.driving)
        review.explanation = slice_explanation(predictor, answer, review.driving)
        if review.verdict.is_finding:
            review.roi = default_roi(predictor, review.explanation, review.scan)
    sr = build_results(StudyReview(str(heads[0].StudyInstanceUID), ModelIdentity.of(predictor),
                                   [review]))[0]
    (group,) = read_sr(sr)
    return review, group


def report_text(predictor, scan, card, explanation, outline) -> str:
    from medcls.engine.report import render_report
    from medcls.io.display import display_image

    pdf = render_report(display_image(scan), explanation, explanation.prediction, card,
                        scan.sha256, fmt="pdf", segmentation=outline)
    return pdf_text(pdf)


def audit_row(pred, card, region):
    from medcls.integrations.audit.store import Answer

    return Answer.of(pred, card, "u", "main", region=region, input_sha256="0" * 64)


# ----------------------------------------------------------------------------- the normal class

def test_the_normal_class_is_the_cards_everywhere(renamed):
    """One reader of the normal class: the card's field, read by findings, present, training's
    partial labels and the segmenter alike."""
    from medcls.engine import findings, present
    from medcls.learning.data import label_set, negative_class
    from medcls.models.card import normal_class

    _, card = renamed
    assert normal_class(card) == findings.normal_class(card) == NORMAL
    assert normal_class(card.to_dict()) == NORMAL  # the card as JSON says the same
    assert present.is_normal_class(card, NORMAL) and not present.is_normal_class(card, "glioma")
    assert findings.finding_noun(card) == "finding"  # the word comes from the class, not the task
    assert negative_class(card.classes, card.normal_class) == NORMAL
    assert label_set("tumor", card.classes, card.normal_class) == {"glioma", "meningioma", "pituitary"}


def test_a_normal_answer_has_no_region_on_screen_report_sr_or_audit(renamed, data_dir):
    from medcls.engine import present
    from medcls.engine.reading import read_prediction

    predictor, card = renamed
    scan, pred, gray = confident(predictor, data_dir, "no_tumor", finding=False)
    explanation = predictor.explain(scan)
    outline = predictor.outline(scan, pred)
    # the segmenter's outline decision reads the card: no outline for "unremarkable"
    assert outline is None
    # the screen
    verdict = present.verdict(pred, card)
    assert verdict.name == "Unremarkable" and verdict.state == "confident"
    assert not present.shows_region(pred, NORMAL, card)
    assert "not a lesion" in present.heatmap_meaning(pred, card, NORMAL)
    reading = read_prediction(pred, card, explanation.region)
    assert not reading.is_finding and reading.measure is None
    # the PDF report: the same answer, no size, no outline
    text = report_text(predictor, scan, card, explanation, predictor.segmenter.segment(scan))
    assert "Unremarkable" in text and reading.headline.split(" · ")[0] in text
    assert "Tumour size" not in text and "Region size" not in text and "outline" not in text
    # the DICOM SR: the normal class, no region
    review, group = series_review(predictor, gray)
    assert review.verdict.label == NORMAL and not review.verdict.is_finding
    assert group["class"] == NORMAL and group["class_meaning"] == "Unremarkable"
    assert not group["roi"] and group["area_mm2"] is None
    # the audit row: the answer, no region even when one is handed over
    row = audit_row(pred, card, predictor.segmenter.segment(scan))
    assert row.predicted == NORMAL and not row.withheld and row.withheld_reason is None
    assert (row.region_method, row.region_area_mm2, row.region_diameter_mm) == (None, None, None)


def test_a_finding_has_one_size_with_its_method_everywhere(renamed, data_dir):
    """A glioma answer: the screen, the report, the SR and the audit row give the same class and
    the same segmentation size, each naming the method."""
    from medcls.engine import present
    from medcls.engine.reading import read_prediction, read_series

    predictor, card = renamed
    scan, pred, gray = confident(predictor, data_dir, "glioma", finding=True)
    explanation = predictor.explain(scan)
    outline = predictor.outline(scan, pred)
    assert outline is not None
    assert present.shows_region(pred, "glioma", card)
    reading = read_prediction(pred, card, outline)
    assert reading.is_finding and reading.measure.method == "segmentation"
    text = report_text(predictor, scan, card, explanation, outline)
    assert "Glioma" in text and f"Tumour size: {reading.measure.text}" in text.replace("\n", " ")
    row = audit_row(pred, card, outline)
    assert row.region_method == "segmentation"
    assert row.region_area_mm2 == pytest.approx(outline.area_mm2)
    # the series as the PACS sends it: one size (the driving slice's segmentation) and one
    # probability (the run class's mean), the same in the SR, the capture and the reading
    review, group = series_review(predictor, gray)
    series = read_series(review.answer)
    assert review.verdict.is_finding and group["class"] == review.verdict.label == series.label
    assert group["probability"] == pytest.approx(series.probability)
    assert group["method"] == "segmentation" and group["roi"]
    assert group["area_mm2"] == pytest.approx(review.roi.area_mm2)
    assert series.measure.area_mm2 == pytest.approx(review.roi.area_mm2, rel=1e-6)
    assert series.probability_text in review.answer.summary.text  # the sentence says that number
    from medcls.integrations.pacs.records import ModelIdentity
    from medcls.integrations.pacs.results import banner_answer

    assert series.probability_text in banner_answer(review, ModelIdentity.of(predictor))


# ----------------------------------------------------------------------------- withheld

@pytest.fixture(scope="module")
def xray(data_dir):
    return sorted(require(data_dir / "chest-xray" / "normal").glob("*.jpeg"))[0]


def test_a_withheld_scan_says_withheld_and_why_everywhere(renamed, xray, tmp_path):
    """A chest radiograph shown to the brain model: the screen, the report (PDF), the worklist
    CSV and tiles, the SR and the audit row all say "withheld" with the reason, and none gives
    a class, a red bar, a heatmap or a region."""
    from medcls.engine import present
    from medcls.engine.reading import read_prediction, read_series
    from medcls.engine.review import run_review, summary, write_csv
    from medcls.io.load import load_scan
    from medcls.io.sources import folder_sources

    predictor, card = renamed
    scan = load_scan(xray)
    explanation = predictor.explain(scan)
    pred = explanation.prediction
    assert pred.outside_training_distribution
    reason = present.withheld_reason(pred)
    assert reason and "input gate" in reason
    # the screen
    assert present.verdict(pred, card).text == f"Answer withheld: {reason}, so it gives no class."
    reading = read_prediction(pred, card, explanation.region)
    assert reading.withheld and reading.label is None and reading.measure is None
    # the report: withheld and why; no class line, no heatmap, no size
    text = report_text(predictor, scan, card, explanation, None).replace("\n", " ")
    assert "Answer withheld" in text and "input gate" in text and "No heatmap" in text
    assert "Prediction:" not in text and "LOW CONFIDENCE" not in text
    assert "Region size" not in text and "Tumour size" not in text
    # the worklist: CSV and tiles count it as withheld, never as a class
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(xray, folder / "chest.jpeg")
    rows = list(run_review(predictor, folder_sources(folder)))
    buf = io.StringIO()
    write_csv(rows, predictor.classes, buf, card)
    (rec,) = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert rec["predicted"] == "" and rec["answer"] == "Withheld" and rec["state"] == "withheld"
    assert "input gate" in rec["withheld_reason"] and rec["confidence"] == ""
    tiles = summary(rows, predictor.classes, card)
    assert tiles["withheld"] == 1 and sum(tiles["per_class"].values()) == 0
    assert present.worklist_record(rows[0], predictor.classes, card)["predicted"] == \
        f"Withheld: {reason}"
    # the audit row
    row = audit_row(pred, card, explanation.region)
    assert row.withheld and row.withheld_reason == reason and row.region_method is None
    # the SR of the radiograph as a series: withheld, with its coded reason, no class
    import cv2

    review, group = series_review(predictor, cv2.imread(str(xray), cv2.IMREAD_GRAYSCALE))
    assert read_series(review.answer).withheld
    assert group["state"] == "withheld" and group["class"] is None and group["probability"] is None
    assert group["withheld_reason"] == "Unlike the model's training images (input gate)"
    assert not group["roi"]


def test_a_no_finding_report_carries_no_box_from_another_class(renamed, data_dir):
    """Issue 28 point 2: the report of a "no tumour" answer whose heatmap was asked for another
    class names that map as asked for; the map of the normal class carries no box."""
    from medcls.engine.findings import may_show_region, strongest_finding_class

    predictor, card = renamed
    scan, pred, _ = confident(predictor, data_dir, "no_tumor", finding=False)
    own = predictor.explain(scan)
    assert not may_show_region(pred, card, class_name=own.class_name)
    other = predictor.explain(scan, class_index=strongest_finding_class(pred.probabilities, card))
    text = report_text(predictor, scan, card, other, None).replace("\n", " ")
    assert "asked for" in text and "the answer is Unremarkable" in text


def test_the_signed_worklist_summary_says_what_the_table_says(renamed, xray, data_dir, tmp_path):
    """Issue 28 point 15: the worklist's summary PDF, signed by its user, with the model's
    identity and the date; each scan as its Reading says it (withheld: "Withheld" and why), the
    tiles' counts, no file names; its SHA-256 is the signature."""
    import datetime as dt
    import hashlib

    from medcls.engine.review import run_review, summary
    from medcls.engine.summary import signed_summary
    from medcls.io.sources import folder_sources

    predictor, card = renamed
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(xray, folder / "Doe^John-chest.jpeg")  # a name that must not reach the PDF
    for row in split_rows(data_dir, "brain-mri", label="glioma")[:2]:
        shutil.copy(row["path"], folder / row["path"].name)
    rows = list(run_review(predictor, folder_sources(folder)))
    when = dt.datetime(2026, 12, 7, 9, 30, tzinfo=dt.timezone.utc)
    made = signed_summary([r.reading(card) for r in rows], [r.sha256 for r in rows], card,
                          "dr.alice", "folder scans", when)
    assert made.sha256 == hashlib.sha256(made.pdf).hexdigest() and made.n_rows == 3
    text = pdf_text(made.pdf)
    flat = " ".join(text.split())
    assert "Signed by: dr.alice" in flat and "2026-12-07 09:30" in flat
    assert f"Model: {card['name']} v{card['version']}, model SHA-256 {card.model_sha256}" in flat
    tiles = summary(rows, predictor.classes, card)
    assert f"withheld {tiles['withheld']}" in flat and tiles["withheld"] == 1
    assert "Answer withheld: it does not look like the images the model was trained on" in flat
    for r in rows:
        assert r.sha256[:16] in flat
    assert "Doe" not in text and ".jpeg" not in text and ".jpg" not in text
