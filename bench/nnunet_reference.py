"""nnU-Net v2's side of the benchmarks: the same cases through nnU-Net's own code, in the same run.

Used by ``bench/preprocess.py``, ``bench/infer.py`` and ``bench/train_step.py`` when ``nnunetv2``
is importable and the device is the CPU (``make bench-nnunet`` installs it in a virtual
environment of its own; this module never installs it). nnU-Net reads its three folders from
environment variables when it is imported, so everything of nnU-Net runs in child processes
that get those variables (``child_process.run_child(..., env=...)``).

Set-up (not timed): a raw dataset ``Dataset987_KitspipeBench`` of hard links to the cases,
``nnUNetv2_extract_fingerprint`` and ``nnUNetv2_plan_experiment`` with nnU-Net's defaults.

Inference (``child_predict``): what ``nnUNetv2_predict`` does to one case, without test-time
mirroring, with the network its ``3d_fullres`` plan describes (``get_network_from_plans``, seeded
initial weights: the cost of a forward pass does not depend on them), in three timed stages:

1. ``preprocess``: nnU-Net's preprocessor on the image file (read, crop, resample, normalise);
2. ``sliding window``: ``nnUNetPredictor.predict_sliding_window_return_logits`` (step 0.5,
   Gaussian weighting, on the CPU, float32: nnU-Net autocasts only on CUDA). A whole case takes
   about a quarter of an hour on 2 cores, so by default it runs on a crop of 1 × 2 × 2 of its
   tiles, and the whole case is the crop's seconds per tile times the tile count nnU-Net's own
   slicer gives for the whole case (every tile costs the same);
3. ``export``: ``export_prediction_from_logits`` (probabilities back on the source grid, argmax,
   NIfTI written) of logits of the whole case's shape. With a crop, those are random logits:
   their values do not change the cost of resampling and writing.

Training: ``nnunet_training.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
import child_process
from benchlib import Summary, mib, summary_json, table

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_KitspipeBench"
CONFIGURATION = "3d_fullres"
PLAN_CASES = 5  # synthetic cases nnU-Net plans on: its target spacing is their median
INSTALL_HINT = "make bench-nnunet (a virtual environment of its own: nnunetv2 pulls a newer torch)"


def available() -> bool:
    return importlib.util.find_spec("nnunetv2") is not None


def skip_reason(device: str) -> str | None:
    """Why nnU-Net's side cannot run here, or None when it can."""
    if device != "cpu":
        return "nnU-Net comparison skipped: it is a CPU comparison (issue 6's targets); run without --device cuda"
    if not available():
        return f"nnunetv2 is not importable here: nnU-Net comparison skipped (to run it: {INSTALL_HINT})"
    return None


def version() -> str:
    from importlib.metadata import version as package_version

    return package_version("nnunetv2")


def setup(cases: list, root: Path) -> dict[str, str]:
    """An nnU-Net raw dataset of hard links to ``cases``, fingerprinted and planned; returns the
    environment variables nnU-Net needs to find it."""
    raw, preprocessed, results = root / "raw", root / "preprocessed", root / "results"
    dataset = raw / DATASET_NAME
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir(parents=True)
    for case in cases:
        benchlib.link_file(Path(case.image), dataset / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        benchlib.link_file(Path(case.label), dataset / "labelsTr" / f"{case.case_id}.nii.gz")
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "kidney": 1, "tumor": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"}, indent=2))
    preprocessed.mkdir()
    results.mkdir()
    env = {"nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed), "nnUNet_results": str(results)}
    script = ("import sys\n"
              "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import "
              "extract_fingerprint_entry, plan_experiment_entry\n"
              f"sys.argv = ['x', '-d', '{DATASET_ID}', '-np', '1']\n"
              "extract_fingerprint_entry()\n"
              f"sys.argv = ['x', '-d', '{DATASET_ID}']\n"
              "plan_experiment_entry()\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nnU-Net's fingerprint/planning failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return env


def plans(env: dict[str, str]) -> dict[str, Any]:
    return json.loads((Path(env["nnUNet_preprocessed"]) / DATASET_NAME / "nnUNetPlans.json").read_text())


def planned(env: dict[str, str], wanted: tuple[str, ...]) -> list[str]:
    """The configurations of ``wanted`` that nnU-Net's planner produced for these cases."""
    configurations = plans(env).get("configurations", {})
    return [c for c in wanted if c in configurations]


# ----------------------------------------------------------------------------- child side

def child_preprocess(spec: dict[str, Any]) -> None:
    """``nnUNetv2_preprocess -d 987 -c CONFIGURATION -np WORKERS``, timed."""
    from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints import preprocess_entry

    sys.argv = ["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-c", spec["configuration"],
                "-np", str(spec["workers"])]
    baseline = child_process.rss_bytes()
    clock = child_process.ChildClock()
    preprocess_entry()
    child_process.child_report(clock, baseline)


def child_import() -> None:
    """How long importing nnU-Net's entry points takes (not counted in the preprocessing times)."""
    clock = child_process.ChildClock()
    import nnunetv2.experiment_planning.plan_and_preprocess_entrypoints  # noqa: F401

    child_process.child_report(clock, 0)


def crop_slices(shape: tuple[int, ...], patch: tuple[int, ...], tiles_per_axis: tuple[int, ...]) -> tuple[slice, ...]:
    """A centred crop on which nnU-Net's sliding window (step 0.5) places ``tiles_per_axis`` tiles."""
    slices = []
    for n, p, k in zip(shape, patch, tiles_per_axis):
        size = min(n, p + (k - 1) * p // 2)
        start = (n - size) // 2
        slices.append(slice(start, start + size))
    return tuple(slices)


def planned_network(deep_supervision: bool) -> tuple[Any, Any, dict[str, Any], Any]:
    """nnU-Net's plans manager, 3d_fullres configuration, dataset.json and the network it
    describes, with seeded initial weights (the cost of a step does not depend on them)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(os.environ["nnUNet_preprocessed"]) / DATASET_NAME
    plans_manager = PlansManager(str(folder / "nnUNetPlans.json"))
    configuration = plans_manager.get_configuration(CONFIGURATION)
    dataset_json = load_json(str(folder / "dataset.json"))
    heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    torch.manual_seed(0)
    network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, 1, heads,
                                     allow_init=True, deep_supervision=deep_supervision)
    return plans_manager, configuration, dataset_json, network


def child_predict(spec: dict[str, Any]) -> None:
    """One case through nnU-Net's predictor, stage by stage (see the module's docstring)."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from inference_flops import count_flops

    plans_manager, configuration, dataset_json, network = planned_network(deep_supervision=False)
    network.eval()
    flops = count_flops(network)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, configuration, None, dataset_json, "nnUNetTrainer", None)
    threads = torch.get_num_threads()  # nnU-Net's own default is 8 threads whatever the machine has

    baseline = child_process.rss_bytes()
    clock = child_process.ChildClock()
    marks = [time.perf_counter()]
    data, _, properties = configuration.preprocessor_class(verbose=False).run_case(
        [spec["image"]], None, plans_manager, configuration, dataset_json)
    marks.append(time.perf_counter())
    data = torch.from_numpy(data)
    patch = tuple(configuration.patch_size)

    def tiles(shape: tuple[int, ...]) -> int:  # nnU-Net pads a volume up to one patch first
        return len(predictor._internal_get_sliding_window_slicers(tuple(max(n, p) for n, p in zip(shape, patch))))

    whole_tiles = tiles(tuple(data.shape[1:]))
    crop = crop_slices(tuple(data.shape[1:]), patch, tuple(spec["crop_tiles"])) if spec["crop_tiles"] else None
    window_input = data if crop is None else data[(slice(None), *crop)].clone()
    run_tiles = tiles(tuple(window_input.shape[1:]))
    marks.append(time.perf_counter())
    logits = predictor.predict_sliding_window_return_logits(window_input)
    marks.append(time.perf_counter())
    if crop is not None:  # not timed: stand-in logits of the whole case for the export
        logits = torch.randn((logits.shape[0], *data.shape[1:]), dtype=torch.float16)
    marks.append(time.perf_counter())
    export_prediction_from_logits(logits, properties, configuration, plans_manager, dataset_json,
                                  str(Path(spec["out"]) / "nnunet_prediction"), False, num_threads_torch=threads)
    marks.append(time.perf_counter())
    stages = {"preprocess": marks[1] - marks[0], "sliding_window": marks[3] - marks[2], "export": marks[5] - marks[4]}
    child_process.child_report(clock, baseline, stages=stages, run_tiles=run_tiles, whole_tiles=whole_tiles,
                               patch_size=list(patch), spacing=list(configuration.spacing),
                               preprocessed_shape=list(data.shape[1:]), crop_shape=list(window_input.shape[1:]),
                               flops=flops["flops"],
                               flops_per_patch_voxel=flops["flops"] / run_tiles / math.prod(patch))


# ----------------------------------------------------------------------------- parent side

def whole_case_estimate(result: child_process.ChildResult) -> dict[str, float]:
    """Seconds of the whole case by stage: the sliding window scaled from the crop's tiles."""
    stages = result.extra["stages"]
    per_tile = stages["sliding_window"] / result.extra["run_tiles"]
    window = per_tile * result.extra["whole_tiles"]
    return {"preprocess": stages["preprocess"], "sliding_window": window, "export": stages["export"],
            "seconds_per_tile": per_tile, "total": stages["preprocess"] + window + stages["export"]}


def compare_inference(script: Path, case, plan_cases: list, plans_path: Path, region: list[list[int]],
                      scratch: Path, args) -> tuple[list, list] | str:
    """One case end to end through nnU-Net's predictor (planned on ``plan_cases``) and through
    everything ``kitspipe infer`` does (``whole_case_inference.child_main``: read, predict in fast
    mode on the kidneys' box ``region`` of the 1 mm grid, post-process, write), runs interleaved;
    or why it was skipped.
    ``script`` is the benchmark whose children dispatch the tasks ``nnunet`` and ``end_to_end``."""
    from dataclasses import replace

    from kitspipe.plans import load_plans, save_plans

    reason = skip_reason(args.device)
    if reason:
        return reason
    env = setup(plan_cases, scratch / "nnunet")
    kitspipe_plans = load_plans(plans_path)
    end_to_end_plans = scratch / "plans_end_to_end.json"
    precision = "bf16" if args.amp else "off"
    save_plans(replace(kitspipe_plans, inference=replace(kitspipe_plans.inference, mixed_precision=precision)),
               end_to_end_plans)
    crop_tiles = None if args.nnunet_whole else ([1, 1, 1] if args.quick else [1, 2, 2])
    nnunet_spec = {"task": "nnunet", "image": str(case.image), "crop_tiles": crop_tiles, "out": str(scratch)}
    kitspipe_spec = {"task": "end_to_end", "plans": str(end_to_end_plans), "image": str(case.image),
                     "region": region, "out": str(scratch)}
    nnunet_runs, kitspipe_runs = [], []
    runs = args.repeats or (1 if args.quick else 3)
    where = "whole case" if crop_tiles is None else "crop of " + "×".join(map(str, crop_tiles)) + " tiles"
    for run in range(runs):
        print(f"end to end {run + 1}/{runs}: nnU-Net {CONFIGURATION} ({where}, planned on {len(plan_cases)} "
              "cases), then kitspipe ...", flush=True)
        nnunet_runs.append(child_process.run_child(script, nnunet_spec, env=env))
        kitspipe_runs.append(child_process.run_child(script, kitspipe_spec))
    return nnunet_runs, kitspipe_runs


def report_inference(nnunet_runs: list[child_process.ChildResult], kitspipe_runs: list[child_process.ChildResult],
                     precision: str) -> dict[str, Any]:
    """The table of one case through both pipelines, end to end, and the ratio of their medians."""
    estimates = [whole_case_estimate(r) for r in nnunet_runs]
    first = nnunet_runs[0].extra
    cropped = first["run_tiles"] != first["whole_tiles"]
    nnunet_total = Summary.of([e["total"] for e in estimates])
    kitspipe_total = Summary.of([r.seconds for r in kitspipe_runs])
    kitspipe_stages = kitspipe_runs[0].extra["stages"]
    rows = [[f"nnU-Net {version()} {CONFIGURATION}", "preprocess",
             Summary.of([e["preprocess"] for e in estimates]).fmt()],
            ["", f"sliding window, {first['whole_tiles']} tiles of {'×'.join(map(str, first['patch_size']))}"
             + (f" ({first['run_tiles']} run, × {first['whole_tiles'] / first['run_tiles']:.0f})" if cropped else ""),
             Summary.of([e["sliding_window"] for e in estimates]).fmt()],
            ["", "export (resample back, argmax, write)", Summary.of([e["export"] for e in estimates]).fmt()],
            ["", "all" + (" (EXTRAPOLATED)" if cropped else ""), nnunet_total.fmt()]]
    rows += [["kitspipe paper, fast + kidney box" if i == 0 else "", stage,
              Summary.of([r.extra["stages"][stage] for r in kitspipe_runs]).fmt()]
             for i, stage in enumerate(kitspipe_stages)]
    rows.append(["", "all (measured)", kitspipe_total.fmt()])
    ratio = kitspipe_total.median / nnunet_total.median
    print()
    print(table(["pipeline", "stage", "seconds"], rows,
                title=f"One case end to end, no test-time mirroring: median (min–max) of {len(nnunet_runs)} / "
                      f"{len(kitspipe_runs)} runs, each in a fresh process"))
    print(f"nnU-Net: float32 on the CPU (its predictor autocasts only on CUDA), "
          f"{first['flops_per_patch_voxel'] / 1e3:.0f} kFLOP per patch voxel, peak RSS "
          f"{mib(Summary.of([r.peak_rss for r in nnunet_runs]).median)} MiB"
          + (" (crop run: not the whole case's)" if cropped else "")
          + f"; kitspipe: {precision}, peak RSS {mib(Summary.of([r.peak_rss for r in kitspipe_runs]).median)} MiB")
    print(f"kitspipe / nnU-Net, whole case: {ratio:.2f}× (target ≤ 0.2×)")
    return {"nnunet_version": version(), "configuration": CONFIGURATION, "patch_size": first["patch_size"],
            "spacing": first["spacing"], "preprocessed_shape": first["preprocessed_shape"],
            "crop_shape": first["crop_shape"], "run_tiles": first["run_tiles"], "whole_tiles": first["whole_tiles"],
            "extrapolated": cropped, "flops_per_patch_voxel": first["flops_per_patch_voxel"],
            "nnunet_stage_seconds": {k: summary_json([e[k] for e in estimates]) for k in estimates[0]},
            "nnunet_peak_rss_bytes": summary_json([r.peak_rss for r in nnunet_runs]),
            "kitspipe_precision": precision,
            "kitspipe_stage_seconds": {k: summary_json([r.extra["stages"][k] for r in kitspipe_runs])
                                       for k in kitspipe_stages},
            "kitspipe_seconds": summary_json([r.seconds for r in kitspipe_runs]),
            "kitspipe_peak_rss_bytes": summary_json([r.peak_rss for r in kitspipe_runs]),
            "seconds_ratio_kitspipe_over_nnunet": ratio}
