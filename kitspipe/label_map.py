"""The label map a dataset declares, checked against the labels its files actually hold.

An nnU-Net ``dataset.json`` names its label values; discovery checks the names against
KiTS19's. The names can be right while the files disagree: a value that occurs in the labels
but is not declared, a declared class that no case contains, or kidney and tumour swapped by a
conversion script. Those show only in the label histogram that ``check`` measures, so the
cross-check runs after every case has been read (checklist 26).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from kitspipe.errors import Problem
from kitspipe.labels import KIDNEY, TUMOUR

if TYPE_CHECKING:
    from kitspipe.dataset import Dataset
    from kitspipe.validation import CaseReport


def labels_by_value(labels: object) -> dict[int, str]:
    """``dataset.json``'s ``labels`` as value -> lower-case name.

    nnU-Net v1 maps value -> name and v2 name -> value; both are accepted.

    Raises:
        TypeError, ValueError: ``labels`` is not an object of integer values.
    """
    if not isinstance(labels, dict):
        raise TypeError("labels must be an object")
    if all(str(k).isdigit() for k in labels):
        return {int(k): str(v).lower() for k, v in labels.items()}
    return {int(v): str(k).lower() for k, v in labels.items()}


def cross_check_label_map(dataset: Dataset, reports: Iterable[CaseReport], stage: str) -> list[Problem]:
    """Errors and warnings where the declared label map and the label histogram disagree.

    Args:
        dataset: the dataset checked; ``dataset.label_map`` is the declared map, if any.
        reports: the per-case reports of ``check``, with their label value counts.
        stage: the stage name used in problem lines.
    """
    voxels: Counter[int] = Counter()
    cases: Counter[int] = Counter()
    for report in reports:
        for value, count in report.label_values.items():
            voxels[value] += count
            cases[value] += count > 0
    if not voxels:
        return []  # no label was read: nothing to compare
    declared = dataset.label_map
    where: Path = dataset.root / "dataset.json" if declared is not None else dataset.root
    problems = []
    if declared is not None:
        for value in sorted(set(voxels) - set(declared)):
            problems.append(Problem(stage, "-", where, f"label value {value} is in the data but not in dataset.json",
                                    f"{voxels[value]} voxels in {cases[value]} cases", f"declared {sorted(declared)}"))
        for value in sorted(v for v in declared if v and not voxels[v]):
            problems.append(Problem(stage, "-", where, f"label {value} ({declared[value]}) is declared but no case "
                                    "contains it", "0 voxels", "some voxels", severity="warning"))
    # Summed over a dataset, kidney voxels outnumber tumour voxels; the reverse is what a
    # conversion that swapped the two values produces. A warning, since a tiny dataset of
    # large tumours can do it too.
    if voxels[TUMOUR] > voxels[KIDNEY]:
        problems.append(Problem(stage, "-", where, "more tumour than kidney voxels over the dataset; are labels 1 "
                                "and 2 swapped?", f"{voxels[TUMOUR]} tumour voxels",
                                f"fewer than the {voxels[KIDNEY]} kidney voxels", severity="warning"))
    return problems
