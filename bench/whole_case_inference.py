#!/usr/bin/env python3
"""Peak memory and time of inference on one large case, end to end, with the ``paper`` network.

Issue 6 asks for peak RSS ≤ 8 GiB on a 512 × 512 × 600 case. ``bench/infer.py`` times
``predict_volume`` alone; this script runs everything ``kitspipe infer`` does to one case in one
fresh child process: read the image, ``predict_case`` (inference's preprocessing, the network,
the probabilities back on the source grid), post-processing, writing the label file. The network
is ``build_dual_network(plans)`` with seeded initial weights in ``fast`` mode restricted to the
kidneys' box (``inference.restrict_to_low_resolution_mask``; the box is the one a trained network
that found the reference kidneys would give, as in ``bench/infer.py --modes roi``).

The case is synthetic full-size case ``--case`` resampled along the slice axis to ``--slices``
slices over the same extent (linear for the image, nearest for the labels): a thin-slice scan of
the same anatomy. Its float32 size is printed next to the peak.

    python bench/whole_case_inference.py --amp                 # 512 × 512 × 600, bf16
    python bench/whole_case_inference.py --slices 91 --amp     # the case's own 91 slices
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
import child_process  # noqa: E402
from benchlib import mib  # noqa: E402

SCRIPT = Path(__file__).resolve()


def thin_slices(case_folder: Path, out_folder: Path, slices: int) -> None:
    """Write the case resampled to ``slices`` slices over the same extent into ``out_folder``."""
    import SimpleITK as sitk

    out_folder.mkdir(parents=True)
    for name, interpolator in (("imaging.nii.gz", sitk.sitkLinear), ("segmentation.nii.gz", sitk.sitkNearestNeighbor)):
        image = sitk.ReadImage(str(case_folder / name))
        size, spacing = list(image.GetSize()), list(image.GetSpacing())
        axis = spacing.index(max(spacing))  # the slice axis: synthetic cases have thick slices
        extent = size[axis] * spacing[axis]
        size[axis], spacing[axis] = slices, extent / slices
        # Keep the first slice's outer edge where it was: shift the origin by half the change.
        shift = (spacing[axis] - image.GetSpacing()[axis]) / 2
        direction = image.GetDirection()
        origin = [o + shift * direction[3 * row + axis] for row, o in enumerate(image.GetOrigin())]
        resampled = sitk.Resample(image, size, sitk.Transform(), interpolator, origin, spacing, direction,
                                  0, image.GetPixelID())
        sitk.WriteImage(resampled, str(out_folder / name))


def child_main(spec: dict[str, Any]) -> None:
    import time

    import torch

    from kitspipe.imageio import read_volume
    from kitspipe.inference.export import labels_from_probabilities, write_prediction
    from kitspipe.inference.run import postprocessing_settings, predict_case
    from kitspipe.plans import load_plans
    from kitspipe.resampling import Box
    from kitspipe.trainers.builtin import build_dual_network

    plans = load_plans(spec["plans"])
    torch.manual_seed(0)
    network = build_dual_network(plans).eval()
    baseline = child_process.rss_bytes()
    clock = child_process.ChildClock()
    marks = [time.perf_counter()]
    image = read_volume(spec["image"], stage="infer")
    marks.append(time.perf_counter())
    regions, low, _ = predict_case([network], image, plans, "fast", torch.device("cpu"),
                                   region_of_interest=Box(*map(tuple, spec["region"])))
    marks.append(time.perf_counter())
    labels = labels_from_probabilities(regions, low, image.grid.spacing, postprocessing_settings(plans))
    marks.append(time.perf_counter())
    write_prediction(labels, image, Path(spec["out"]) / "prediction.nii.gz")
    marks.append(time.perf_counter())
    stages = dict(zip(("read", "predict_case", "postprocess", "write"), (b - a for a, b in zip(marks, marks[1:]))))
    child_process.child_report(clock, baseline, stages=stages, source_shape=list(image.array.shape))


def kidney_box(image_path: Path, label_path: Path, plans) -> list[list[int]]:
    """The box of the 1 mm grid that the reference kidneys and tumours give (kitspipe's own rule)."""
    from kitspipe.imageio import read_volume
    from kitspipe.inference.region_of_interest import fine_region
    from kitspipe.preprocessing import prepare_case

    image, label = read_volume(image_path), read_volume(label_path)
    prepared = prepare_case(image, label.array, plans)
    box = fine_region((prepared.high_label > 0).astype("float32"), plans)
    return [list(box.start), list(box.stop)]


def measure(args) -> dict[str, Any]:
    from dataclasses import replace

    from kitspipe.fingerprint import run_fingerprint
    from kitspipe.planning import run_plan
    from kitspipe.plans import load_plans, save_plans

    with benchlib.scratch_folder("whole-case") as scratch:
        benchlib.synthesize(scratch / "synth", [args.case], args.seed, "full")
        case = benchlib.labelled_cases(scratch / "synth", 1)[0]
        folder = scratch / "data" / case.case_id
        thin_slices(case.image.parent, folder, args.slices)
        run_fingerprint(scratch / "data", scratch / "work", progress=False)
        run_plan(scratch / "work", "paper")
        plans_path = scratch / "work" / "plans.json"
        plans = load_plans(plans_path)
        precision = "bf16" if args.amp else "off"
        save_plans(replace(plans, inference=replace(plans.inference, mixed_precision=precision)), plans_path)
        region = kidney_box(folder / "imaging.nii.gz", folder / "segmentation.nii.gz", plans)
        print(f"{case.case_id} at {args.slices} slices: 1 mm network on the kidneys' box {region} ...", flush=True)
        result = child_process.run_child(SCRIPT, {"plans": str(plans_path), "image": str(folder / "imaging.nii.gz"),
                                                  "region": region, "out": str(scratch)})
    shape = result.extra["source_shape"]
    float32_bytes = 4 * shape[0] * shape[1] * shape[2]
    stages = result.extra["stages"]
    print()
    print(f"source {'×'.join(map(str, shape))} voxels = {mib(float32_bytes)} MiB as float32; precision {precision}")
    print(benchlib.table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in stages.items()]
                         + [["all", f"{result.seconds:.1f} ({result.cpu_seconds:.0f} CPU s)"]],
                         title="one `kitspipe infer` case, end to end, in one fresh process"))
    print(f"peak RSS {mib(result.peak_rss)} MiB = {result.peak_rss / float32_bytes:.1f} × the float32 source "
          f"(baseline after imports and the network: {mib(result.baseline_rss)} MiB)")
    return {"case_id": case.case_id, "slices": args.slices, "source_shape": shape, "precision": precision,
            "region": region, "stages": stages, "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
            "peak_rss_bytes": result.peak_rss, "baseline_rss_bytes": result.baseline_rss,
            "source_float32_bytes": float32_bytes}


def main() -> None:
    parser = benchlib.base_parser(__doc__)
    parser.add_argument("--slices", type=int, default=600, help="slices of the resampled case (default 600)")
    parser.add_argument("--case", type=int, default=0, help="synthetic case index (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic dataset seed (default 0)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the network")
    args = parser.parse_args()
    benchlib.run_benchmark(args, "bench/whole_case_inference.py", measure, child_main, device_check=False)


if __name__ == "__main__":
    main()
