"""Training on tiny data: resume exactness, resume policy, plugin trainers, safe checkpoints."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kitspipe.errors import KitspipeError
from kitspipe.training.checkpoint import load_tensors
from kitspipe.training.run import train_fold

REPO = Path(__file__).resolve().parents[1]


def _weights(folder: Path) -> dict:
    return load_tensors(folder / "checkpoint_latest.pt")["model"]


@pytest.mark.parametrize("weight_average_decay", [None, 0.9])
def test_resume_equals_uninterrupted_run(tiny_work, tmp_path, weight_average_decay):
    import shutil

    plans = json.loads((tiny_work / "plans.json").read_text())
    plans["training"]["weight_average_decay"] = weight_average_decay
    # Every epoch validated: a run stopped after epoch 1 validates it as its last, and the
    # uninterrupted run must log the same rows.
    plans["training"]["validation_interval"] = 1
    (tiny_work / "plans.json").write_text(json.dumps(plans))
    other = tmp_path / "other"
    shutil.copytree(tiny_work, other)
    straight = train_fold(tiny_work, 0, epochs=2, progress=False)
    first = train_fold(other, 0, epochs=1, progress=False)
    resumed = train_fold(other, 0, epochs=2, resume=True, progress=False)
    assert first == resumed
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if weight_average_decay is not None:
        # "model" (what inference loads) is the average; training continued from its own weights.
        tensors_a, tensors_b = load_tensors(straight / "checkpoint_latest.pt"), load_tensors(resumed / "checkpoint_latest.pt")
        own_a, own_b = tensors_a["training_model"], tensors_b["training_model"]
        assert all(torch.equal(own_a[k], own_b[k]) for k in own_a)
        assert tensors_a["weight_average_updates"] == tensors_b["weight_average_updates"] > 0
        assert any(not torch.equal(a[k], own_a[k]) for k in a if a[k].is_floating_point())
    log_a = (straight / "training_log.csv").read_text().splitlines()
    log_b = (resumed / "training_log.csv").read_text().splitlines()
    strip = lambda lines: [",".join(line.split(",")[:12]) for line in lines]  # drop timing columns
    assert strip(log_a) == strip(log_b)
    assert (straight / "progress.png").stat().st_size > 1000
    metadata = json.loads((straight / "checkpoint_latest.json").read_text())
    assert metadata["state"]["finished"] and metadata["trainer"] == "DualResolutionTrainer"


def test_validation_interval_skips_epochs_between(tiny_work):
    import csv

    plans = json.loads((tiny_work / "plans.json").read_text())
    plans["training"].update(validation_interval=2, pretraining_max_epochs=3)
    (tiny_work / "plans.json").write_text(json.dumps(plans))
    folder = train_fold(tiny_work, 0, epochs=4, progress=False)
    rows = list(csv.DictReader((folder / "training_log.csv").open()))
    validated = [(row["phase"], any(row[key] != "" for key in row if key.startswith("val_"))) for row in rows]
    # Epochs 2 and 3 of the 3-epoch pre-training (3 is its last), 2 and 4 of the full phase.
    assert validated == [("low", False), ("low", True), ("low", True),
                         ("full", False), ("full", True), ("full", False), ("full", True)]
    assert all(float(row["seconds_validation"]) == 0 for row, (_, done) in zip(rows, validated) if not done)
    assert (folder / "progress.png").stat().st_size > 1000


def test_an_epoch_that_exhausts_patience_is_validated(tiny_work):
    import csv

    plans = json.loads((tiny_work / "plans.json").read_text())
    plans["training"].update(validation_interval=5, patience=2)
    (tiny_work / "plans.json").write_text(json.dumps(plans))
    folder = train_fold(tiny_work, 0, epochs=4, progress=False)
    rows = [row for row in csv.DictReader((folder / "training_log.csv").open()) if row["phase"] == "full"]
    # Full epoch 2 could end the phase on patience (the first validation always improves),
    # epoch 4 is the last; epochs 1 and 3 are skipped.
    assert [row["val_score"] != "" for row in rows] == [False, True, False, True]
    assert (folder / "checkpoint_best.pt").exists()


def test_resume_policy(tiny_work, caplog):
    with pytest.raises(KitspipeError, match="nothing to resume"):
        train_fold(tiny_work, 1, resume=True, progress=False)
    folder = train_fold(tiny_work, 1, epochs=1, progress=False)
    before = (folder / "checkpoint_latest.pt").read_bytes()
    with caplog.at_level("INFO"):
        train_fold(tiny_work, 1, epochs=1, resume=True, progress=False)
    assert "already complete" in caplog.text
    assert (folder / "checkpoint_latest.pt").read_bytes() == before
    plans = json.loads((tiny_work / "plans.json").read_text())
    plans["loss"]["topk_fraction"] = 0.5
    (tiny_work / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(KitspipeError, match="plan or preprocessed data changed"):
        train_fold(tiny_work, 1, epochs=2, resume=True, progress=False)


def test_training_refuses_incomplete_preprocessing(tiny_work):
    manifest = tiny_work / "preprocessed" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["status"] = "interrupted"
    manifest.write_text(json.dumps(data))
    with pytest.raises(KitspipeError, match="previous stage did not complete"):
        train_fold(tiny_work, 0, progress=False)


def test_plugin_trainer_from_docs_example(tiny_work):
    example = REPO / "docs" / "examples" / "my_trainer.py"
    folder = train_fold(tiny_work, 0, trainer="DiceOnlyUNetTrainer", plugins=(str(example),), epochs=1,
                        progress=False)
    assert folder.name == "DiceOnlyUNetTrainer" and (folder / "checkpoint_latest.pt").is_file()


@pytest.mark.parametrize("trainer", ["UNet3DTrainer", "TwoStageCascadeTrainer"])
def test_shipped_trainers_train(tiny_work, trainer):
    folder = train_fold(tiny_work, 0, trainer=trainer, epochs=1, progress=False)
    assert json.loads((folder / "checkpoint_latest.json").read_text())["state"]["finished"]


def test_unknown_trainer_lists_known_ones(tiny_work):
    with pytest.raises(KitspipeError, match="known: .*DualResolutionTrainer"):
        train_fold(tiny_work, 0, trainer="NoSuchTrainer", progress=False)


class _Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_malicious_checkpoint_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "checkpoint_latest.pt"
    torch.save({"model": _Payload(str(sentinel))}, path, pickle_protocol=2)
    assert not sentinel.exists()  # saving the payload does not run it
    with pytest.raises(KitspipeError, match="refusing to load checkpoint"):
        load_tensors(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("trainer, port", [("UNet3DTrainer", 29517), ("DualResolutionTrainer", 29518)])
def test_ddp_two_process_gloo_trains_one_epoch(tiny_work, trainer, port):
    # The dual trainer's low-resolution pre-training runs through the DDP wrapper's forward too
    # (DualResolutionUNet.forward(low_only=True)); calling the inner module would skip the sync.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "kitspipe", "-q", "--no-progress", "train", str(tiny_work), "--fold", "0",
               "--trainer", trainer, "--epochs", "1", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tiny_work / "fold_0" / trainer
    assert json.loads((folder / "checkpoint_latest.json").read_text())["state"]["finished"]


def test_a_loader_bound_epoch_is_warned_about_once_it_is_long_enough_to_judge(caplog):
    from kitspipe.plans import load_preset
    from kitspipe.training.loop import _warn_if_waiting_for_data, available_cores

    plans = load_preset("paper")
    assert available_cores() >= 1
    with caplog.at_level("WARNING", logger="kitspipe.training.loop"):
        assert not _warn_if_waiting_for_data({"epoch": 0, "seconds_data": 2.0, "seconds_compute": 1.0}, plans)
        assert not _warn_if_waiting_for_data({"epoch": 1, "seconds_data": 20.0, "seconds_compute": 80.0}, plans)
        assert not _warn_if_waiting_for_data({"epoch": 2, "seconds_data": 60.0, "seconds_compute": 40.0}, plans, rank=1)
        assert _warn_if_waiting_for_data({"epoch": 2, "seconds_data": 60.0, "seconds_compute": 40.0}, plans)
    assert len(caplog.records) == 1
    assert "epoch 2 waited for data 60 % of its 100 s" in caplog.text and "num_workers (now 4;" in caplog.text


def test_fit_warns_about_a_loader_bound_run_once(tiny_work, monkeypatch, caplog):
    import kitspipe.training.loop as loop

    # Every epoch counts as loader-bound: the warning must still come once per train call.
    monkeypatch.setattr(loop, "MIN_EPOCH_SECONDS_TO_JUDGE", 0.0)
    monkeypatch.setattr(loop, "DATA_BOUND_SHARE", 0.0)
    with caplog.at_level("WARNING", logger="kitspipe.training.loop"):
        folder = train_fold(tiny_work, 0, epochs=2, trainer="UNet3DTrainer", device="cpu", progress=False)
    assert len(json.loads((folder / "checkpoint_latest.json").read_text())["state"]["history"]) >= 2
    warnings = [record for record in caplog.records if "waited for data" in record.getMessage()]
    assert len(warnings) == 1 and "epoch 0 waited for data" in warnings[0].getMessage()
