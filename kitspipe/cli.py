"""The ``kitspipe`` command: one subcommand per stage, each a thin wrapper over a stage function."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import typing
from pathlib import Path

from kitspipe import __version__
from kitspipe.errors import KitspipeError
from kitspipe.logs import add_stage_file, configure
from kitspipe.plans import MixedPrecision

log = logging.getLogger("kitspipe")

MIXED_PRECISION_CHOICES = typing.get_args(MixedPrecision)


def _synth(args: argparse.Namespace) -> None:
    from kitspipe.synthetic import synthesize_dataset

    ids = synthesize_dataset(args.out, n_cases=args.cases, seed=args.seed, size=args.size,
                             first_index=args.first_index, with_labels=not args.no_labels, progress=args.progress)
    log.info("wrote %d cases to %s", len(ids), args.out)


def _check(args: argparse.Namespace) -> None:
    from kitspipe.dataset import discover
    from kitspipe.validation import check_dataset

    dataset = discover(args.data, stage="check", require_labels=args.require_labels)
    report = check_dataset(dataset, stage="check", jobs=args.jobs, progress=args.progress)
    for warning in report.warnings:
        log.warning(warning.line())
    report.raise_if_errors()
    log.info("check: %d cases (%s layout), no errors, %d warnings", len(dataset.cases), dataset.layout,
             len(report.warnings))


def _fingerprint(args: argparse.Namespace) -> None:
    from kitspipe.fingerprint import run_fingerprint

    if args.show:
        from kitspipe.fingerprint_report import show_fingerprint

        print(show_fingerprint(args.target))
        return
    if args.work is None:
        raise KitspipeError("fingerprint: --work WORK is required (or use --show WORK)")
    add_stage_file(args.work, "fingerprint")
    out = run_fingerprint(args.target, args.work, jobs=args.jobs, progress=args.progress, force=args.force)
    log.info("fingerprint: %s", out)


def _plan(args: argparse.Namespace) -> None:
    from kitspipe.planning import run_plan

    add_stage_file(args.work, "plan")
    out = run_plan(args.work, preset=args.preset, force=args.force)
    log.info("plan: %s", out)


def _preprocess(args: argparse.Namespace) -> None:
    from kitspipe.preprocessing import run_preprocess

    add_stage_file(args.work, "preprocess")
    out = run_preprocess(args.work, data=args.data, jobs=args.jobs, progress=args.progress, force=args.force)
    log.info("preprocess: %s", out)


def _train(args: argparse.Namespace) -> None:
    from kitspipe.training.run import train_fold

    add_stage_file(args.work, f"train_fold_{args.fold}")
    resume = {"yes": True, "auto": "auto", None: False}[args.resume]
    folder = train_fold(args.work, args.fold, trainer=args.trainer, resume=resume, epochs=args.epochs,
                        max_minutes=args.max_minutes, device=args.device, force=args.force,
                        plugins=tuple(args.plugin), progress=args.progress, mixed_precision=args.mixed_precision,
                        compile_network=args.compile)
    log.info("train: %s", folder)


def _cv(args: argparse.Namespace) -> None:
    from kitspipe.crossval import run_cv

    add_stage_file(args.work, "cv")
    out = run_cv(args.work, trainer=args.trainer, jobs=args.jobs, folds=args.folds, epochs=args.epochs,
                 max_minutes=args.max_minutes, device=args.device, progress=args.progress,
                 plugins=tuple(args.plugin))
    log.info("cv: %s", out)


def _infer(args: argparse.Namespace) -> None:
    from kitspipe.inference.run import run_inference

    add_stage_file(args.work, "infer")
    out = run_inference(args.work, args.input, args.output, folds=args.folds, mode=args.mode,
                        save_probabilities=args.save_probabilities, device=args.device, trainer=args.trainer,
                        checkpoint=args.checkpoint, postprocess=not args.no_postprocessing,
                        plugins=tuple(args.plugin), progress=args.progress, mixed_precision=args.mixed_precision,
                        mirror_axes=args.mirror_axes)
    log.info("infer: %s", out)


def _evaluate(args: argparse.Namespace) -> None:
    from kitspipe.dataset import discover
    from kitspipe.evaluation import evaluate_pairs, pair_predictions

    reference = discover(args.reference, stage="evaluate")
    # A flat folder of <case>.nii.gz holds the reference label maps themselves.
    references = ({c.case_id: c.image for c in reference.cases} if reference.layout == "folder"
                  else {c.case_id: c.label for c in reference.labelled})
    pairs = pair_predictions(args.predictions, references, stage="evaluate", allow_extra=args.allow_extra)
    table = evaluate_pairs(pairs, args.out or args.predictions / "evaluation", tolerance_mm=args.tolerance_mm)
    columns = [c for c in ("kidney_dice", "tumour_dice", "composite_dice") if c in table.columns]
    print(table[["case", *columns]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(table[columns].mean().to_frame("mean").T.to_string(float_format=lambda v: f"{v:.4f}"))


def _report(args: argparse.Namespace) -> None:
    from kitspipe.report import build_report

    if not args.work.is_dir():
        raise KitspipeError(f"report: work folder {args.work} does not exist")
    add_stage_file(args.work, "report")
    out = build_report(args.work, data=args.data, predictions=args.predictions, evaluation=args.evaluation)
    log.info("report: %s", out)


def _demo(args: argparse.Namespace) -> None:
    from kitspipe.demo import run_demo

    add_stage_file(args.work, "demo")
    run_demo(args.work, train_cases=args.train_cases, test_cases=args.test_cases, seed=args.seed,
             preset=args.preset, max_minutes=args.max_minutes, progress=args.progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kitspipe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kitspipe {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug output")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the built-in synthetic CT dataset (KiTS19 layout)")
    p.add_argument("out", type=Path)
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=["small", "full"], default="small")
    p.add_argument("--first-index", type=int, default=0, help="index of the first case (case_XXXXX)")
    p.add_argument("--no-labels", action="store_true", help="write images only (test cases)")
    p.set_defaults(func=_synth)

    p = sub.add_parser("check", help="validate a dataset: every problem of every case, one line each")
    p.add_argument("data", type=Path)
    p.add_argument("--require-labels", action="store_true", help="cases without a label are errors")
    p.add_argument("-j", "--jobs", type=int, default=1)
    p.set_defaults(func=_check)

    p = sub.add_parser("fingerprint", help="measure a dataset (or --show WORK to inspect one)")
    p.add_argument("target", type=Path, help="DATA folder, or WORK folder with --show")
    p.add_argument("--work", type=Path)
    p.add_argument("--show", action="store_true", help="print WORK/fingerprint.json as tables, draw fingerprint.png")
    p.add_argument("-j", "--jobs", type=int, default=1)
    p.add_argument("--force", action="store_true", help="recompute even if up to date")
    p.set_defaults(func=_fingerprint)

    p = sub.add_parser("plan", help="fingerprint + preset -> WORK/plans.json")
    p.add_argument("work", type=Path)
    p.add_argument("--preset", default="paper", help="preset name in plans/ (paper, cpu) or a JSON path")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_plan)

    p = sub.add_parser("preprocess", help="resample every case onto the plan's grids")
    p.add_argument("work", type=Path)
    p.add_argument("--data", type=Path, help="dataset folder (default: the fingerprinted one)")
    p.add_argument("-j", "--jobs", type=int, default=1)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("train", help="train one cross-validation fold (resumable)")
    p.add_argument("work", type=Path)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--trainer", help="trainer name (default: the plan's)")
    p.add_argument("--plugin", action="append", default=[], help="a .py file or module defining trainers")
    p.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                   help="continue from checkpoint_latest; 'auto' also starts a fold that has none")
    p.add_argument("--epochs", type=int, help="maximum epochs of the last phase (overrides the plan)")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget (overrides the plan)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES,
                   help="bf16 autocast: auto (bf16 on a CUDA GPU that supports it), bf16 or off (default: the plan's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for training")
    p.add_argument("--force", action="store_true", help="start over even if a run exists")
    p.set_defaults(func=_train)

    p = sub.add_parser("cv", help="five-fold cross-validation: train, predict held-out cases, evaluate")
    p.add_argument("work", type=Path)
    p.add_argument("--trainer")
    p.add_argument("-j", "--jobs", type=int, default=1, help="folds trained in parallel")
    p.add_argument("--plugin", action="append", default=[], help="a .py file or module defining trainers")
    p.add_argument("--folds", type=int, nargs="+", help="only these folds")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--device")
    p.set_defaults(func=_cv)

    p = sub.add_parser("infer", help="segment raw cases with trained folds")
    p.add_argument("work", type=Path)
    p.add_argument("input", type=Path, help="KiTS19 / nnU-Net raw layout, or a folder of NIfTI files")
    p.add_argument("output", type=Path)
    p.add_argument("--folds", type=int, nargs="+", default=[0], help="folds to ensemble")
    p.add_argument("--mode", choices=["paper", "fast"], help="tiling (default: the plan's)")
    p.add_argument("--save-probabilities", action="store_true")
    p.add_argument("--no-postprocessing", action="store_true")
    p.add_argument("--checkpoint", choices=["best", "latest"], default=None,
                   help="which checkpoint of each fold (default: the plan's inference.checkpoint)")
    p.add_argument("--trainer")
    p.add_argument("--plugin", action="append", default=[])
    p.add_argument("--device")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES,
                   help="bf16 autocast: auto, bf16 or off (default: the plan's)")
    p.add_argument("--mirror-axes", nargs="*", choices=["z", "y", "x"], metavar="AXIS",
                   help="test-time mirroring along these axes (z, y, x; none given: no mirroring; "
                        "default: the plan's inference.mirror_axes)")
    p.set_defaults(func=_infer)

    p = sub.add_parser("evaluate", help="KiTS19 metrics of predictions against reference labels")
    p.add_argument("predictions", type=Path, help="folder of <case>.nii.gz")
    p.add_argument("reference", type=Path, help="labelled dataset (KiTS19 or nnU-Net raw layout)")
    p.add_argument("--out", type=Path, help="where the tables go (default PREDICTIONS/evaluation)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance")
    p.add_argument("--allow-extra", action="store_true", help="ignore predictions without a reference")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("report", help="static HTML report of a work folder -> WORK/report/index.html")
    p.add_argument("work", type=Path)
    p.add_argument("--data", type=Path, help="dataset with the images and labels of the predicted cases")
    p.add_argument("--predictions", type=Path, help="folder of predicted <case>.nii.gz")
    p.add_argument("--evaluation", type=Path, help="folder with metrics_per_case.csv and summary.json")
    p.set_defaults(func=_report)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in synthetic dataset")
    p.add_argument("--work", type=Path, default=Path("demo"), help="folder for data and artefacts")
    p.add_argument("--train-cases", type=int, default=24)
    p.add_argument("--test-cases", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--max-minutes", type=float, help="training budget (default: the preset's)")
    p.set_defaults(func=_demo)
    return parser


def _interrupt(signum, frame):
    # SIGTERM (a scheduler's kill, `docker stop`) takes the same clean path as Ctrl-C: atomic
    # writes in flight are abandoned, manifests are marked interrupted, the exit code is 130.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    configure(-1 if args.quiet else (1 if args.verbose else 0))
    try:
        args.func(args)
    except KitspipeError as error:
        print(str(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kitspipe: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            # A signal that arrives once the work is done takes the default path.
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
