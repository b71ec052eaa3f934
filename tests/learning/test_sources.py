"""Training and measuring across sources: several folders, partial labels, source
randomisation, balanced sampling, per-source evaluation and the shortcut check, modality scope."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require

from medcls.core.errors import DatasetError, WrongModalityError
from medcls.learning.data import Record, label_set, load_dataset, load_datasets, stratum_weights, tf_dataset
from medcls.learning.evaluate import source_report

BRAIN_CLASSES = ["glioma", "meningioma", "no_tumor", "pituitary"]


@pytest.fixture(scope="module")
def combined(data_dir):
    return load_datasets([require(data_dir / "brain-mri"), require(data_dir / "br35h-tumour"),
                          require(data_dir / "normal-ixi")])


# ----------------------------------------------------------------------------- data layer

def test_several_folders_keep_their_root_and_source(combined, data_dir):
    assert combined.classes == BRAIN_CLASSES  # 'tumor' is a partial label, not a class
    by_source = {}
    for r in combined.records:
        by_source.setdefault(r.source, set()).add(r.root.name)
    assert by_source == {"figshare": {"brain-mri"}, "br35h": {"brain-mri", "br35h-tumour"},
                         "ixi": {"normal-ixi"}}
    tumour = next(r for r in combined.records if r.label == "tumor")
    assert combined.path(tumour) == data_dir / "br35h-tumour" / tumour.ref
    assert combined.path(tumour).is_file()
    assert len(combined.split("test")) == 595 + 217 + 103


def test_partial_label_is_the_set_of_tumour_classes(combined):
    rows = [next(r for r in combined.records if r.label == lab) for lab in ("tumor", "no_tumor", "glioma")]
    t = combined.targets(rows)
    assert t.tolist() == [[1, 1, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0]]
    assert label_set("tumor", BRAIN_CLASSES) == {"glioma", "meningioma", "pituitary"}
    with pytest.raises(DatasetError, match="partial label"):
        combined.label_index(rows)  # a partial label has no single class index
    with pytest.raises(DatasetError, match="negative class"):
        label_set("tumor", ["cat", "dog"])


def test_a_folder_of_partial_labels_needs_a_task_that_can_hold_them(data_dir):
    with pytest.raises(DatasetError, match="negative class"):
        load_dataset(require(data_dir / "br35h-tumour"), classes=["cat", "dog"])


def test_balanced_sampling_weighs_labels_alike_within_a_source(combined):
    train = combined.split("train")
    idx, weight = stratum_weights(train)
    assert abs(sum(weight.values()) - 1.0) < 1e-9
    assert weight[("br35h", "tumor")] == pytest.approx(weight[("br35h", "no_tumor")])
    assert weight[("figshare", "glioma")] == pytest.approx(weight[("figshare", "meningioma")])
    # sources by the square root of their size
    n = {s: sum(1 for r in train if r.source == s) for s in ("figshare", "ixi")}
    fig = sum(w for (s, _), w in weight.items() if s == "figshare")
    assert fig / weight[("ixi", "no_tumor")] == pytest.approx(np.sqrt(n["figshare"] / n["ixi"]))
    keys = sorted(weight)
    assert [keys[i] for i in idx[:3]] == [(r.source, r.label) for r in train[:3]]


def test_balanced_pipeline_draws_strata_in_their_proportions():
    recs = [Record(ref=str(i), label="a" if i < 90 else "b", source="s") for i in range(100)]
    idx, weight = stratum_weights(recs)
    x = np.zeros((100, 8, 8, 1), np.float32)
    x[90:] = 1.0  # 'b' images are white
    t = np.zeros((100, 2), np.float32)
    t[:90, 0] = t[90:, 1] = 1
    seen = []
    for _ in range(5):
        for img, lab in tf_dataset(x, t, 50, training=True, strata=(idx, weight), channels=1):
            seen.append(lab.numpy()[:, 1])
    share_b = np.concatenate(seen).mean()
    assert 0.4 < share_b < 0.6  # 10% of the rows, half of the draws


# ----------------------------------------------------------------------------- loss

def test_partial_label_loss_raises_the_tumour_classes_together():
    import tensorflow as tf

    from medcls.learning.train import label_set_loss

    loss = label_set_loss(0.0)
    logits = tf.Variable([[0.5, -0.2, 1.5, 0.1]])
    target = tf.constant([[1.0, 1.0, 0.0, 1.0]])  # 'tumor'
    p0 = tf.nn.softmax(logits).numpy()[0]
    with tf.GradientTape() as tape:
        value = loss(target, logits)
    logits.assign_sub(0.5 * tape.gradient(value, logits))
    p1 = tf.nn.softmax(logits).numpy()[0]
    assert value.numpy()[0] == pytest.approx(-np.log(p0[[0, 1, 3]].sum()), rel=1e-5)
    assert all(p1[i] > p0[i] for i in (0, 1, 3)) and p1[2] < p0[2]


def test_set_loss_is_keras_cross_entropy_for_one_class_rows():
    import keras

    from medcls.learning.train import label_set_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 4)).astype(np.float32)
    onehot = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 16)]
    for eps in (0.0, 0.1):
        ours = np.asarray(label_set_loss(eps)(onehot, logits))
        ref = np.asarray(keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=eps,
                                                              reduction=None)(onehot, logits))
        assert np.allclose(ours, ref, atol=1e-5)


def test_temperature_fits_on_label_sets():
    from medcls.models.calibration import nll

    logits = np.array([[2.0, 0.0, -1.0, 1.0]])
    p = np.exp(logits) / np.exp(logits).sum()
    assert nll(logits, np.array([[1, 1, 0, 1]])) == pytest.approx(-np.log(p[0, [0, 1, 3]].sum()))
    assert nll(logits, np.array([2])) == pytest.approx(-np.log(p[0, 2]))


# ----------------------------------------------------------------------------- augmentation

@pytest.fixture(scope="module")
def real_images(combined):
    from medcls.io.preprocess import PreprocessSpec, preprocess

    spec = PreprocessSpec(input_size=128, channels=3)
    recs = [r for r in combined.split("train") if r.box][:6] + \
        [r for r in combined.split("train") if r.source == "ixi"][:2]
    return recs, np.stack([preprocess(combined.scan(r), spec).array for r in recs]).astype(np.float32)


def test_source_randomisation_keeps_range_gray_and_positions(real_images):
    import tensorflow as tf

    from medcls.learning.augment import source_randomise

    tf.random.set_seed(3)
    _, x = real_images
    changed = 0
    for img in x:
        for _ in range(4):
            out = source_randomise(tf.constant(img)).numpy()
            assert out.shape == img.shape and out.dtype == np.float32
            assert out.min() >= 0.0 and out.max() <= 1.0
            assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
            # anatomy stays in place: the head's centre of mass moves by less than two pixels
            m0, m1 = img[..., 0] > 0.2, out[..., 0] > 0.2
            c0 = np.argwhere(m0).mean(0)
            c1 = np.argwhere(m1).mean(0) if m1.any() else c0
            assert np.abs(c0 - c1).max() < 2.0 + 0.05 * img.shape[0]
            changed += not np.allclose(out, img, atol=1e-3)
    assert changed >= len(x)  # it does randomise


def test_pipeline_keeps_labels_and_boxes(real_images, combined):
    recs, x = real_images
    t = combined.targets(recs)
    masks = np.zeros((len(x), 128, 128), np.uint8)
    for i, r in enumerate(recs):
        if r.box:
            xc, yc, w, h = r.box
            masks[i, int((yc - h / 2) * 128):int((yc + h / 2) * 128), int((xc - w / 2) * 128):int((xc + w / 2) * 128)] = 1
    ds = tf_dataset(x[..., :1], t, len(x), training=False, box_masks=masks, grid=8, source_augment=True)
    img, (lab, box) = next(iter(ds))
    assert np.array_equal(lab.numpy(), t)  # no shuffling without training: rows in order
    box = box.numpy()
    for i, r in enumerate(recs):
        allowed = t[i] > 0
        if r.box:  # +1 inside / -1 outside on the allowed classes only
            assert (box[i][..., allowed] == 1).any() and (box[i][..., allowed] == -1).any()
            assert (box[i][..., ~allowed] == 0).all()
        else:
            assert (box[i] == 0).all()
    ds = tf_dataset(x[..., :1], t, 4, training=True, box_masks=masks, grid=8, source_augment=True)
    for img, (lab, _) in ds:
        assert img.shape[-1] == 3 and float(img.numpy().min()) >= 0.0 and float(img.numpy().max()) <= 1.0
        assert set(map(tuple, lab.numpy().tolist())) <= set(map(tuple, t.tolist()))


# ----------------------------------------------------------------------------- evaluation

def test_shortcut_check_on_constructed_predictions():
    classes = BRAIN_CLASSES
    targets = np.array([[1, 1, 0, 1]] * 4 + [[0, 0, 1, 0]] * 4 + [[1, 0, 0, 0]] * 2, np.float32)
    probs = np.full((10, 4), 0.02)
    # tumour (type unknown): 3 called a tumour class, 1 called no_tumor
    for i, c in enumerate([0, 3, 1, 2]):
        probs[i, c] = 0.94
    # normals: 1 of 4 called a tumour
    for i, c in enumerate([2, 2, 2, 0]):
        probs[4 + i, c] = 0.94
    probs[8, 0] = 0.94  # glioma right
    probs /= probs.sum(1, keepdims=True)
    probs[9] = [0.30, 0.40, 0.10, 0.20]  # glioma called meningioma, unsure
    rep = source_report(targets, probs, classes, "no_tumor", low_confidence_threshold=0.8)
    assert rep["called_no_tumor"] == pytest.approx(1 / 6)  # 1 of the 6 tumour rows
    assert rep["called_tumour"] == pytest.approx(1 / 4)
    assert rep["n_single_label"] == 6 and rep["accuracy"] == pytest.approx(4 / 6)
    assert rep["coverage"] == pytest.approx(9 / 10)
    assert rep["answered_accuracy"] == pytest.approx(7 / 9)  # wrong: 1 missed tumour, 1 normal
    assert rep["tumour_answers_unflagged"] == 1


def test_a_tumour_of_unknown_type_is_calibrated_on_finding_or_none():
    """Tumours labelled only "tumor", answered with the mass split between two tumour types: the
    top class's 0.5 is scored right every time (top-label ECE 0.5), while the finding-or-none
    forecast (0.98 against no_tumor) is right every time too (ECE 0.02)."""
    classes = BRAIN_CLASSES
    targets = np.array([[1, 1, 0, 1]] * 10, np.float32)  # tumour, type unknown
    probs = np.array([[0.49, 0.49, 0.02, 0.0]] * 10)
    rep = source_report(targets, probs, classes, "no_tumor")
    assert rep["ece"] == pytest.approx(0.51, abs=1e-6)
    assert rep["ece_finding"] == pytest.approx(0.02, abs=1e-6)
    probs[:3] = [0.0, 0.1, 0.9, 0.0]  # three missed: said "none" with 0.9
    rep = source_report(targets, probs, classes, "no_tumor")
    assert rep["called_no_tumor"] == pytest.approx(0.3)
    assert rep["ece_finding"] == pytest.approx((7 * 0.02 + 3 * 0.9) / 10, abs=1e-6)


def test_shipped_default_per_source_figures_match_a_direct_count(brain_model_dir, brain_predictor, data_dir):
    """evaluate's by-source figures on Br35H tumours and IXI normals equal a count made directly
    from the predictor's answers (sample of each test set)."""
    from medcls.learning.evaluate import evaluate_model

    ds = load_datasets([require(data_dir / "br35h-tumour"), require(data_dir / "normal-ixi")],
                       classes=list(brain_predictor.classes))
    recs = ds.split("test")[::6] + ds.split("test")[-20:]
    rep = evaluate_model(brain_model_dir, ds, records=recs, bootstrap=0)
    preds = brain_predictor.predict([ds.scan(r) for r in recs])
    for src in ("br35h", "ixi"):
        mine = [p for p, r in zip(preds, recs) if r.source == src]
        calls = np.mean([p.label == "no_tumor" for p in mine])
        got = rep["by_source"][src]
        if src == "br35h":
            assert got["called_no_tumor"] == pytest.approx(calls)
        else:
            assert got["called_tumour"] == pytest.approx(1 - calls)
        answered = [p for p in mine if not p.low_confidence and not p.outside_training_distribution]
        assert got["coverage"] == pytest.approx(len(answered) / len(mine))


# ----------------------------------------------------------------------------- scope

def test_a_ct_dicom_is_refused_by_an_mr_model(brain_predictor, data_dir):
    from medcls.io.load import load_scan

    if brain_predictor.card.get("modality") != "MR":
        pytest.skip("the shipped brain model's card does not state its modality yet")
    ct = load_scan(require(data_dir / "dicom" / "wg04" / "CT1_J2KR.dcm"))
    with pytest.raises(WrongModalityError, match="CT scan.*MR"):
        brain_predictor.predict(ct)
    mr = load_scan(require(data_dir / "dicom" / "wg04" / "MR1_JPLL.dcm"))
    assert brain_predictor.predict(mr).label in brain_predictor.classes


def test_card_states_the_scope_each_class_was_trained_on(brain_predictor):
    card = brain_predictor.card
    if "scope" not in card:
        pytest.skip("the shipped brain model predates the scope field")
    scope = card["scope"]["classes"]
    assert set(scope) == set(brain_predictor.classes)
    assert {"br35h", "ixi"} <= set(scope["no_tumor"]["train_images_by_source"])
    assert "br35h (type unknown)" in scope["glioma"]["train_images_by_source"]
    assert card["modality"] == "MR"


# ----------------------------------------------------------------------------- ROAD

def test_noisy_linear_imputation_solves_the_neighbour_equations():
    import cv2

    from medcls.learning.localization import noisy_linear_impute

    rng = np.random.default_rng(1)
    S = 64
    img = cv2.GaussianBlur(rng.random((S, S)).astype(np.float32), (0, 0), 3)
    yy, xx = np.mgrid[0:S, 0:S]
    ramp = (0.3 * yy / S + 0.5 * xx / S).astype(np.float32)
    hole = np.zeros((S, S), bool)
    hole[10:40, 15:50] = True
    # a linear ramp is its own neighbour average: the hole is filled exactly
    assert np.abs(noisy_linear_impute(ramp, hole, noise=0.0, exact=True) - ramp).max() < 1e-5
    assert np.abs(noisy_linear_impute(ramp, hole, noise=0.0) - ramp).max() < 2e-3
    for share in (0.1, 0.5, 0.9):
        removed = np.zeros(S * S, bool)
        removed[np.argsort(-cv2.GaussianBlur(rng.random((S, S)), (0, 0), 8).ravel())[:int(share * S * S)]] = True
        removed = removed.reshape(S, S)
        fast = noisy_linear_impute(img, removed, noise=0.0)
        exact = noisy_linear_impute(img, removed, noise=0.0, exact=True)
        assert np.abs(fast - exact).max() < 0.05 * (img.max() - img.min())
        assert np.abs(fast - exact).mean() < 0.01 * (img.max() - img.min())
        assert np.array_equal(fast[~removed], img[~removed])  # known pixels untouched
    noisy = noisy_linear_impute(np.repeat(img[..., None], 3, -1), hole, noise=0.01)
    assert noisy.shape == (S, S, 3) and np.array_equal(noisy[..., 0], noisy[..., 2])


def test_road_reads_the_class_probability_after_removal():
    from medcls.learning.localization import road

    S = 32
    img = np.zeros((S, S, 1), np.float32)
    img[8:16, 8:16] = 1.0  # the "evidence": a bright square

    def proba(batch):  # probability of class 1 = brightness of the square's area
        p = batch[:, 8:16, 8:16, 0].mean(axis=(1, 2))
        return np.stack([1 - p, p], axis=1)

    good = np.zeros((S, S))
    good[8:16, 8:16] = 1.0
    r_good = road(proba, img, good, 1, noise=0.0)
    r_bad = road(proba, img, -good, 1, noise=0.0)
    assert r_good["morf"][0] < 0.2 < 0.9 < r_good["lerf"][0]  # removing the square first kills it
    assert r_good["morf_mean"] < r_bad["morf_mean"] and r_good["lerf_mean"] > r_bad["lerf_mean"]


# ----------------------------------------------------------------------------- validated planes

def test_dicom_slices_outside_the_validated_planes_are_withheld(brain_model_dir, data_dir, tmp_path):
    import shutil

    from medcls.engine.inference import Predictor
    from medcls.io.geometry import scan_plane
    from medcls.io.load import load_scan
    from medcls.learning.evaluate import evaluate_model
    from medcls.models.package import update_card

    model = tmp_path / "model"
    shutil.copytree(brain_model_dir, model)
    scope = dict(Predictor.from_path(model).card.get("scope") or {})
    update_card(model, {"scope": scope | {"validated_planes": ["axial"]}})
    p = Predictor.from_path(model)
    sagittal = sorted(require(data_dir / "dicom" / "volunteer-sagittal-t1").glob("*.dcm"))[:3]
    axial = sorted(require(data_dir / "dicom" / "mprage-series").iterdir())[:2]
    for f in sagittal:
        scan = load_scan(f)
        assert scan_plane(scan) == "sagittal"
        pred = p.predict(scan)
        assert pred.outside_scope and pred.outside_training_distribution
        assert "sagittal" in pred.scope_note and "axial" in pred.scope_note
    for f in axial:
        scan = load_scan(f)
        assert scan_plane(scan) == "axial" and not p.predict(scan).outside_scope
    # the stream (review engine) applies the same rule
    items = list(p.predict_stream([str(f) for f in sagittal + axial]))
    assert [i.prediction.outside_scope for i in items] == [True] * 3 + [False] * 2
    # and evaluation counts such slices as not answered
    from medcls.learning.data import Dataset, Record

    ds = Dataset(root=sagittal[0].parent, classes=list(p.classes), name="vol",
                 records=[Record(ref=f.name, label="no_tumor", split="test", source="vol",
                                 root=sagittal[0].parent) for f in sagittal])
    assert evaluate_model(model, ds, bootstrap=0)["overall"]["coverage"] == 0.0
