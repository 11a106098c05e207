"""A lock file so that two runs cannot write into the same work folder at once."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from kitspipe.errors import KitspipeError, Problem


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def work_lock(folder: str | Path, stage: str) -> Iterator[Path]:
    """Hold ``folder/.kitspipe.lock`` for the block; fail fast with the holder's pid and host.

    A lock left by a killed process on this host is taken over, since its pid is gone.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".kitspipe.write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        # Found before any heavy work starts, instead of after hours of computation.
        raise KitspipeError(Problem(stage, "-", folder, "output folder is not writable", error.strerror or "",
                                    "a writable folder")) from None
    path = folder / ".kitspipe.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            same_host = holder.get("host") == me["host"]
            if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                path.unlink(missing_ok=True)
                continue
            raise KitspipeError(Problem(stage, "-", folder, "work folder is in use by another run",
                                        f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('stage')})",
                                        "no other run")) from None
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
