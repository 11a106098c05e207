"""nnU-Net v2's training side of ``bench/train_step.py``: its step and its data augmentation.

Runs in a child process with nnU-Net's environment (``nnunet_reference.setup``), on the
``3d_fullres`` plan nnU-Net makes for five full-size synthetic cases:

* the step (``child_train_step``): nnUNetTrainer's ``train_step`` on a random batch, float32;
* the data augmentation (``time_augmentation``): the transforms ``nnUNetTrainer.get_dataloaders``
  builds for that plan (spatial: rotation ±30°, scaling 0.7-1.4, elastic off by default; noise,
  blur, brightness, contrast, low resolution, gamma, mirroring; deep-supervision targets),
  applied to one sample at a time of its initial patch size as ``nnUNetDataLoader`` does, with
  one thread as in its worker processes. Next to it, kitspipe's ``paper`` sample drawn the same
  way (``bench/train_step.py``: sampling, augmentation, normalisation of a 108³ pair).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import benchlib
import child_process
from benchlib import Summary, mib, summary_json, table
from nnunet_reference import CONFIGURATION, PLAN_CASES, planned_network, setup, skip_reason, version


def child_train_step(spec: dict[str, Any]) -> None:
    """nnUNetTrainer's ``train_step`` on the CPU: batch and patch of the 3d_fullres plan, deep
    supervision with its loss weights, Dice + cross-entropy, gradient clipping at 12, SGD with
    Nesterov momentum; float32 (nnU-Net autocasts only on CUDA). The batch is random: the cost
    of a step does not depend on the values. The first step is a warm-up whose FLOPs
    ``torch.utils.flop_counter`` counts; then a plain conv3d 32→32 in the same process, and
    :func:`time_augmentation` with the same plan."""
    import numpy as np
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from torch.utils.flop_counter import FlopCounterMode

    import ceiling

    _, configuration, _, network = planned_network(deep_supervision=True)
    network.train()
    batch, patch = configuration.batch_size, tuple(configuration.patch_size)
    optimiser = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    loss = DC_and_CE_loss({"batch_dice": configuration.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((batch, 1, *patch), generator=generator)
    targets: list = []
    supervised: list = []  # the deep-supervision loss, built once the outputs are known

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        outputs = network(image)
        if not targets:  # one target per deep-supervision output, at its resolution
            targets.extend(torch.randint(0, 3, (batch, 1, *o.shape[2:]), generator=generator).float() for o in outputs)
            weights = np.array([1 / 2**i for i in range(len(outputs))])
            weights[-1] = 0
            supervised.append(DeepSupervisionWrapper(loss, weights / weights.sum()))
        total = supervised[0](outputs, targets)
        total.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimiser.step()

    baseline = child_process.rss_bytes()
    clock = child_process.ChildClock()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    seconds = []
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    conv = ceiling.conv_reference(108, 32, "cpu", spec["conv_repeats"], False)
    augmentation = time_augmentation(configuration, spec["augmentation_samples"])
    child_process.child_report(clock, baseline, step_s=seconds, counted_gflop=counter.get_total_flops() / 1e9,
                               batch_size=batch, patch_size=list(patch), conv=conv, augmentation=augmentation)


def time_augmentation(configuration, samples: int) -> dict[str, Any]:
    """Seconds per sample of nnU-Net's training transforms for ``configuration``, one thread.

    The input is what its data loader hands the transforms: an image of the initial patch size
    (larger than the patch, so that rotation and scaling find data at the corners) and its
    segmentation. The image values do not change the cost; the segmentation's number of labels
    does (``SpatialTransform`` resamples each label separately), so it holds background, kidney
    and tumour, the costly case of a crop that reaches a tumour. The draws are seeded, so every
    run times the same sequence of transforms.
    """
    import numpy as np
    import torch
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    patch = tuple(configuration.patch_size)
    # configure_rotation_dummyDA_mirroring_and_inital_patch_size for a 3D patch
    dummy_2d = max(patch) / patch[0] > ANISO_THRESHOLD
    angle = (180.0 if dummy_2d else 30.0) / 360 * 2.0 * np.pi
    rotation = (-angle, angle)
    initial = list(get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25)))
    if dummy_2d:
        initial[0] = patch[0]
    scales = list(list(i) for i in 1 / np.cumprod(np.vstack(configuration.pool_op_kernel_sizes), axis=0))[:-1]
    transforms = nnUNetTrainer.get_training_transforms(patch, rotation, scales, (0, 1, 2), dummy_2d,
                                                       use_mask_for_norm=configuration.use_mask_for_norm,
                                                       foreground_labels=[1, 2])
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((1, *initial), generator=generator)
    segmentation = torch.zeros((1, *initial), dtype=torch.int16)
    centre = [n // 2 for n in initial]
    for label, half in ((1, (20, 40, 40)), (2, (8, 15, 15))):  # a kidney around a tumour
        box = tuple(slice(max(0, c - h), c + h) for c, h in zip(centre, half))
        segmentation[(0, *box)] = label
    seconds = []
    with torch.no_grad(), benchlib.one_thread():
        # With dummy 2D augmentation nnU-Net blurs (channels · z, y, x) slices.
        tune_blur(transforms, patch[1:] if dummy_2d else patch)
        torch.manual_seed(0)
        np.random.seed(0)
        for index in range(samples + 1):  # the first is a warm-up
            started = time.perf_counter()
            transforms(image=image.clone(), segmentation=segmentation.clone())
            if index:
                seconds.append(time.perf_counter() - started)
    return {"initial_patch_size": [int(n) for n in initial], "patch_size": list(patch), "sample_s": seconds,
            "dummy_2d": bool(dummy_2d)}


def tune_blur(transforms, patch: tuple[int, ...]) -> None:
    """Run the one-off tuning of nnU-Net's blur before timing: ``GaussianBlurTransform(benchmark=True)``
    times plain against FFT convolution the first time it meets an (axis length, kernel size),
    1-2 s each on one thread, a cost that training spreads over thousands of samples.
    ``patch`` is the spatial shape the blur receives."""
    import numpy as np
    import torch
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform, _compute_kernel_size

    pending, blurs = [transforms], []
    while pending:  # ComposeTransforms hold .transforms, RandomTransform a .transform
        transform = pending.pop()
        if isinstance(transform, GaussianBlurTransform):
            blurs.append(transform)
        pending.extend(getattr(transform, "transforms", None) or [])
        if getattr(transform, "transform", None) is not None:
            pending.append(transform.transform)
    for blur in blurs:
        low, high = blur.blur_sigma
        sigmas = {_compute_kernel_size(sigma): sigma for sigma in np.linspace(low, high, 21)}
        dummy = torch.zeros((1, *patch))
        for dim in range(len(patch)):
            for sigma in sigmas.values():
                blur._benchmark_wrapper(dummy, float(sigma), dim)


def compare_training(script: Path, scratch: Path, args, plan_cases: int = PLAN_CASES) -> child_process.ChildResult | str:
    """nnU-Net's training step and data augmentation with its 3d_fullres plan for ``plan_cases``
    full-size synthetic cases, in a child of ``script`` (task ``nnunet``); or why it was skipped."""
    reason = skip_reason(args.device)
    if reason:
        return reason
    data = scratch / "nnunet_cases"
    print(f"nnU-Net: synthesizing {plan_cases} full-size cases and planning ...", flush=True)
    benchlib.synthesize(data, range(plan_cases), args.seed, "full")
    env = setup(benchlib.labelled_cases(data), scratch / "nnunet")
    steps = args.repeats or (1 if args.quick else 2)
    print(f"nnU-Net {CONFIGURATION}: 1 warm-up + {steps} timed training steps ...", flush=True)
    spec = {"task": "nnunet", "steps": steps, "conv_repeats": 1 if args.quick else 3,
            "augmentation_samples": 5 if args.quick else 20}
    return child_process.run_child(script, spec, env=env)



def report_training(result: child_process.ChildResult, kitspipe: dict[str, Any] | None, amp: bool) -> dict[str, Any]:
    """nnU-Net's step next to the kitspipe ``paper`` preset's (``kitspipe``: its train_step figures)."""
    r = result.extra
    seconds = Summary.of(r["step_s"])
    gflops = r["counted_gflop"] / seconds.median
    ceiling_gflops = r["conv"]["forward_backward_gflops"]
    voxels = r["batch_size"] * math.prod(r["patch_size"])
    rows = [[f"nnU-Net {version()} {CONFIGURATION}", f"{r['batch_size']} × {'×'.join(map(str, r['patch_size']))}",
             "fp32", f"{r['counted_gflop']:.0f}", seconds.fmt(2), f"{gflops:.0f}", f"{ceiling_gflops:.0f}",
             f"{100 * gflops / ceiling_gflops:.0f} %", f"{voxels / seconds.median / 1e3:.1f}", mib(result.peak_rss)]]
    figures = {"nnunet_version": version(), "configuration": CONFIGURATION, "batch_size": r["batch_size"],
               "patch_size": r["patch_size"], "counted_gflop": r["counted_gflop"],
               "step_s": summary_json(r["step_s"]), "gflops": gflops, "conv_reference": r["conv"],
               "of_conv3d": gflops / ceiling_gflops, "peak_rss_bytes": result.peak_rss}
    if kitspipe:
        precision = "bf16" if amp else "fp32"
        step = kitspipe["step_s"]["median"]
        conv = max((c for c in kitspipe["conv_reference"] if c["channels"] == 32 and c["precision"] == precision),
                   key=lambda c: c["forward_backward_gflops"])
        kitspipe_gflops = kitspipe["counted_gflop"] / kitspipe["compute_s"]["median"]
        kitspipe_voxels = kitspipe["batch_size"] * kitspipe["high_output"] ** 3
        rows.append(["kitspipe paper", f"{kitspipe['batch_size']} × {kitspipe['high_output']}³ (out)", precision,
                     f"{kitspipe['counted_gflop']:.0f}", f"{step:.2f}", f"{kitspipe_gflops:.0f}",
                     f"{conv['forward_backward_gflops']:.0f}",
                     f"{100 * kitspipe_gflops / conv['forward_backward_gflops']:.0f} %",
                     f"{kitspipe_voxels / step / 1e3:.1f}", mib(kitspipe["peak_rss_bytes"])])
        figures["kitspipe_paper_of_conv3d"] = kitspipe_gflops / conv["forward_backward_gflops"]
    print()
    print(table(["network", "batch × patch", "precision", "GFLOP/step", "s/step", "GFLOP/s", "conv3d GFLOP/s",
                 "of conv3d", "k output voxels/s", "peak RSS MiB"], rows,
                title="Training step next to nnU-Net's on the same CPU, same run (conv3d: 32→32 forward+backward "
                      "in the same process and precision)"))
    print("(nnU-Net: nnUNetTrainer's step on a random batch, float32 as it runs on a CPU; its data augmentation "
          "is timed below)")
    figures["augmentation"] = report_augmentation(r["augmentation"], kitspipe)
    return figures


def report_augmentation(nnunet: dict[str, Any], kitspipe: dict[str, Any] | None) -> dict[str, Any]:
    """nnU-Net's augmentation per sample next to kitspipe's ``paper`` sample, both on one thread;
    the ratio is of the means (what a loader's throughput depends on)."""
    seconds = Summary.of(nnunet["sample_s"])
    voxels = math.prod(nnunet["patch_size"])
    # Throughput is set by the mean: nnU-Net applies most transforms with a probability, so a
    # few samples cost many times the median.
    rows = [[f"nnU-Net {version()} {CONFIGURATION}", "×".join(map(str, nnunet["initial_patch_size"])) + " crop",
             "×".join(map(str, nnunet["patch_size"])), f"{voxels / 1e6:.2f}", seconds.fmt(3),
             f"{statistics.fmean(nnunet['sample_s']):.3f}"]]
    figures = {"nnunet_sample_s": summary_json(nnunet["sample_s"]), **nnunet}
    if kitspipe:
        sample = kitspipe["loader"]["one_sample_in_process_s"]
        kitspipe_voxels = kitspipe["high_input"] ** 3 + kitspipe["low_input"] ** 3
        rows.append(["kitspipe paper", "memory-mapped case", f"{kitspipe['high_input']}³ + {kitspipe['low_input']}³",
                     f"{kitspipe_voxels / 1e6:.2f}", Summary.of(sample["values"]).fmt(3),
                     f"{statistics.fmean(sample['values']):.3f}"])
        figures["kitspipe_over_nnunet"] = statistics.fmean(sample["values"]) / statistics.fmean(nnunet["sample_s"])
    print()
    print(table(["pipeline", "input", "augmented sample", "M voxels", "s per sample", "mean s"], rows,
                title="Data augmentation of one training sample, one thread, same run (median, min–max, and mean)"))
    return figures
