"""The arithmetic of the nnU-Net comparison in bench/ (runs without nnunetv2 installed)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import child_process  # noqa: E402
import nnunet_reference  # noqa: E402
import nnunet_training  # noqa: E402


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
    result = child_process.ChildResult(seconds=0.0, cpu_seconds=0.0, peak_rss=0, tree_peak_rss=0, baseline_rss=0,
                                  extra={"stages": {"preprocess": 3.0, "sliding_window": 48.0, "export": 5.0},
                                         "run_tiles": 4, "whole_tiles": 70})
    estimate = nnunet_reference.whole_case_estimate(result)
    assert estimate["seconds_per_tile"] == pytest.approx(12.0)
    assert estimate["sliding_window"] == pytest.approx(840.0)
    assert estimate["total"] == pytest.approx(848.0)


def child(seconds: float = 0.0, peak: int = 2**30, **extra) -> child_process.ChildResult:
    return child_process.ChildResult(seconds=seconds, cpu_seconds=seconds, peak_rss=peak, tree_peak_rss=peak,
                                baseline_rss=0, extra=extra)


def test_the_inference_report_divides_kitspipe_by_nnunets_whole_case(monkeypatch, capsys):
    monkeypatch.setattr(nnunet_reference, "version", lambda: "2.8.1")
    nnunet = [child(stages={"preprocess": 10.0, "sliding_window": 40.0 + k, "export": 10.0}, run_tiles=4,
                    whole_tiles=100, patch_size=[64, 192, 192], flops_per_patch_voxel=4.5e5, spacing=[1.75, 0.9, 0.9],
                    preprocessed_shape=[156, 512, 512], crop_shape=[64, 288, 288]) for k in (0, 4, 8)]
    kitspipe = [child(seconds=s, stages={"read": 1.0, "predict_case": s - 2.0, "postprocess": 0.5, "write": 0.5})
                for s in (100.0, 110.0, 102.0)]
    figures = nnunet_reference.report_inference(nnunet, kitspipe, "bf16")
    # nnU-Net's median whole case: 10 + 44 / 4 × 100 + 10 = 1120 s; kitspipe's median 102 s.
    assert figures["nnunet_stage_seconds"]["total"]["median"] == pytest.approx(1120.0)
    assert figures["seconds_ratio_kitspipe_over_nnunet"] == pytest.approx(102.0 / 1120.0)
    assert figures["extrapolated"] is True
    assert "EXTRAPOLATED" in capsys.readouterr().out


def test_the_training_report_rates_both_steps_against_their_own_conv3d(monkeypatch):
    monkeypatch.setattr(nnunet_training, "version", lambda: "2.8.1")
    augmentation = {"initial_patch_size": [84, 250, 250], "patch_size": [64, 192, 192],
                    "sample_s": [0.2, 0.3, 0.25], "dummy_2d": False}
    nnunet = child(step_s=[80.0, 84.0], counted_gflop=6400.0, conv={"forward_backward_gflops": 100.0},
                   batch_size=2, patch_size=[64, 192, 192], augmentation=augmentation)
    kitspipe = {"step_s": {"median": 14.0}, "compute_s": {"median": 13.0}, "counted_gflop": 2080.0,
                "batch_size": 2, "high_output": 20, "high_input": 108, "low_input": 108, "peak_rss_bytes": 2**32,
                "loader": {"one_sample_in_process_s": {"median": 0.1, "values": [0.1, 0.09, 0.12]}},
                "conv_reference": [{"channels": 32, "precision": "fp32", "forward_backward_gflops": 120.0},
                                   {"channels": 32, "precision": "bf16", "forward_backward_gflops": 200.0},
                                   {"channels": 32, "precision": "bf16", "forward_backward_gflops": 250.0}]}
    figures = nnunet_training.report_training(nnunet, kitspipe, amp=True)
    assert figures["gflops"] == pytest.approx(6400.0 / 82.0)
    assert figures["of_conv3d"] == pytest.approx(6400.0 / 82.0 / 100.0)
    # Against the faster of the two bf16 ceilings (e.g. the channels-last one).
    assert figures["kitspipe_paper_of_conv3d"] == pytest.approx(2080.0 / 13.0 / 250.0)
    assert figures["augmentation"]["kitspipe_over_nnunet"] == pytest.approx((0.31 / 3) / 0.25)
