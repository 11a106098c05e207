"""The orientation a NIfTI header gives, judged before a single voxel is loaded.

Which transform wins, sform or qform
------------------------------------
kitspipe uses exactly the transform that ITK 5.4's ``NiftiImageIO`` uses (read from
``SetImageIOOrientationFromNIfTI`` and confirmed on crafted files with SimpleITK 2.5.7):

1. both codes 0: no transform; ITK uses an identity direction and zero origin
   (recorded as a warning, since the orientation of the patient is then unknown);
2. the sform, if ``sform_code > 0``, its matrix is invertible with orthonormal
   normalised columns, and either ``qform_code == 0``, or ``sform_code == 1``
   (scanner anatomy), or the sform and qform agree;
3. otherwise the qform, if ``qform_code > 0``;
4. otherwise ITK refuses the file ("No orthonormal definition found").

Voxel spacing always comes from ``pixdim``, even when the sform is used. Experiments:
a file with sform_code 2 and a qform shifted by 100 mm reads with the qform's origin,
the same file with sform_code 1 reads with the sform's origin, and an sform whose
columns are 0.78 mm long next to a ``pixdim`` of 1 reads with 1 mm spacing.

nibabel, FSL and most viewers instead prefer any sform with a code above 0. Where the
two rules would place the image differently, a prediction written by kitspipe would not
overlay its input in those tools, so kitspipe reports:

* an **error** when ITK falls back to a qform that disagrees with a set sform (this
  includes an sform that is singular or sheared), and when the sform used by ITK has
  voxel sizes that disagree with ``pixdim``;
* a **warning** when both are set, disagree, and the sform is used (every reader agrees
  on the sform then; only the qform is stale).

KiTS19 files have either an sform only (images, uint8 labels) or a qform only (nine
uint16 labels); both pass without a note.
"""

from __future__ import annotations

import numpy as np

from kitspipe.errors import Problem
from kitspipe.nifti_header import NiftiHeader

# Tolerances for comparing two transforms of the same file; they absorb float32 storage.
DIRECTION_TOL = 1e-4
SPACING_RTOL = 1e-4
TRANSLATION_TOL_MM = 1e-3


def orientation_problems(info: NiftiHeader, stage: str, case: str) -> tuple[str, list[Problem]]:
    """Apply the sform/qform rule of the module docstring and judge the spacing in ``pixdim``.

    Args:
        info: the parsed header.
        stage: the stage name used in error lines.
        case: the case id used in error lines.

    Returns:
        The transform ITK will use (``sform``, ``qform`` or ``none``) and the problems found.
    """
    header = info.header
    problems: list[Problem] = []
    def report(problem: str, observed: str, expected: str, severity: str = "error") -> None:
        problems.append(Problem(stage, case, info.path, problem, observed, expected, severity))

    pixdim = info.spatial_pixdim()
    pixdim_ok = all(np.isfinite(v) and v > 0 for v in pixdim)
    if not pixdim_ok:
        report("degenerate affine: non-positive or non-finite spacing in pixdim",
               f"pixdim {format_vector(pixdim)}", "positive voxel spacing")
    sform_code = max(0, int(header["sform_code"]))
    qform_code = max(0, int(header["qform_code"]))
    if sform_code == 0 and qform_code == 0:
        report("no sform or qform: orientation unknown", "sform_code 0, qform_code 0",
               "an sform or qform (ITK assumes identity direction)", "warning")
        return "none", problems
    sform = np.asarray(header.get_sform(), dtype=float)
    sform_defect = _matrix_defect(sform) if sform_code > 0 else None
    if sform_defect is not None:
        report(f"degenerate affine: {sform_defect} sform", f"sform {_rows(sform)}",
               "an invertible sform with orthonormal direction")
    qform = None
    if qform_code > 0 and pixdim_ok:
        try:
            qform = np.asarray(header.get_qform(), dtype=float)
        except Exception as error:  # nibabel rejects unnormalisable quaternions in several ways
            report("degenerate affine: invalid qform quaternion", str(error)[:120], "a unit quaternion")
    disagreement = _differences(sform, qform) if sform_code > 0 and qform is not None else []
    sform_usable = sform_code > 0 and sform_defect is None
    if sform_usable and (qform_code == 0 or sform_code == 1 or not disagreement):
        chosen = "sform"
    elif qform_code > 0:
        chosen = "qform"
    else:
        return "none", problems
    if disagreement and sform_usable:
        if chosen == "sform":
            report("sform and qform disagree", "; ".join(disagreement),
                   "equal transforms (the sform is used, as by nibabel and viewers)", "warning")
        else:
            report("sform and qform disagree", "; ".join(disagreement),
                   f"equal transforms (ITK uses the qform since sform_code is {sform_code}; nibabel the sform)")
    if chosen == "sform" and pixdim_ok:
        sform_spacing = tuple(float(v) for v in np.linalg.norm(sform[:3, :3], axis=0))
        if not np.allclose(sform_spacing, pixdim[:3], rtol=SPACING_RTOL, atol=0):
            report("degenerate affine: sform voxel size differs from pixdim",
                   f"sform {format_vector(sform_spacing)} mm", f"pixdim {format_vector(pixdim)} mm (ITK uses pixdim)")
    return chosen, problems


def _matrix_defect(affine: np.ndarray) -> str | None:
    matrix = affine[:3, :3]
    if not np.all(np.isfinite(affine)):
        return "non-finite"
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(norms < 1e-9):
        return "singular"
    directions = matrix / norms
    if abs(np.linalg.det(directions)) < 1e-6:
        return "singular"
    if not np.allclose(directions.T @ directions, np.eye(3), rtol=0, atol=DIRECTION_TOL):
        return "non-orthonormal"
    return None


def _differences(sform: np.ndarray, qform: np.ndarray) -> list[str]:
    """How two 4x4 transforms of one file differ, in the units a reader would notice."""
    found = []
    s_norms = np.linalg.norm(sform[:3, :3], axis=0)
    q_norms = np.linalg.norm(qform[:3, :3], axis=0)
    if not np.allclose(s_norms, q_norms, rtol=SPACING_RTOL, atol=0):
        found.append(f"voxel size sform {format_vector(s_norms)}, qform {format_vector(q_norms)}")
    s_dir = sform[:3, :3] / np.where(s_norms > 0, s_norms, 1)
    q_dir = qform[:3, :3] / np.where(q_norms > 0, q_norms, 1)
    if not np.allclose(s_dir, q_dir, rtol=0, atol=DIRECTION_TOL):
        found.append(f"direction sform {_rows(s_dir)}, qform {_rows(q_dir)}")
    if not np.allclose(sform[:3, 3], qform[:3, 3], rtol=0, atol=TRANSLATION_TOL_MM):
        found.append(f"offset sform {format_vector(sform[:3, 3])}, qform {format_vector(qform[:3, 3])}")
    return found


def format_vector(values) -> str:
    """``(0.8, 0.8, 2.5)``: a vector as error messages show it."""
    return "(" + ", ".join(f"{float(v) + 0.0:.6g}" for v in values) + ")"  # + 0.0 prints -0 as 0


def _rows(matrix: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{float(v) + 0.0:.4g}" for v in row) for row in np.asarray(matrix)[:3]) + "]"
