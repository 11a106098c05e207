"""The training loader: batch layout and determinism across workers, seeds and resumption."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kitspipe.data.augmentation import make_augmenter
from kitspipe.data.cases import open_cases
from kitspipe.data.loader import make_loader
from kitspipe.data.sampling import PatchSampler
from kitspipe.networks.sizes import output_size
from kitspipe.plans import IntensityPlan, ResolutionPlan, load_preset

SCALE = 4
STEPS = 4


def write_case(root: Path, case_id: str, seed: int) -> None:
    """A 48³ (1 mm) / 12³ (4 mm) preprocessed case with a kidney ball holding a tumour."""
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    z, y, x = np.ogrid[:48, :48, :48]
    centre = rng.integers(14, 34, size=3)
    distance2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
    label = np.where(distance2 <= 64, 1, 0).astype(np.uint8)
    label[distance2 <= 9] = 2
    image = (np.where(label > 0, 150, 20) + rng.normal(0, 10, label.shape)).astype(np.int16)
    arrays = {"high_image": image, "high_label": label,
              "low_image": image.reshape(12, 4, 12, 4, 12, 4).mean(axis=(1, 3, 5)).astype(np.int16),
              "low_label": np.ascontiguousarray(label[2::4, 2::4, 2::4])}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    grid = {"origin": [0.0] * 3, "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    properties = {"high_grid": dict(grid, shape=[48] * 3, spacing=[1.0] * 3),
                  "low_grid": dict(grid, shape=[12] * 3, spacing=[4.0] * 3),
                  "locations": {"kidney": np.argwhere(label > 0).tolist(), "tumour": np.argwhere(label == 2).tolist()},
                  "has_tumour": True}
    (folder / "properties.json").write_text(json.dumps(properties))


@pytest.fixture
def plans():
    base = load_preset("cpu")
    high = ResolutionPlan((1.0,) * 3, 4, 1, (36,) * 3, (output_size(36, 1),) * 3)
    low = ResolutionPlan((4.0,) * 3, 4, 1, (24,) * 3, (output_size(24, 1),) * 3)
    # Every random part switched on, so determinism covers all of them.
    augmentation = replace(base.augmentation, elastic_probability=0.5, noise_probability=0.5, mirror_left_right=True)
    return replace(base, high=high, low=low, intensity=IntensityPlan((-500.0, 400.0), 50.0, 100.0),
                   augmentation=augmentation, training=replace(base.training, batch_size=2))


@pytest.fixture
def sampler(tmp_path, plans):
    for index in range(3):
        write_case(tmp_path, f"case_{index}", index)
    cases = open_cases(tmp_path, [f"case_{index}" for index in range(3)])
    return PatchSampler(cases, plans, make_augmenter(plans))


def batches(sampler, plans, epoch=0, num_workers=0, seed=0, start_step=0):
    return list(make_loader(sampler, plans, epoch, STEPS, num_workers, seed, start_step=start_step))


def assert_same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_batches_have_the_documented_layout(sampler, plans):
    loaded = batches(sampler, plans)
    assert len(loaded) == STEPS
    shapes = {"high_image": (2, 1, 36, 36, 36), "low_image": (2, 1, 24, 24, 24),
              "high_target": (2, 2, 20, 20, 20), "low_target": (2, 1, 8, 8, 8), "tumour_present": (2, 1)}
    for batch in loaded:
        assert {key: tuple(value.shape) for key, value in batch.items()} == shapes
        assert all(value.dtype == torch.float32 for value in batch.values())
        present = batch["high_target"][:, 1].flatten(1).amax(dim=1, keepdim=True)
        torch.testing.assert_close(batch["tumour_present"], present)


def test_the_same_seed_gives_the_same_batches_and_another_seed_others(sampler, plans):
    assert_same(batches(sampler, plans), batches(sampler, plans))
    other = batches(sampler, plans, seed=1)
    assert not torch.equal(other[0]["high_image"], batches(sampler, plans)[0]["high_image"])
    next_epoch = batches(sampler, plans, epoch=1)
    assert not torch.equal(next_epoch[0]["high_image"], batches(sampler, plans)[0]["high_image"])


def test_worker_processes_give_the_same_batches_as_the_main_process(sampler, plans):
    assert_same(batches(sampler, plans, num_workers=0), batches(sampler, plans, num_workers=2))


def test_a_resumed_epoch_continues_with_the_batches_it_would_have_seen(sampler, plans):
    assert_same(batches(sampler, plans, start_step=2), batches(sampler, plans)[2:])
    assert batches(sampler, plans, start_step=STEPS) == []


def test_a_start_step_past_the_epoch_is_refused(sampler, plans):
    with pytest.raises(ValueError, match="start_step"):
        make_loader(sampler, plans, 0, STEPS, 0, 0, start_step=STEPS + 1)
