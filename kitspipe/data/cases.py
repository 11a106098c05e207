"""Preprocessed cases, opened lazily for patch sampling.

A preprocessed case is a folder ``WORK/preprocessed/<case>/`` holding four ``.npy`` arrays
(the image and label on the high- and low-resolution grids) and ``properties.json``
(written by ``kitspipe.preprocessing``). Training reads small patches from these arrays
many thousands of times, so each array is memory-mapped on first use: the operating
system then reads only the pages a patch touches, and opening a whole dataset costs no
more than parsing its property files.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from kitspipe.errors import KitspipeError, Problem

ARRAY_NAMES = ("high_image", "high_label", "low_image", "low_label")
REQUIRED_PROPERTIES = ("high_grid", "low_grid", "locations", "has_tumour")


class PreprocessedCase:
    """One preprocessed case; its arrays are memory-mapped when first accessed.

    Args:
        case_id: the case's folder name.
        folder: the case's folder.
        properties: the parsed ``properties.json``.
        stage: pipeline stage named in error messages.
    """

    def __init__(self, case_id: str, folder: Path, properties: dict, stage: str = "train") -> None:
        self.case_id = case_id
        self.folder = Path(folder)
        self.properties = properties
        self.stage = stage
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def high_image(self) -> np.ndarray:
        """int16 HU on the high-resolution grid, (z, y, x)."""
        return self._array("high_image")

    @property
    def high_label(self) -> np.ndarray:
        """uint8 labels 0/1/2 on the high-resolution grid."""
        return self._array("high_label")

    @property
    def low_image(self) -> np.ndarray:
        """int16 HU on the low-resolution grid."""
        return self._array("low_image")

    @property
    def low_label(self) -> np.ndarray:
        """uint8 labels 0/1/2 on the low-resolution grid."""
        return self._array("low_label")

    @property
    def has_tumour(self) -> bool:
        return bool(self.properties["has_tumour"])

    @cached_property
    def tumour_locations(self) -> np.ndarray:
        """A sample of tumour voxel positions on the high-resolution grid, shape (n, 3)."""
        return np.asarray(self.properties["locations"].get("tumour", []), dtype=np.int64).reshape(-1, 3)

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            path = self.folder / f"{name}.npy"
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise KitspipeError(Problem(self.stage, self.case_id, path, "cannot read preprocessed array",
                                            str(error), "a .npy file written by `kitspipe preprocess`")) from None
            grid = "high_grid" if name.startswith("high") else "low_grid"
            expected = tuple(int(n) for n in self.properties[grid]["shape"])
            if array.shape != expected:
                raise KitspipeError(Problem(self.stage, self.case_id, path,
                                            f"shape differs from {grid} in properties.json",
                                            str(array.shape), str(expected)))
            self._arrays[name] = array
        return self._arrays[name]

    def __getstate__(self) -> dict:
        # Pickling a memory map would copy the whole array into the pickle; a worker process
        # that receives this case opens its own maps instead.
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def __repr__(self) -> str:
        return f"PreprocessedCase({self.case_id!r}, {str(self.folder)!r})"


def open_case(folder: str | Path, stage: str = "train") -> PreprocessedCase:
    """Open one preprocessed case folder, checking that every file is there.

    Args:
        folder: ``WORK/preprocessed/<case>``.
        stage: pipeline stage named in error messages.

    Raises:
        KitspipeError: naming the first missing or unreadable file.
    """
    folder = Path(folder)
    case_id = folder.name
    properties_path = folder / "properties.json"
    for path in [properties_path] + [folder / f"{name}.npy" for name in ARRAY_NAMES]:
        if not path.is_file():
            raise KitspipeError(Problem(stage, case_id, path, "missing preprocessed file", "not found",
                                        "rerun `kitspipe preprocess`"))
    try:
        properties = json.loads(properties_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise KitspipeError(Problem(stage, case_id, properties_path, "cannot read properties", str(error),
                                    "JSON written by `kitspipe preprocess`")) from None
    missing = [key for key in REQUIRED_PROPERTIES if key not in properties]
    if missing:
        raise KitspipeError(Problem(stage, case_id, properties_path, "properties lack required keys",
                                    ", ".join(missing), ", ".join(REQUIRED_PROPERTIES)))
    return PreprocessedCase(case_id, folder, properties, stage)


def open_cases(preprocessed_dir: str | Path, case_ids: Sequence[str], stage: str = "train") -> list[PreprocessedCase]:
    """Open the named cases of a preprocessed folder, in the order given.

    Args:
        preprocessed_dir: ``WORK/preprocessed``.
        case_ids: the cases to open (e.g. the training cases of one fold).
        stage: pipeline stage named in error messages.

    Raises:
        KitspipeError: naming the first missing or unreadable file.
    """
    root = Path(preprocessed_dir)
    return [open_case(root / case_id, stage) for case_id in case_ids]
