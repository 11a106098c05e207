"""Per-stage manifests: what went in, under which plan, and what came out.

"Up to date" is decided here and nowhere else: a case is current only when its recorded
input hashes and configuration hash equal the present ones and every recorded output still
exists with its recorded hash. A file that merely exists proves nothing (it may be the
truncated remains of a killed run from before atomic writes, or built from other inputs).
"""

from __future__ import annotations

import contextlib
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from kitspipe import __version__
from kitspipe.atomic import atomic_write_json
from kitspipe.errors import KitspipeError, Problem
from kitspipe.hashing import file_sha256

MANIFEST_FILE = "manifest.json"


@dataclass
class StageManifest:
    path: Path
    stage: str
    config_sha256: str
    status: str = "incomplete"
    cases: dict[str, dict] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, stage: str, config_sha256: str) -> "StageManifest":
        """Load the manifest at ``path``; entries made under another configuration are dropped."""
        path = Path(path)
        manifest = cls(path, stage, config_sha256)
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                return manifest  # a corrupt manifest only costs recomputation
            if data.get("stage") == stage and data.get("config_sha256") == config_sha256:
                manifest.cases = dict(data.get("cases", {}))
                manifest.extra = dict(data.get("extra", {}))
        return manifest

    def is_current(self, case_id: str, inputs: dict[str, str]) -> bool:
        entry = self.cases.get(case_id)
        if not entry or entry.get("status") != "done" or entry.get("inputs") != inputs:
            return False
        folder = self.path.parent
        for name, digest in entry.get("outputs", {}).items():
            output = folder / name
            if not output.is_file() or file_sha256(output) != digest:
                return False
        return True

    def record(self, case_id: str, inputs: dict[str, str], outputs: list[Path], **details) -> None:
        folder = self.path.parent
        self.cases[case_id] = {
            "status": "done",
            "inputs": inputs,
            "outputs": {str(p.relative_to(folder)): file_sha256(p) for p in outputs},
            **details,
        }

    @contextlib.contextmanager
    def marking_interrupts(self) -> Iterator[None]:
        """Record the status ``interrupted`` when Ctrl-C, or SIGTERM (which the command line turns
        into the same KeyboardInterrupt), stops the block; the cases done so far stay recorded."""
        try:
            yield
        except KeyboardInterrupt:
            self.save(status="interrupted")
            raise

    def save(self, status: str | None = None) -> None:
        if status is not None:
            self.status = status
        atomic_write_json(self.path, {
            "stage": self.stage,
            "config_sha256": self.config_sha256,
            "status": self.status,
            "kitspipe_version": __version__,
            "python": platform.python_version(),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cases": self.cases,
            "extra": self.extra,
        })


def require_complete(path: str | Path, stage: str, config_sha256: str, case_ids: list[str] | None = None) -> dict:
    """Load a manifest that a later stage depends on; refuse it unless complete and matching."""
    path = Path(path)
    if not path.is_file():
        raise KitspipeError(Problem(stage, "-", path, "missing manifest (run the previous stage first)"))
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("config_sha256") != config_sha256:
        raise KitspipeError(Problem(stage, "-", path, "artefacts were built under another plan",
                                    str(data.get("config_sha256"))[:12], config_sha256[:12]))
    if data.get("status") != "complete":
        raise KitspipeError(Problem(stage, "-", path, "previous stage did not complete",
                                    str(data.get("status")), "complete"))
    if case_ids is not None:
        missing = sorted(set(case_ids) - set(data.get("cases", {})))
        if missing:
            raise KitspipeError(Problem(stage, missing[0], path, "case missing from the manifest",
                                        f"{len(missing)} missing", "all cases"))
    return data
