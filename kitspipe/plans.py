"""The plans: one typed JSON contract between the stages.

Configuration flows one way: fingerprint → plans → preprocess / train / infer. A preset in
``plans/`` is a plans file with some fields left ``null``; the planner (``planning.py``)
fills those from the dataset fingerprint and writes ``WORK/plans.json``, which every later
stage loads through ``load_plans``. Every field is documented in ``docs/plans.md``.

Arrays are canonical (z, y, x), so every spacing and patch triple is in that order.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from kitspipe.atomic import atomic_write_json, canonical_json
from kitspipe.errors import PlanError
from kitspipe.json_input import JsonInputError, read_json
from kitspipe.schema import from_dict, merge, to_dict

SCHEMA_VERSION = 1
# bf16 autocast: "auto" = on a CUDA GPU that supports bf16, off elsewhere (kitspipe.devices).
MixedPrecision = Literal["auto", "bf16", "off"]
Determinism = Literal["auto", "on", "off"]
Triple = tuple[int, int, int]
TripleF = tuple[float, float, float]


@dataclass(frozen=True)
class ResolutionPlan:
    """One branch of the network: the grid it sees and the U-Net that looks at it."""

    spacing_mm: TripleF
    base_filters: int
    depth: int
    input_patch: Triple | None = None
    output_patch: Triple | None = None
    padding: Literal["valid", "same"] = "valid"
    output_crop: int = 0

    @property
    def borders(self):
        """The U-Net's :class:`~kitspipe.networks.sizes.UNetBorders`."""
        from kitspipe.networks.sizes import UNetBorders

        return UNetBorders(self.padding, self.output_crop)

    def __post_init__(self) -> None:
        for value in self.spacing_mm:
            if not value > 0:
                raise ValueError(f"spacing_mm: every spacing must be > 0, got {list(self.spacing_mm)}")
        if self.base_filters < 1:
            raise ValueError(f"base_filters: must be >= 1, got {self.base_filters}")
        if not 1 <= self.depth <= 5:
            raise ValueError(f"depth: must be within 1..5, got {self.depth}")
        if self.output_crop < 0:
            raise ValueError(f"output_crop: must be >= 0, got {self.output_crop}")
        if self.input_patch is not None:
            from kitspipe.networks.sizes import output_size

            try:
                expected = tuple(output_size(s, self.depth, borders=self.borders) for s in self.input_patch)
            except ValueError as error:
                raise ValueError(f"input_patch: {list(self.input_patch)} is not valid for depth {self.depth} "
                                 f"and {self.padding} padding ({error})") from None
            if self.output_patch is not None and tuple(self.output_patch) != expected:
                raise ValueError(f"output_patch: {list(self.output_patch)} does not match input_patch "
                                 f"{list(self.input_patch)} at depth {self.depth} (expected {list(expected)})")


@dataclass(frozen=True)
class IntensityPlan:
    """HU window (paper: [-500, 400]) and the z-score of clipped foreground HU applied after it."""

    clip_hu: tuple[float, float] = (-500.0, 400.0)
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if not self.clip_hu[0] < self.clip_hu[1]:
            raise ValueError(f"clip_hu: lower bound must be below upper bound, got {list(self.clip_hu)}")
        if self.std is not None and not self.std > 0:
            raise ValueError(f"std: must be > 0, got {self.std}")


@dataclass(frozen=True)
class NetworkPlan:
    mask_join: Literal["first_skip", "all_skips", "input"] = "first_skip"
    mask_upsampling: Literal["nearest", "trilinear"] = "trilinear"
    mask_branch_filters: int | None = None
    classification_head: bool = True
    head_conv_filters: tuple[int, ...] = (32, 16)
    head_fc: tuple[int, ...] = (1024, 256, 128)
    head_fc_after_volume: tuple[int, ...] = (64, 32)
    normalisation: Literal["batch", "instance"] = "batch"


@dataclass(frozen=True)
class LossPlan:
    high_weight: float = 2.0
    classification_weight: float = 2.0
    low_weight: float = 1.0
    dice_weight: float = 0.2
    ce_weight: float = 0.8
    topk_fraction: float = 0.7
    high_positive_weights: tuple[float, float] | None = None
    low_positive_weight: float | None = None
    max_positive_weight: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.topk_fraction <= 1:
            raise ValueError(f"topk_fraction: must be within (0, 1], got {self.topk_fraction}")


@dataclass(frozen=True)
class AugmentationPlan:
    enabled: bool = True
    elastic_probability: float = 0.3
    elastic_grid_points: int = 10
    elastic_magnitude_mm: float = 4.0
    scale_range: float = 0.05
    rotation_degrees: float = 5.0
    noise_probability: float = 0.15
    noise_std_hu: float = 10.0
    hu_shift_range: float = 50.0
    mirror_left_right: bool = False


@dataclass(frozen=True)
class SamplingPlan:
    positive_fraction: float = 0.5
    tumour_fraction_of_positives: float = 0.0
    grid_overlap: float = 0.5
    # None: every draw picks its case uniformly first. A number: a tumour-centred draw picks
    # among the cases with a tumour, weighted by tumour volume to this power (1: every tumour
    # voxel equally likely; large tumours are rare, and a uniform case choice rarely shows one).
    tumour_volume_exponent: float | None = None

    def __post_init__(self) -> None:
        for name in ("positive_fraction", "tumour_fraction_of_positives"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be within [0, 1], got {getattr(self, name)}")
        if self.tumour_volume_exponent is not None and not 0 <= self.tumour_volume_exponent <= 2:
            raise ValueError(f"tumour_volume_exponent: must be within [0, 2] or null, got {self.tumour_volume_exponent}")
        if not 0 <= self.grid_overlap < 1:
            raise ValueError(f"grid_overlap: must be within [0, 1), got {self.grid_overlap}")


@dataclass(frozen=True)
class TrainingPlan:
    trainer: str = "DualResolutionTrainer"
    seed: int = 0
    batch_size: int = 1
    learning_rate: float = 1e-4
    lr_decay_per_epoch: float = 0.9
    steps_per_epoch: int = 250
    max_epochs: int = 100
    patience: int = 10
    validation_interval: int = 1
    validation_fraction: float = 0.2
    low_resolution_pretraining: bool = True
    pretraining_dice_threshold: float = 0.9
    pretraining_max_epochs: int = 20
    trainable_low_blocks: int = 3
    num_workers: int = 2
    non_finite_loss: Literal["stop", "skip"] = "stop"
    max_minutes: float | None = None
    n_folds: int = 5
    weight_average_decay: float | None = None
    # How the network runs, not what it learns: excluded from the resume identity (training.identity).
    mixed_precision: MixedPrecision = "off"
    compile: bool = False
    channels_last: bool = False
    deterministic: Determinism = "on"  # the behaviour of plans written before the field existed

    def __post_init__(self) -> None:
        if self.n_folds < 2:
            raise ValueError(f"n_folds: must be >= 2, got {self.n_folds}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction: must be within (0, 1), got {self.validation_fraction}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate: must be > 0, got {self.learning_rate}")
        if self.weight_average_decay is not None and not 0 <= self.weight_average_decay < 1:
            raise ValueError(f"weight_average_decay: must be within [0, 1) or null, got {self.weight_average_decay}")
        for name in ("batch_size", "steps_per_epoch", "max_epochs", "patience", "validation_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class PostprocessingPlan:
    threshold: float = 0.5
    keep_largest_kidney_per_side: bool = True
    drop_unconnected_tumour: bool = True
    low_resolution_mask: bool = True
    low_resolution_dilation_mm: float = 10.0
    low_resolution_mask_first: bool = True
    min_tumour_volume_ml: float = 0.0
    min_tumour_fraction_in_kidney_region: float = 0.0


@dataclass(frozen=True)
class InferencePlan:
    tile_mode: Literal["paper", "fast"] = "fast"
    max_tile_voxels: int = 8_000_000
    mixed_precision: MixedPrecision = "off"
    checkpoint: Literal["best", "latest"] = "best"
    # Fast mode: run the fine network only where post-processing's low-resolution mask can keep
    # a voxel (kitspipe/inference/region_of_interest.py): the same labels, probabilities 0
    # elsewhere. Off by default because plans written before it existed computed everywhere.
    restrict_to_low_resolution_mask: bool = False
    # Test-time mirroring along these canonical axes (kitspipe/inference/mirroring.py): every
    # subset of them is one more prediction, averaged. The paper does not mirror.
    mirror_axes: tuple[Literal["z", "y", "x"], ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mirror_axes) - {"z", "y", "x"})
        if unknown:
            raise ValueError(f"mirror_axes: {unknown[0]!r} is not one of 'z', 'y', 'x'")
        if len(set(self.mirror_axes)) != len(self.mirror_axes):
            raise ValueError(f"mirror_axes: each axis at most once, got {list(self.mirror_axes)}")


@dataclass(frozen=True)
class PlannerPlan:
    """Settings only the planner reads: how to derive patch sizes when a preset leaves them null."""

    step_gflop_budget: float | None = None
    max_input_size: int = 268
    low_output_covers_high_input: bool = False


@dataclass(frozen=True)
class Plans:
    preset: str
    high: ResolutionPlan
    low: ResolutionPlan
    schema_version: int = SCHEMA_VERSION
    description: str = ""
    fingerprint_sha256: str | None = None
    intensity: IntensityPlan = field(default_factory=IntensityPlan)
    network: NetworkPlan = field(default_factory=NetworkPlan)
    loss: LossPlan = field(default_factory=LossPlan)
    augmentation: AugmentationPlan = field(default_factory=AugmentationPlan)
    sampling: SamplingPlan = field(default_factory=SamplingPlan)
    training: TrainingPlan = field(default_factory=TrainingPlan)
    postprocessing: PostprocessingPlan = field(default_factory=PostprocessingPlan)
    inference: InferencePlan = field(default_factory=InferencePlan)
    planner: PlannerPlan = field(default_factory=PlannerPlan)

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version: {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        ratios = [lo / hi for lo, hi in zip(self.low.spacing_mm, self.high.spacing_mm)]
        if any(abs(r - round(r)) > 1e-6 or round(r) < 1 for r in ratios) or len({round(r) for r in ratios}) != 1:
            raise ValueError(f"low.spacing_mm: must be the same integer multiple of high.spacing_mm on every axis, "
                             f"got ratios {ratios}")

    @property
    def scale(self) -> int:
        """How many high-resolution voxels one low-resolution voxel spans per axis."""
        return int(round(self.low.spacing_mm[0] / self.high.spacing_mm[0]))

    def unresolved_fields(self) -> list[str]:
        missing = []
        for name in ("input_patch", "output_patch"):
            for branch in ("high", "low"):
                if getattr(getattr(self, branch), name) is None:
                    missing.append(f"{branch}.{name}")
        for name in ("mean", "std"):
            if getattr(self.intensity, name) is None:
                missing.append(f"intensity.{name}")
        if self.loss.high_positive_weights is None:
            missing.append("loss.high_positive_weights")
        if self.loss.low_positive_weight is None:
            missing.append("loss.low_positive_weight")
        return missing

    def with_training(self, **changes) -> "Plans":
        return replace(self, training=replace(self.training, **changes))

    def to_json_dict(self) -> dict:
        return to_dict(self)

    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.to_json_dict()).encode()).hexdigest()

    def preprocessing_sha256(self) -> str:
        """Hash of exactly the fields that change preprocessed arrays, so training settings can
        change without invalidating them."""
        relevant = {"high_spacing": self.high.spacing_mm, "low_spacing": self.low.spacing_mm,
                    "clip_hu": self.intensity.clip_hu, "fingerprint": self.fingerprint_sha256}
        return hashlib.sha256(canonical_json(to_dict(relevant)).encode()).hexdigest()


def preset_folder() -> Path:
    """``plans/`` of the source checkout (editable install), else the copy setup.py installs."""
    checkout = Path(__file__).resolve().parent.parent / "plans"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "kitspipe" / "plans"


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_folder().glob("*.json"))


def load_preset(name_or_path: str | Path) -> Plans:
    """A preset by name (``paper``, ``cpu``) or a path to a preset/plans JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = preset_folder() / f"{name_or_path}.json"
        if not path.is_file():
            raise PlanError(f"unknown preset {str(name_or_path)!r} (known: {', '.join(preset_names())})")
    return _load(path, allow_unresolved=True)


def load_plans(path: str | Path) -> Plans:
    """Load a resolved plans file; any field still ``null`` is an error naming it."""
    return _load(Path(path), allow_unresolved=False)


def _read_json(path: Path) -> dict:
    try:
        return read_json(path, what="a plans file")
    except OSError as error:
        raise PlanError(f"{path}: cannot read ({error.strerror})") from None
    except JsonInputError as error:
        raise PlanError(f"{path}: {error}") from None


def _load(path: Path, allow_unresolved: bool) -> Plans:
    data = _read_json(path)
    if isinstance(data, dict) and "extends" in data:
        base = _read_json(preset_folder() / f"{data.pop('extends')}.json")
        data = merge(base, data)
    plans = from_dict(Plans, data, str(path))
    if not allow_unresolved:
        missing = plans.unresolved_fields()
        if missing:
            raise PlanError(f"{path}.{missing[0]}: not resolved (run `kitspipe plan` to fill it from the fingerprint)")
    return plans


def save_plans(plans: Plans, path: str | Path) -> None:
    atomic_write_json(path, plans.to_json_dict())
