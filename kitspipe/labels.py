"""The KiTS19 label convention and the derived training targets.

Label values: 0 background, 1 kidney, 2 tumour. The paper trains on derived formats:
format 1 is kidney ∪ tumour as one class (the low-resolution target); our reading of its
undefined "format 3" is two overlapping region channels, kidney ∪ tumour and tumour (see
docs/interpretation.md), which is also how the official KiTS metrics define the regions.
"""

from __future__ import annotations

import numpy as np

BACKGROUND, KIDNEY, TUMOUR = 0, 1, 2
ALLOWED_LABELS = (BACKGROUND, KIDNEY, TUMOUR)
# Names accepted in an nnU-Net dataset.json for each value.
KITS_LABELS = {0: {"background"}, 1: {"kidney"}, 2: {"tumor", "tumour", "kidney_tumor", "kidney_tumour"}}
REGION_NAMES = ("kidney", "tumour")  # kidney means kidney ∪ tumour, as in the KiTS19 metric


def format1(labels: np.ndarray) -> np.ndarray:
    """kidney ∪ tumour as one binary mask."""
    return labels > 0


def regions(labels: np.ndarray) -> np.ndarray:
    """Stack of region masks (kidney ∪ tumour, tumour) with a new leading axis."""
    return np.stack([labels > 0, labels == TUMOUR])


def labels_from_regions(kidney: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    out = np.zeros(kidney.shape, dtype=np.uint8)
    out[kidney] = KIDNEY
    out[tumour] = TUMOUR
    return out
