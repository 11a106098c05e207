"""The raw NIfTI header, judged before a single voxel is loaded.

SimpleITK is kitspipe's reader of record, but it is forgiving in ways that hide broken
input: it takes ``abs()`` of a negative ``pixdim``, turns a zero ``pixdim`` into 1 mm,
reads a file with a wrong ``sizeof_hdr`` or magic as if nothing were wrong, and returns a
volume from a ``.nii.gz`` whose last bytes are missing. So the header is parsed here
directly (the first 348 or 540 bytes, through nibabel's header classes, never the
extensions), and the whole compressed stream is checked separately.

Which transform ITK uses, and whether it agrees with other readers, is judged in
``nifti_orientation``.
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
