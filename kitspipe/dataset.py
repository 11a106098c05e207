"""Finding the cases of a dataset on disk, in the layouts kitspipe accepts.

Three layouts are detected automatically:

* ``kits``: ``case_XXXXX/imaging.nii.gz`` with an optional ``segmentation.nii.gz``
  (cases without one are test cases);
* ``nnunet``: ``imagesTr/<id>_0000.nii.gz``, ``labelsTr/<id>.nii.gz``, ``imagesTs/`` and
  ``dataset.json``;
* ``folder``: a flat folder of ``<id>.nii.gz`` (or ``<id>_0000.nii.gz``) images, for inference.

Case ids become file names of artefacts, so they are checked against a strict pattern and
every resolved path must stay inside the dataset root (no ``..``, no links leading out).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kitspipe.errors import KitspipeError, Problem
from kitspipe.json_input import JsonInputError, read_json
from kitspipe.label_map import labels_by_value
from kitspipe.labels import KITS_LABELS

# Matched with fullmatch: "$" alone would also accept a trailing newline, which a file name can hold.
CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# The channel suffix of nnU-Net image names; [0-9], since \d also matches non-ASCII digits.
CHANNEL_SUFFIX = re.compile(r"(.*)_([0-9]{4})")
# Device names that Windows will not create as files, with any extension, in any letter case:
# artefacts named after such a case could not be copied to a Windows share.
WINDOWS_RESERVED = re.compile(r"(CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])", re.IGNORECASE)
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: its image and, for training cases, its label."""

    case_id: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class Dataset:
    root: Path
    layout: str
    cases: tuple[CaseFiles, ...]
    label_map: dict[int, str] | None = None  # value -> name, as dataset.json declares it

    @property
    def labelled(self) -> tuple[CaseFiles, ...]:
        return tuple(c for c in self.cases if c.label is not None)

    def by_id(self) -> dict[str, CaseFiles]:
        return {c.case_id: c for c in self.cases}


def detect_layout(root: Path) -> str:
    if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir():
        return "nnunet"
    if any(p.is_dir() and (p / "imaging.nii.gz").exists() or (p / "imaging.nii.gz").is_symlink()
           for p in _listdir(root)):
        return "kits"
    if any(_strip_nifti(p.name) for p in _listdir(root) if p.is_file()):
        return "folder"
    raise KitspipeError(Problem("discover", "-", root, "no cases found",
                                "no case_*/imaging.nii.gz, imagesTr/ or *.nii.gz", "a KiTS19, nnU-Net raw or NIfTI folder"))


def discover(root: str | Path, stage: str = "discover", require_labels: bool = False) -> Dataset:
    """Find every case under ``root``; all problems found are reported together.

    Args:
        root: the dataset folder.
        stage: the stage name used in error lines.
        require_labels: training stages need a label for every case; test cases are then errors.
    """
    root = Path(root)
    if not root.is_dir():
        raise KitspipeError(Problem(stage, "-", root, "dataset folder does not exist"))
    layout = detect_layout(root)
    problems: list[Problem] = []
    label_map = None
    if layout == "kits":
        cases = _discover_kits(root, stage, problems)
    elif layout == "nnunet":
        cases, label_map = _discover_nnunet(root, stage, problems)
    else:
        cases = _discover_folder(root, stage, problems)
    _check_collisions(cases, root, stage, problems)
    for case in cases:
        for path in (case.image, case.label):
            if path is not None:
                _check_confined(root, path, case.case_id, stage, problems)
        if require_labels and case.label is None:
            problems.append(Problem(stage, case.case_id, case.image.parent, "training case without a label file",
                                    "no segmentation", "segmentation.nii.gz"))
    if problems:
        raise KitspipeError(problems)
    if not cases:
        raise KitspipeError(Problem(stage, "-", root, "no cases found"))
    return Dataset(root=root, layout=layout, cases=tuple(sorted(cases, key=lambda c: c.case_id)),
                   label_map=label_map)


def _listdir(folder: Path) -> list[Path]:
    # Sorted so that nothing downstream depends on the order the filesystem returns.
    try:
        return sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError:
        return []


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def validate_case_id(case_id: str, path: Path, stage: str, problems: list[Problem]) -> bool:
    if "\x00" in case_id or not CASE_ID_PATTERN.fullmatch(case_id):
        problems.append(Problem(stage, repr(case_id), path, "invalid case id", repr(case_id),
                                "letters, digits, '_' and '-' only, at most 64"))
        return False
    if WINDOWS_RESERVED.fullmatch(case_id):
        problems.append(Problem(stage, repr(case_id), path, "invalid case id: a reserved device name on Windows",
                                repr(case_id), "not CON, PRN, AUX, NUL, COM1-9 or LPT1-9"))
        return False
    return True


def _check_confined(root: Path, path: Path, case_id: str, stage: str, problems: list[Problem]) -> None:
    if path.is_symlink() and not path.exists():
        problems.append(Problem(stage, case_id, path, "dangling or looping symbolic link"))
        return
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        problems.append(Problem(stage, case_id, path, "file does not exist or cannot be resolved"))
        return
    real_root = root.resolve()
    if os.path.commonpath([real_root, resolved]) != str(real_root):
        problems.append(Problem(stage, case_id, path, "path leaves the dataset root", str(resolved), str(real_root)))


def _check_collisions(cases: list[CaseFiles], root: Path, stage: str, problems: list[Problem]) -> None:
    """Ids that differ only by letter case or zero padding would overwrite each other's artefacts."""
    seen: dict[str, str] = {}
    for case in cases:
        key = re.sub(r"(?<![0-9])0+(?=[0-9])", "", case.case_id.lower())
        if key in seen:
            problems.append(Problem(stage, case.case_id, root, "case id collides with another",
                                    case.case_id, f"distinct from {seen[key]}"))
        else:
            seen[key] = case.case_id


def _discover_kits(root: Path, stage: str, problems: list[Problem]) -> list[CaseFiles]:
    cases = []
    for folder in _listdir(root):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        image = folder / "imaging.nii.gz"
        if not (image.exists() or image.is_symlink()):
            continue
        if not validate_case_id(folder.name, folder, stage, problems):
            continue
        label = folder / "segmentation.nii.gz"
        has_label = label.exists() or label.is_symlink()
        cases.append(CaseFiles(folder.name, image, label if has_label else None))
    return cases


def _load_dataset_json(root: Path, stage: str, problems: list[Problem]) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        problems.append(Problem(stage, "-", path, "missing dataset.json"))
        return {}
    try:
        data = read_json(path, what="dataset.json")
    except OSError as error:
        problems.append(Problem(stage, "-", path, "unreadable JSON", str(error.strerror)))
        return {}
    except JsonInputError as error:
        problems.append(Problem(stage, "-", path, error.problem, error.observed[:120], error.expected))
        return {}
    if not isinstance(data, dict):
        problems.append(Problem(stage, "-", path, "dataset.json is not an object"))
        return {}
    return data


def _discover_nnunet(root: Path, stage: str,
                     problems: list[Problem]) -> tuple[list[CaseFiles], dict[int, str] | None]:
    meta = _load_dataset_json(root, stage, problems)
    file_ending = meta.get("file_ending", ".nii.gz")
    if file_ending not in NIFTI_SUFFIXES:
        problems.append(Problem(stage, "-", root / "dataset.json", "unsupported file_ending", str(file_ending), ".nii.gz"))
        return [], None
    channels = meta.get("channel_names", meta.get("modality", {"0": "CT"}))
    if isinstance(channels, dict) and len(channels) != 1:
        problems.append(Problem(stage, "-", root / "dataset.json", "kitspipe expects one CT channel",
                                f"{len(channels)} channels", "1"))
    labels = meta.get("labels")
    label_map = None if labels is None else _check_label_map(labels, root / "dataset.json", stage, problems)
    cases = []
    label_dir = root / "labelsTr"
    for split, image_dir in (("train", root / "imagesTr"), ("test", root / "imagesTs")):
        for path in _listdir(image_dir):
            if path.name.startswith("."):
                continue
            stem = _strip_nifti(path.name)
            if stem is None or not path.name.endswith(file_ending):
                problems.append(Problem(stage, "-", path, "file ending does not match dataset.json",
                                        path.name, f"*{file_ending}"))
                continue
            match = CHANNEL_SUFFIX.fullmatch(stem)
            if match is None:
                problems.append(Problem(stage, "-", path, "image name lacks the channel suffix", path.name,
                                        f"<case>_0000{file_ending}"))
                continue
            case_id, channel = match.groups()
            if channel != "0000":
                problems.append(Problem(stage, case_id, path, "unexpected channel", channel, "only _0000 (CT)"))
                continue
            if not validate_case_id(case_id, path, stage, problems):
                continue
            label = label_dir / f"{case_id}{file_ending}"
            has_label = split == "train" and (label.exists() or label.is_symlink())
            if split == "train" and not has_label:
                problems.append(Problem(stage, case_id, label, "training image without a label file"))
            cases.append(CaseFiles(case_id, path, label if has_label else None))
    train_ids = {c.case_id for c in cases if c.label is not None}
    for path in _listdir(label_dir):
        if path.name.startswith("."):
            continue
        # Any other file here is an error too: nnU-Net would read it as a label of some case.
        if not path.name.endswith(file_ending):
            problems.append(Problem(stage, "-", path, "file ending does not match dataset.json",
                                    path.name, f"*{file_ending}"))
            continue
        stem = path.name[: -len(file_ending)]
        if stem not in train_ids:
            problems.append(Problem(stage, stem, path, "label without a training image in imagesTr"))
    expected = meta.get("numTraining")
    found = sum(1 for c in cases if c.label is not None)
    if isinstance(expected, int) and expected != found:
        problems.append(Problem(stage, "-", root / "dataset.json", "numTraining does not match the cases found",
                                str(found), str(expected)))
    return cases, label_map


def _check_label_map(labels: object, path: Path, stage: str, problems: list[Problem]) -> dict[int, str] | None:
    """The label map must agree with KiTS19's, since every stage assumes 1 = kidney, 2 = tumour;
    returns it by value for the later cross-check against the label histogram."""
    if not isinstance(labels, dict):
        problems.append(Problem(stage, "-", path, "labels must be an object"))
        return None
    try:
        by_value = labels_by_value(labels)
    except (TypeError, ValueError):
        problems.append(Problem(stage, "-", path, "label values must be integers", str(labels)))
        return None
    values = sorted(by_value)
    if values != list(range(len(values))):
        problems.append(Problem(stage, "-", path, "label values are not consecutive", str(values), "0, 1, 2"))
    for value, names in KITS_LABELS.items():
        if value in by_value and by_value[value] not in names:
            problems.append(Problem(stage, "-", path, f"label {value} is named {by_value[value]!r}",
                                    by_value[value], "/".join(sorted(names))))
    extra = [v for v in values if v not in KITS_LABELS]
    if extra:
        problems.append(Problem(stage, "-", path, "labels beyond background/kidney/tumour", str(extra), "0, 1, 2"))
    return by_value


def _discover_folder(root: Path, stage: str, problems: list[Problem]) -> list[CaseFiles]:
    cases = []
    for path in _listdir(root):
        stem = _strip_nifti(path.name)
        if stem is None or path.name.startswith("."):
            continue
        suffixed = CHANNEL_SUFFIX.fullmatch(stem)
        case_id = suffixed.group(1) if suffixed else stem
        if suffixed is None or suffixed.group(2) == "0000":
            if validate_case_id(case_id, path, stage, problems):
                cases.append(CaseFiles(case_id, path, None))
        else:
            problems.append(Problem(stage, case_id, path, "unexpected channel", stem[-4:], "only _0000 (CT)"))
    return cases
