"""``medcls train``, ``evaluate``, ``fit-region``, ``train-seg`` and ``fit-seg``: the commands that
make and measure model packages (the work is :mod:`medcls.learning`)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def add_train_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a model on a dataset with a fixed split")
    t.add_argument("--data", required=True, nargs="+",
                   help="folder(s) with labels.csv (file,label,split[,source,group,box_*]) or one "
                        ".npz; several folders are combined, the first is the task's own (its "
                        "test split gives the card's figures); label 'tumor' is a partial label "
                        "(one of the tumour classes)")
    t.add_argument("--arch", help="seed-cnn, compact-cnn or mobilenet-tl (not with --init)")
    t.add_argument("--init", help="start from this model package's weights and contract (fine-tuning only)")
    t.add_argument("--source-augment", action="store_true",
                   help="per-image source randomisation (intensity curves, blur/sharpen, noise, "
                        "resampling, JPEG re-encoding)")
    t.add_argument("--balanced", action="store_true", help="sample batches balanced over (source, label)")
    t.add_argument("--modality", help="DICOM Modality the model is for (e.g. MR); DICOM of another modality is refused")
    t.add_argument("--scope", help="JSON file describing the sources (planes, sequences) for the card's scope")
    t.add_argument("--out", required=True, help="model package folder to write (models/<name>)")
    t.add_argument("--name")
    t.add_argument("--task", help="task id shared by models of the same task (e.g. brain-mri)")
    t.add_argument("--task-description")
    t.add_argument("--version", default="1.0.0", help="the model's version, stated in its card")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--fine-tune-epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--fine-tune-lr", type=float, default=2e-4)
    t.add_argument("--patience", type=int, default=6)
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--input-size", type=int)
    t.add_argument("--weights", help="ImageNet *_no_top.h5 file for mobilenet-tl")
    t.add_argument("--fine-tune-from", default="block_9_expand",
                   help="first backbone layer unfrozen in the fine-tuning phase (mobilenet-tl)")
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--ema", action="store_true",
                   help="keep an exponential moving average of the weights (not for networks trained "
                        "from scratch with BatchNormalization: their statistics follow the raw weights)")
    t.add_argument("--box-loss", type=float, default=0.0,
                   help="weight of the tumour-box localisation loss (labels.csv box columns)")
    t.add_argument("--cache-dir", default=".cache/medcls")
    t.add_argument("--max-train", type=int, help="use only this many training images (smoke runs)")
    t.add_argument("--limits", help="JSON file with the card's list of limits")
    t.add_argument("--preprocess", help='JSON overrides of the preprocessing spec, e.g. \'{"crop": false}\'')
    t.add_argument("--workers", type=int, help="train on a Ray cluster with this many workers "
                   "(Ray Train, MultiWorkerMirroredStrategy; default: this machine only)")
    t.add_argument("--address", help="Ray cluster for --workers: auto, HOST:PORT or ray://HOST:10001")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a model package on labelled scans")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True, nargs="+",
                   help="folder(s) with labels.csv, or one folder per class; figures are also "
                        "given per source (the shortcut check)")
    e.add_argument("--split", default="test", help="split to use ('all' for every row)")
    e.add_argument("--out", required=True)
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0: none)")
    e.set_defaults(func=cmd_evaluate)

    f = sub.add_parser("fit-region", help="fit the heatmap-region threshold on the validation split")
    f.add_argument("--model", required=True)
    f.add_argument("--data", required=True, help="dataset with tumour boxes in labels.csv")
    f.add_argument("--split", default="val")
    f.set_defaults(func=cmd_fit_region)

    g = sub.add_parser("train-seg", help="train the tumour segmentation companion package")
    g.add_argument("--data", required=True, help="dataset with masks.csv (brain-mri)")
    g.add_argument("--out", required=True, help="companion package folder (models/brain-mri-seg)")
    g.add_argument("--weights", help="MobileNetV2 0.35 ImageNet *_no_top.h5")
    g.add_argument("--negatives", nargs="*", default=[], help="datasets adding no_tumor train images")
    g.add_argument("--box-data", nargs="*", default=[], help="datasets of box-only tumours")
    g.add_argument("--input-size", type=int, default=160)
    g.add_argument("--epochs", type=int, default=8)
    g.add_argument("--negative-every", type=int, default=3,
                   help="keep every n-th training image without a mask")
    g.add_argument("--freeze-until", default="block_4_expand",
                   help="encoder layers before this one keep ImageNet weights ('' for none)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--max-train", type=int)
    g.add_argument("--max-minutes", type=float)
    g.add_argument("--init", help="continue from this companion package's weights")
    g.add_argument("--no-empty-dice", action="store_true",
                   help="Dice over tumour images only (cross-entropy alone for images without one)")
    g.add_argument("--decoder", default="96,64,48,32,16",
                   help="filters per decoder stage, from stride 16 to full size")
    g.add_argument("--convs-per-stage", type=int, default=1)
    g.add_argument("--patience", type=int, default=4, help="epochs without a better validation Dice before stopping")
    g.add_argument("--encoder", default="mobilenet_v2", choices=("mobilenet_v2", "efficientnet-lite0"),
                   help="the U-Net's encoder network")
    g.add_argument("--encoder-from", help="classifier package whose MobileNetV2 backbone starts the encoder")
    g.add_argument("--flip-average", action="store_true",
                   help="the package averages each image's probabilities with its mirror image's")
    g.add_argument("--cache-dir", default=".cache/medcls")
    g.set_defaults(func=cmd_train_seg)

    h = sub.add_parser("fit-seg", help="set a segmentation package's flip averaging and refit its "
                                       "threshold on the validation split")
    h.add_argument("--model", required=True, help="segmentation package folder")
    h.add_argument("--data", required=True, help="dataset with masks.csv (brain-mri)")
    h.add_argument("--flip-average", action="store_true")
    h.set_defaults(func=cmd_fit_seg)


def cmd_train(args) -> int:
    from medcls.learning.train import TrainConfig, command_line, train
    from medcls.models.architectures import get_architecture

    if not args.arch and not args.init:
        print("medcls train: give --arch, or --init with a model package to start from", file=sys.stderr)
        return 2

    cfg = TrainConfig(data=args.data, arch=args.arch, out=args.out, name=args.name, task=args.task,
                      epochs=args.epochs, fine_tune_epochs=args.fine_tune_epochs,
                      batch_size=args.batch_size, lr=args.lr, fine_tune_lr=args.fine_tune_lr,
                      patience=args.patience, seed=args.seed, input_size=args.input_size,
                      weights=args.weights, cache_dir=args.cache_dir, max_train=args.max_train,
                      task_description=args.task_description, version=args.version,
                      preprocess=json.loads(args.preprocess) if args.preprocess else {},
                      label_smoothing=args.label_smoothing, ema=args.ema, box_loss=args.box_loss,
                      fine_tune_from=args.fine_tune_from,
                      limits=json.loads(Path(args.limits).read_text()) if args.limits else [],
                      init=args.init, source_augment=args.source_augment, balanced=args.balanced,
                      modality=args.modality,
                      scope=json.loads(Path(args.scope).read_text()) if args.scope else {})
    if cfg.arch and get_architecture(cfg.arch).transfer and not cfg.weights and not cfg.init:
        logging.getLogger(__name__).warning("no --weights given: %s starts from random weights "
                                            "(no download is attempted)", cfg.arch)
    if args.workers:  # Ray Train: the same training code on N workers (medcls.integrations.ray)
        from medcls.integrations.ray.train import train_on_ray

        train_on_ray(cfg, args.workers, args.address, command=command_line())
        return 0
    train(cfg, command=command_line())
    return 0



def cmd_evaluate(args) -> int:
    from medcls.learning.evaluate import evaluate_model, report_markdown

    report = evaluate_model(args.model, args.data, split=args.split, out_dir=args.out,
                            bootstrap=args.bootstrap)
    print(report_markdown(report, f"{Path(args.model).name} on {', '.join(map(str, args.data))} "
                                  f"({args.split or 'all'})"))
    return 0


def cmd_fit_region(args) -> int:
    from medcls.learning.localization import store_region_threshold

    fit = store_region_threshold(args.model, args.data, args.split)
    print(f"region threshold {fit['threshold']:.2f}: mean box IoU {fit['mean_iou']:.3f} on "
          f"{fit['n']} {args.split} images")
    return 0


def cmd_train_seg(args) -> int:
    from medcls.learning.segmentation import SegTrainConfig, train_segmentation
    from medcls.learning.train import command_line

    cfg = SegTrainConfig(data=args.data, out=args.out, weights=args.weights, negatives=args.negatives,
                         box_data=args.box_data, input_size=args.input_size, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, max_train=args.max_train,
                         max_minutes=args.max_minutes, cache_dir=args.cache_dir,
                         negative_every=args.negative_every, freeze_until=args.freeze_until or None,
                         init=args.init, empty_dice=not args.no_empty_dice,
                         decoder=tuple(int(f) for f in args.decoder.split(",")),
                         convs_per_stage=args.convs_per_stage, encoder_from=args.encoder_from,
                         encoder=args.encoder,
                         patience=args.patience, flip_average=args.flip_average)
    print(train_segmentation(cfg, command=command_line()))
    return 0


def cmd_fit_seg(args) -> int:
    from medcls.learning.segmentation import refit

    fit = refit(args.model, args.data, args.flip_average)
    print(f"threshold {fit['threshold']}, {fit['postprocess']}: validation Dice {fit['dice_tumour']:.3f} "
          f"on {fit['n']} tumour images (flip averaging {'on' if args.flip_average else 'off'})")
    return 0
