"""medcls.engine.present: the words and numbers of the clinician's screen, without a page."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import PROJECT_ROOT, model_package, require

from medcls.engine import present
from medcls.engine.inference import Prediction
from medcls.engine.review import ReviewRow

BRAIN = ("glioma", "meningioma", "no_tumor", "pituitary")


def pred(probs, low=0.9, gate=1.0, gate_thr=17.78, classes=BRAIN) -> Prediction:
    p = np.asarray(probs, dtype=float)
    return Prediction(tuple(classes), p / p.sum(), np.log(p), gate, gate_thr, low)


def card_of(name="brain-mri-default") -> dict:
    return json.loads(require(PROJECT_ROOT / "models" / name / "card.json").read_text())


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("p, text", [(0.997, ">99%"), (1.0, ">99%"), (0.9949, "99%"),
                                     (0.004, "<1%"), (0.0, "<1%"), (0.56, "56%"), (0.006, "1%")])
def test_probabilities_never_read_100_or_0(p, text):
    assert present.fmt_prob(p) == text


def test_compared_numbers_get_enough_decimals_to_differ():
    assert present.fmt_pair(0.59, 0.9135) == ("59%", "91%")
    a, b = present.fmt_pair(0.912, 0.9135)
    assert a != b and (a, b) == ("91.2%", "91.3%")
    assert present.fmt_pair(17.8012, 17.7839, kind="number") == ("17.80", "17.78")
    s, t = present.fmt_pair(17.81, 17.8, kind="number")
    assert s != t


def test_class_names_from_card_or_readable_fallback():
    assert present.class_name(None, "no_tumor") == "No tumour"
    assert present.class_name(None, "glioma") == "Glioma"
    assert present.class_name({"class_names": {"no_tumor": "No tumour seen"}}, "no_tumor") == "No tumour seen"
    assert present.task_noun({"task_description": "Chest radiograph: pneumonia or normal"}) == "chest radiograph"
    assert present.task_noun({"task_description": "Brain MRI slice: glioma"}) == "brain MRI slice"


# ----------------------------------------------------------------------------- one answer

def test_verdict_states():
    v = present.verdict(pred([0.97, 0.01, 0.01, 0.01]))
    assert (v.state, v.name, v.probability_text, v.kind) == ("confident", "Glioma", "97%", "success")
    v = present.verdict(pred([0.2, 0.1, 0.6, 0.1]))
    assert v.state == "uncertain" and "No tumour" in v.text and "60%" in v.text
    v = present.verdict(pred([0.97, 0.01, 0.01, 0.01], gate=30.0))
    assert v.withheld and "Glioma" not in v.text and "%" not in v.text


def test_threshold_sentence_reads_the_card_and_invents_nothing():
    p = pred([0.59, 0.2, 0.11, 0.1], low=0.9135)
    bare = present.threshold_sentence(p, {"low_confidence_threshold": 0.9135})
    assert "91%" in bare and "59%" in bare and "below" in bare and "right" not in bare
    # the fields training writes (medcls.learning.train.selective_figures, build_card)
    card = {"low_confidence_threshold": 0.9135,
            "selective": {"n": 726, "threshold": 0.9135, "coverage": 0.83,
                          "answered_accuracy": 0.981, "accuracy_above_threshold": 0.987}}
    assert present.threshold_sentence(p, card) == (
        "Answers above 91% were right 99% of the time on validation; this one (59%) is below that.")
    card["low_confidence_val_accuracy"] = 0.974  # the card's own top-level figure comes first
    assert "right 97% of the time" in present.threshold_sentence(p, card)
    card["selective"]["threshold"] = 0.8  # figures of another threshold: not used
    assert "right" not in present.threshold_sentence(p, card)
    # the shipped card as it is: no invented accuracy either way
    shipped = card_of()
    text = present.threshold_sentence(p, shipped)
    assert ("right" in text) == (present.selective_figures(shipped) is not None)


def test_gate_sentence_tells_close_numbers_apart():
    p = pred([0.9, 0.05, 0.03, 0.02], gate=17.8012, gate_thr=17.7839)
    text = present.gate_sentence(p)
    assert "17.80" in text and "17.78" in text and "withheld" in text


def test_no_region_for_normal_or_withheld_answers():
    card = card_of()
    assert not present.shows_region(pred([0.01, 0.01, 0.97, 0.01]), "no_tumor", card)
    assert not present.shows_region(pred([0.97, 0.01, 0.01, 0.01], gate=40), "glioma", card)
    assert present.shows_region(pred([0.97, 0.01, 0.01, 0.01]), "glioma", card)
    assert present.is_normal_class(card_of("chest-xray-default"), "normal")
    assert present.is_normal_class({"classes": ["healthy_tissue", "lesion"],
                                    "negative_class": "healthy_tissue"}, "healthy_tissue")
    assert not present.is_normal_class({"classes": ["no_tumor", "normal"],
                                        "negative_class": "no_tumor"}, "normal")


def test_explain_choices_put_the_runner_up_second():
    p = pred([0.3, 0.5, 0.15, 0.05])
    assert present.explain_choices(p)[:2] == [1, 0] and present.runner_up(p) == 0


# ----------------------------------------------------------------------------- several models

def test_agreement_of_unsure_models_is_amber_not_plain():
    unsure = [pred([0.1, 0.1, p, 0.8 - p]) for p in (0.56, 0.6, 0.67)]
    s = present.agreement_state(unsure)
    assert s.state == "agree_unsure" and s.kind == "warning" and not s.plain_agreement
    assert "every model is unsure" in s.text and "No tumour" in s.text
    sure = [pred([0.01, 0.01, 0.97, 0.01])] * 3
    assert present.agreement_state(sure).state == "agree"
    mixed = sure[:2] + unsure[:1]
    assert present.agreement_state(mixed).kind == "warning"
    split = [pred([0.97, 0.01, 0.01, 0.01]), pred([0.01, 0.97, 0.01, 0.01])]
    assert present.agreement_state(split).state == "disagree"
    gone = [pred([0.97, 0.01, 0.01, 0.01], gate=99)] * 2
    assert present.agreement_state(gone).state == "withheld"


# ----------------------------------------------------------------------------- worklist

def rows():
    def r(f, c, low=False, out=False, err=None):
        return ReviewRow(f, None if err else "glioma", c, {} if err else {"glioma": c},
                         low, out, None, err)
    return [r("a.png", 0.99), r("b.png", 0.6, low=True), r("c.txt", None, err="not an image"),
            r("d.png", 0.95, out=True), r("e.png", 0.93), r("f.png", 0.7, low=True)]


def test_triage_order_needs_attention_first_then_rising_confidence():
    rs = rows()
    order = [rs[i].file for i in present.triage_order(rs)]
    assert order == ["c.txt", "d.png", "b.png", "f.png", "e.png", "a.png"]
    assert [rs[i].file for i in present.triage_order(rs, "file")] == sorted(r.file for r in rs)
    rec = present.worklist_record(rs[2], ["glioma"])
    assert rec["predicted"] == "unreadable: not an image" and list(rec)[:3] == ["file", "predicted", "flags"]
    assert present.worklist_record(rs[3], ["glioma"])["predicted"].startswith("Withheld: ")


def test_triage_order_on_a_real_review(data_dir, brain_predictor, tmp_path):
    """The shipped model over real test images plus an unreadable file: every row needing
    attention comes before every row that does not."""
    from medcls.engine.review import run_review
    from medcls.io.sources import folder_sources

    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        picks = [r["file"] for r in csv.DictReader(fh) if r["split"] == "test"][:24]
    for f in picks:
        (tmp_path / f.replace("/", "_")).write_bytes((data_dir / "brain-mri" / f).read_bytes())
    (tmp_path / "zz.dcm").write_text("not a scan")
    got = list(run_review(brain_predictor, folder_sources(tmp_path)))
    ordered = [got[i] for i in present.triage_order(got)]
    flags = [r.needs_attention for r in ordered]
    assert flags == sorted(flags, reverse=True) and ordered[0].error is not None
    calm = [r.confidence for r in ordered if not r.needs_attention]
    assert calm == sorted(calm)


# ----------------------------------------------------------------------------- other tasks

def test_withheld_chest_radiograph_suggests_the_chest_task(data_dir, brain_predictor):
    from medcls import load_scan
    from medcls.engine.inference import Predictor

    chest = Predictor.from_path(model_package("chest-xray"))
    with open(require(data_dir / "chest-xray" / "labels.csv"), newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["split"] == "test")
    scan = load_scan(data_dir / "chest-xray" / row["file"])
    assert present.verdict(brain_predictor.predict(scan)).withheld
    text = present.task_suggestion([(chest.card, chest.predict(scan))])
    assert text.startswith("This looks like a chest radiograph: switch to the chest-xray task")
    # and a brain slice is not sent to the chest task
    with open(data_dir / "brain-mri" / "labels.csv", newline="") as fh:
        brow = next(r for r in csv.DictReader(fh) if r["split"] == "test")
    assert present.task_suggestion([(chest.card, chest.predict(load_scan(data_dir / "brain-mri" / brow["file"])))]) is None


# ----------------------------------------------------------------------------- engineer's view

def test_model_figures_carry_intervals_caveats_and_sources():
    card = card_of()
    path = PROJECT_ROOT / "bench" / "results" / "accuracy.json"
    figs = present.model_figures(card, present.load_results(path), "bench/results/accuracy.json")
    by = {f.figure: f for f in figs}
    assert by["accuracy"].value == card["metrics"]["test"]["accuracy"]
    lo, hi = by["accuracy"].ci
    assert lo <= by["accuracy"].value <= hi
    assert "bench/results/accuracy.json" in by["accuracy"].source
    assert card["training"]["date"] in by["accuracy"].source
    assert "No tumour: recall" in by and by["No tumour: recall"].caveat  # the no_tumor caveat
    assert not by["Glioma: recall"].caveat
    assert by["Glioma: precision"].value == card["metrics"]["test"]["per_class"]["glioma"]["precision"]
    names, matrix = present.confusion(card)
    assert names[2] == "No tumour" and sum(map(sum, matrix)) == card["metrics"]["test"]["n"]
    assert present.model_figures(card, None)[0].ci is None  # no results file: no interval
