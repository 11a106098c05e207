"""Atomic artefact writes.

An interrupted stage must never leave a half-written file under its final name, because a
later stage would trust it. Every artefact is written to a temporary file in the same folder
(same filesystem, so the rename is atomic), flushed and fsynced, then ``os.replace``d.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

TEMP_PREFIX = ".tmp-"
# A new file only (never an existing one or a link), as tempfile.mkstemp opens it.
_CREATE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0))


@contextlib.contextmanager
def temporary_beside(path: Path, suffix: str = "") -> Iterator[tuple[int, Path]]:
    """A new temporary file in ``path``'s folder (an open descriptor and its name), removed if
    the block raises, Ctrl-C and SIGTERM included.

    ``tempfile.mkstemp`` creates the file before the caller learns its name, so an interrupt
    arriving in between left a temporary behind; here the name is chosen first and the file
    created exclusively under it, inside the block that removes it.
    """
    name = None
    try:
        while True:
            name = path.parent / f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(6)}{suffix}"
            try:
                fd = os.open(name, _CREATE_FLAGS, 0o600)
                break
            except FileExistsError:
                continue
        yield fd, name
    except BaseException:
        if name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: int = 0o644, size: int | None = None) -> Iterator[BinaryIO]:
    """Open a temporary binary file that replaces ``path`` only if the block succeeds.

    Args:
        path: the final name.
        mode: permission bits of the final file.
        size: the bytes the block will write, when known: a disk-full error then names them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_beside(path) as (fd, tmp_name):
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            # Created readable by the owner only; artefacts are shared results.
            os.chmod(tmp_name, mode)
            os.replace(tmp_name, path)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full_error(path, size) from None
            raise
    _fsync_directory(path.parent)


def disk_full_error(path: Path, size: int | None, upper_bound: bool = False) -> Exception:
    """The one-line error for a full disk, with the bytes needed and free where known, so the
    user can tell a nearly full disk from a quota far too small.

    Args:
        path: the file that could not be written.
        size: its size in bytes, if known.
        upper_bound: ``size`` is an upper bound (e.g. before compression).
    """
    from kitspipe.errors import KitspipeError, Problem
    from kitspipe.preflight import format_bytes, free_bytes

    free = free_bytes(path.parent)
    needs = "no space left" if size is None else f"needs {'up to ' if upper_bound else ''}{format_bytes(size)}"
    return KitspipeError(Problem("write", "-", path, "disk full; the previous file is untouched", needs,
                                 "free space on the device" if free is None else f"{format_bytes(free)} free"))


def _fsync_directory(folder: Path) -> None:
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, size=len(data)) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no NaN literals, so equal content gives equal bytes and hashes."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, canonical_json(obj))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    # Straight into the temporary file: an in-memory buffer would hold two more copies of what
    # is often a case's largest array.
    array = np.ascontiguousarray(array)
    with atomic_open(path, size=array.nbytes + 128) as handle:
        np.save(handle, array, allow_pickle=False)


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files left by an interrupted write; returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for candidate in folder.rglob(TEMP_PREFIX + "*"):
            if candidate.is_file():
                candidate.unlink()
                removed.append(candidate)
    return removed
