"""Checklist 57: hostile JSON in a plans file, ``dataset.json`` or ``splits.json`` (deep nesting,
huge numbers, NaN literals, duplicate keys) is refused with one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kitspipe.dataset import discover
from kitspipe.errors import KitspipeError, PlanError
from kitspipe.json_input import MAX_DEPTH, parse_json
from kitspipe.plans import load_plans, load_preset, preset_names
from kitspipe.training.splits import load_or_create_splits

HOSTILE = {
    # Deep enough that plain json.loads raises RecursionError rather than a message.
    "deep nesting": ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
                     "JSON nested too deeply (100001 levels vs at most 32)"),
    "huge integer": ('{"a": ' + "9" * 5000 + "}", "integer too long (5000 digits vs at most 20)"),
    "overflowing float": ('{"a": 1e999}', "number out of range (1e999 vs a finite float64)"),
    "long float": ('{"a": 0.' + "1" * 100 + "}", "number too long (102 characters vs at most 32)"),
    "NaN literal": ('{"a": NaN}', "NaN is not allowed in {what}"),
    "Infinity literal": ('{"a": -Infinity}', "-Infinity is not allowed in {what}"),
    "duplicate key": ('{"a": 1, "a": 2}', "duplicate key 'a'"),
}


@pytest.mark.parametrize("text, reason", HOSTILE.values(), ids=HOSTILE.keys())
def test_item_57_hostile_plans_file_is_refused_in_one_line(tmp_path, text, reason):
    path = tmp_path / "plans.json"
    path.write_text(text)
    with pytest.raises(PlanError) as caught:
        load_plans(path)
    assert str(caught.value) == f"kitspipe: {path}: {reason.format(what='a plans file')}"


@pytest.mark.parametrize("text, reason", HOSTILE.values(), ids=HOSTILE.keys())
def test_item_57_hostile_dataset_json_is_refused_in_one_line(tmp_path, text, reason):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(KitspipeError) as caught:
        discover(tmp_path, stage="check")
    assert str(caught.value) == f"kitspipe: check: - {tmp_path / 'dataset.json'}: {reason.format(what='dataset.json')}"


@pytest.mark.parametrize("name", ["deep nesting", "huge integer", "NaN literal"])
def test_item_57_hostile_splits_file_is_refused_in_one_line(tmp_path, name):
    text, reason = HOSTILE[name]
    (tmp_path / "splits.json").write_text(text)
    with pytest.raises(KitspipeError) as caught:
        load_or_create_splits(tmp_path, ["case_00000", "case_00001"], 2, 0, 0.2)
    assert str(caught.value) == f"kitspipe: split: - {tmp_path / 'splits.json'}: {reason.format(what='splits.json')}"


def test_item_57_limits_leave_room_for_real_files(tmp_path):
    for name in preset_names():  # every shipped preset loads
        load_preset(name)
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_json(f'{{"a": {nested[1:-1]}, "s": "{"[" * 1000}", "n": [12345678901234567890, -1.5e-300]}}') == {
        "a": json.loads(nested[1:-1]), "s": "[" * 1000, "n": [12345678901234567890, -1.5e-300]}


def test_item_57_oversized_file_is_refused_unread(tmp_path, monkeypatch):
    import kitspipe.json_input as json_input

    monkeypatch.setattr(json_input, "MAX_BYTES", 10)
    path = Path(tmp_path / "plans.json")
    path.write_text('{"preset": "cpu"}')
    with pytest.raises(PlanError) as caught:
        load_plans(path)
    assert str(caught.value) == f"kitspipe: {path}: JSON file too large (17 bytes vs at most 10)"
