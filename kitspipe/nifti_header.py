"""The raw NIfTI header, judged before a single voxel is loaded.

SimpleITK is kitspipe's reader of record, but it is forgiving in ways that hide broken
input: it takes ``abs()`` of a negative ``pixdim``, turns a zero ``pixdim`` into 1 mm,
reads a file with a wrong ``sizeof_hdr`` or magic as if nothing were wrong, and returns a
volume from a ``.nii.gz`` whose last bytes are missing. So the header is parsed here
directly (the first 348 or 540 bytes, through nibabel's header classes, never the
extensions), and the whole compressed stream is checked separately.

Which transform wins, sform or qform
------------------------------------
kitspipe uses exactly the transform that ITK 5.4's ``NiftiImageIO`` uses (read from
``SetImageIOOrientationFromNIfTI`` and confirmed on crafted files with SimpleITK 2.5.7):

1. both codes 0: no transform; ITK uses an identity direction and zero origin
   (recorded as a warning, since the orientation of the patient is then unknown);
2. the sform, if ``sform_code > 0``, its matrix is invertible with orthonormal
   normalised columns, and either ``qform_code == 0``, or ``sform_code == 1``
   (scanner anatomy), or the sform and qform agree;
3. otherwise the qform, if ``qform_code > 0``;
4. otherwise ITK refuses the file ("No orthonormal definition found").

Voxel spacing always comes from ``pixdim``, even when the sform is used. Experiments:
a file with sform_code 2 and a qform shifted by 100 mm reads with the qform's origin,
the same file with sform_code 1 reads with the sform's origin, and an sform whose
columns are 0.78 mm long next to a ``pixdim`` of 1 reads with 1 mm spacing.

nibabel, FSL and most viewers instead prefer any sform with a code above 0. Where the
two rules would place the image differently, a prediction written by kitspipe would not
overlay its input in those tools, so kitspipe reports:

* an **error** when ITK falls back to a qform that disagrees with a set sform (this
  includes an sform that is singular or sheared), and when the sform used by ITK has
  voxel sizes that disagree with ``pixdim``;
* a **warning** when both are set, disagree, and the sform is used (every reader agrees
  on the sform then; only the qform is stale).

KiTS19 files have either an sform only (images, uint8 labels) or a qform only (nine
uint16 labels); both pass without a note.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from kitspipe.errors import KitspipeError, Problem

NIFTI1_HEADER_BYTES = 348
NIFTI2_HEADER_BYTES = 540
GZIP_MAGIC = b"\x1f\x8b"
CHUNK_BYTES = 1 << 20
# Some writers pad the data; anything beyond this is a decompression bomb, not padding.
TRAILING_SLACK_BYTES = 1 << 20
# About 8 GiB as float32 and eight times the largest KiTS19 volume (1059 x 512 x 512):
# a header asking for more is a lie or a bomb, whatever the machine's memory.
MAX_VOXELS = 2**31
# Tolerances for comparing two transforms of the same file; they absorb float32 storage.
DIRECTION_TOL = 1e-4
SPACING_RTOL = 1e-4
TRANSLATION_TOL_MM = 1e-3


@dataclass(frozen=True)
class NiftiHeader:
    """The parts of a NIfTI-1/2 header that decide whether and how a file can be read."""

    path: Path
    version: int
    compressed: bool
    header: nib.Nifti1Header
    shape: tuple[int, ...]
    dtype: np.dtype
    vox_offset: int

    @property
    def voxels(self) -> int:
        count = 1
        for extent in self.shape:
            count *= extent
        return count

    @property
    def data_bytes(self) -> int:
        return self.voxels * self.dtype.itemsize

    def spatial_pixdim(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.header["pixdim"][1:1 + min(3, len(self.shape))])

    def scaling(self) -> tuple[float, float] | None:
        """``(slope, intercept)`` as ITK applies them, or None when ITK leaves values as stored.

        ITK treats a slope of 0 or NaN as 1 and still adds the intercept (checked with
        SimpleITK 2.5.7), unlike the NIfTI standard, which then ignores both; kitspipe
        follows the reader that actually loads the voxels.
        """
        slope = float(self.header["scl_slope"])
        inter = float(self.header["scl_inter"])
        slope = 1.0 if not np.isfinite(slope) or slope == 0 else slope
        inter = 0.0 if not np.isfinite(inter) else inter
        return None if (slope == 1.0 and inter == 0.0) else (slope, inter)

    def encoding(self) -> str:
        """How intensities are stored, e.g. ``int16 scaled (slope 1, inter -1024)``."""
        scaling = self.scaling()
        if scaling is None:
            return self.dtype.name
        return f"{self.dtype.name} scaled (slope {scaling[0]:g}, inter {scaling[1]:g})"

    def loaded_itemsize(self) -> int:
        """Bytes per voxel once SimpleITK has read the file (scaled integers become float32)."""
        if self.scaling() is None or self.dtype == np.float64:
            return self.dtype.itemsize
        return 4

    def memory_needed_bytes(self) -> int:
        # The loaded volume plus one working copy of the same size (np.unique sorts a copy).
        return 2 * self.voxels * self.loaded_itemsize()

    def dims_text(self) -> str:
        return "×".join(str(v) for v in self.shape)


def read_nifti_header(path: str | Path, stage: str, case: str) -> NiftiHeader:
    """Parse the fixed-size header of a ``.nii`` or ``.nii.gz`` file.

    Args:
        path: the file.
        stage: the stage name used in error lines.
        case: the case id used in error lines.

    Raises:
        KitspipeError: empty file, unreadable gzip start, not NIfTI-1/2, bad dimensions
            or an unsupported data type.
    """
    path = Path(path)
    def fail(problem: str, observed: str = "", expected: str = "") -> KitspipeError:
        return KitspipeError(Problem(stage, case, path, problem, observed, expected))

    if path.stat().st_size == 0:
        raise fail("empty file", "0 bytes", "a NIfTI-1/2 image")
    with open(path, "rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as handle:
            block = handle.read(NIFTI2_HEADER_BYTES)
    except EOFError as error:
        raise fail("truncated gzip stream", str(error), "a complete gzip file") from None
    except (OSError, zlib.error) as error:
        raise fail("corrupt gzip stream", str(error), "a complete gzip file") from None
    if len(block) < 4:
        raise fail("not NIfTI-1/2", f"only {len(block)} bytes", "a 348- or 540-byte header")
    version, endian = _version_and_byte_order(block)
    header_bytes = NIFTI2_HEADER_BYTES if version == 2 else NIFTI1_HEADER_BYTES
    magic = bytes(block[4:12] if version == 2 else block[344:348])
    expected_magic = b"n+2\x00\r\n\x1a\n" if version == 2 else b"n+1\x00"
    if version == 0 or len(block) < header_bytes or magic != expected_magic:
        sizeof_hdr = int.from_bytes(block[:4], "little")
        raise fail("not NIfTI-1/2", f"sizeof_hdr {sizeof_hdr}, magic {magic!r}",
                   "sizeof_hdr 348 with magic n+1, or 540 with n+2")
    header_class = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    header = header_class(binaryblock=block[:header_bytes], endianness=endian, check=False)
    dim = [int(v) for v in header["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(v < 1 for v in dim[1:ndim + 1]):
        raise fail("invalid dimensions in header", f"dim {dim[:8]}", "dim[0] in 1..7 and extents >= 1")
    try:
        dtype = header.get_data_dtype()
    except Exception:  # nibabel raises several types for unknown codes
        raise fail("unsupported data type", f"datatype code {int(header['datatype'])}",
                   "an integer or float type") from None
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise fail("unsupported data type", str(dtype), "a scalar integer or float type")
    vox_offset = int(header["vox_offset"])
    if vox_offset < header_bytes:
        raise fail("invalid vox_offset in header", str(vox_offset), f">= {header_bytes}")
    return NiftiHeader(path, version, compressed, header, tuple(dim[1:ndim + 1]), dtype, vox_offset)


def _version_and_byte_order(block: bytes) -> tuple[int, str]:
    for order, endian in (("little", "<"), ("big", ">")):
        sizeof_hdr = int.from_bytes(block[:4], order)
        if sizeof_hdr == NIFTI1_HEADER_BYTES:
            return 1, endian
        if sizeof_hdr == NIFTI2_HEADER_BYTES:
            return 2, endian
    return 0, "<"


def verify_stream(info: NiftiHeader, stage: str, case: str, values: str = "voxel values") -> list[Problem]:
    """Read the whole file once, so a truncated or corrupt file fails here and not in training.

    The stream is read in chunks (memory stays at one chunk) up to the size the header
    declares plus a little slack, which also stops a decompression bomb early; the gzip
    module checks the CRC and length trailer at the end. Float data are scanned for NaN
    and infinities on the way, because the NIfTI C library inside SimpleITK silently
    replaces them with 0 when it loads the file.

    Args:
        info: the parsed header of the file.
        stage: the stage name used in error lines.
        case: the case id used in error lines.
        values: what the voxels are, for the non-finite message ("intensities", "label values").
    """
    expected = info.vox_offset + info.data_bytes
    limit = expected + TRAILING_SLACK_BYTES
    counter = _NonFiniteCounter(info) if info.dtype.kind == "f" else None
    found = 0
    try:
        with (gzip.open(info.path, "rb") if info.compressed else open(info.path, "rb")) as handle:
            while found <= limit and (chunk := handle.read(CHUNK_BYTES)):
                if counter is not None:
                    counter.add(chunk, found)
                found += len(chunk)
    except EOFError as error:
        return [Problem(stage, case, info.path, "truncated gzip stream", str(error), "a complete gzip file")]
    except (OSError, zlib.error) as error:
        return [Problem(stage, case, info.path, "corrupt gzip stream", str(error), "a complete gzip file")]
    if found > limit:
        return [Problem(stage, case, info.path, "more data than the header declares (decompression stopped)",
                        f"over {found} bytes", f"{expected} bytes")]
    if found < expected:
        return [Problem(stage, case, info.path, "data shorter than the header declares",
                        f"{found} bytes", f"{expected} bytes for {info.dims_text()} {info.dtype.name}")]
    if counter is not None and counter.total():
        return [Problem(stage, case, info.path, f"non-finite {values}",
                        f"{counter.nan} NaN, {counter.pos_inf} +Inf, {counter.neg_inf} -Inf", "finite values only")]
    return []


class _NonFiniteCounter:
    """Counts NaN and infinities in the data section of a stream that arrives in chunks."""

    def __init__(self, info: NiftiHeader):
        self.dtype = info.dtype
        self.start = info.vox_offset
        self.stop = info.vox_offset + info.data_bytes
        self.carry = b""  # bytes of a voxel split between two chunks
        self.nan = self.pos_inf = self.neg_inf = 0

    def add(self, chunk: bytes, position: int) -> None:
        first = max(self.start, position) - position
        last = min(self.stop, position + len(chunk)) - position
        if last <= first:
            return
        data = self.carry + chunk[first:last]
        whole = len(data) - len(data) % self.dtype.itemsize
        self.carry = data[whole:]
        values = np.frombuffer(data[:whole], dtype=self.dtype)
        self.nan += int(np.count_nonzero(np.isnan(values)))
        self.pos_inf += int(np.count_nonzero(np.isposinf(values)))
        self.neg_inf += int(np.count_nonzero(np.isneginf(values)))

    def total(self) -> int:
        return self.nan + self.pos_inf + self.neg_inf


def size_problems(info: NiftiHeader, stage: str, case: str, memory_limit_bytes: int | None) -> list[Problem]:
    """Refuse a volume whose header asks for more memory or voxels than allowed, before loading it.

    Args:
        info: the parsed header.
        stage: the stage name used in error lines.
        case: the case id used in error lines.
        memory_limit_bytes: the memory this check may use; None means no limit but ``MAX_VOXELS``.
    """
    needed = info.memory_needed_bytes()
    limits = []
    if info.voxels > MAX_VOXELS:
        limits.append(f"at most {MAX_VOXELS} voxels")
    if memory_limit_bytes is not None and needed > memory_limit_bytes:
        limits.append(f"memory limit {_gib(memory_limit_bytes)}")
    if not limits:
        return []
    return [Problem(stage, case, info.path, "volume too large to load",
                    f"needs {_gib(needed)} for {info.dims_text()} {info.encoding()}", " and ".join(limits))]


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def available_memory_bytes() -> int | None:
    """Memory that can be allocated now: MemAvailable, capped by a cgroup v2 limit if any."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = None
    # In a container MemAvailable describes the host; the cgroup limit is what the OOM killer enforces.
    try:
        limit_text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit_text != "max":
            headroom = max(0, int(limit_text) - used)
            available = headroom if available is None else min(available, headroom)
    except (OSError, ValueError):
        pass
    return available


def orientation_problems(info: NiftiHeader, stage: str, case: str) -> tuple[str, list[Problem]]:
    """Apply the sform/qform rule of the module docstring and judge the spacing in ``pixdim``.

    Args:
        info: the parsed header.
        stage: the stage name used in error lines.
        case: the case id used in error lines.

    Returns:
        The transform ITK will use (``sform``, ``qform`` or ``none``) and the problems found.
    """
    header = info.header
    problems: list[Problem] = []
    def report(problem: str, observed: str, expected: str, severity: str = "error") -> None:
        problems.append(Problem(stage, case, info.path, problem, observed, expected, severity))

    pixdim = info.spatial_pixdim()
    pixdim_ok = all(np.isfinite(v) and v > 0 for v in pixdim)
    if not pixdim_ok:
        report("degenerate affine: non-positive or non-finite spacing in pixdim",
               f"pixdim {format_vector(pixdim)}", "positive voxel spacing")
    sform_code = max(0, int(header["sform_code"]))
    qform_code = max(0, int(header["qform_code"]))
    if sform_code == 0 and qform_code == 0:
        report("no sform or qform: orientation unknown", "sform_code 0, qform_code 0",
               "an sform or qform (ITK assumes identity direction)", "warning")
        return "none", problems
    sform = np.asarray(header.get_sform(), dtype=float)
    sform_defect = _matrix_defect(sform) if sform_code > 0 else None
    if sform_defect is not None:
        report(f"degenerate affine: {sform_defect} sform", f"sform {_rows(sform)}",
               "an invertible sform with orthonormal direction")
    qform = None
    if qform_code > 0 and pixdim_ok:
        try:
            qform = np.asarray(header.get_qform(), dtype=float)
        except Exception as error:  # nibabel rejects unnormalisable quaternions in several ways
            report("degenerate affine: invalid qform quaternion", str(error)[:120], "a unit quaternion")
    disagreement = _differences(sform, qform) if sform_code > 0 and qform is not None else []
    sform_usable = sform_code > 0 and sform_defect is None
    if sform_usable and (qform_code == 0 or sform_code == 1 or not disagreement):
        chosen = "sform"
    elif qform_code > 0:
        chosen = "qform"
    else:
        return "none", problems
    if disagreement and sform_usable:
        if chosen == "sform":
            report("sform and qform disagree", "; ".join(disagreement),
                   "equal transforms (the sform is used, as by nibabel and viewers)", "warning")
        else:
            report("sform and qform disagree", "; ".join(disagreement),
                   f"equal transforms (ITK uses the qform since sform_code is {sform_code}; nibabel the sform)")
    if chosen == "sform" and pixdim_ok:
        sform_spacing = tuple(float(v) for v in np.linalg.norm(sform[:3, :3], axis=0))
        if not np.allclose(sform_spacing, pixdim[:3], rtol=SPACING_RTOL, atol=0):
            report("degenerate affine: sform voxel size differs from pixdim",
                   f"sform {format_vector(sform_spacing)} mm", f"pixdim {format_vector(pixdim)} mm (ITK uses pixdim)")
    return chosen, problems


def _matrix_defect(affine: np.ndarray) -> str | None:
    matrix = affine[:3, :3]
    if not np.all(np.isfinite(affine)):
        return "non-finite"
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(norms < 1e-9):
        return "singular"
    directions = matrix / norms
    if abs(np.linalg.det(directions)) < 1e-6:
        return "singular"
    if not np.allclose(directions.T @ directions, np.eye(3), rtol=0, atol=DIRECTION_TOL):
        return "non-orthonormal"
    return None


def _differences(sform: np.ndarray, qform: np.ndarray) -> list[str]:
    """How two 4x4 transforms of one file differ, in the units a reader would notice."""
    found = []
    s_norms = np.linalg.norm(sform[:3, :3], axis=0)
    q_norms = np.linalg.norm(qform[:3, :3], axis=0)
    if not np.allclose(s_norms, q_norms, rtol=SPACING_RTOL, atol=0):
        found.append(f"voxel size sform {format_vector(s_norms)}, qform {format_vector(q_norms)}")
    s_dir = sform[:3, :3] / np.where(s_norms > 0, s_norms, 1)
    q_dir = qform[:3, :3] / np.where(q_norms > 0, q_norms, 1)
    if not np.allclose(s_dir, q_dir, rtol=0, atol=DIRECTION_TOL):
        found.append(f"direction sform {_rows(s_dir)}, qform {_rows(q_dir)}")
    if not np.allclose(sform[:3, 3], qform[:3, 3], rtol=0, atol=TRANSLATION_TOL_MM):
        found.append(f"offset sform {format_vector(sform[:3, 3])}, qform {format_vector(qform[:3, 3])}")
    return found


def format_vector(values) -> str:
    """``(0.8, 0.8, 2.5)``: a vector as error messages show it."""
    return "(" + ", ".join(f"{float(v) + 0.0:.6g}" for v in values) + ")"  # + 0.0 prints -0 as 0


def _rows(matrix: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{float(v) + 0.0:.4g}" for v in row) for row in np.asarray(matrix)[:3]) + "]"
