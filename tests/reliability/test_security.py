"""Checklist 49-51 and 54: hostile names and links in a dataset, and no pickle anywhere.

Case ids become file names of artefacts (``preprocessed/<id>/``, ``<id>.nii.gz``), so a
hostile id must never reach a path, and discovery must never follow a path out of the
dataset root, whether it comes from a name, from ``dataset.json`` or from a link.
"""

import ast
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kitspipe.dataset import discover, validate_case_id
from kitspipe.errors import KitspipeError

PACKAGE = Path(__file__).resolve().parents[2] / "kitspipe"

HOSTILE_IDS = [
    "../../etc/passwd", "/abs/path", "case_00001/../../x", "..", ".", "", "case_00001\x00", "\x00",
    "case_00001\n", "саse_00001",  # Cyrillic 'с' and 'а'
    "case_０００01",  # full-width digits
    "case_00001\u200b",  # zero-width space
    "CON", "nul", "Com1", "LPT9", "aux", "prn",  # Windows reserved device names
    " case_00001", "case.00001", "-case", "_case", "case 1", "a" * 65, "case_00001/", "C:\\x",
]


@pytest.mark.parametrize("case_id", HOSTILE_IDS, ids=repr)
def test_item_49_hostile_case_ids_are_rejected(case_id):
    problems = []
    assert not validate_case_id(case_id, Path("somewhere"), "check", problems)
    assert len(problems) == 1 and "invalid case id" in problems[0].line()
    assert "\n" not in problems[0].line()  # repr() keeps control characters on one line


@pytest.mark.parametrize("case_id", ["case_00001", "KiTS-19_case_7", "a", "A" * 64, "console", "com10"])
def test_item_49_ordinary_case_ids_pass(case_id):
    assert _valid(case_id)


def _valid(case_id: str) -> bool:
    return validate_case_id(case_id, Path("somewhere"), "check", [])


def _creatable(name: str) -> bool:
    """A single path component this filesystem can hold, with room for ``_0000.nii.gz``."""
    return 0 < len(name.encode()) <= 200 and "/" not in name and "\x00" not in name and name not in (".", "..")


NAMES = st.one_of(st.sampled_from([n for n in HOSTILE_IDS if _creatable(n)]),
                  st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=70)).filter(_creatable)


def _write_layout(root: Path, layout: str, name: str) -> None:
    """One well-formed case plus one case called ``name``, as empty files (discovery reads no voxels)."""
    def touch(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    for case_id in ("case_00000", name):
        if layout == "kits":
            touch(root / case_id / "imaging.nii.gz")
            touch(root / case_id / "segmentation.nii.gz")
        else:
            touch(root / "imagesTr" / f"{case_id}_0000.nii.gz")
            touch(root / "labelsTr" / f"{case_id}.nii.gz")
    if layout == "nnunet":
        (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))


def _expected_files(layout: str, case_id: str) -> tuple[str, str]:
    if layout == "kits":
        return f"{case_id}/imaging.nii.gz", f"{case_id}/segmentation.nii.gz"
    return f"imagesTr/{case_id}_0000.nii.gz", f"labelsTr/{case_id}.nii.gz"


@pytest.mark.parametrize("layout", ["kits", "nnunet"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(name=NAMES)
@example(name="case_00001\n")
@example(name="x_0000\n")
def test_item_49_fuzzed_case_names_never_become_paths(layout, name):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        try:
            _write_layout(root, layout, name)
        except OSError:
            return  # a name this filesystem refuses cannot reach kitspipe either
        try:
            dataset = discover(root)
        except KitspipeError as error:
            lines = str(error).splitlines()
            assert lines and all(line.startswith("kitspipe: discover: ") for line in lines), lines
            assert not _valid(name) or "collides" in str(error), lines
            return
        real_root = root.resolve()
        for case in dataset.cases:
            assert _valid(case.case_id), case.case_id
            image, label = _expected_files(layout, case.case_id)
            # The id is exactly the name on disk: nothing was cut off, decoded or normalised.
            assert case.image == root / image and case.label == root / label
            for path in (case.image, case.label):
                assert os.path.commonpath([real_root, path.resolve()]) == str(real_root)
        ids = {c.case_id for c in dataset.cases}
        assert ids in ({"case_00000", name}, {"case_00000"}), ids
        assert name in ids or name.startswith("."), "a case was dropped without an error"


def test_item_50_paths_in_dataset_json_are_never_followed(tmp_path):
    outside = tmp_path / "outside"
    (outside / "imagesTr").mkdir(parents=True)
    (outside / "imagesTr" / "secret_0000.nii.gz").write_bytes(b"")
    root = tmp_path / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTr" / "case_00000_0000.nii.gz").write_bytes(b"")
    (root / "labelsTr" / "case_00000.nii.gz").write_bytes(b"")
    os.environ["KITSPIPE_TEST_OUTSIDE"] = str(outside)
    try:
        (root / "dataset.json").write_text(json.dumps({
            "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 1,
            # nnU-Net v1 lists files; v2 accepts absolute paths and $VAR expansion (utilities/utils.py).
            "training": [{"image": str(outside / "imagesTr" / "secret_0000.nii.gz"), "label": "/etc/passwd"},
                         {"image": "$KITSPIPE_TEST_OUTSIDE/imagesTr/secret_0000.nii.gz", "label": "../../x"}],
            "test": ["/etc/shadow", "../outside/imagesTr/secret_0000.nii.gz"],
            "dataset": {"secret": {"images": ["$KITSPIPE_TEST_OUTSIDE/imagesTr/secret_0000.nii.gz"]}},
        }))
        dataset = discover(root)
    finally:
        del os.environ["KITSPIPE_TEST_OUTSIDE"]
    assert [c.case_id for c in dataset.cases] == ["case_00000"]
    assert dataset.cases[0].image == root / "imagesTr" / "case_00000_0000.nii.gz"


def _kits_case(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "imaging.nii.gz").write_bytes(b"")
    (folder / "segmentation.nii.gz").write_bytes(b"")
    return folder


@pytest.mark.parametrize("link", ["image file", "case folder", "parent of the file"])
def test_item_51_links_leading_out_of_the_root_are_refused(tmp_path, link):
    outside = _kits_case(tmp_path / "outside" / "case_00001")
    root = tmp_path / "data"
    _kits_case(root / "case_00000")
    if link == "image file":
        _kits_case(root / "case_00001")
        (root / "case_00001" / "imaging.nii.gz").unlink()
        (root / "case_00001" / "imaging.nii.gz").symlink_to(outside / "imaging.nii.gz")
    elif link == "case folder":
        (root / "case_00001").symlink_to(outside, target_is_directory=True)
    else:
        (root / "case_00001").mkdir()
        (root / "case_00001" / "segmentation.nii.gz").symlink_to("../../outside/case_00001/segmentation.nii.gz")
        (root / "case_00001" / "imaging.nii.gz").symlink_to("../../outside/case_00001/imaging.nii.gz")
    with pytest.raises(KitspipeError) as caught:
        discover(root)
    lines = str(caught.value).splitlines()
    assert lines and all("case_00001" in line and "path leaves the dataset root" in line for line in lines), lines


def test_item_51_links_inside_the_root_are_followed(tmp_path):
    root = tmp_path / "data"
    _kits_case(root / "store" / "case_00000")
    _kits_case(root / "case_00001")
    (root / "case_00000").symlink_to(root / "store" / "case_00000", target_is_directory=True)
    assert [c.case_id for c in discover(root).cases] == ["case_00000", "case_00001"]


# Loaders that run code from the file they read (pickle and everything built on it).
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
PICKLE_CALLS = {"read_pickle", "to_pickle"}


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _pickle_uses(source: str) -> list[str]:
    """Every place in ``source`` that could load a pickle, as ``line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{node.lineno}: from {node.module} import")
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{node.lineno}: {name}(allow_pickle=...) not False")
            if name in PICKLE_CALLS:
                found.append(f"{node.lineno}: {name}()")
            if name == "load" and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "torch":
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{node.lineno}: torch.load without weights_only=True")
    return found


def test_item_54_the_scanner_finds_every_kind_of_pickle_load():
    source = ("import pickle\nfrom joblib import load\nimport numpy as np, torch, pandas as pd\n"
              "np.load('a.npy', allow_pickle=True)\ntorch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\n"
              "pd.read_pickle('p.pkl')\nnp.load('a.npy', allow_pickle=flag)\n")
    assert len(_pickle_uses(source)) == 7
    assert _pickle_uses("import numpy as np, torch\nnp.load('a.npy', allow_pickle=False)\n"
                        "torch.load('m.pt', map_location='cpu', weights_only=True)\n") == []


def test_item_54_no_pickle_is_ever_loaded_by_kitspipe():
    found = {str(path.relative_to(PACKAGE.parent)): uses for path in sorted(PACKAGE.rglob("*.py"))
             if (uses := _pickle_uses(path.read_text(encoding="utf-8")))}
    assert found == {}, f"code that could load a pickle (checklist 54): {found}"


def test_item_54_preprocessing_writes_json_and_plain_arrays_only(tiny_work):
    import numpy as np

    files = [p for p in (tiny_work / "preprocessed").rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".npy", ".json"}, sorted({p.suffix for p in files})
    for path in files:
        if path.suffix == ".npy":
            np.load(path, allow_pickle=False)  # raises for an object array
        else:
            json.loads(path.read_text(encoding="utf-8"))
