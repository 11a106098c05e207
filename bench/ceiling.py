"""The ceiling a benchmark's GFLOP/s are compared with: one plain ``conv3d`` on the same device.

A network's convolutions cannot run faster than a large 3×3×3 ``conv3d`` alone in the same
process, device and precision; ``bench/train_step.py`` and ``bench/infer.py`` print their
achieved rate as a share of it. Rates print as GFLOP/s on a CPU and TFLOP/s on a GPU.
"""

from __future__ import annotations

from typing import Any

from benchlib import Stopwatch, Summary, summary_json


def conv_reference(size: int, channels: int, device: str, repeats: int, amp: bool,
                   channels_last: bool = False) -> dict[str, Any]:
    """GFLOP/s of one ``conv3d`` channels→channels 3×3×3 (valid) on a ``size``³ input, batch 1:
    the ceiling a network's convolutions are compared with, measured on the same device and in
    the same precision (``amp``: bf16 autocast), and in ``torch.channels_last_3d`` when asked."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(1, channels, size, size, size, device=device, requires_grad=True)
    weight = (0.05 * torch.randn(channels, channels, 3, 3, 3, device=device)).requires_grad_(True)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
        weight = weight.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    flop = 2.0 * channels * channels * 27 * (size - 2) ** 3
    forward, both = [], []
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
        for index in range(repeats + 1):  # the first of each is a warm-up
            with torch.no_grad(), Stopwatch(device) as watch:
                F.conv3d(x, weight)
            if index:
                forward.append(watch.seconds)
            with Stopwatch(device) as watch:
                out = F.conv3d(x, weight)
                out.backward(torch.ones_like(out))
            if index:
                both.append(watch.seconds)
            x.grad = weight.grad = None
    return {"size": size, "channels": channels, "precision": "bf16" if amp else "fp32",
            "layout": "channels_last_3d" if channels_last else "ncdhw", "gflop_forward": flop / 1e9,
            "forward_s": summary_json(forward), "forward_backward_s": summary_json(both),
            "forward_gflops": flop / 1e9 / Summary.of(forward).median,
            "forward_backward_gflops": 3 * flop / 1e9 / Summary.of(both).median}


def rate(gflops: float, device: str) -> str:
    """GFLOP/s as printed: whole GFLOP/s on a CPU, TFLOP/s with one decimal on a GPU."""
    return f"{gflops / 1e3:.1f}" if device == "cuda" else f"{gflops:.0f}"


def rate_unit(device: str) -> str:
    return "TFLOP/s" if device == "cuda" else "GFLOP/s"
