"""The GPU path, tested on the CPU: bf16 autocast in training and inference, compile and
data-parallel unwrapping for checkpoints, channels-last batches, tiles from free GPU memory."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from kitspipe.devices import (autocast, autocast_dtype, batch_to_device, channels_last_active, configure_determinism,
                              deterministic_kernels, kernel_choice, maybe_compile, unwrap)
from kitspipe.errors import PlanError
from kitspipe.inference.predictor import fast_tile_voxels, predict_volume
from kitspipe.inference.tile_budget import activation_bytes_per_voxel, tile_voxels_for_memory
from kitspipe.plans import Plans, load_preset
from kitspipe.schema import from_dict, to_dict
from kitspipe.trainers.builtin import DualResolutionTrainer, build_dual_network
from kitspipe.training.checkpoint import load_tensors
from kitspipe.training.run import train_fold
from tests.test_inference import _plans, _randomised


def test_autocast_dtype_follows_the_setting_and_the_device():
    assert autocast_dtype("off", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("auto", "meta") is None  # neither CUDA nor CPU: no bf16 claim to rely on
    with pytest.raises(ValueError, match="mixed_precision"):
        autocast_dtype("fp16", "cpu")


@pytest.mark.parametrize("section, key, value, message", [
    ("training", "mixed_precision", "fp16", "training.mixed_precision: 'fp16' is not one of"),
    ("inference", "mixed_precision", True, "inference.mixed_precision: True is not one of"),
    ("training", "compile", "yes", "training.compile: expected true or false"),
    ("training", "channels_last", 1, "training.channels_last: expected true or false"),
    ("training", "deterministic", True, "training.deterministic: True is not one of"),
])
def test_invalid_gpu_settings_name_the_field(section, key, value, message):
    data = to_dict(load_preset("paper"))
    data[section][key] = value
    with pytest.raises(PlanError, match=message):
        from_dict(Plans, data, "plans.json")


def test_presets_choose_precision_for_their_hardware():
    # Both train and infer in bf16 where the hardware runs it natively (the cpu preset's paper-mode
    # tiles gave the same held-out Dice in bf16 as in float32, docs/results.md, at 2.7x the speed).
    paper, cpu = load_preset("paper"), load_preset("cpu")
    assert (paper.training.mixed_precision, paper.inference.mixed_precision) == ("auto", "auto")
    assert (cpu.training.mixed_precision, cpu.inference.mixed_precision) == ("auto", "auto")
    assert not (paper.training.compile or paper.training.channels_last)
    # Timed kernels on CUDA for the presets; a plan written before the field keeps deterministic ones.
    assert paper.training.deterministic == cpu.training.deterministic == "auto"
    data = to_dict(paper)
    del data["training"]["deterministic"]
    assert from_dict(Plans, data, "plans.json").training.deterministic == "on"


def test_auto_precision_follows_native_bf16_support_on_the_cpu(monkeypatch):
    import kitspipe.devices as devices

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.autocast_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.autocast_dtype("auto", "cpu") is None
    assert devices.autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert devices.autocast_dtype("off", "cpu") is None


def test_deterministic_kernels_follow_the_setting_and_the_device():
    # auto: repeatable on the CPU; on CUDA, where a run is not repeatable bit for bit anyway,
    # cuDNN may time its algorithms.
    assert deterministic_kernels("auto", "cpu") and not deterministic_kernels("auto", "cuda")
    assert deterministic_kernels("on", "cuda") and not deterministic_kernels("off", "cpu")
    with pytest.raises(ValueError, match="deterministic"):
        deterministic_kernels("yes", "cpu")


@pytest.fixture
def restore_kernel_choice():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.utils.deterministic.fill_uninitialized_memory)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.benchmark = saved[2]
    torch.utils.deterministic.fill_uninitialized_memory = saved[3]


def test_configure_determinism_sets_the_process_flags(restore_kernel_choice):
    assert configure_determinism("off", "cpu") is False
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert configure_determinism("auto", "cpu") is True
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.backends.cudnn.benchmark and not torch.utils.deterministic.fill_uninitialized_memory
    # kernel_choice scopes the choice: a process's later inference keeps its own.
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = False
    with kernel_choice("on", "cpu") as deterministic:
        assert deterministic and torch.are_deterministic_algorithms_enabled()
    with kernel_choice("off", "cuda"):
        assert torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark


def test_a_run_without_deterministic_kernels_says_so_and_may_resume_with_them(tiny_work, restore_kernel_choice):
    plans = json.loads((tiny_work / "plans.json").read_text())
    plans["training"]["deterministic"] = "off"
    (tiny_work / "plans.json").write_text(json.dumps(plans))
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    folder = train_fold(tiny_work, 0, epochs=1, trainer="UNet3DTrainer", device="cpu", progress=False)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    sidecar = json.loads((folder / "checkpoint_latest.json").read_text())
    assert sidecar["determinism"]["bitwise"] is False
    assert "deterministic algorithms are off" in sidecar["determinism"]["reasons"]
    # How kernels are chosen is how the network runs, not what it learns: a resume may change it,
    # and the run as a whole stays unrepeatable, because its first part was.
    plans["training"]["deterministic"] = "auto"
    (tiny_work / "plans.json").write_text(json.dumps(plans))
    folder = train_fold(tiny_work, 0, epochs=2, trainer="UNet3DTrainer", resume=True, device="cpu", progress=False)
    sidecar = json.loads((folder / "checkpoint_latest.json").read_text())
    assert sidecar["state"]["finished"] and sidecar["determinism"] == {
        "bitwise": False, "reasons": ["deterministic algorithms are off"]}


def test_compiled_and_data_parallel_networks_save_plain_keys(tmp_path):
    from kitspipe.training.loop import RunContext, save_state
    from kitspipe.training.state import TrainingState

    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv3d(2, 1, 1))
    plain_keys = list(network.state_dict())
    compiled = maybe_compile(network, True)  # lazy: nothing is compiled until the first call
    assert list(compiled.state_dict())[0].startswith("_orig_mod.")
    assert unwrap(compiled) is network
    assert unwrap(torch.nn.DataParallel(compiled)) is network
    assert maybe_compile(network, False) is network
    optimiser = torch.optim.Adam(compiled.parameters())
    context = RunContext(folder=tmp_path, plans=load_preset("cpu"), metadata={}, device=torch.device("cpu"),
                         deadline=None, make_batches=None, validation_cases=[])
    save_state(context, compiled, optimiser, TrainingState())
    assert list(load_tensors(tmp_path / "checkpoint_latest.pt")["model"]) == plain_keys


def test_batches_move_channels_last_only_where_asked():
    batch = {"high_image": torch.zeros(1, 1, 4, 4, 4), "tumour_present": torch.zeros(1, 1), "name": "x"}
    moved = batch_to_device(batch, torch.device("cpu"), channels_last=True)
    assert moved["high_image"].is_contiguous(memory_format=torch.channels_last_3d)
    assert moved["tumour_present"].shape == (1, 1) and moved["name"] == "x"
    assert channels_last_active(True, "cuda:0") and not channels_last_active(True, "cpu")
    assert not channels_last_active(False, "cuda")


def _tiny_dual_plans():
    plans = _plans(depth=2, high_in=64, low_in=56)
    return replace(plans, loss=replace(plans.loss, high_positive_weights=(2.0, 5.0), low_positive_weight=2.0))


def test_bf16_training_loss_is_finite_and_close_to_fp32():
    plans = _tiny_dual_plans()
    trainer = DualResolutionTrainer(plans)
    torch.manual_seed(0)
    network, loss_fn = trainer.build_network(), trainer.build_loss()
    generator = torch.Generator().manual_seed(1)
    batch = {"high_image": torch.randn(1, 1, 64, 64, 64, generator=generator),
             "low_image": torch.randn(1, 1, 56, 56, 56, generator=generator),
             "high_target": (torch.rand(1, 2, 24, 24, 24, generator=generator) > 0.7).float(),
             "low_target": (torch.rand(1, 1, 16, 16, 16, generator=generator) > 0.7).float(),
             "tumour_present": torch.ones(1, 1)}
    phase = trainer.phases()[-1]
    trainer.set_train_mode(network, phase)
    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with autocast("cpu", dtype):
            terms = trainer.loss(network, loss_fn, batch, phase)
        assert terms.total.dtype == torch.float32  # the loss itself is float32 under autocast
        terms.total.backward()
        assert all(torch.isfinite(p.grad).all() for p in network.parameters() if p.grad is not None)
        network.zero_grad()
        losses[name] = float(terms.total.detach())
    assert np.isfinite(losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)
    assert losses["bf16"] != losses["fp32"]  # autocast did run the convolutions in bf16


@pytest.mark.parametrize("mode", ["paper", "fast"])
def test_bf16_inference_probabilities_are_close_to_fp32(mode):
    plans = _tiny_dual_plans()
    network = _randomised(build_dual_network(plans))
    rng = np.random.default_rng(2)
    high = rng.normal(size=(24, 28, 30)).astype(np.float32)
    low = rng.normal(size=(6, 7, 8)).astype(np.float32)
    fp32 = predict_volume(network, high, low, plans, mode=mode, mixed_precision="off")
    bf16 = predict_volume(network, high, low, plans, mode=mode, mixed_precision="bf16")
    assert bf16.regions.dtype == np.float32 and bf16.regions.shape == fp32.regions.shape
    assert 0 < np.abs(bf16.regions - fp32.regions).max() < 0.05  # bf16 ran, and changed little
    assert np.abs(bf16.low_on_high - fp32.low_on_high).max() < 0.05


def test_tile_budget_from_free_memory():
    cap = 8_000_000
    # The paper's 1 mm network on an 80 GB card: memory allows far more than the plan's cap.
    assert tile_voxels_for_memory(79 * 2**30, 32, 32, 2, cap) == cap
    # On a 16 GiB card the memory decides, bf16 fits about twice the voxels of float32.
    fp32 = tile_voxels_for_memory(16 * 2**30, 32, 32, 4, cap)
    bf16 = tile_voxels_for_memory(16 * 2**30, 32, 32, 2, cap)
    assert 1_000_000 < fp32 < bf16 < cap and 1.8 < bf16 / fp32 < 2.0
    per_voxel = 1.5 * activation_bytes_per_voxel(32, 32, 4)
    assert fp32 * per_voxel <= 14 * 2**30 < (fp32 + 1) * per_voxel  # free minus the 2 GiB reserve
    assert tile_voxels_for_memory(2**30, 32, 32, 4, cap) == 1  # below the reserve: the tiler's floor decides
    assert tile_voxels_for_memory(8 * 2**30, 16, 0, 4, cap) > tile_voxels_for_memory(8 * 2**30, 32, 32, 4, cap)
    with pytest.raises(ValueError):
        tile_voxels_for_memory(2**30, 32, 32, 4, 0)
    plans = load_preset("paper")
    assert fast_tile_voxels(plans, torch.device("cpu"), 32, 32) == plans.inference.max_tile_voxels


def test_cuda_tile_budget_counts_pytorchs_cache_as_free(monkeypatch):
    # The CUDA branch on a CPU build: the driver reports 4 GiB free, PyTorch holds 6 GiB of which
    # 1 GiB is in use, so 9 GiB are really available to the next tile.
    plans = load_preset("paper")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * 2**30)
    budget = fast_tile_voxels(plans, torch.device("cuda"), 32, 32)
    cap = plans.inference.max_tile_voxels
    assert budget == tile_voxels_for_memory(9 * 2**30, 32, 32, 4, cap)
    assert budget > tile_voxels_for_memory(4 * 2**30, 32, 32, 4, cap)


def test_bf16_training_runs_and_a_resume_may_change_the_precision(tiny_work, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_work, other)
    folder = train_fold(tiny_work, 0, epochs=1, trainer="UNet3DTrainer", mixed_precision="bf16", progress=False)
    plain = train_fold(other, 0, epochs=1, trainer="UNet3DTrainer", mixed_precision="off", progress=False)
    history = json.loads((folder / "checkpoint_latest.json").read_text())["state"]["history"]
    reference = json.loads((plain / "checkpoint_latest.json").read_text())["state"]["history"]
    assert np.isfinite(history[0]["loss_total"]) and history[0]["loss_total"] != reference[0]["loss_total"]
    assert history[0]["loss_total"] == pytest.approx(reference[0]["loss_total"], rel=0.05)
    # Precision is how the network runs, not what it is: the bf16 run continues in float32.
    train_fold(tiny_work, 0, epochs=2, trainer="UNet3DTrainer", resume=True, mixed_precision="off", progress=False)
    assert json.loads((folder / "checkpoint_latest.json").read_text())["state"]["finished"]
