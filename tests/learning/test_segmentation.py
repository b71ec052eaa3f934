"""Tumour segmentation (medcls.models.segmenter): masks aligned with their images, the geometry
undone back to the original image, measures on constructed shapes, the shipped companion on
real test images, the main page's outline and the report's size."""

from __future__ import annotations

import csv
import shutil

import cv2
import numpy as np
import pytest
from conftest import PROJECT_ROOT, pdf_text, require

SEG_DIR = PROJECT_ROOT / "models" / "brain-mri-seg"


@pytest.fixture(scope="module")
def brain(data_dir):
    root = require(data_dir / "brain-mri")
    with open(root / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return root, rows


@pytest.fixture(scope="module")
def segmenter():
    from medcls.models.segmenter import Segmenter

    return Segmenter(require(SEG_DIR)).warmup()


def test_masks_are_read_and_aligned_with_their_images(brain):
    """Every 150th tumour's mask has its image's size and its box matches labels.csv's box."""
    from medcls.io.load import load_scan
    from medcls.learning.localization import normalised_box_to_pixels
    from medcls.learning.segmentation import mask_index, read_mask
    from medcls.models.measures import box_iou

    root, rows = brain
    masks = mask_index(root)
    tumours = [r for r in rows if r["source"] == "figshare"]
    assert len(masks) == len(tumours) == 3064
    assert not any(r["file"] in masks for r in rows if r["label"] == "no_tumor")
    ious = []
    for r in tumours[::150]:
        mask = read_mask(root / masks[r["file"]])
        assert mask.shape == load_scan(root / r["file"]).shape and mask.any()
        ys, xs = np.nonzero(mask)
        box = normalised_box_to_pixels(*(float(r[k]) for k in ("box_xc", "box_yc", "box_w", "box_h")),
                                       mask.shape)
        ious.append(box_iou((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), box))
    assert np.median(ious) > 0.8 and min(ious) > 0.5, ious


def test_mask_through_the_preprocessing_geometry_and_back(brain):
    """A mask brought onto the model grid (crop to the head, resize, pad) and mapped back lands
    where it was: the grid is the image's geometry, and undoing it recovers the original."""
    from medcls.io.load import load_scan
    from medcls.io.preprocess import preprocess
    from medcls.learning.segmentation import mask_index, mask_to_grid, read_mask, training_spec
    from medcls.models.measures import dice
    from medcls.models.segmenter import grid_to_original

    root, rows = brain
    masks = mask_index(root)
    spec = training_spec(192)
    for r in [r for r in rows if r["file"] in masks and r["split"] == "test"][:6]:
        scan, mask = load_scan(root / r["file"]), read_mask(root / masks[r["file"]])
        pre = preprocess(scan, spec)
        grid = mask_to_grid(mask, pre.geometry)
        assert grid.shape == (192, 192) and grid.any()
        assert pre.mask[grid].mean() > 0.95  # the tumour lies on the head, as on the image
        back = grid_to_original(grid.astype(np.float32), pre.geometry) >= 0.5
        assert back.shape == scan.shape
        assert dice(back, mask) > 0.85, r["file"]


def test_output_has_the_original_geometry_after_crop_and_padding(segmenter):
    """A wide image with black borders (so both crop and padding are at work): the probability
    map comes back at the image's size, and a bright disc drawn into it maps to its place."""
    from medcls.io.load import scan_from_array
    from medcls.io.preprocess import preprocess
    from medcls.learning.segmentation import mask_to_grid
    from medcls.models.segmenter import grid_to_original

    img = np.zeros((300, 520), np.uint8)
    cv2.ellipse(img, (300, 160), (150, 110), 0, 0, 360, 90, -1)  # a "head" off centre
    disc = np.zeros_like(img, bool)
    cv2.circle(disc.view(np.uint8), (340, 140), 25, 1, -1)
    img[disc] = 230
    scan = scan_from_array(img)
    pre = preprocess(scan, segmenter.spec)
    g = pre.geometry
    assert g.crop_box != (0, 0, 520, 300) and g.pad != (0, 0)
    prob = segmenter.probability(pre)
    assert prob.shape == scan.shape and prob.dtype == np.float32
    assert prob[:, :120].max() == 0.0  # left of the head's crop: nothing, by construction
    grid = mask_to_grid(disc, g)
    back = grid_to_original(grid.astype(np.float32), g) >= 0.5
    ys, xs = np.nonzero(back)
    assert abs(xs.mean() - 340) < 1.5 and abs(ys.mean() - 140) < 1.5


def test_dice_iou_and_hausdorff_on_constructed_shapes():
    from medcls.models.measures import dice, hausdorff95, iou

    a = np.zeros((100, 100), bool)
    b = np.zeros((100, 100), bool)
    a[10:30, 10:30] = True  # 400 px
    b[10:30, 20:40] = True  # 400 px, 200 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(200 / 600)
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0  # both empty: agreement
    shifted = np.roll(a, 4, axis=1)
    assert hausdorff95(a, shifted) == pytest.approx(4.0, abs=0.01)
    assert hausdorff95(a, shifted, (0.5, 0.5)) == pytest.approx(2.0, abs=0.01)
    assert np.isnan(hausdorff95(a, np.zeros_like(a)))


@pytest.mark.parametrize("r", [5, 12, 40])
def test_longest_diameter_of_a_disc_and_a_square(r):
    from medcls.models.measures import longest_diameter

    disc = np.zeros((200, 200), np.uint8)
    cv2.circle(disc, (100, 90), r, 1, -1)
    assert longest_diameter(disc) == pytest.approx(2 * r, abs=1.0)
    assert longest_diameter(disc, (0.5, 0.5)) == pytest.approx(r, abs=0.5)
    square = np.zeros((200, 200), bool)
    square[50:50 + 2 * r, 60:60 + 2 * r] = True
    assert longest_diameter(square) == pytest.approx(2 * r * np.sqrt(2), abs=1.5)
    # anisotropic spacing: rows 1 mm, columns 0.5 mm -> a square of pixels is a 2:1 rectangle
    assert longest_diameter(square, (1.0, 0.5)) == pytest.approx(
        np.hypot(2 * r - 1, (2 * r - 1) * 0.5), abs=0.01)


def test_loss_ignores_the_inside_of_a_box_only_tumour():
    """Dice + BCE: near zero for the truth; a box-only tumour (weight 0 inside its box) costs
    nothing for what is predicted inside the box and pays for anything outside it."""
    from medcls.learning.segmentation import dice_bce_loss

    y = np.zeros((1, 32, 32, 1), np.float32)
    y[0, 8:16, 8:16] = 1
    w = np.ones_like(y)
    loss = dice_bce_loss()
    truth = np.concatenate([y, w], -1)
    assert float(loss(truth, y)) < 0.01 and float(loss(truth, 1 - y)) > 1.0
    box_only = np.concatenate([np.zeros_like(y), 1 - y], -1)  # tumour known by its box only
    assert float(loss(box_only, y)) < 0.01 and float(loss(box_only, np.roll(y, 16, 1))) > 0.5
    empty = np.concatenate([np.zeros_like(y), w], -1)
    speck = np.where(np.arange(32)[None, :, None, None] == 3, 0.9, 0.0).astype(np.float32) * np.ones_like(y)
    assert float(dice_bce_loss(empty_dice=False)(empty, speck)) < float(loss(empty, speck))


def test_measure_reads_area_diameter_and_confidence():
    from medcls.models.segmenter import measure

    prob = np.zeros((120, 120), np.float32)
    cv2.circle(prob, (60, 60), 20, 0.9, -1)
    prob[5:8, 5:8] = 0.8  # a speck: dropped by "largest"
    seg = measure(prob, 0.5, "largest", pixel_spacing=(0.5, 0.5))
    assert seg.area_px == int((prob >= 0.5).sum()) - 9
    assert seg.area_mm2 == pytest.approx(seg.area_px * 0.25)
    assert seg.diameter_px == pytest.approx(40, abs=1) and seg.diameter_mm == pytest.approx(20, abs=0.5)
    assert seg.confidence == pytest.approx(0.9)
    assert measure(prob, 0.95) is None


def test_companion_is_found_through_the_classifier_card(tmp_path, brain_model_dir, companion_predictor):
    from medcls.core.errors import ModelPackageError
    from medcls.models.package import list_packages, update_card
    from medcls.models.segmenter import Segmenter, companion_segmenter

    require(SEG_DIR)
    shutil.copytree(brain_model_dir, tmp_path / "clf")
    card = update_card(tmp_path / "clf", {"segmentation": "seg"})
    with pytest.raises(ModelPackageError):  # named but missing: a clear error
        companion_segmenter(tmp_path / "clf", card)
    shutil.copytree(SEG_DIR, tmp_path / "seg")
    assert isinstance(companion_segmenter(tmp_path / "clf", card), Segmenter)
    assert [p.name for p, _ in list_packages(tmp_path)] == ["clf"]  # a companion is no model to pick
    assert companion_segmenter(brain_model_dir, {"name": "x"}) is None  # no key: no segmenter
    assert isinstance(companion_predictor.segmenter, Segmenter)
    assert companion_predictor.segmenter.name == "brain-mri-seg"


def test_unet_decoder_depth_and_encoder_from_the_classifier(shipped_models):
    """Two convolutions per decoder stage keep the output on the input's grid; the encoder
    copied from a brain classifier carries the classifier's own backbone weights: MobileNetV2
    from brain-mri-fast, EfficientNet-Lite0 (``encoder="efficientnet-lite0"``) from the default."""
    import keras

    from medcls.learning.segmentation import build_unet, copy_encoder
    from medcls.models.package import MODEL_FILE

    one = build_unet(64, decoder=(16, 16, 8, 8, 8))
    two = build_unet(64, decoder=(16, 16, 8, 8, 8), convs_per_stage=2)
    assert one.output_shape == two.output_shape == (None, 64, 64, 1)
    assert two.count_params() > one.count_params() and two.get_layer("dec4_conv_2") is not None
    # an untrained U-Net starts at the tumour-pixel prior, not at p = 0.5 everywhere
    from medcls.learning.segmentation import TUMOUR_PIXEL_PRIOR
    start = two.predict(np.random.default_rng(0).random((2, 64, 64, 3), np.float32), verbose=0)
    assert abs(float(np.median(start)) - TUMOUR_PIXEL_PRIOR) < 0.01
    for folder, encoder in (("brain-mri-fast", "mobilenet_v2"),
                            ("brain-mri-default", "efficientnet-lite0")):
        net = build_unet(224, decoder=(16, 16, 8, 8, 8), convs_per_stage=2, encoder=encoder)
        assert copy_encoder(net, shipped_models / folder) > 50
        classifier = keras.saving.load_model(shipped_models / folder / MODEL_FILE, compile=False)
        copied = [layer.name for layer in net.layers if layer.weights
                  and not layer.name.startswith("dec") and layer.name in
                  {c.name for c in classifier.layers}]
        for name in (copied[0], copied[len(copied) // 2], copied[-1]):
            for a, b in zip(net.get_layer(name).get_weights(),
                            classifier.get_layer(name).get_weights()):
                np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError, match="no encoder layer"):  # the other backbone's names
            other = "brain-mri-default" if folder == "brain-mri-fast" else "brain-mri-fast"
            copy_encoder(build_unet(224, decoder=(16, 16, 8, 8, 8), encoder=encoder),
                         shipped_models / other)


def test_saved_companion_holds_the_weights_without_the_optimizer(tmp_path):
    """A package trained and saved holds its weights only: the Adam moments of a compiled model
    would triple the file (the Lite0 U-Net: 45 MB instead of 15, over the 20 MB a shipped
    package may weigh). The saved network gives the same output as the trained one."""
    import keras

    from medcls.learning.segmentation import build_unet, dice_bce_loss, save_segmenter
    from medcls.models.package import MODEL_FILE

    net = build_unet(64, decoder=(8, 8, 8, 8, 8))
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss=dice_bce_loss(False))
    x = np.random.default_rng(0).random((4, 64, 64, 3), np.float32)
    net.fit(x, np.zeros((4, 64, 64, 2), np.float32), epochs=1, verbose=0)
    assert net.optimizer.variables  # trained: the moments exist
    folder = save_segmenter(tmp_path / "seg", net, {"name": "t"})
    size = (folder / MODEL_FILE).stat().st_size
    # float32 weights plus the graph's description (here 1.7 MB; with the moments 3.8 MB)
    assert size < 4 * net.count_params() + 1_000_000, size
    again = keras.saving.load_model(folder / MODEL_FILE, compile=False)
    np.testing.assert_allclose(again.predict(x, verbose=0), net.predict(x, verbose=0), atol=1e-6)


def test_flip_averaging_mirrors_with_the_image(tmp_path, brain):
    """With the card's flip averaging, the probabilities of a mirrored slice are the mirrored
    probabilities (exactly, up to float rounding); they are the mean of the plain network's
    answers for the slice and for its mirror image."""
    from medcls.io.load import load_scan
    from medcls.io.preprocess import preprocess
    from medcls.learning.segmentation import update_seg_card
    from medcls.models.segmenter import FLIP_KEY, Segmenter

    root, rows = brain
    packages = {}
    for flag in (True, False):  # the same weights, with and without flip averaging
        folder = tmp_path / f"flip-{flag}"
        shutil.copytree(SEG_DIR, folder)
        update_seg_card(folder, {FLIP_KEY: flag})
        packages[flag] = Segmenter(folder)
    flipped, plain = packages[True], packages[False]
    r = next(r for r in rows if r["split"] == "test" and r["label"] == "meningioma")
    x = preprocess(load_scan(root / r["file"]), flipped.spec).array[None].astype(np.float32)
    mirror = x[:, :, ::-1].copy()
    a, b = flipped.probability_grid(x)[0], flipped.probability_grid(mirror)[0]
    np.testing.assert_allclose(b, a[:, ::-1], atol=1e-5)
    expected = (plain.probability_grid(x)[0] + plain.probability_grid(mirror)[0][:, ::-1]) / 2
    np.testing.assert_allclose(a, expected, atol=1e-5)
    assert np.abs(plain.probability_grid(x)[0] - a).max() > 1e-3  # the averaging does something


def test_shipped_companion_segments_real_test_tumours(brain, segmenter):
    """On eight test tumours (every class), Dice against the authors' masks is real."""
    from medcls.io.load import load_scan
    from medcls.io.preprocess import preprocess
    from medcls.learning.segmentation import mask_index, read_mask
    from medcls.models.measures import dice

    root, rows = brain
    masks = mask_index(root)
    picked = [r for c in ("glioma", "meningioma", "pituitary")
              for r in [r for r in rows if r["split"] == "test" and r["label"] == c][:: 30][:3]]
    scores = []
    for r in picked[:8]:
        scan = load_scan(root / r["file"])
        seg = segmenter.segment(scan, preprocess(scan, segmenter.spec))
        pred = seg.mask if seg is not None else np.zeros(scan.shape, bool)
        assert pred.shape == scan.shape
        scores.append(dice(pred, read_mask(root / masks[r["file"]])))
    assert np.mean(scores) > 0.6, scores
    card = segmenter.card
    assert card["metrics"]["test"]["dice_tumour"]["mean"] >= 0.6 and 0 < card["threshold"] < 1


def test_card_test_dice_is_what_the_code_produces(brain, segmenter):
    """The shipped card's test Dice and per-class Dice (written by bench.segmentation) are
    recomputed here from the package over every test tumour image: a card never states a figure
    the code no longer produces."""
    from medcls.io.load import load_scan
    from medcls.io.preprocess import preprocess
    from medcls.learning.segmentation import mask_index, read_mask
    from medcls.models.measures import dice

    root, rows = brain
    masks = mask_index(root)
    per_class: dict[str, list[float]] = {}
    for r in rows:
        if r["split"] != "test" or r["file"] not in masks:
            continue
        scan = load_scan(root / r["file"])
        seg = segmenter.segment(scan, preprocess(scan, segmenter.spec))
        pred = seg.mask if seg is not None else np.zeros(scan.shape, bool)
        per_class.setdefault(r["label"], []).append(dice(pred, read_mask(root / masks[r["file"]])))
    stated = segmenter.card["metrics"]["test"]
    scores = [d for v in per_class.values() for d in v]
    assert len(scores) == stated["n_tumour_images"]
    assert np.mean(scores) == pytest.approx(stated["dice_tumour"]["mean"], abs=1e-4)
    for cls, value in stated["dice_per_class"].items():
        assert np.mean(per_class[cls]) == pytest.approx(value, abs=1e-4), cls


# ----------------------------------------------------------------------------- page and report

@pytest.fixture(scope="module")
def models_with_companion(tmp_path_factory, brain_model_dir):
    """A models folder whose brain classifier names the shipped companion (the card key the
    integrator adds to models/brain-mri-default)."""
    from medcls.models.package import update_card

    require(SEG_DIR)
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(brain_model_dir, root / brain_model_dir.name)
    update_card(root / brain_model_dir.name, {"segmentation": "brain-mri-seg"})
    shutil.copytree(SEG_DIR, root / "brain-mri-seg")
    return root


@pytest.fixture(scope="module")
def companion_predictor(models_with_companion):
    from medcls.engine.inference import Predictor

    return Predictor.from_path(models_with_companion / "brain-mri-default")


def _answered(predictor, root, rows, label):
    """The first test image of ``label`` that the classifier answers with that label."""
    for r in rows:
        if r["split"] == "test" and r["label"] == label:
            pred = predictor.predict_file(root / r["file"])
            if pred.label == label and not pred.outside_training_distribution:
                return root / r["file"]
    pytest.skip(f"no {label} test image answered as such")


def test_main_page_draws_the_outline_for_a_tumour_answer_only(brain, models_with_companion,
                                                              companion_predictor, monkeypatch):
    from streamlit.testing.v1 import AppTest

    root, rows = brain
    monkeypatch.setenv("MEDCLS_MODELS", str(models_with_companion))
    predictor = companion_predictor
    for label, drawn in (("meningioma", True), ("no_tumor", False)):
        at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=180)
        at.session_state["scan_bytes"] = _answered(predictor, root, rows, label).read_bytes()
        at.run()
        assert not at.exception
        captions = [c.value for c in at.caption]
        outline = next(iter(at.session_state["_results"].values()))[2]
        assert (outline is not None) == drawn, label
        assert any(c.startswith("Tumour outline") for c in captions) == drawn, captions
        # the heatmap is named for what it is, beside the outline (not a lesion boundary)
        assert any("drove" in c or "supported that answer" in c for c in captions), captions
        assert not any("Region above" in c for c in captions)  # no heatmap "lesion" area


def test_outline_is_drawn_on_the_image():
    from medcls.engine.render import draw_outline
    from medcls.models.segmenter import measure

    prob = np.zeros((64, 64), np.float32)
    prob[20:40, 20:40] = 0.9
    img = np.full((64, 64), 0.2, np.float32)
    seg = measure(prob, 0.5)
    drawn = draw_outline(img, seg)
    plain = draw_outline(img, None)
    assert drawn.shape == (64, 64, 3) and plain.shape == (64, 64, 3)
    changed = (drawn != plain).any(-1)
    assert changed[20, 20:40].all() and not changed[30, 30] and not changed[5, 5]


def test_report_carries_the_measured_size(brain, companion_predictor):
    from medcls.engine.report import render_report
    from medcls.io.display import display_image
    from medcls.io.load import load_scan

    root, rows = brain
    predictor = companion_predictor
    scan_path = _answered(predictor, root, rows, "meningioma")

    scan = load_scan(scan_path)
    explanation = predictor.explain(scan)
    seg = predictor.outline(scan, explanation.prediction)
    assert seg is not None
    text = pdf_text(render_report(display_image(scan), explanation, explanation.prediction,
                                  predictor.card, scan.sha256, fmt="pdf", segmentation=seg))
    from medcls.engine.reading import measure_of

    # one wording of a size, with its method (medcls.engine.reading.Measure), as every screen
    assert f"Tumour size: {measure_of(seg).text}" in " ".join(text.split())
    assert "(method: segmentation)" in " ".join(text.split())
    assert "Grad-CAM region" not in text  # the segmentation's size replaces the heatmap's

    # with pixel spacing: the size in mm², longest diameter in mm
    import dataclasses

    mm = dataclasses.replace(scan, pixel_spacing=(0.5, 0.5))
    seg_mm = predictor.outline(mm, explanation.prediction)
    text = pdf_text(render_report(display_image(mm), explanation, explanation.prediction,
                                  predictor.card, mm.sha256, fmt="pdf", segmentation=seg_mm))
    assert f"area {seg_mm.area_mm2:.0f} mm², longest diameter {seg_mm.diameter_mm:.1f} mm" in text
    assert seg_mm.area_mm2 == pytest.approx(seg_mm.area_px * 0.25)


def test_report_size_rule_no_tumour_withheld_and_heatmap(brain, companion_predictor):
    """A no-tumour or withheld answer carries no size (even when handed a segmentation); a
    model without a companion gives the Grad-CAM region's area, named as such; a model with one
    never gives the heatmap's."""
    import dataclasses

    from medcls.engine.report import render_report
    from medcls.io.display import display_image
    from medcls.io.load import load_scan

    root, rows = brain
    predictor = companion_predictor
    tumour = load_scan(_answered(predictor, root, rows, "meningioma"))
    tumour = dataclasses.replace(tumour, pixel_spacing=(0.5, 0.5))
    e = predictor.explain(tumour)
    seg = predictor.outline(tumour, e.prediction)
    normal = load_scan(_answered(predictor, root, rows, "no_tumor"))
    en = predictor.explain(normal)
    withheld = dataclasses.replace(e.prediction, gate_score=e.prediction.gate_threshold + 1)

    def text(expl, pred, card, segmentation, scan=tumour):
        return pdf_text(render_report(display_image(scan), expl, pred, card, "0" * 64,
                                      fmt="pdf", segmentation=segmentation))

    for pred, expl, scan in ((en.prediction, en, normal), (withheld, e, tumour)):
        t = text(expl, pred, predictor.card, seg, scan)
        assert "Tumour size" not in t and "Region size" not in t and "mm²" not in t
    no_companion = {k: v for k, v in predictor.card.items() if k != "segmentation"}
    t = text(e, e.prediction, no_companion, None)
    assert "Region size: area" in t and "(method: Grad-CAM region; coarse, not a lesion boundary)" \
        in " ".join(t.split())
    assert f"area {e.region.area_mm2:.0f} mm" in " ".join(t.split())
    t = text(e, e.prediction, predictor.card, None)  # a companion that found no outline
    assert "Grad-CAM region" not in t and "Tumour size" not in t


def test_series_report_carries_the_segmentation_size_and_volume(built_series, companion_predictor):
    """The series report of the built tumour series: the run's volume from the segmentation
    (method named) and the shown slice's outline size."""
    from medcls.engine.report import render_series_report
    from medcls.engine.series import answer_series, slice_explanation
    from medcls.io.display import display_image
    from medcls.io.gather import gather
    from medcls.io.sources import bytes_source

    series = gather([bytes_source(f"{i}.dcm", b)
                     for i, b in enumerate(built_series.dicom())]).series[0]
    answer = answer_series(companion_predictor, series)
    i = answer.summary.most_suspicious
    seg = answer.segmentations[i]
    assert seg is not None and answer.volume_method == "segmentation"
    pdf = pdf_text(render_series_report(answer, display_image(series.scan(i)),
                                        slice_explanation(companion_predictor, answer, i), i,
                                        fmt="pdf"))
    assert f"Suspicious region volume: {answer.volume_mm3:.0f} mm3" in pdf
    assert "method: segmentation" in pdf
    assert (f"Slice {i + 1}: Tumour size: area {seg.area_mm2:.0f} mm², longest diameter "
            f"{seg.diameter_mm:.1f} mm (method: segmentation)") in " ".join(pdf.split())
