"""What a checkpoint records about the run that wrote it, and what a resume compares.

A resumed run must be the run that was started (checklist 31): the same plan except its
run-length settings, the same preprocessed data and the same kitspipe version. The stable part
of the plan is stored in every checkpoint sidecar, so a refusal names the fields that changed
rather than two hashes. A checkpoint also says whether its run can be repeated bit for bit
(checklist 48), because a deterministic CPU run and a GPU run without cuBLAS's workspace
setting look the same from the outside.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kitspipe import __version__
from kitspipe.errors import KitspipeError, Problem
from kitspipe.plans import Plans
from kitspipe.schema import from_dict

# Fields listed in a refusal before it says "and N more": the line stays readable.
MAX_LISTED = 6


def stable_plan(plans: Plans) -> Plans:
    """The plan without what a resumed run may change: its length (epochs, minutes) and how the
    network runs (precision, compile, memory format, deterministic kernels)."""
    return plans.with_training(max_epochs=1, max_minutes=None, mixed_precision="off", compile=False,
                               channels_last=False, deterministic="on")


def resume_identity(plans: Plans, preprocessed_sha: str) -> dict:
    """The hashes a resume compares, plus the stable plan itself for the field diff."""
    stable = stable_plan(plans)
    return {"plans_sha256": stable.sha256(), "preprocessing_sha256": preprocessed_sha,
            "kitspipe_version": __version__, "plans": stable.to_json_dict()}


def changed_fields(old: object, new: object, prefix: str = "") -> list[str]:
    """``field: old -> new`` for every leaf that differs between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new)):
            where = f"{prefix}.{key}" if prefix else str(key)
            changes += changed_fields(old.get(key, "(absent)"), new.get(key, "(absent)"), where)
        return changes
    return [] if old == new else [f"{prefix or '(plan)'}: {old!r} -> {new!r}"]


def _with_defaults(stored: object) -> dict | None:
    """A stored plan with the fields added to kitspipe since then at their defaults, or None.

    Every new plan field defaults to the behaviour from before it existed, so a run started
    then is the same run under the filled-in plan and may be resumed.
    """
    try:
        return stable_plan(from_dict(Plans, stored, "checkpoint plan")).to_json_dict()
    except (KitspipeError, TypeError, ValueError):
        return None


def refuse_changed_run(metadata: dict, identity: dict, folder: Path) -> None:
    """Raise one line naming what changed since the run in ``folder`` started, if anything did."""
    changes = []
    stored = _with_defaults(metadata.get("plans")) if isinstance(metadata.get("plans"), dict) else None
    if metadata.get("plans_sha256") != identity["plans_sha256"] and stored != identity["plans"]:
        if stored is not None:
            changes += changed_fields(stored, identity["plans"])
        elif isinstance(metadata.get("plans"), dict):
            changes += changed_fields(metadata["plans"], identity["plans"])
        if not changes:  # a checkpoint from before plans were stored: only the hashes can be shown
            changes.append(f"plans_sha256: {str(metadata.get('plans_sha256'))[:12]} -> {identity['plans_sha256'][:12]}")
    if metadata.get("preprocessing_sha256") != identity["preprocessing_sha256"]:
        changes.append(f"preprocessed data: {str(metadata.get('preprocessing_sha256'))[:12]} -> "
                       f"{identity['preprocessing_sha256'][:12]}")
    if metadata.get("kitspipe_version") != identity["kitspipe_version"]:
        changes.append(f"kitspipe_version: {metadata.get('kitspipe_version')!r} -> {identity['kitspipe_version']!r}")
    if changes:
        listed = "; ".join(changes[:MAX_LISTED]) + (f"; and {len(changes) - MAX_LISTED} more"
                                                    if len(changes) > MAX_LISTED else "")
        raise KitspipeError(Problem("train", "-", folder, "plan or preprocessed data changed since this run "
                                    "started, or kitspipe did; --force starts over", listed, "unchanged"))


def determinism(device: torch.device, world: int, earlier: dict | None = None) -> dict:
    """Whether this run can be repeated bit for bit, and if not, why.

    Reads the process's kernel choice (``training.deterministic``, set by
    ``kitspipe.devices.kernel_choice``): deterministic algorithms run in warn-only mode, so an
    operation without a deterministic version warns instead of stopping the run; on CUDA,
    cuBLAS is deterministic only with ``CUBLAS_WORKSPACE_CONFIG`` set before the first call.
    ``earlier`` is what the checkpoint being resumed recorded: a run that was not repeatable
    before the resume is not repeatable as a whole, whatever the resumed part does.
    """
    reasons = []
    if device.type == "cuda":
        if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
            reasons.append("CUDA without CUBLAS_WORKSPACE_CONFIG=:4096:8")
        if torch.backends.cudnn.benchmark:
            reasons.append("cudnn.benchmark chooses kernels by timing")
        reasons.append("CUDA operations without a deterministic version only warn")
    elif device.type != "cpu":
        reasons.append(f"{device.type} is not checked for determinism")
    if world > 1:
        reasons.append(f"{world} processes: the order of gradient reductions may vary")
    if not torch.are_deterministic_algorithms_enabled():
        reasons.append("deterministic algorithms are off")
    if isinstance(earlier, dict) and earlier.get("bitwise") is False:
        # A sidecar is a file people can edit: only a list of texts counts as reasons.
        stored = earlier.get("reasons")
        stored = [reason for reason in stored if isinstance(reason, str)] if isinstance(stored, list) else []
        reasons += [reason for reason in stored or ["an earlier part of this run was not repeatable"]
                    if reason not in reasons]
    return {"bitwise": not reasons, "reasons": reasons}
