#!/usr/bin/env python3
"""Benchmark of whole-case prediction with the ``paper`` network, in ``paper`` and ``fast`` tile modes.

One full-size (512 x 512) synthetic case is planned with the ``paper`` preset and brought
onto its 1 mm and 4 mm grids by ``kitspipe.preprocessing.prepare_case`` (timed: that is
inference's own preprocessing) and ``kitspipe.inference.predictor.normalise``. The network is
``kitspipe.trainers.builtin.build_dual_network(plans)`` with its (seeded) initial weights in
eval mode: the cost of a forward pass does not depend on the weights. Each measurement of
``predict_volume(network, high, low, plans, mode=...)`` runs in a fresh child process (clean
peak RSS, see child_process.py).

Work done: forward hooks on every convolution count the FLOPs that actually ran (2 ×
multiply-adds, as ``kitspipe.networks.sizes.unet_forward_flops``), and the ratio to the
FLOPs of one dense pass (every output voxel computed once: the per-voxel cost of the U-Nets
in the large-tile limit, ``unet_forward_flops`` at a huge input, plus the mask branch) says
how much work tiling repeats.

On a CPU the paper network needs ~4-10 s per 108³ tile, and a whole case in ``paper`` mode
is thousands of tiles (hours), so by default on CPU each mode runs on a crop of the case
centred on the kidneys (the same box of the 1 mm and the 4 mm grid): 30 mm for ``paper``
mode (2 × 2 × 2 tiles, one run; ``--repeats`` asks for more) and 96 mm for ``fast`` mode (one
large tile, 3 runs). The whole-case figures are then extrapolated and marked as such:
``paper`` mode as the median seconds per tile times the whole case's tile count (kitspipe's
tiler re-run on the whole grid with the tile sizes and stride the crop run used; every tile
costs the same), ``fast`` mode as the whole case's FLOPs (its tile plan from kitspipe's
tiler) at the GFLOP/s measured on the crop. With ``--device cuda`` both
modes run on the whole case unless ``--crop`` says otherwise (``--quick`` on CUDA: ``paper`` mode
on a 100 mm crop, 343 tiles, ``fast`` mode on the whole case).

A third mode, ``roi``, is ``fast`` mode with ``inference.restrict_to_low_resolution_mask``: the
1 mm network runs only on the box that post-processing's low-resolution mask can keep. The
untrained network's 4 mm output means nothing, so the box is the one kitspipe's
``fine_region`` gives for the reference kidneys and tumours on the 1 mm grid
(``whole_case_inference.kidney_box``), i.e. what a trained network that found them would cost.
It always runs on the whole case, and its FLOPs/dense compares with one dense pass over the whole case.

``--amp`` runs the network under bf16 autocast through ``predict_volume(mixed_precision="bf16")``,
as ``inference.mixed_precision`` does. A plain ``conv3d`` 32→32 on a 108³ input is measured on
the same device in a child of its own (float32, and bf16 with ``--amp``), the ceiling for the
GFLOP/s column. On CUDA the peak GPU memory (``torch.cuda.max_memory_allocated``) of each run is
printed next to ``kitspipe.inference.tile_budget``'s estimate for fast mode's largest tile.

When ``nnunetv2`` is importable (``make bench-nnunet``) and the device is the CPU, the
case then goes end to end through nnU-Net's predictor and through everything ``kitspipe infer``
does (``bench/nnunet_reference.py``, ``bench/whole_case_inference.py``), no test-time mirroring
on either side, and the ratio of the two is printed. nnU-Net plans on ``--nnunet-plan-cases``
synthetic cases (its target spacing is their median) and runs 1 × 2 × 2 of its tiles, scaled to
the whole case's tile count (``--nnunet-whole``: all of them, ~17 min per run); ``--no-nnunet``
skips the comparison.

    python bench/infer.py                        # CPU: crops, 2.5-4 min on 2 cores (+ ~10 min with nnU-Net)
    python bench/infer.py --quick                # 14 mm / 48 mm crops, 1 run each
    python bench/infer.py --device cuda          # whole case, both modes
    python bench/infer.py --device cuda --amp --quick   # bf16; paper mode on a 100 mm crop
    python bench/infer.py --crop 64              # one crop size for both modes (mm, 0 = whole case)
    python bench/infer.py --modes roi --amp      # the whole case, 1 mm network on the kidneys' box only
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import child_process  # noqa: E402
import ceiling  # noqa: E402
import nnunet_reference  # noqa: E402
import whole_case_inference  # noqa: E402
from benchlib import Summary, mib, summary_json, table  # noqa: E402
from infer_regions import crop_box, mode_settings  # noqa: E402
from inference_flops import (count_flops, dense_flops_per_voxel, fast_mode_flops, mask_branch,  # noqa: E402
                             paper_mode_tiles, spy_on_tile_plans)

SCRIPT = Path(__file__).resolve()
MODES = ("paper", "fast", "roi")  # roi: fast mode on the kidneys' box only (inference.restrict_to_low_resolution_mask)


# ----------------------------------------------------------------------------- child side

def child_main(spec: dict[str, Any]) -> None:
    if spec["task"] == "prepare":
        child_prepare(spec)
    elif spec["task"] == "conv":
        child_conv(spec)
    elif spec["task"] == "nnunet":
        nnunet_reference.child_predict(spec)
    elif spec["task"] == "end_to_end":
        whole_case_inference.child_main(spec)
    else:
        child_predict(spec)


def child_conv(spec: dict[str, Any]) -> None:
    """The conv3d ceiling on the device, float32 and (with amp) bf16."""
    baseline = child_process.rss_bytes()
    clock = child_process.ChildClock()
    conv = [ceiling.conv_reference(108, 32, spec["device"], spec["repeats"], amp)
            for amp in ((False, True) if spec["amp"] else (False,))]
    child_process.child_report(clock, baseline, conv=conv)


def child_prepare(spec: dict[str, Any]) -> None:
    """Time inference's preprocessing of the case; save the arrays for the predict children."""
    import numpy as np

    from kitspipe.imageio import read_volume
    from kitspipe.inference.predictor import normalise
    from kitspipe.plans import load_plans
    from kitspipe.preprocessing import prepare_case

    plans = load_plans(spec["plans"])
    baseline = child_process.rss_bytes()
    clock = child_process.ChildClock()
    image = read_volume(spec["image"], dtype=np.float32, stage="infer")
    prepared = prepare_case(image, None, plans)
    high, low = normalise(prepared.high_image, plans), normalise(prepared.low_image, plans)
    seconds, cpu = clock.elapsed()
    out = Path(spec["out"])
    np.save(out / "high.npy", high)
    np.save(out / "low.npy", low)
    # Canonical source voxel -> 1 mm grid index: (i - crop start) * source spacing / 1 mm spacing.
    bbox = spec["foreground_bbox"]
    centre = [((a + b) / 2 - start) * src / dst for (a, b), start, src, dst
              in zip(bbox, prepared.crop.start, image.grid.spacing, prepared.high_grid.spacing)]
    child_process.child_report(clock, baseline, prepare_seconds=seconds, prepare_cpu_seconds=cpu,
                               high_shape=list(high.shape), low_shape=list(low.shape), kidney_centre_high=centre)


def child_predict(spec: dict[str, Any]) -> None:
    import numpy as np
    import torch

    from kitspipe.devices import autocast
    from kitspipe.inference.predictor import fast_tile_voxels, predict_volume
    from kitspipe.plans import load_plans
    from kitspipe.resampling import Box
    from kitspipe.trainers.builtin import build_dual_network

    plans = load_plans(spec["plans"])
    high = np.load(spec["high"], mmap_mode="r")
    low = np.load(spec["low"], mmap_mode="r")
    box = spec["box"]  # [high start, high size, low start, low size] or None for the whole case
    if box is not None:
        high_start, high_size, low_start, low_size = box
        high = high[tuple(slice(s, s + n) for s, n in zip(high_start, high_size))]
        low = low[tuple(slice(s, s + n) for s, n in zip(low_start, low_size))]
    high, low = np.ascontiguousarray(high), np.ascontiguousarray(low)
    tile_plans = spy_on_tile_plans()
    torch.manual_seed(0)
    network = build_dual_network(plans).to(spec["device"]).eval()
    flops = count_flops(network)
    tile_seconds: list[float] = []
    if spec["mode"] == "paper":  # one top-level forward per tile: time each
        marks: dict[str, float] = {}

        def tile_started(*_: Any) -> None:
            marks["start"] = time.perf_counter()

        def tile_finished(*_: Any) -> None:
            if spec["device"] == "cuda":
                torch.cuda.synchronize()  # the predictor copies the result to the host next anyway
            tile_seconds.append(time.perf_counter() - marks["start"])

        network.register_forward_pre_hook(tile_started)
        network.register_forward_hook(tile_finished)
    device = torch.device(spec["device"])
    free_bytes, budget = 0, plans.inference.max_tile_voxels
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        free_bytes = torch.cuda.mem_get_info()[0]
        branch = mask_branch(plans)[1]
        with autocast(device, torch.bfloat16 if spec["amp"] else None):  # the budget depends on the dtype
            budget = fast_tile_voxels(plans, device, plans.high.base_filters, branch)
    baseline = child_process.rss_bytes()
    clock = child_process.ChildClock()
    region = Box(*map(tuple, spec["region"])) if spec.get("region") else False
    prediction = predict_volume(network, high, low, plans, mode="fast" if spec["mode"] == "roi" else spec["mode"],
                                device=device, mixed_precision="bf16" if spec["amp"] else "off",
                                region_of_interest=region)
    if device.type == "cuda":
        torch.cuda.synchronize()
    child_process.child_report(clock, baseline, flops=flops["flops"], tile_seconds=tile_seconds, tile_plans=tile_plans,
                               high_shape=list(high.shape), low_shape=list(low.shape),
                               output_shape=list(prediction.regions.shape), gpu_free_bytes_at_start=free_bytes,
                               fast_tile_budget_voxels=budget, region=spec.get("region"),
                               gpu_peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else 0)


# ----------------------------------------------------------------------------- parent side

def measure(args) -> dict[str, Any]:
    from kitspipe.fingerprint import load_fingerprint, run_fingerprint
    from kitspipe.planning import run_plan
    from kitspipe.plans import load_plans

    with benchlib.data_folder(args.data) as data, benchlib.scratch_folder("infer") as scratch:
        with_nnunet = args.nnunet and nnunet_reference.skip_reason(args.device) is None
        if not benchlib.has_cases(data):
            # nnU-Net plans its target spacing from the dataset: from this one case alone it would not resample.
            others = [i for i in range(args.case + args.nnunet_plan_cases) if i != args.case]
            indices = [args.case] + (others[:args.nnunet_plan_cases - 1] if with_nnunet else [])
            print(f"synthesizing full-size cases {indices} (seed {args.seed}) in {data} ...", flush=True)
            benchlib.synthesize(data, indices, args.seed, "full")
        plan_cases = benchlib.labelled_cases(data, args.nnunet_plan_cases)
        case = next((c for c in plan_cases if c.case_id == f"case_{args.case:05d}"), plan_cases[0])
        if with_nnunet and len(plan_cases) < args.nnunet_plan_cases:
            print(f"warning: nnU-Net plans on the {len(plan_cases)} case(s) of {data}, not "
                  f"{args.nnunet_plan_cases}: its target spacing is their median", flush=True)
        linked = benchlib.link_case(case, scratch / "data")
        work = scratch / "work"
        run_fingerprint(linked, work, progress=False)
        run_plan(work, "paper")
        plans_path = work / "plans.json"
        plans = load_plans(plans_path)
        fingerprint = load_fingerprint(work)["cases"][0]

        print(f"{case.case_id}: prepare_case (inference preprocessing) ...", flush=True)
        prepared = child_process.run_child(SCRIPT, {"task": "prepare", "plans": str(plans_path),
                                                    "image": str(case.image), "out": str(scratch),
                                                    "foreground_bbox": fingerprint["foreground_bbox"]})
        high_shape, low_shape = prepared.extra["high_shape"], prepared.extra["low_shape"]
        results: dict[str, list[child_process.ChildResult]] = {}
        boxes: dict[str, list[list[int]] | None] = {}
        settings = mode_settings(args)
        # The box roi mode and the end-to-end comparison restrict the 1 mm network to.
        region = whole_case_inference.kidney_box(case.image, case.label, plans)
        for mode in args.modes:
            box = crop_box(prepared.extra["kidney_centre_high"], high_shape, low_shape, settings[mode]["crop_mm"],
                           plans.scale)
            boxes[mode] = box
            where = "whole case" if box is None else f"crop {'×'.join(map(str, box[1]))} at 1 mm"
            print(f"{mode} mode: {settings[mode]['runs']} run(s) on the {where} ...", flush=True)
            spec = {"task": "predict", "plans": str(plans_path), "high": str(scratch / "high.npy"),
                    "low": str(scratch / "low.npy"), "box": box, "mode": mode, "device": args.device, "amp": args.amp,
                    "region": region if mode == "roi" else None}
            results[mode] = [child_process.run_child(SCRIPT, spec) for _ in range(settings[mode]["runs"])]
        print("conv3d 32→32 reference ...", flush=True)
        conv = child_process.run_child(SCRIPT, {"task": "conv", "device": args.device, "amp": args.amp,
                                                "repeats": args.repeats or (1 if args.quick else 3)}).extra["conv"]
        comparison = (nnunet_reference.compare_inference(SCRIPT, case, plan_cases, plans_path, region, scratch,
                                                         args) if args.nnunet else None)
    figures = report(case.case_id, fingerprint, plans, prepared, results, boxes, high_shape, low_shape, conv, args)
    if isinstance(comparison, str):
        print(comparison)
        figures["nnunet"] = {"skipped": comparison}
    elif comparison:
        figures["nnunet"] = nnunet_reference.report_inference(*comparison, "bf16" if args.amp else "float32")
    return figures


def report(case_id: str, fingerprint: dict, plans, prepared: child_process.ChildResult, results: dict[str, list[child_process.ChildResult]],
           boxes: dict[str, list[list[int]] | None], high_shape: list[int], low_shape: list[int],
           conv: list[dict[str, Any]], args) -> dict[str, Any]:
    from kitspipe.inference.tile_budget import DEFAULT_SAFETY, activation_bytes_per_voxel

    high_dense, low_dense = dense_flops_per_voxel(plans)
    case_voxels = math.prod(high_shape)
    case_dense = case_voxels * high_dense + math.prod(low_shape) * low_dense
    source_shape = fingerprint["shape"]
    print()
    spacing = "×".join(f"{s:.2f}" for s in fingerprint["spacing_mm"])
    print(f"case {case_id}: source {'×'.join(map(str, source_shape))} voxels ({spacing} mm), "
          f"1 mm grid {'×'.join(map(str, high_shape))} = {case_voxels / 1e6:.1f} M voxels, "
          f"4 mm grid {'×'.join(map(str, low_shape))}")
    print(f"prepare_case + normalise: {prepared.extra['prepare_seconds']:.1f} s "
          f"({prepared.extra['prepare_cpu_seconds']:.1f} CPU s), peak RSS {mib(prepared.peak_rss)} MiB")
    print(f"one dense pass: {high_dense / 1e6:.2f} MFLOP per 1 mm voxel + {low_dense / 1e6:.2f} MFLOP per 4 mm voxel "
          f"= {case_dense / 1e12:.1f} TFLOP for this case")

    rows = []
    figures: dict[str, Any] = {
        "case_id": case_id, "source_shape": source_shape, "high_shape": high_shape, "low_shape": low_shape,
        "amp_bf16": args.amp, "conv_reference": conv,
        "prepare": {"seconds": prepared.extra["prepare_seconds"],
                    "cpu_seconds": prepared.extra["prepare_cpu_seconds"], "peak_rss_bytes": prepared.peak_rss},
        "dense_flops_per_high_voxel": high_dense, "dense_flops_per_low_voxel": low_dense,
        "dense_tflop_case": case_dense / 1e12, "modes": {}}
    for mode, runs in results.items():
        box = boxes[mode]
        region_high = runs[0].extra["high_shape"]
        region_low = runs[0].extra["low_shape"]
        region_voxels = math.prod(region_high)
        region_dense = region_voxels * high_dense + math.prod(region_low) * low_dense
        seconds = Summary.of([r.seconds for r in runs])
        flops = runs[0].extra["flops"]
        gflops = flops / 1e9 / seconds.median
        ratio = flops / region_dense
        peak = Summary.of([r.peak_rss for r in runs])
        tiles = [t for r in runs for t in r.extra["tile_seconds"]]
        if box is None:
            whole, how = seconds.median, "measured"
        elif mode == "paper":
            whole_tiles = paper_mode_tiles(region_high, runs[0].extra["tile_plans"][0], high_shape)
            whole, how = Summary.of(tiles).median * whole_tiles, f"{whole_tiles} tiles × s per tile"
        else:
            whole_flops = fast_mode_flops(plans, tuple(high_shape), tuple(low_shape))
            whole, how = whole_flops / 1e9 / gflops, "FLOPs ÷ GFLOP/s"
        if box is None:
            whole_ratio = ratio
        elif mode == "paper":
            whole_ratio = flops / runs[0].extra["tile_plans"][0]["tiles"] * whole_tiles / case_dense
        else:
            whole_ratio = fast_mode_flops(plans, tuple(high_shape), tuple(low_shape)) / case_dense
        region = "whole case" if box is None else "crop " + "×".join(map(str, region_high))
        if mode == "roi":
            start, stop = runs[0].extra["region"]
            region = "kidney box " + "×".join(str(b - a) for a, b in zip(start, stop))
        # paper mode: dual forwards (one per tile); fast mode: 1 mm tiles + 4 mm tiles.
        n_tiles = (len(runs[0].extra["tile_seconds"]) if mode == "paper"
                   else "+".join(str(plan["tiles"]) for plan in reversed(runs[0].extra["tile_plans"])))
        # Forward-only work against the forward conv3d of the same precision.
        conv_gflops = next(c for c in conv if c["precision"] == ("bf16" if args.amp else "fp32"))["forward_gflops"]
        high_tile = runs[0].extra["tile_plans"][-1]["input_tile"]  # the 1 mm plan is made last
        estimate = (DEFAULT_SAFETY * math.prod(high_tile)
                    * activation_bytes_per_voxel(plans.high.base_filters, mask_branch(plans)[1], 2 if args.amp else 4))
        rows.append([mode, region, n_tiles, seconds.fmt(), Summary.of([r.cpu_seconds for r in runs]).fmt(1),
                     Summary.of(tiles).fmt(3) if tiles else "-", f"{flops / 1e12:.2f}",
                     ceiling.rate(gflops, args.device), f"{100 * gflops / conv_gflops:.0f} %",
                     f"{ratio:.1f}", mib(peak.median) + (f" / {mib(runs[0].extra['gpu_peak_bytes'])} "
                                                          f"(est. {mib(estimate)})" if args.device == "cuda" else ""),
                     f"{whole:.0f} ({how})", f"{whole_ratio:.1f}"])
        figures["modes"][mode] = {
            "region": region, "box": box, "runs": len(runs), "tiles_per_run": n_tiles,
            "tile_plans": runs[0].extra["tile_plans"], "seconds": summary_json([r.seconds for r in runs]),
            "cpu_seconds": summary_json([r.cpu_seconds for r in runs]),
            "tile_seconds": summary_json(tiles) if tiles else None, "tflop": flops / 1e12, "gflops": gflops,
            "flops_over_dense": ratio, "peak_rss_bytes": summary_json([r.peak_rss for r in runs]),
            "baseline_rss_bytes": runs[0].baseline_rss, "gpu_peak_bytes": runs[0].extra["gpu_peak_bytes"],
            "gpu_free_bytes_at_start": runs[0].extra["gpu_free_bytes_at_start"],
            "fast_tile_budget_voxels": runs[0].extra["fast_tile_budget_voxels"],
            "high_input_tile": high_tile, "estimated_tile_activation_bytes": estimate, "of_conv3d": gflops / conv_gflops,
            "whole_case_seconds": whole, "whole_case_seconds_method": how, "whole_case_flops_over_dense": whole_ratio}
    print()
    gpu = " / GPU (estimate)" if args.device == "cuda" else ""
    unit = ceiling.rate_unit(args.device)
    print(table(["mode", "region", "tiles (1mm+4mm)", "seconds", "CPU s", "s per tile", "TFLOP run", unit,
                 "of conv3d", "FLOPs/dense", f"peak RSS MiB{gpu}", "whole case s", "whole FLOPs/dense"], rows,
                title="predict_volume, paper network (untrained weights, eval): median (min–max) of the runs"))
    print("(FLOPs/dense: FLOPs that ran ÷ FLOPs of computing every output voxel once; peak RSS includes "
          f"~{mib(next(iter(results.values()))[0].baseline_rss)} MiB of interpreter, torch and the input arrays; "
          f"precision {'bf16 autocast' if args.amp else 'fp32'})")
    print()
    print(table(["conv3d", "precision", "input", "forward s", unit], [
        [f"{c['channels']}→{c['channels']}", c["precision"], f"{c['size']}³",
         Summary.of(c["forward_s"]["values"]).fmt(4), ceiling.rate(c["forward_gflops"], args.device)] for c in conv],
        title="Plain torch.nn.functional.conv3d 3×3×3, batch 1, same device ('of conv3d' above: forward of the "
              "same precision)"))
    if args.device == "cuda" and "fast" in figures["modes"]:
        fast = figures["modes"]["fast"]
        print(f"GPU: {fast['gpu_free_bytes_at_start'] / 2**30:.1f} GiB free at start; fast-mode tile budget from "
              f"free memory {fast['fast_tile_budget_voxels']:,} voxels (cap {plans.inference.max_tile_voxels:,}); "
              f"estimate = kitspipe.inference.tile_budget for the largest 1 mm tile "
              f"{'×'.join(map(str, fast['high_input_tile']))}")
    if any(box is not None for box in boxes.values()):
        print("crops: the same box of the 1 mm and 4 mm grids around the kidneys; whole-case seconds are "
              "EXTRAPOLATED (paper: the whole case's tile count from kitspipe's tiler × median s per tile; "
              "fast: the whole case's FLOPs from kitspipe's tile plan at the crop's GFLOP/s)")
    return figures


def main() -> None:
    parser = benchlib.base_parser(__doc__)
    parser.add_argument("--crop", type=int, default=None,
                        help="edge in mm of the crop both modes run on; 0 = the whole case "
                             "(default: CPU 30 mm paper / 96 mm fast, CUDA whole case)")
    parser.add_argument("--case", type=int, default=0, help="synthetic case index (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic dataset seed (default 0)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the network")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="paper and fast tiling, and roi = fast mode on the kidneys' box only "
                             "(always the whole case; default: all three)")
    parser.add_argument("--no-nnunet", dest="nnunet", action="store_false",
                        help="skip the end-to-end comparison with nnU-Net's predictor "
                             "(it runs when nnunetv2 is importable)")
    parser.add_argument("--nnunet-whole", action="store_true",
                        help="nnU-Net's sliding window on the whole case (~17 min per run on 2 cores) instead of "
                             "1×2×2 of its tiles scaled to the whole case's tile count")
    parser.add_argument("--nnunet-plan-cases", type=int, default=nnunet_reference.PLAN_CASES,
                        help="cases nnU-Net's planner sees (its target spacing is their median; "
                             f"default {nnunet_reference.PLAN_CASES})")
    args = parser.parse_args()
    if args.nnunet_plan_cases < 1:
        parser.error("--nnunet-plan-cases must be at least 1")
    benchlib.run_benchmark(args, "bench/infer.py", measure, child_main, notes=(), after=None)

if __name__ == "__main__":
    main()
