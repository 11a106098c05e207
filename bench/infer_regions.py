"""Where ``bench/infer.py`` runs the network: crops of the case around the kidneys (the same
box of the 1 mm and the 4 mm grid), and each mode's crop and number of runs."""

from __future__ import annotations

import math


def crop_box(centre: list[float], high_shape: list[int], low_shape: list[int], size_mm: int,
             scale: int) -> list[list[int]] | None:
    """The same physical box on both grids: a cube of ``size_mm`` 1 mm voxels around ``centre``
    whose start is a multiple of ``scale`` (so it is a whole number of 4 mm voxels); None = whole case."""
    if size_mm <= 0 or all(size_mm >= n for n in high_shape):
        return None
    high_start, high_size, low_start, low_size = [], [], [], []
    for c, n_high, n_low in zip(centre, high_shape, low_shape):
        size = min(size_mm, n_high)
        start = int(round(c - size / 2))
        start = max(0, min(start, n_high - size)) // scale * scale
        high_start.append(start)
        high_size.append(size)
        low_start.append(start // scale)
        low_size.append(min(n_low - start // scale, math.ceil((start + size) / scale) - start // scale))
    return [high_start, high_size, low_start, low_size]


def mode_settings(args) -> dict[str, dict[str, int]]:
    """Crop (mm, 0 = whole case) and runs of each mode."""
    on_cpu = args.device == "cpu"
    settings = {}
    for mode in args.modes:
        if mode == "roi":  # the point of it is the whole case
            settings[mode] = {"crop_mm": 0, "runs": args.repeats or (1 if args.quick or on_cpu else 3)}
            continue
        if args.crop is not None:
            crop = args.crop
        elif not on_cpu:
            crop = 100 if args.quick and mode == "paper" else 0
        elif mode == "paper":
            crop = 14 if args.quick else 30
        else:
            crop = 48 if args.quick else 96
        slow = on_cpu and mode == "paper"
        runs = args.repeats or (1 if args.quick or slow else 3)
        settings[mode] = {"crop_mm": crop, "runs": runs}
    return settings
