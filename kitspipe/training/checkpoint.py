"""Checkpoints as plain tensors plus a JSON sidecar; never a pickle of code.

``checkpoint_<tag>.pt`` holds only tensors and primitive containers (model, optimiser, RNG
states) and is read with ``torch.load(weights_only=True)``, so a checkpoint from elsewhere
cannot run code. ``checkpoint_<tag>.json`` holds what a person or a later stage wants to read:
trainer name, plan hash, phase, epoch, best metric, history. Both are written atomically;
the JSON is written last and names the hash of the .pt it belongs to, so a pair torn by a
kill is detected and never trusted.

Before a pair is replaced, the current one is kept as ``checkpoint_<tag>.previous.{pt,json}``
(hard links, so nothing is copied). A kill between the two renames leaves a torn pair; a
resume then falls back to the previous pair (:func:`read_resumable`) instead of starting the
fold over. Inference reads only the current pair (:func:`read_metadata`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from kitspipe.atomic import TEMP_PREFIX, atomic_torch_save, atomic_write_json
from kitspipe.errors import KitspipeError, Problem
from kitspipe.hashing import file_sha256

log = logging.getLogger(__name__)


def save_checkpoint(folder: Path, tag: str, tensors: dict, metadata: dict) -> Path:
    weights = folder / f"checkpoint_{tag}.pt"
    if read_metadata(folder, tag) is not None:
        for suffix in (".pt", ".json"):
            _keep_as_previous(folder / f"checkpoint_{tag}{suffix}", folder / f"checkpoint_{tag}.previous{suffix}")
    atomic_torch_save(weights, tensors)
    atomic_write_json(folder / f"checkpoint_{tag}.json", {**metadata, "weights_sha256": file_sha256(weights)})
    return weights


def read_metadata(folder: Path, tag: str) -> dict | None:
    """The sidecar of a checkpoint whose weights file matches it, else None."""
    sidecar = folder / f"checkpoint_{tag}.json"
    weights = folder / f"checkpoint_{tag}.pt"
    if not sidecar.is_file() or not weights.is_file():
        return None
    try:
        metadata = json.loads(sidecar.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if metadata.get("weights_sha256") != file_sha256(weights):
        return None
    return metadata


def read_resumable(folder: Path, tag: str) -> tuple[dict, Path] | None:
    """The sidecar and weights file of the newest valid pair, the previous one if the current
    pair is torn; None when neither is valid."""
    metadata = read_metadata(folder, tag)
    if metadata is not None:
        return metadata, folder / f"checkpoint_{tag}.pt"
    previous = read_metadata(folder, f"{tag}.previous")
    if previous is None:
        return None
    log.warning("%s: checkpoint_%s.pt and .json do not belong together (a write was interrupted); "
                "resuming from checkpoint_%s.previous, one epoch earlier", folder, tag, tag)
    return previous, folder / f"checkpoint_{tag}.previous.pt"


def _keep_as_previous(current: Path, previous: Path) -> None:
    """Point ``previous`` at the file ``current`` names now, atomically."""
    temporary = previous.with_name(TEMP_PREFIX + previous.name)
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    try:
        os.link(current, temporary)
    except OSError:  # a filesystem without hard links: copy instead
        shutil.copyfile(current, temporary)
    os.replace(temporary, previous)


def load_tensors(path: Path, stage: str = "train") -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means an untrusted or corrupt file
        raise KitspipeError(Problem(stage, "-", path, "refusing to load checkpoint (not a weights-only file)",
                                    type(error).__name__, "tensors only")) from None
