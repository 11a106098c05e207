"""Resource pre-flight: refuse a stage before its work when the disk or /dev/shm cannot hold it.

A stage that fills the disk halfway through has wasted its time and may have starved other
jobs of space, and a data loader whose shared memory runs out dies with a bus error that
names neither the cause nor the fix. Both are cheap to predict: the space a stage writes
follows from the NIfTI headers and the plan, the shared memory a loader uses from the batch
size and the number of batches in flight.

A refusal must be trustworthy, so a stage refuses only when a *lower* bound of what it writes
exceeds the free space. For preprocessing (uncompressed ``.npy``) the estimate from the headers
is tight. Inference writes gzip-compressed NIfTI and ``.npz``, whose size the headers cannot
predict: deflate compresses at most about 1032:1, which gives the lower bound that refuses,
while the uncompressed size (typically 50-200x what a label map compresses to) only warns.
The messages name both numbers so the user can judge a close call.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
from pathlib import Path
from typing import Iterable

from kitspipe.errors import KitspipeError, Problem
from kitspipe.nifti_header import read_nifti_header

log = logging.getLogger(__name__)

SHARED_MEMORY = Path("/dev/shm")
# properties.json (up to 2 x 2000 sampled label positions), .npy headers, manifest entry.
PER_CASE_OVERHEAD_BYTES = 256 * 1024
# A NIfTI-1 header plus its extension flag.
NIFTI_HEADER_BYTES = 352
# deflate emits at least one bit per 258-byte match, about 1032:1 at best.
DEFLATE_MAX_RATIO = 1032


def format_bytes(n_bytes: float) -> str:
    """``3.2 GiB``, ``140.0 MiB`` or ``12.0 KiB``: the unit that keeps the number readable."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= 0.1 * size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes / 2**10:.1f} KiB"


def free_bytes(folder: Path) -> int | None:
    """Free space for an unprivileged writer on the filesystem that holds ``folder``.

    The folder need not exist yet (a stage creates its output folder); its nearest existing
    parent is on the same filesystem unless a mount point lies in between, which is rare
    enough for an estimate. None when even that cannot be queried.
    """
    folder = Path(folder).absolute()
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def require_free_disk(stage: str, folder: Path, needed_bytes: int) -> None:
    """Raise a one-line KitspipeError when ``folder``'s filesystem has less than ``needed_bytes`` free."""
    free = free_bytes(folder)
    log.debug("%s: %s needed in %s, %s free", stage, format_bytes(needed_bytes), folder,
              "unknown" if free is None else format_bytes(free))
    if free is not None and needed_bytes > free:
        raise KitspipeError(Problem(stage, "-", folder, "not enough free disk",
                                    f"needs {format_bytes(needed_bytes)}", f"{format_bytes(free)} free"))


def plan_grid_voxels(image: Path, high_spacing_mm: Iterable[float], scale: int, stage: str,
                     case: str) -> tuple[int, int]:
    """At most how many voxels ``image`` has on the plan's high and low grids, from its header alone.

    The grids cover the field of view, ``n_i * pixdim_i`` per stored axis, rounded up to whole
    low-resolution voxels as ``resampling.plan_grids`` does. Which stored axis becomes which
    canonical one depends on the affine, so the largest count over all axis pairings is taken
    (they differ only when the plan's spacing is anisotropic).
    """
    info = read_nifti_header(image, stage, case)
    extents = [n * abs(p) for n, p in zip(info.shape[:3], info.spatial_pixdim())]
    low = max(math.prod(max(1, math.ceil(e / (s * scale))) for e, s in zip(extents, order))
              for order in itertools.permutations(list(high_spacing_mm)))
    return low * scale**3, low


def preprocess_bytes_needed(images: dict[str, Path], high_spacing_mm: Iterable[float], scale: int,
                            stage: str = "preprocess") -> int:
    """Bytes the preprocess stage writes for these cases (case id -> image file).

    Per grid: the int16 image and the uint8 label, 3 bytes a voxel, as ``.npy`` (uncompressed,
    since the training loader memory-maps them).
    """
    spacing = list(high_spacing_mm)
    total = 0
    for case_id, image in images.items():
        high, low = plan_grid_voxels(image, spacing, scale, stage, case_id)
        total += 3 * (high + low) + PER_CASE_OVERHEAD_BYTES
    return total


def export_bytes_needed(images: dict[str, Path], files_per_case: int = 1, probabilities: bool = False,
                        stage: str = "infer") -> tuple[int, int]:
    """(Lower, upper) bound of the bytes the infer stage writes: uint8 labels on each input's grid.

    The upper bound is the uncompressed size; the lower bound divides it by deflate's best
    ratio, since the outputs are gzip-compressed (see the module docstring).

    Args:
        images: case id -> input image.
        files_per_case: label files written per case (2 when unprocessed labels are kept too).
        probabilities: also counts the float16 probability arrays (up to 3 channels).
    """
    lower = upper = 0
    for case_id, image in images.items():
        voxels = read_nifti_header(image, stage, case_id).voxels
        payload = files_per_case * voxels + (3 * 2 * voxels if probabilities else 0)
        upper += payload + files_per_case * NIFTI_HEADER_BYTES
        lower += math.ceil(payload / DEFLATE_MAX_RATIO) + files_per_case * NIFTI_HEADER_BYTES
    return lower, upper


def warn_if_disk_may_not_suffice(stage: str, folder: Path, upper_bytes: int) -> None:
    """Log a warning when the uncompressed size of a stage's output exceeds the free space."""
    free = free_bytes(folder)
    if free is not None and upper_bytes > free:
        log.warning("%s: %s has %s free; the outputs need up to %s uncompressed (usually far less)",
                    stage, folder, format_bytes(free), format_bytes(upper_bytes))


def require_shared_memory(stage: str, needed_bytes: int, folder: Path = SHARED_MEMORY) -> None:
    """Refuse when /dev/shm cannot hold ``needed_bytes``; warn when it holds less than twice that.

    Docker gives containers 64 MiB of /dev/shm unless told otherwise (``--shm-size``); torch's
    worker processes hand every batch to the trainer through it and die with a bus error when
    it is full. Other runs on the machine (``make -j 5 cv-folds``) share it, hence the warning.
    """
    if not folder.is_dir():
        return  # no POSIX shared memory folder (macOS): torch uses other mechanisms
    free = free_bytes(folder)
    if free is None:
        return
    if needed_bytes > free:
        raise KitspipeError(Problem(stage, "-", folder, "not enough shared memory for the data loader workers; "
                                    "raise it (docker run --shm-size) or set training.num_workers to 0",
                                    f"needs {format_bytes(needed_bytes)}", f"{format_bytes(free)} free"))
    if 2 * needed_bytes > free:
        log.warning("%s: %s holds %s free and the data loader needs %s; other runs sharing it may starve it",
                    stage, folder, format_bytes(free), format_bytes(needed_bytes))
