"""Logging set-up: one logger per module, console verbosity from the CLI, a log file per stage."""

from __future__ import annotations

import logging
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(verbosity: int = 0) -> None:
    """``verbosity`` -1 = warnings only, 0 = info, 1 = debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        if getattr(handler, "_kitspipe_console", False):
            root.removeHandler(handler)
    console = logging.StreamHandler()
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(message)s"))
    console._kitspipe_console = True  # type: ignore[attr-defined]
    root.addHandler(console)
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_stage_file(work: str | Path, stage: str) -> logging.Handler:
    """Append everything a stage logs (debug included) to ``WORK/logs/<stage>.log``."""
    folder = Path(work) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / f"{stage}.log", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)
    return handler
