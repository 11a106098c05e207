"""Checkpoints as plain tensors plus a JSON sidecar; never a pickle of code.

``checkpoint_<tag>.pt`` holds only tensors and primitive containers (model, optimiser, RNG
states) and is read with ``torch.load(weights_only=True)``, so a checkpoint from elsewhere
cannot run code. ``checkpoint_<tag>.json`` holds what a person or a later stage wants to read:
trainer name, plan hash, phase, epoch, best metric, history. Both are written atomically;
the JSON is written last and names the hash of the .pt it belongs to, so a pair torn by a
kill is detected and treated as no checkpoint rather than trusted.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kitspipe.atomic import atomic_torch_save, atomic_write_json
from kitspipe.errors import KitspipeError, Problem
from kitspipe.hashing import file_sha256


def save_checkpoint(folder: Path, tag: str, tensors: dict, metadata: dict) -> Path:
    weights = folder / f"checkpoint_{tag}.pt"
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


def load_tensors(path: Path, stage: str = "train") -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means an untrusted or corrupt file
        raise KitspipeError(Problem(stage, "-", path, "refusing to load checkpoint (not a weights-only file)",
                                    type(error).__name__, "tensors only")) from None
