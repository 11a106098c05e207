"""Whole-volume prediction and export back onto the input's own grid."""

import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from kitspipe.geometry import Geometry
from kitspipe.imageio import to_canonical
from kitspipe.inference.export import labels_from_probabilities, to_source_grid, write_prediction
from kitspipe.inference.predictor import predict_volume
from kitspipe.metrics import dice
from kitspipe.networks.unet3d import UNet3D
from kitspipe.plans import load_preset
from kitspipe.postprocessing import PostprocessingSettings
from kitspipe.preprocessing import prepare_case
from kitspipe.trainers.builtin import build_dual_network

OFF = PostprocessingSettings(keep_largest_kidney_per_side=False, drop_unconnected_tumour=False,
                             low_resolution_mask=False)


def _plans(depth=2, high_in=64, low_in=56, tile_voxels=300_000, high_spacing=2.0):
    plans = load_preset("cpu")
    from kitspipe.networks.sizes import output_size

    plans = replace(plans,
                    # Valid convolutions, whatever the preset pads: these sizes are valid-network sizes.
                    high=replace(plans.high, spacing_mm=(high_spacing,) * 3, base_filters=4, depth=depth,
                                 padding="valid", output_crop=0, input_patch=(high_in,) * 3,
                                 output_patch=(output_size(high_in, depth),) * 3),
                    low=replace(plans.low, spacing_mm=(4 * high_spacing,) * 3, base_filters=4, depth=depth,
                                padding="valid", output_crop=0, input_patch=(low_in,) * 3,
                                output_patch=(output_size(low_in, depth),) * 3),
                    intensity=replace(plans.intensity, mean=50.0, std=100.0),
                    # Batch norm: a fixed map at inference, so the tiling modes are comparable.
                    network=replace(plans.network, normalisation="batch"),
                    # float32: bf16 rounding would hide whether two tilings compute the same voxels.
                    inference=replace(plans.inference, max_tile_voxels=tile_voxels, mixed_precision="off"))
    return plans


def _randomised(network):
    torch.manual_seed(0)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return network.eval()


@pytest.mark.parametrize("shape", [(37, 50, 45), (10, 12, 9)])
def test_fast_equals_paper_for_plain_unet(shape):
    plans = _plans(depth=2, high_in=64)
    network = _randomised(UNet3D(1, 2, 4, 2))
    volume = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    paper = predict_volume(network, volume, None, plans, mode="paper").regions
    fast = predict_volume(network, volume, None, plans, mode="fast").regions
    assert paper.shape == (2, *shape)
    assert np.abs(paper - fast).max() <= 1e-4


def test_dual_network_modes_run_and_agree_where_the_mask_covers_the_input():
    plans = _plans(depth=2, high_in=64, low_in=56)  # low output 16 x 8 mm = 128 mm >= 64 x 2 mm
    network = _randomised(build_dual_network(plans))
    rng = np.random.default_rng(2)
    high = rng.normal(size=(32, 40, 48)).astype(np.float32)
    low = rng.normal(size=(8, 10, 12)).astype(np.float32)
    paper = predict_volume(network, high, low, plans, mode="paper")
    fast = predict_volume(network, high, low, plans, mode="fast")
    assert paper.regions.shape == fast.regions.shape == (2, 32, 40, 48)
    assert paper.low_on_high.shape == (32, 40, 48)
    assert np.all((fast.regions >= 0) & (fast.regions <= 1))
    # Differences come only from the low-resolution net's pooling phase per patch (docs/inference.md).
    assert np.abs(paper.regions - fast.regions).mean() < 0.05


@pytest.mark.parametrize("direction, origin", [
    ((0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0), (0.0, 0.0, 0.0)),          # KiTS19 IPL
    ((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0), (120.0, -35.5, 60.0)),    # RAS-stored
    ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0), (-10.0, 20.0, -300.0)),   # permuted, flipped
])
def test_label_round_trip_through_preprocessing_and_export(tmp_path, direction, origin):
    from tests.conftest import phantom_arrays

    image_zyx, label_zyx = phantom_arrays(shape_zyx=(30, 44, 52), spacing_zyx=(3.0, 1.7, 1.9), seed=3)
    stored_image = sitk.GetImageFromArray(image_zyx.transpose(2, 1, 0).copy())
    stored_label = sitk.GetImageFromArray(label_zyx.transpose(2, 1, 0).copy())
    for item in (stored_image, stored_label):
        item.SetSpacing((1.9, 1.7, 3.0))
        item.SetDirection(direction)
        item.SetOrigin(origin)
    plans = _plans(high_spacing=1.0, low_in=64)  # the paper's 1 mm grid
    image = to_canonical(stored_image, dtype=np.float32)
    label = to_canonical(stored_label).array
    prepared = prepare_case(image, label, plans)
    regions = np.stack([prepared.high_label > 0, prepared.high_label == 2]).astype(np.float32)
    on_source = to_source_grid(regions, prepared.high_grid, image, prepared.crop)
    labels = labels_from_probabilities(on_source, None, image.grid.spacing, OFF)
    path = tmp_path / "case.nii.gz"
    write_prediction(labels, image, path)
    written = sitk.ReadImage(str(path))
    assert Geometry.of(written).differences(Geometry.of(stored_label)) == []
    assert written.GetPixelID() == sitk.sitkUInt8
    result = sitk.GetArrayFromImage(written)
    reference = sitk.GetArrayFromImage(stored_label)
    assert dice(result > 0, reference > 0) >= 0.97
    assert dice(result == 2, reference == 2) >= 0.97


def test_infer_and_evaluate_commands_on_a_trained_fold(tiny_work, tiny_dataset, tmp_path):
    from kitspipe.cli import main

    assert main(["-q", "--no-progress", "train", str(tiny_work), "--fold", "0", "--trainer", "UNet3DTrainer",
                 "--epochs", "1"]) == 0
    out = tmp_path / "predictions"
    assert main(["-q", "--no-progress", "infer", str(tiny_work), str(tiny_dataset), str(out), "--folds", "0",
                 "--trainer", "UNet3DTrainer", "--save-probabilities"]) == 0
    for case in sorted(tiny_dataset.iterdir()):
        written = sitk.ReadImage(str(out / f"{case.name}.nii.gz"))
        source = sitk.ReadImage(str(case / "imaging.nii.gz"))
        assert Geometry.of(written).differences(Geometry.of(source)) == []
        assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1, 2}
    before = (out / "case_00000.nii.gz").stat().st_mtime_ns
    assert main(["-q", "--no-progress", "infer", str(tiny_work), str(tiny_dataset), str(out), "--folds", "0",
                 "--trainer", "UNet3DTrainer", "--save-probabilities"]) == 0
    assert (out / "case_00000.nii.gz").stat().st_mtime_ns == before  # up to date: not redone
    # The tiny plan comes from the cpu preset, which mirrors along z and x; turning that off
    # (--mirror-axes with no axis) changes the prediction's recipe, so the cases are redone.
    assert json.loads((tiny_work / "plans.json").read_text())["inference"]["mirror_axes"] == ["z", "x"]
    assert main(["-q", "--no-progress", "infer", str(tiny_work), str(tiny_dataset), str(out), "--folds", "0",
                 "--trainer", "UNet3DTrainer", "--save-probabilities", "--mirror-axes"]) == 0
    assert (out / "case_00000.nii.gz").stat().st_mtime_ns != before
    with pytest.raises(SystemExit):
        main(["-q", "infer", str(tiny_work), str(tiny_dataset), str(out), "--mirror-axes", "w"])
    assert main(["-q", "evaluate", str(out), str(tiny_dataset), "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 4


def _same_padded(plans, crop: int, high_in: int = 64, low_in: int = 32):
    from kitspipe.networks.sizes import UNetBorders, output_size

    high_borders, low_borders = UNetBorders("same", crop), UNetBorders("same")
    return replace(plans,
                   high=replace(plans.high, padding="same", output_crop=crop, input_patch=(high_in,) * 3,
                                output_patch=(output_size(high_in, plans.high.depth, borders=high_borders),) * 3),
                   low=replace(plans.low, padding="same", output_crop=0, input_patch=(low_in,) * 3,
                               output_patch=(output_size(low_in, plans.low.depth, borders=low_borders),) * 3))


def test_same_padding_cropped_by_the_receptive_field_is_tile_independent():
    """A same-padded U-Net whose output crop covers its receptive-field radius never lets the
    zero padding reach a kept voxel, so any tiling gives the same volume."""
    from kitspipe.networks.sizes import UNetBorders, margin

    crop = margin(2)  # the valid network's margin is exactly its receptive-field radius
    plans = _same_padded(_plans(depth=2), crop, high_in=48)
    network = _randomised(UNet3D(1, 2, 4, 2, borders=UNetBorders("same", crop)))
    volume = np.random.default_rng(3).normal(size=(30, 41, 37)).astype(np.float32)
    paper = predict_volume(network, volume, None, plans, mode="paper").regions
    fast = predict_volume(network, volume, None, plans, mode="fast").regions
    assert paper.shape == fast.shape == (2, 30, 41, 37)
    assert np.abs(paper - fast).max() <= 1e-4


@pytest.mark.parametrize("normalisation", ["batch", "instance"])
def test_same_padded_dual_network_predicts_whole_volumes(normalisation):
    plans = _same_padded(_plans(depth=2), crop=4)
    plans = replace(plans, network=replace(plans.network, normalisation=normalisation))
    network = _randomised(build_dual_network(plans))
    rng = np.random.default_rng(4)
    high = rng.normal(size=(36, 70, 50)).astype(np.float32)
    low = rng.normal(size=(9, 18, 13)).astype(np.float32)
    for mode in ("paper", "fast"):
        prediction = predict_volume(network, high, low, plans, mode=mode)
        assert prediction.regions.shape == (2, 36, 70, 50) and prediction.low_on_high.shape == (36, 70, 50)
        assert np.all((prediction.regions >= 0) & (prediction.regions <= 1))


def test_plan_chooses_which_checkpoint_infer_loads(tiny_work, tiny_dataset, tmp_path):
    from kitspipe.inference.run import run_inference
    from kitspipe.training.checkpoint import load_tensors, read_metadata, save_checkpoint
    from kitspipe.training.run import train_fold

    folder = train_fold(tiny_work, 0, trainer="UNet3DTrainer", epochs=1, progress=False)
    tensors = load_tensors(folder / "checkpoint_latest.pt")
    tensors["model"]["head.bias"] = tensors["model"]["head.bias"] + 30.0  # "best" now says foreground everywhere
    save_checkpoint(folder, "best", tensors, {k: v for k, v in read_metadata(folder, "latest").items()
                                              if k != "weights_sha256"})

    def foreground(out) -> float:
        return float((sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_00000.nii.gz"))) > 0).mean())

    common = dict(folds=[0], trainer="UNet3DTrainer", postprocess=False, progress=False, case_ids=["case_00000"])
    plans = json.loads((tiny_work / "plans.json").read_text())
    for choice in ("best", "latest"):
        plans["inference"]["checkpoint"] = choice
        (tiny_work / "plans.json").write_text(json.dumps(plans))
        run_inference(tiny_work, tiny_dataset, tmp_path / choice, **common)
    # Foreground everywhere on the preprocessed body crop (the rest of the image is background).
    assert foreground(tmp_path / "best") > 0.8
    assert foreground(tmp_path / "latest") < 0.5
