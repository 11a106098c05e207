#!/usr/bin/env python3
"""Benchmark of one training step, for the ``cpu`` and the ``paper`` preset.

Per preset, in a fresh child process (clean peak RSS, see child_process.py), with kitspipe's own
parts: ``PatchSampler`` + ``make_augmenter`` + ``make_loader`` feed batches, the trainer from
the registry (``get_trainer(plans.training.trainer)(plans)``) builds network and loss, and
a step is what ``kitspipe.training.loop.run_epoch`` does: move the batch, zero the grads,
``trainer.loss``, backward, Adam step (the ``full`` phase: the whole network, low-resolution
blocks frozen as the trainer says). Measured:

* seconds per step, split into data wait (time blocked on the loader) and compute;
* compute GFLOP/s from the FLOPs one step really runs, counted by ``torch.utils.flop_counter``
  (every convolution and matrix product of forward and backward, mask branch and head
  included), next to the planner's estimate ``kitspipe.planning.training_step_gflop``
  (≈ 3 × the forward of both U-Nets, without the mask branch and the head);
* in the same process, a plain ``torch.nn.functional.conv3d`` 32→32 3×3×3 on the preset's
  high-resolution input size (and base→base at the preset's own width), the ceiling to
  compare the step's GFLOP/s with: in float32, and with ``--amp`` in bf16 too (the step is
  compared with the conv of its own precision);
* peak GPU memory (``torch.cuda.max_memory_allocated``) on CUDA;
* the data loader alone: seconds per batch with the plan's workers, and one sample drawn in
  the calling process on one thread, as in a worker: the CPU cost of sampling + augmentation.

When ``nnunetv2`` is importable (``make bench-nnunet``) and the
device is the CPU, nnUNetTrainer's step with the ``3d_fullres`` plan nnU-Net makes for five
full-size synthetic cases runs next to them (``bench/nnunet_training.py``: float32
as nnU-Net runs on a CPU, 1 warm-up + 2 timed steps of ~85 s), with its share of a conv3d
measured in its own process, and its data augmentation per sample next to kitspipe's ``paper``
sample, both on one thread; ``--no-nnunet`` skips it.

The ``cpu`` preset is resolved against a fingerprint of small synthetic cases; the
``paper`` preset against the same cases (resampled to 1 mm and 4 mm: a full 108³ patch pair).

Steps: one untimed warm-up step, then 10 timed steps (``cpu`` preset, and ``paper`` on
CUDA) or 2 (``paper`` on CPU: 20-50 s each); ``--repeats N`` sets the timed steps of both.
``--amp``, ``--compile`` and ``--channels-last`` run the step the way the plan settings
``training.mixed_precision``/``compile``/``channels_last`` make ``kitspipe train`` run it
(``kitspipe.devices``); with ``--compile`` the warm-up is 2 steps (forward and backward graphs).
``--deterministic`` overrides ``training.deterministic`` (``off``: cuDNN times its algorithms, the
default on CUDA), ``--batch-size`` overrides ``training.batch_size``, ``--compile-mode`` tries
another ``torch.compile`` mode (an exploration, not a plan setting), and ``--profile`` prints
torch.profiler's table of one more step. With ``--channels-last`` the conv3d ceiling is measured
in both layouts and the step is compared with the faster.

    python bench/train_step.py                      # 2-4.5 min on 2 cores, most of it the paper steps
    python bench/train_step.py --quick              # 3 cpu steps, 1 cold paper step
    python bench/train_step.py --device cuda --amp  # bf16 autocast on a GPU
    python bench/train_step.py --device cuda --presets paper --quick --amp --channels-last
    python bench/train_step.py --device cuda --presets paper --amp --channels-last --compile --deterministic on
"""

from __future__ import annotations

import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import child_process  # noqa: E402
import ceiling  # noqa: E402
import nnunet_training  # noqa: E402
import step_probes  # noqa: E402
from benchlib import Stopwatch, Summary, mib, summary_json, table  # noqa: E402

from kitspipe.plans import Determinism  # noqa: E402

SCRIPT = Path(__file__).resolve()
PRESETS = ("cpu", "paper")


# ----------------------------------------------------------------------------- child side

def child_main(spec: dict[str, Any]) -> None:
    if spec.get("task") == "nnunet":
        nnunet_training.child_train_step(spec)
        return
    import numpy as np
    import torch

    from kitspipe.data.augmentation import make_augmenter
    from kitspipe.data.cases import open_cases
    from kitspipe.data.loader import make_loader
    from kitspipe.data.sampling import PatchSampler
    from kitspipe.devices import (autocast, batch_to_device, channels_last_active, configure_determinism, maybe_compile,
                                  set_memory_format)
    from kitspipe.planning import training_step_gflop
    from kitspipe.plans import load_plans
    from kitspipe.trainers.registry import get_trainer

    work, device, amp = Path(spec["work"]), spec["device"], spec["amp"]
    torch.manual_seed(0)
    plans = load_plans(work / "plans.json")
    if spec["batch_size"] is not None:
        plans = plans.with_training(batch_size=spec["batch_size"])
    deterministic = configure_determinism(spec["deterministic"] or plans.training.deterministic, device)
    case_ids = sorted(json.loads((work / "preprocessed" / "manifest.json").read_text())["cases"])
    cases = open_cases(work / "preprocessed", case_ids)
    sampler = PatchSampler(cases, plans, make_augmenter(plans))
    workers = plans.training.num_workers if spec["workers"] is None else spec["workers"]

    trainer = get_trainer(plans.training.trainer)(plans)
    network = set_memory_format(trainer.build_network().to(device), spec["channels_last"], device)
    loss_fn = trainer.build_loss().to(device)
    phase = trainer.phases()[-1]  # "full": the whole network
    optimiser = torch.optim.Adam(list(trainer.trainable_parameters(network, phase)), lr=plans.training.learning_rate)
    if spec["compile"] and spec["compile_mode"]:  # an exploration of torch.compile's modes, not a plan setting
        network = torch.compile(network, mode=spec["compile_mode"])
    else:
        network = maybe_compile(network, spec["compile"])  # last, as kitspipe.training.run does
    trainer.set_train_mode(network, phase)
    dtype = torch.bfloat16 if amp else None
    channels_last = channels_last_active(spec["channels_last"], device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = child_process.rss_bytes()
    clock = child_process.ChildClock()

    warmup, steps = spec["warmup"], spec["steps"]
    data_s, compute_s, losses = [], [], []
    loader = make_loader(sampler, plans, epoch=0, steps=warmup + steps, num_workers=workers, seed=plans.training.seed)
    waited = time.perf_counter()
    for index, batch in enumerate(loader):
        started = time.perf_counter()
        batch = batch_to_device(batch, torch.device(device), channels_last)
        optimiser.zero_grad(set_to_none=True)
        with autocast(device, dtype):  # as kitspipe.training.loop.run_epoch
            terms = trainer.loss(network, loss_fn, batch, phase)
        terms.total.backward()
        optimiser.step()
        losses.append(float(terms.total.detach()))  # synchronises, as the loop's bookkeeping does
        if device == "cuda":
            torch.cuda.synchronize()
        finished = time.perf_counter()
        if index >= warmup:
            data_s.append(started - waited)
            compute_s.append(finished - started)
        waited = finished
    del loader
    training_peak_rss = child_process.peak_rss_bytes()
    profile = (step_probes.profile_step(trainer, network, loss_fn, phase, batch, device, dtype, optimiser)
               if spec["profile"] else "")
    counted_gflop = step_probes.counted_step_gflop(trainer, network, loss_fn, phase, batch, device, dtype)
    gpu_peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0

    high_in, low_in = plans.high.input_patch[0], plans.low.input_patch[0]
    step_gflop = training_step_gflop(plans, high_in, low_in)
    reference_size = min(high_in, 108)
    conv = []
    for channels in sorted({32, plans.high.base_filters}, reverse=True):
        for precision_amp in ((False, True) if amp else (False,)):
            conv.append(ceiling.conv_reference(reference_size, channels, device, spec["conv_repeats"], precision_amp))
            if channels_last:  # the ceiling is the faster layout: cuDNN's NDHWC kernels may beat NCDHW
                conv.append(ceiling.conv_reference(reference_size, channels, device, spec["conv_repeats"],
                                                   precision_amp, channels_last=True))

    # The loader alone: the plan's workers, then one sample at a time in this process.
    loader_batches = spec["loader_batches"]
    intervals = []
    started = time.perf_counter()
    last = started
    first_batch_s = 0.0
    for index, _ in enumerate(make_loader(sampler, plans, epoch=1, steps=loader_batches + 1, num_workers=workers,
                                          seed=plans.training.seed)):
        now = time.perf_counter()
        if index == 0:
            first_batch_s = now - started
        else:
            intervals.append(now - last)
        last = now
    in_process = []
    with benchlib.one_thread():  # as in a loader worker, and as nnU-Net's augmentation is timed
        for index in range(spec["sample_repeats"]):
            with Stopwatch() as watch:
                sampler.sample(np.random.default_rng([plans.training.seed, 2, index]))
            in_process.append(watch.seconds)

    child_process.child_report(
        clock, baseline,
        preset=plans.preset, high_input=high_in, low_input=low_in, high_output=plans.high.output_patch[0],
        batch_size=plans.training.batch_size, workers=workers, deterministic=deterministic, warmup_steps=warmup,
        step_gflop=step_gflop,
        counted_gflop=counted_gflop,
        data_s=data_s, compute_s=compute_s, losses=losses, training_peak_rss=training_peak_rss,
        gpu_peak_bytes=gpu_peak, parameters=sum(p.numel() for p in network.parameters()), conv=conv,
        loader_first_batch_s=first_batch_s, loader_interval_s=intervals, sample_in_process_s=in_process,
        elastic_probability=plans.augmentation.elastic_probability, profile=profile)


# ----------------------------------------------------------------------------- parent side

def prepare(data: Path, scratch: Path, preset: str, n_cases: int) -> Path:
    """Fingerprint, plan and preprocess ``n_cases`` cases of ``data`` with ``preset`` (not timed)."""
    from kitspipe.fingerprint import run_fingerprint
    from kitspipe.planning import run_plan
    from kitspipe.preprocessing import run_preprocess

    linked = scratch / f"data_{preset}"
    for case in benchlib.labelled_cases(data, n_cases):
        benchlib.link_case(case, linked)
    work = scratch / f"work_{preset}"
    run_fingerprint(linked, work, progress=False)
    run_plan(work, preset)
    run_preprocess(work, jobs=1, progress=False)
    return work


def plan_steps(args, preset: str) -> tuple[int, int]:
    """(warm-up steps, timed steps) of a preset."""
    slow = preset == "paper" and args.device == "cpu"
    warmup = 2 if args.compile else 1
    if args.repeats is not None:
        return (0 if slow and args.quick else warmup), args.repeats
    if args.quick:
        return (0, 1) if slow else (warmup, 3)
    return (1, 2) if slow else (warmup, 10)


def measure(args) -> dict[str, Any]:
    n_cases = args.cases or 4
    results = {}
    with benchlib.data_folder(args.data) as data, benchlib.scratch_folder("train") as scratch:
        if not benchlib.has_cases(data):
            print(f"synthesizing {n_cases} small cases in {data} ...", flush=True)
            benchlib.synthesize(data, range(n_cases), args.seed, "small")
        for preset in args.presets:
            # The paper preset's 1 mm grids are large; two cases are enough to draw patches from.
            preset_cases = n_cases if preset == "cpu" else min(n_cases, 2)
            print(f"{preset}: preparing {preset_cases} cases ...", flush=True)
            work = prepare(data, scratch, preset, preset_cases)
            warmup, steps = plan_steps(args, preset)
            slow = preset == "paper" and args.device == "cpu"
            spec = {"work": str(work), "device": args.device, "amp": args.amp, "compile": args.compile,
                    "channels_last": args.channels_last, "workers": args.workers, "batch_size": args.batch_size,
                    "deterministic": args.deterministic, "compile_mode": args.compile_mode, "profile": args.profile,
                    "warmup": warmup, "steps": steps,
                    "conv_repeats": args.repeats or (1 if slow and args.quick else 3),
                    "loader_batches": 2 if args.quick else (4 if slow else 10),
                    "sample_repeats": 3 if args.quick else 10}
            print(f"{preset}: {warmup} warm-up + {steps} timed steps ...", flush=True)
            results[preset] = child_process.run_child(SCRIPT, spec)
        nnunet = nnunet_training.compare_training(SCRIPT, scratch, args) if args.nnunet else None
    figures = report(results, args)
    if isinstance(nnunet, str):
        print(nnunet)
        figures["nnunet"] = {"skipped": nnunet}
    elif nnunet:
        figures["nnunet"] = nnunet_training.report_training(nnunet, figures["presets"].get("paper"), args.amp)
    return figures


def report(results: dict[str, child_process.ChildResult], args) -> dict[str, Any]:
    step_rows, conv_rows, loader_rows = [], [], []
    figures: dict[str, Any] = {"amp_bf16": args.amp, "compile": args.compile, "compile_mode": args.compile_mode,
                               "channels_last": args.channels_last, "presets": {}}
    device = args.device
    for preset, result in results.items():
        r = result.extra
        data, compute = Summary.of(r["data_s"]), Summary.of(r["compute_s"])
        total = Summary.of([d + c for d, c in zip(r["data_s"], r["compute_s"])])
        # The rate of what the step really computes (FlopCounterMode), not the planner's estimate.
        gflops = Summary.of([r["counted_gflop"] / c for c in r["compute_s"]])
        # The step against the 32→32 conv of its own precision (bf16 under --amp).
        precision = "bf16" if args.amp else "fp32"
        best_conv = max(c["forward_backward_gflops"] for c in r["conv"]
                        if c["channels"] == 32 and c.get("precision", "fp32") == precision)
        step_rows.append([preset, f"{r['high_input']}³/{r['low_input']}³ → {r['high_output']}³", r["batch_size"],
                          r["workers"], f"{r['step_gflop']:.0f} / {r['counted_gflop']:.0f}", total.n, data.fmt(3), compute.fmt(3),
                          total.fmt(3), ceiling.rate(gflops.median, device),
                          f"{100 * gflops.median / best_conv:.0f} %",
                          mib(r["training_peak_rss"]) + (f" / {mib(r['gpu_peak_bytes'])}" if args.device == "cuda"
                                                         else "")])
        for conv in r["conv"]:
            conv_rows.append([preset, f"{conv['channels']}→{conv['channels']}", conv.get("precision", "fp32"),
                              conv.get("layout", "ncdhw"),
                              f"{conv['size']}³", Summary.of(conv["forward_s"]["values"]).fmt(4),
                              ceiling.rate(conv["forward_gflops"], device),
                              Summary.of(conv["forward_backward_s"]["values"]).fmt(4),
                              ceiling.rate(conv["forward_backward_gflops"], device)])
        interval = Summary.of(r["loader_interval_s"])
        sample = Summary.of(r["sample_in_process_s"])
        loader_rows.append([preset, r["workers"], r["batch_size"], f"{r['loader_first_batch_s']:.2f}",
                            interval.fmt(3), f"{r['batch_size'] / interval.median:.1f}", sample.fmt(3),
                            f"{r['elastic_probability']:.1f}"])
        figures["presets"][preset] = {
            "high_input": r["high_input"], "low_input": r["low_input"], "high_output": r["high_output"],
            "batch_size": r["batch_size"], "workers": r["workers"], "warmup_steps": r["warmup_steps"],
            "deterministic": r["deterministic"],
            "parameters": r["parameters"], "step_gflop": r["step_gflop"],
            "data_wait_s": summary_json(r["data_s"]), "compute_s": summary_json(r["compute_s"]),
            "step_s": summary_json([d + c for d, c in zip(r["data_s"], r["compute_s"])]),
            "compute_gflops": summary_json([r["step_gflop"] / c for c in r["compute_s"]]),
            "counted_gflop": r["counted_gflop"],
            "compute_gflops_counted": summary_json([r["counted_gflop"] / c for c in r["compute_s"]]),
            "losses": r["losses"], "peak_rss_bytes": r["training_peak_rss"], "gpu_peak_bytes": r["gpu_peak_bytes"],
            "conv_reference": r["conv"],
            "loader": {"first_batch_s": r["loader_first_batch_s"],
                       "batch_interval_s": summary_json(r["loader_interval_s"]),
                       "samples_per_s": r["batch_size"] / interval.median,
                       "one_sample_in_process_s": summary_json(r["sample_in_process_s"])},
        }
    print()
    kernels = ", ".join(f"{preset} {'on' if result.extra['deterministic'] else 'off'}" for preset, result in results.items())
    gpu = " / GPU" if args.device == "cuda" else ""
    unit = ceiling.rate_unit(device)
    print(table(["preset", "patch in (1mm/4mm) → out", "batch", "workers", "GFLOP/step plan / counted", "steps",
                 "data wait s",
                 "compute s", "step s", f"compute {unit}", "of conv3d", f"peak RSS MiB{gpu}"],
                step_rows, title="Training step: median (min–max) over the timed steps, after the warm-up"))
    print("(GFLOP/step: plan = kitspipe.planning.training_step_gflop, 3 × forward of both U-Nets for the batch; "
          "counted = torch.utils.flop_counter over one step, every convolution and matrix product of forward and "
          f"backward; compute {unit} and 'of conv3d' use the counted figure: compute {unit} / conv3d 32→32 "
          f"forward+backward {unit} below, same precision; "
          f"precision {'bf16 autocast' if args.amp else 'fp32'}{', compiled' if args.compile else ''}"
          f"{', channels-last' if args.channels_last else ''}; deterministic kernels: {kernels})")
    print()
    print(table(["preset", "conv3d", "precision", "layout", "input", "forward s", unit, "forward+backward s", unit], conv_rows,
                title="Plain torch.nn.functional.conv3d 3×3×3, batch 1, measured in the same process"))
    for preset, result in results.items():
        if result.extra.get("profile"):
            print(f"\ntorch.profiler, one {preset} step (self time per operator and kernel, most first):")
            print(result.extra["profile"])
    print()
    print(table(["preset", "workers", "batch", "first batch s", "s per batch", "samples/s", "one sample in-process s",
                 "elastic p"], loader_rows,
                title="Data loader alone (make_loader over PatchSampler + augmentation, no training)"))
    return figures


def main() -> None:
    parser = benchlib.base_parser(__doc__)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for forward and loss")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (training.compile)")
    parser.add_argument("--channels-last", action="store_true",
                        help="channels_last_3d network and batches on CUDA (training.channels_last)")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune",
                                                   "max-autotune-no-cudagraphs"), default=None,
                        help="torch.compile mode with --compile (default: kitspipe's, torch's default mode)")
    parser.add_argument("--deterministic", choices=typing.get_args(Determinism), default=None,
                        help="deterministic kernels (default: the plan's training.deterministic; off on CUDA "
                             "lets cuDNN time its algorithms)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's table of one more step (the operators that take the time)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the plan's training.batch_size")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the plan's num_workers)")
    parser.add_argument("--cases", type=int, default=None, help="synthetic small cases (default 4; paper uses 2)")
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS),
                        help="presets to measure (default both)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic dataset seed (default 0)")
    parser.add_argument("--no-nnunet", dest="nnunet", action="store_false",
                        help="skip nnU-Net's training step (run on the CPU when nnunetv2 is importable)")
    args = parser.parse_args()
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode needs --compile")
    benchlib.run_benchmark(args, "bench/train_step.py", measure, child_main, notes=(), after=None)

if __name__ == "__main__":
    main()
