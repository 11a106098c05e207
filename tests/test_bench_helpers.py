"""The arithmetic of the nnU-Net comparison in bench/ (runs without nnunetv2 installed)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import benchlib  # noqa: E402
import nnunet_reference  # noqa: E402


def sliding_window_steps(size: int, patch: int, step: float = 0.5) -> int:
    """Tiles nnU-Net's sliding window places along one axis (its compute_steps_for_sliding_window)."""
    return 1 if size <= patch else math.ceil((size - patch) / (patch * step)) + 1


@given(shape=st.tuples(*[st.integers(16, 400)] * 3), patch=st.tuples(*[st.integers(8, 200)] * 3),
       tiles=st.tuples(*[st.integers(1, 3)] * 3))
def test_a_crop_holds_the_requested_tiles_when_the_volume_is_large_enough(shape, patch, tiles):
    crop = nnunet_reference.crop_slices(shape, patch, tiles)
    for axis, (s, n, p, k) in enumerate(zip(crop, shape, patch, tiles)):
        assert 0 <= s.start < s.stop <= n
        size = s.stop - s.start
        assert abs(s.start - (n - s.stop)) <= 1  # centred
        wanted = p + (k - 1) * p // 2
        if wanted <= n:
            assert size == wanted
            assert sliding_window_steps(size, p) == k
        else:
            assert size == n


def test_the_whole_case_scales_the_sliding_window_by_the_tile_count():
    result = benchlib.ChildResult(seconds=0.0, cpu_seconds=0.0, peak_rss=0, tree_peak_rss=0, baseline_rss=0,
                                  extra={"stages": {"preprocess": 3.0, "sliding_window": 48.0, "export": 5.0},
                                         "run_tiles": 4, "whole_tiles": 70})
    estimate = nnunet_reference.whole_case_estimate(result)
    assert estimate["seconds_per_tile"] == pytest.approx(12.0)
    assert estimate["sliding_window"] == pytest.approx(840.0)
    assert estimate["total"] == pytest.approx(848.0)
