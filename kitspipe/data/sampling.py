"""Where to cut training patch pairs (see ``patch_geometry`` for how a pair is laid out).

Candidate positions (paper 2.3.3: "patches have 50 % overlapping in all directions") are the
high output regions on a regular grid over the volume. The plan's overlap asks for a stride of
``O_h·(1 − overlap)`` high voxels; it is rounded *down* to a whole number of low voxels so
every candidate stays on the low grid (the overlap is then at least the plan's: 60 % for the
paper's 20³ outputs at scale 4). A candidate is positive when its high output region holds
any kidney or tumour voxel, which is decided exactly from the high-resolution label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from kitspipe.data.cases import PreprocessedCase
from kitspipe.data.patch_geometry import PairGeometry, Triple, Window, read_patch
from kitspipe.errors import KitspipeError, PlanError, Problem
from kitspipe.plans import Plans

if TYPE_CHECKING:
    from kitspipe.data.augmentation import Augmenter

# Voxels per slab when the high label is scanned for candidates: bounds the memory of a scan.
_SLAB_VOXELS = 8_000_000


def grid_stride(output: int, scale: int, overlap: float) -> int:
    """High-resolution stride between neighbouring candidates along one axis.

    ``output·(1 − overlap)`` rounded down to a multiple of ``scale`` (at least ``scale``), so
    candidates stay on the low grid and overlap at least as much as asked.
    """
    return scale * max(1, math.floor(output * (1.0 - overlap) / scale + 1e-9))


def _axis_grid(n_high: int, output: int, offset: int, scale: int, stride: int) -> tuple[int, int]:
    """First low start and number of candidates along one axis, covering ``[0, n_high)``.

    The grid is centred on the volume; the first start is rounded down onto the low grid,
    which can leave the far end uncovered by less than ``scale`` voxels, then one more
    candidate is added.
    """
    count = max(1, math.ceil((n_high - output) / stride) + 1)
    span = (count - 1) * stride + output
    first = math.floor(((n_high - span) / 2 - offset) / scale)
    if scale * first + offset + span < n_high:
        count += 1
    return first, count


def _pooled_foreground(label: np.ndarray, start: Triple, size: Triple, block: Triple) -> np.ndarray:
    """Whether each ``block`` of a box of ``label`` holds a non-zero voxel, read slab by slab."""
    rows = max(1, _SLAB_VOXELS // (size[1] * size[2] * block[0])) * block[0]
    pooled = []
    for z in range(0, size[0], rows):
        depth = min(rows, size[0] - z)
        slab = read_patch(label, (start[0] + z, start[1], start[2]), (depth, size[1], size[2]), 0)
        shape = (depth // block[0], block[0], size[1] // block[1], block[1], size[2] // block[2], block[2])
        # One axis at a time, outermost first: the full-size pass then runs over long
        # contiguous rows, about ten times faster than reducing the three block axes at once.
        pooled.append(slab.reshape(shape).any(axis=1).any(axis=2).any(axis=3))
    return np.concatenate(pooled)


@dataclass(frozen=True, eq=False)
class CaseCandidates:
    """The candidate patch pairs of one case on the overlapping grid.

    Args:
        first_low_start: low start of the candidate with grid index (0, 0, 0).
        low_step: grid stride in low voxels per axis.
        positive: per grid position, whether its high output region holds kidney or tumour.
    """

    first_low_start: Triple
    low_step: Triple
    positive: np.ndarray

    @classmethod
    def compute(cls, high_label: np.ndarray, geometry: PairGeometry, overlap: float) -> "CaseCandidates":
        """Lay the candidate grid over a case and classify every candidate.

        Each candidate's output region starts on the same residue modulo ``scale``, so the
        label is max-pooled in blocks of ``gcd(scale, O_h)`` aligned to that residue: every
        output region is then a whole number of blocks and the test is exact at
        ``scale``⁻³ of the cost. Box sums over all candidates come from cumulative sums,
        one axis at a time.

        Args:
            high_label: the case's label on the high-resolution grid.
            geometry: patch geometry of the plan.
            overlap: the plan's ``sampling.grid_overlap``.
        """
        scale, outputs = geometry.scale, geometry.high_output
        offsets = geometry.high_output_start((0, 0, 0))
        strides = tuple(grid_stride(o, scale, overlap) for o in outputs)
        axes = [_axis_grid(n, o, off, scale, st) for n, o, off, st in zip(high_label.shape, outputs, offsets, strides)]
        firsts = tuple(first for first, _ in axes)
        counts = tuple(count for _, count in axes)
        block = tuple(math.gcd(scale, o) for o in outputs)
        frame_start = geometry.high_output_start(firsts)
        frame_size = tuple((n - 1) * st + o for n, st, o in zip(counts, strides, outputs))
        sums = _pooled_foreground(high_label, frame_start, frame_size, block).astype(np.int32)
        for axis in range(3):
            cumulative = np.cumsum(sums, axis=axis)
            cumulative = np.concatenate([np.zeros_like(cumulative.take([0], axis=axis)), cumulative], axis=axis)
            starts = np.arange(counts[axis]) * (strides[axis] // block[axis])
            ends = starts + outputs[axis] // block[axis]
            sums = cumulative.take(ends, axis=axis) - cumulative.take(starts, axis=axis)
        return cls(firsts, tuple(st // scale for st in strides), sums > 0)

    def count(self, positive: bool) -> int:
        """How many positive (or negative) candidates the case has."""
        n_positive = int(np.count_nonzero(self.positive))
        return n_positive if positive else self.positive.size - n_positive

    def low_start(self, flat_index: int) -> Triple:
        """Low start of the candidate with flat grid index ``flat_index``."""
        grid_index = np.unravel_index(flat_index, self.positive.shape)
        return tuple(int(f + i * st) for f, i, st in zip(self.first_low_start, grid_index, self.low_step))

    def draw(self, rng: np.random.Generator, positive: bool) -> Triple:
        """A uniformly chosen positive (or negative) candidate; the kind must be present."""
        indices = np.flatnonzero(self.positive if positive else ~self.positive)
        return self.low_start(int(indices[rng.integers(len(indices))]))


@dataclass(eq=False)
class PatchPair:
    """One training sample of the dual-resolution network.

    Args:
        high_image: (P_h, P_h, P_h) float32, normalised.
        low_image: (P_l, P_l, P_l) float32, normalised.
        high_target: (2, O_h, O_h, O_h) float32 regions [kidney ∪ tumour, tumour].
        low_target: (1, O_l, O_l, O_l) float32 kidney ∪ tumour (the paper's format 1).
        tumour_present: 1.0 when the high output region holds a tumour voxel, else 0.0.
        case_id: the case the pair was cut from.
        low_start: start of the low-resolution patch, which fixes the pair's position.
    """

    high_image: np.ndarray
    low_image: np.ndarray
    high_target: np.ndarray
    low_target: np.ndarray
    tumour_present: float
    case_id: str
    low_start: Triple


class PatchSampler:
    """Draws balanced, optionally augmented patch pairs from preprocessed cases.

    Every draw comes from the generator passed to :meth:`sample`, so a sample is a pure
    function of that generator's seed (the loader's determinism rests on this).

    Args:
        cases: the cases to sample from (e.g. one fold's training cases).
        plans: a resolved plan (patch sizes, intensity statistics, sampling settings).
        augmenter: spatial and intensity augmentation, or ``None`` for plain patches.
    """

    def __init__(self, cases: Sequence[PreprocessedCase], plans: Plans, augmenter: Augmenter | None = None) -> None:
        if not cases:
            raise KitspipeError("train: no cases to sample patches from")
        if plans.intensity.mean is None or plans.intensity.std is None:
            raise PlanError("intensity.mean: not resolved (run `kitspipe plan`)")
        self.cases = list(cases)
        self.geometry = PairGeometry.from_plans(plans)
        self.sampling = plans.sampling
        self.clip_hu = tuple(plans.intensity.clip_hu)
        self.mean, self.std = float(plans.intensity.mean), float(plans.intensity.std)
        self.augmenter = augmenter
        for case in self.cases:
            expected = tuple(self.geometry.scale * n for n in case.low_label.shape)
            if case.high_label.shape != expected:
                raise KitspipeError(Problem("train", case.case_id, case.folder / "high_label.npy",
                                            f"high grid is not {self.geometry.scale}× the low grid",
                                            str(case.high_label.shape), str(expected)))
        self.candidates = [CaseCandidates.compute(case.high_label, self.geometry, self.sampling.grid_overlap)
                           for case in self.cases]
        self.tumour_case_probabilities = self._tumour_case_probabilities()

    def _tumour_case_probabilities(self) -> np.ndarray | None:
        """Per case, the chance that a tumour-centred draw picks it (``tumour_volume_exponent``)."""
        exponent = self.sampling.tumour_volume_exponent
        if exponent is None:
            return None
        volumes = np.array([np.count_nonzero(np.asarray(case.high_label) == 2) if len(case.tumour_locations) else 0
                            for case in self.cases], dtype=np.float64)
        if not volumes.any():
            return None
        weights = np.where(volumes > 0, volumes ** exponent, 0.0)
        return weights / weights.sum()

    def sample(self, rng: np.random.Generator) -> PatchPair:
        """Draw one patch pair.

        A case is chosen uniformly; with probability ``positive_fraction`` a positive
        candidate (of which ``tumour_fraction_of_positives`` are instead centred on a tumour
        voxel, when the case has one), otherwise a negative one. A case without candidates
        of the wanted kind gives one of the other kind. With ``tumour_volume_exponent`` set,
        the kind of sample is drawn first, and a tumour-centred one picks its case among the
        cases with a tumour, weighted by tumour volume to that power.
        """
        if self.tumour_case_probabilities is None:
            index = int(rng.integers(len(self.cases)))
            positive, on_tumour = self._draw_kind(rng)
        else:
            positive, on_tumour = self._draw_kind(rng)
            index = int(rng.choice(len(self.cases), p=self.tumour_case_probabilities) if on_tumour
                        else rng.integers(len(self.cases)))
        return self.pair_at(index, self._draw_low_start(index, positive, on_tumour, rng), rng)

    def _draw_kind(self, rng: np.random.Generator) -> tuple[bool, bool]:
        """(positive, centred on a tumour voxel) for one draw."""
        positive = bool(rng.random() < self.sampling.positive_fraction)
        return positive, positive and bool(rng.random() < self.sampling.tumour_fraction_of_positives)

    def _draw_low_start(self, index: int, positive: bool, on_tumour: bool, rng: np.random.Generator) -> Triple:
        case, candidates = self.cases[index], self.candidates[index]
        if on_tumour and case.has_tumour:
            locations = case.tumour_locations
            if len(locations):
                return self.geometry.low_start_centred_on(locations[rng.integers(len(locations))])
        if candidates.count(positive) == 0:
            positive = not positive
        return candidates.draw(rng, positive)

    def windows(self, case: PreprocessedCase, low_start: Sequence[int]) -> dict[str, Window]:
        """The four boxes of the pair at ``low_start``: both inputs and both output regions."""
        g, air = self.geometry, self.clip_hu[0]
        low_start = tuple(int(s) for s in low_start)
        return {
            "high_image": Window(case.high_image, g.high_start(low_start), g.high_input, g.high_spacing_mm, air, False),
            "low_image": Window(case.low_image, low_start, g.low_input, g.low_spacing_mm, air, False),
            "high_label": Window(case.high_label, g.high_output_start(low_start), g.high_output,
                                 g.high_spacing_mm, 0, True),
            "low_label": Window(case.low_label, g.low_output_start(low_start), g.low_output,
                                g.low_spacing_mm, 0, True),
        }

    def pair_at(self, index: int, low_start: Sequence[int], rng: np.random.Generator) -> PatchPair:
        """The pair of case ``index`` at ``low_start``, augmented with parameters drawn from ``rng``.

        Args:
            index: position of the case in ``cases``.
            low_start: start of the low-resolution patch.
            rng: source of the augmentation parameters (unused without an augmenter).
        """
        case = self.cases[index]
        windows = self.windows(case, low_start)
        if self.augmenter is None:
            patches = {name: window.read() for name, window in windows.items()}
        else:
            patches = self.augmenter.apply(self.augmenter.sample_parameters(rng), windows)
        high_label, low_label = patches["high_label"], patches["low_label"]
        return PatchPair(
            high_image=self.normalise(patches["high_image"]),
            low_image=self.normalise(patches["low_image"]),
            high_target=np.stack([high_label > 0, high_label == 2]).astype(np.float32),
            low_target=(low_label > 0)[np.newaxis].astype(np.float32),
            tumour_present=float((high_label == 2).any()),
            case_id=case.case_id,
            low_start=tuple(int(s) for s in low_start),
        )

    def normalise(self, hu: np.ndarray) -> np.ndarray:
        """``(clip(hu) − mean) / std`` as float32; an augmentation's HU shift is already in ``hu``."""
        clipped = np.clip(hu.astype(np.float32), self.clip_hu[0], self.clip_hu[1])
        return ((clipped - self.mean) / self.std).astype(np.float32)
