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
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a temporary binary file that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates files readable by the owner only; artefacts are shared results.
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            from kitspipe.errors import KitspipeError, Problem

            raise KitspipeError(Problem("write", "-", path, "disk full; the previous file is untouched",
                                        "no space left", "free space on the device")) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no NaN literals, so equal content gives equal bytes and hashes."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, canonical_json(obj))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


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
