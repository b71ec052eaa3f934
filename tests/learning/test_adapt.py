"""Site adaptation (medcls.learning.adapt, `medcls adapt`, pages/5_Adapt_to_site.py) on a built site:
60 Br35H slices (30 tumours of unknown type from br35h-tumour's test split, 30 no-tumour slices
of brain-mri's test split), adapted from a copy of the small seed-cnn brain package (the parent
is never the shipped folder, and is checked unchanged), with a small reference sample."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from conftest import PROJECT_ROOT, require

from medcls.cli.main import main
from medcls.core.errors import ModelPackageError
from medcls.learning.adapt import (
    AdaptationRejectedError,
    AdaptConfig,
    Recipe,
    TooFewCasesError,
    adapt,
    check_enough,
    split_local,
)
from medcls.learning.data import Record
from medcls.learning.site import SITE_DEFAULT_FILE, set_site_default, site_defaults
from medcls.models.package import file_sha256

QUICK = ["--reference-test", "80", "--reference-n", "32", "--epochs", "3"]


def _rows(data_dir, n_per_label: int) -> list[tuple]:
    """(image, label) of the first Br35H test slices of each label."""
    out = []
    for folder, label in (("br35h-tumour", "tumor"), ("brain-mri", "no_tumor")):
        with (require(data_dir / folder) / "labels.csv").open(newline="") as fh:
            rows = [r for r in csv.DictReader(fh)
                    if r["split"] == "test" and r["label"] == label and r["source"] == "br35h"]
        out += [(data_dir / folder / r["file"], label) for r in rows[:n_per_label]]
    return out


def _site(folder, rows):
    folder.mkdir(parents=True)
    with (folder / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label"])  # no group column: Br35H groups hold up to 15 slices
        for i, (src, label) in enumerate(rows):
            name = f"{i:03d}{src.suffix}"
            shutil.copyfile(src, folder / name)
            w.writerow([name, label])
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir):
    """A scan root holding the 60-case site, and a models folder holding a copy of the parent."""
    from conftest import MODELS_DIR

    tmp = tmp_path_factory.mktemp("adapt")
    parent_src = require(MODELS_DIR / "brain-mri-seed-cnn")
    models = tmp / "models"
    shutil.copytree(parent_src, models / "brain-mri-seed-cnn")
    site = _site(tmp / "scans" / "site", _rows(data_dir, 30))
    return {"tmp": tmp, "models": models, "parent": models / "brain-mri-seed-cnn", "site": site,
            "reference": str(data_dir / "brain-mri"), "scans": tmp / "scans"}


@pytest.fixture(scope="module")
def adapted(env):
    """One CLI run, shared by the tests that read its output."""
    parent_hash = file_sha256(env["parent"] / "model.keras")
    out = env["tmp"] / "out-seed1"
    code = main(["adapt", "--model", str(env["parent"]), "--data", str(env["site"]), "--out", str(out),
                 "--seed", "1", "--reference", env["reference"], *QUICK])
    return {"code": code, "out": out, "card": json.loads((out / "card.json").read_text()),
            "parent_hash": parent_hash}


def test_split_is_grouped_stratified_and_seeded():
    recs = [Record(ref=f"{lab}{i}", label=lab, group=f"{lab}-p{i // 2}")
            for lab in ("tumor", "no_tumor") for i in range(20)]
    adapt_part, check = split_local(recs, 0.3, seed=4)
    assert {r.group for r in adapt_part}.isdisjoint({r.group for r in check})  # a patient on one side
    assert sorted(r.label for r in check).count("tumor") == sorted(r.label for r in check).count("no_tumor") == 6
    assert split_local(recs, 0.3, seed=4) == (adapt_part, check)
    assert split_local(recs, 0.3, seed=5) != (adapt_part, check)


def test_too_few_cases_are_refused_with_the_number_needed(env, data_dir, capsys):
    small = _site(env["tmp"] / "small", _rows(data_dir, 8))
    code = main(["adapt", "--model", str(env["parent"]), "--data", str(small),
                 "--out", str(env["tmp"] / "never")])
    cap = capsys.readouterr()
    err = cap.out + cap.err
    assert code == 2
    assert "each label needs at least 17 cases" in err
    assert not (env["tmp"] / "never").exists()
    with pytest.raises(TooFewCasesError, match="at least two labels"):
        check_enough([Record("a", "tumor")] * 10, [Record("b", "tumor")] * 10, 0.3)


def test_cli_reports_before_after_and_records_provenance(env, adapted):
    card, parent = adapted["card"], json.loads((env["parent"] / "card.json").read_text())
    rec = card["adaptation"]
    assert adapted["code"] in (0, 3)  # 3: written but not promoted; the verdict says why
    assert (adapted["code"] == 0) == rec["accepted"]
    assert card["parent"] == {"name": parent["name"], "version": parent["version"],
                              "model_sha256": parent["model_sha256"], "folder": "brain-mri-seed-cnn"}
    assert card["model_sha256"] == file_sha256(adapted["out"] / "model.keras") != parent["model_sha256"]
    assert file_sha256(env["parent"] / "model.keras") == adapted["parent_hash"]  # parent untouched
    assert len(rec["data_fingerprint"]) == 16 and rec["recipe"]["name"] == "mixed"
    assert rec["split"]["adapt"] + rec["split"]["check"] == 60 and rec["split"]["check"] == 18
    for part in ("before", "after"):
        fig = rec[part]
        assert fig["n"] == 18 and fig["n_by_label"] == {"no_tumor": 9, "tumor": 9}
        for key in ("accuracy", "recall_tumor", "recall_no_tumor", "tumour_vs_none_accuracy"):
            lo, hi = fig[key + "_ci95"]
            assert 0.0 <= lo <= fig[key] <= hi <= 1.0
    assert rec["reference"]["test_cases"] == 80
    assert "site-adapted from brain-mri-seed-cnn" in card["task_description"]


def test_same_seed_gives_the_same_figures(env, adapted):
    rec = adapt(AdaptConfig(model=str(env["parent"]), data=str(env["site"]),
                            out=str(env["tmp"] / "out-seed1-again"), seed=1,
                            reference=[env["reference"]], reference_test=80,
                            recipe=Recipe(epochs=3, reference_n=32)))
    first = adapted["card"]["adaptation"]
    assert rec["before"] == first["before"]
    assert rec["after"] == first["after"]
    assert rec["reference"] == first["reference"]


def test_a_worse_model_is_not_promoted(env):
    out = env["tmp"] / "out-bad"
    code = main(["adapt", "--model", str(env["parent"]), "--data", str(env["site"]), "--out", str(out),
                 "--reference", env["reference"], "--reference-test", "80", "--reference-n", "32",
                 "--epochs", "2", "--lr", "3.0"])  # a learning rate that wrecks the network
    card = json.loads((out / "card.json").read_text())
    assert code == 3 and not card["adaptation"]["accepted"]
    assert any("reference test split" in r for r in card["adaptation"]["reasons"])
    with pytest.raises(AdaptationRejectedError, match="stays the default"):
        set_site_default(out)
    assert site_defaults(env["models"]) == {}


def test_page_adapts_promotes_and_discards(env, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MEDCLS_SCAN_ROOT", str(env["scans"]))
    monkeypatch.setenv("MEDCLS_MODELS", str(env["models"]))
    monkeypatch.syspath_prepend(str(PROJECT_ROOT))
    at = AppTest.from_file(str(PROJECT_ROOT / "pages" / "5_Adapt_to_site.py"), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    at.text_input(key="adapt_folder").set_value("../outside").run()
    at.button[0].click().run()
    assert any("outside" in e.value or "does not exist" in e.value for e in at.error)
    at.number_input(key="adapt_epochs").set_value(3)
    at.text_input(key="adapt_folder").set_value("site").run()
    at.button[0].click().run()  # the page reruns itself until the job is done
    assert not at.exception, [e.stack_trace for e in at.exception]
    table = at.dataframe[0].value
    assert {"accuracy", "recall tumor", "recall no tumor"} <= set(table["figure"])
    out = env["models"] / "brain-mri-seed-cnn-site"
    card = json.loads((out / "card.json").read_text())
    promote = next(b for b in at.button if b.label == "Make it the site default")
    if card["adaptation"]["accepted"]:
        promote.click().run()
        assert site_defaults(env["models"]) == {"brain-mri": out.name}
    else:
        assert promote.disabled and not (env["models"] / SITE_DEFAULT_FILE).exists()
    next(b for b in at.button if b.label == "Discard it").click().run()
    assert not out.exists() and site_defaults(env["models"]) == {}
    assert (env["models"] / "brain-mri-seed-cnn" / "model.keras").is_file()


def test_out_never_overwrites_another_model(env):
    with pytest.raises(ModelPackageError, match="not a site adaptation"):
        adapt(AdaptConfig(model=str(env["parent"]), data=str(env["site"]), out=str(env["parent"])))
