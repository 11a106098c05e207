"""Shapes, size arithmetic, tiling exactness and end-to-end gradients of the networks."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kitspipe.losses import DualResolutionLoss, DualTargets, SegmentationLoss
from kitspipe.networks.blocks import center_pad_or_crop
from kitspipe.networks.classification_head import TumourPresenceHead
from kitspipe.networks.dual_resolution import MASK_JOINS, DualResolutionUNet
from kitspipe.networks.sizes import (
    UNetBorders,
    input_size_for_output,
    is_valid_input_size,
    margin,
    output_size,
    trace_sizes,
    unet_forward_flops,
    valid_input_sizes,
)
from kitspipe.networks.unet3d import UNet3D


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "depth, size, expected",
    [(3, 108, 20), (3, 116, 28), (3, 196, 108), (3, 268, 180), (2, 64, 24), (3, 92, 4), (2, 44, 4)],
)
def test_output_size_table(depth: int, size: int, expected: int) -> None:
    assert output_size(size, depth) == expected


@pytest.mark.parametrize("depth, size", [(3, 106), (3, 110), (3, 84), (3, 0), (3, -8), (2, 62), (2, 40)])
def test_invalid_size_raises_naming_it(depth: int, size: int) -> None:
    with pytest.raises(ValueError, match=f"input size {size} "):
        output_size(size, depth)
    assert not is_valid_input_size(size, depth)


def test_margin_and_size_search() -> None:
    assert margin(3) == 44 and margin(2) == 20
    assert valid_input_sizes(3, max_input=130) == [92, 100, 108, 116, 124]
    assert valid_input_sizes(3, min_output=20, max_input=124) == [108, 116, 124]
    assert input_size_for_output(20, 3) == 108
    assert input_size_for_output(21, 3) == 116
    assert input_size_for_output(1, 3) == 92
    assert input_size_for_output(24, 2) == 64


def test_paper_bottleneck_and_flops() -> None:
    trace = trace_sizes(108, 3)
    assert trace.skips == [104, 48, 20] and trace.bottleneck == 6 and trace.output == 20
    high = unet_forward_flops((108, 108, 108), 1, 32, 3, 2)
    low = unet_forward_flops((108, 108, 108), 1, 16, 3, 1)
    assert 250e9 < high < 270e9  # design notes: about 260 GFLOP
    assert low == pytest.approx(high / 4, rel=0.02)
    # Almost half of it is the second convolution of level 0 (32 → 64 on 104³).
    assert 2 * 32 * 64 * 27 * 104**3 / high == pytest.approx(0.47, abs=0.02)


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(1, 3), size=st.integers(10, 124))
def test_network_output_matches_size_arithmetic(depth: int, size: int) -> None:
    net = UNet3D(1, 1, base_filters=1, depth=depth).eval()
    # One thin slab along the other axes keeps the test fast.
    other = input_size_for_output(1, depth)
    x = torch.zeros(1, 1, size, other, other)
    if not is_valid_input_size(size, depth):
        with pytest.raises(ValueError, match=f"input size {size} "):
            net(x)
        return
    assert output_size(size, depth) == size - 2 * margin(depth)
    with torch.no_grad():
        assert net(x).logits.shape[2] == output_size(size, depth)


# ---------------------------------------------------------------- UNet3D


@pytest.mark.parametrize(
    "depth, size, out, bottleneck",
    [(2, (64, 48, 44), (24, 8, 4), (9, 5, 4)), (3, (108, 100, 92), (20, 12, 4), (6, 5, 4))],
)
def test_unet_shapes(
    depth: int, size: tuple[int, int, int], out: tuple[int, ...], bottleneck: tuple[int, ...]
) -> None:
    net = UNet3D(in_channels=1, num_classes=3, base_filters=2, depth=depth)
    result = net(torch.randn(2, 1, *size))
    assert result.logits.shape == (2, 3, *out)
    assert result.bottleneck.shape == (2, 2 * 2 ** (depth + 1), *bottleneck)


def test_unet_paper_channel_widths() -> None:
    net = UNet3D(1, 2, base_filters=32, depth=3)
    assert [b.out_channels for b in net.encoder] == [64, 128, 256]
    assert net.bottleneck_channels == 512
    assert [b.out_channels for b in net.decoder] == [256, 128, 64]
    assert net.encoder[0][0][0].out_channels == 32  # first convolution: base filters


def test_unet_is_tile_independent_in_eval_mode() -> None:
    net = UNet3D(1, 2, base_filters=2, depth=3)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    net.eval()
    volume = torch.randn(1, 1, 108, 108, 108)
    # Offsets must be multiples of 2^depth = 8 so the max-pooling grids coincide.
    start, size = (8, 16, 0), (100, 92, 108)
    tile = volume[:, :, start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]]
    with torch.no_grad():
        whole = net(volume).logits
        part = net(tile).logits
    assert part.shape[2:] == (12, 4, 20)
    # Output voxel i sits at input voxel i + margin in both runs.
    expected = whole[:, :, 8:20, 16:20, 0:20]
    assert torch.allclose(part, expected, atol=1e-5, rtol=0)


def test_blocks_order_and_freezing_all_but_last_three() -> None:
    net = UNet3D(1, 1, base_filters=2, depth=3)
    blocks = net.blocks()
    assert len(blocks) == 8
    assert blocks[:3] == list(net.encoder) and blocks[3] is net.bottom
    assert blocks[4:7] == list(net.decoder) and blocks[7] is net.head
    for block in blocks[:-3]:
        block.requires_grad_(False)
    net(torch.randn(1, 1, 92, 92, 92)).logits.sum().backward()
    for index, block in enumerate(blocks):
        has_grad = [p.grad is not None for p in block.parameters()]
        assert all(has_grad) if index >= 5 else not any(has_grad)


def test_unet_rejects_undeclared_extra_skips() -> None:
    net = UNet3D(1, 1, base_filters=2, depth=2)
    with pytest.raises(ValueError, match="extra_skips"):
        net(torch.randn(1, 1, 44, 44, 44), {0: torch.randn(1, 2, 40, 40, 40)})
    with pytest.raises(ValueError, match="levels"):
        UNet3D(1, 1, base_filters=2, depth=2, extra_skip_channels={2: 4})


# ---------------------------------------------------------------- head and mask


def test_head_padding_rule_and_small_bottleneck() -> None:
    assert TumourPresenceHead.conv_padding_for((6, 6, 6)) == 0  # paper: 6 → 4 → 2
    assert TumourPresenceHead.conv_padding_for((9, 5, 4)) == 1
    head = TumourPresenceHead(16, conv_padding=1)
    assert head(torch.randn(1, 16, 4, 4, 4), torch.rand(1, 4, 4, 4)).shape == (1, 1)
    # Adaptive pooling lets the same head read a larger inference tile.
    paper = TumourPresenceHead(16)
    assert paper(torch.randn(1, 16, 6, 6, 6), torch.rand(1, 20, 20, 20)).shape == (1, 1)
    assert paper(torch.randn(1, 16, 17, 17, 17), torch.rand(1, 180, 180, 180)).shape == (1, 1)


def test_mask_is_padded_or_cropped_around_the_centre() -> None:
    net = DualResolutionUNet(2, 2, 2, 2, high_input_size=(52,) * 3, low_input_size=(44,) * 3, mask_upsampling="nearest")
    mask = net.mask_from_low(torch.ones(1, 1, 20, 20, 20), (108, 108, 108))
    assert mask.shape == (1, 1, 108, 108, 108)
    assert mask[0, 0, 14:94, 14:94, 14:94].min() == 1 and mask.sum() == 80**3
    assert net.mask_from_low(torch.ones(1, 1, 28, 28, 28), (108, 108, 108)).min() == 1
    # Mixed: one axis padded, one cropped, one exact.
    mixed = center_pad_or_crop(torch.ones(1, 1, 4, 12, 8), (8, 8, 8))
    assert mixed.shape == (1, 1, 8, 8, 8) and mixed[0, 0, :, 0, 0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]


def test_dual_rejects_invalid_sizes_and_options() -> None:
    with pytest.raises(ValueError, match="input size 106 "):
        DualResolutionUNet(2, 2, high_input_size=(106, 108, 108))
    with pytest.raises(ValueError, match="mask_join"):
        DualResolutionUNet(2, 2, mask_join="everywhere")


# ---------------------------------------------------------------- dual network


def _tiny_dual(**kwargs) -> DualResolutionUNet:
    return DualResolutionUNet(
        low_base_filters=2, high_base_filters=2, low_depth=2, high_depth=2,
        high_input_size=(52, 52, 52), low_input_size=(44, 44, 44),
        head_fc_widths=(8, 8, 4), head_joint_widths=(4, 4), **kwargs,
    )


@pytest.mark.parametrize("mask_join", MASK_JOINS)
@pytest.mark.parametrize("mask_upsampling", ["trilinear", "nearest"])
def test_high_resolution_loss_alone_trains_the_low_resolution_net(mask_join: str, mask_upsampling: str) -> None:
    net = _tiny_dual(mask_join=mask_join, mask_upsampling=mask_upsampling)
    out = net(torch.randn(2, 1, 52, 52, 52), torch.randn(2, 1, 44, 44, 44))
    assert out.low_logits.shape == (2, 1, 4, 4, 4)
    assert out.high_logits.shape == (2, 2, 12, 12, 12)
    assert out.tumour_logit.shape == (2, 1)
    assert out.mask.shape == (2, 1, 52, 52, 52)

    targets = (torch.rand(2, 2, 12, 12, 12) > 0.5).float()
    SegmentationLoss()(out.high_logits, targets).backward()
    low_grads = [p.grad for p in net.low.parameters()]
    assert all(g is not None for g in low_grads)
    assert sum(g.abs().sum().item() for g in low_grads) > 0

    before = [p.detach().clone() for p in net.low.parameters()]
    torch.optim.Adam(net.low.parameters(), lr=1e-3).step()
    changed = [not torch.equal(b, p) for b, p in zip(before, net.low.parameters())]
    assert any(changed)


def test_dual_split_forward_equals_composed_forward() -> None:
    net = _tiny_dual(mask_join="all_skips").eval()
    high, low = torch.randn(1, 1, 52, 52, 52), torch.randn(1, 1, 44, 44, 44)
    with torch.no_grad():
        composed = net(high, low)
        mask = net.mask_from_low(torch.sigmoid(net.low_forward(low)), high.shape[2:])
        split = net.high_forward(high, mask)
        no_head = net.high_forward(high, mask, classify=False)
    assert torch.equal(composed.high_logits, split.logits)
    assert torch.equal(composed.tumour_logit, split.tumour_logit)
    assert no_head.tumour_logit is None and torch.equal(no_head.logits, split.logits)


def test_dual_with_cropped_mask_and_without_head() -> None:
    # 4 mm input 60 → 20 → 80 at 1 mm, cropped to the 52 of the 1 mm input.
    net = DualResolutionUNet(
        2, 2, 2, 2, high_input_size=(52,) * 3, low_input_size=(60,) * 3, classification=False
    )
    out = net(torch.randn(1, 1, 52, 52, 52), torch.randn(1, 1, 60, 60, 60))
    assert out.low_logits.shape == (1, 1, 20, 20, 20) and out.tumour_logit is None
    assert out.mask.shape == (1, 1, 52, 52, 52) and out.mask.min() > 0


def test_paper_preset_shapes_and_one_adam_step() -> None:
    torch.set_num_threads(max(torch.get_num_threads(), 2))
    net = DualResolutionUNet()  # the paper: 108³ inputs, 16/32 filters, depth 3
    assert net.low_output_size == (20, 20, 20) and net.high_output_size == (20, 20, 20)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = DualResolutionLoss()
    start = time.perf_counter()
    out = net(torch.randn(1, 1, 108, 108, 108), torch.randn(1, 1, 108, 108, 108))
    assert out.low_logits.shape == (1, 1, 20, 20, 20)
    assert out.high_logits.shape == (1, 2, 20, 20, 20)
    assert out.tumour_logit.shape == (1, 1)
    targets = DualTargets(
        low=torch.zeros(1, 1, 20, 20, 20), high=torch.zeros(1, 2, 20, 20, 20), tumour_present=torch.ones(1, 1)
    )
    before = net.head.out.weight.detach().clone()
    loss_fn(out, targets).total.backward()
    optimizer.step()
    print(f"paper dual network: forward + backward + Adam step {time.perf_counter() - start:.1f} s")
    assert not torch.equal(before, net.head.out.weight)
    assert net.low.encoder[0][0][0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- same padding

SAME = UNetBorders("same", output_crop=4)


def test_same_padding_size_arithmetic() -> None:
    assert output_size(64, 2, borders=SAME) == 56
    assert output_size(64, 2, borders=UNetBorders("same")) == 64
    assert margin(2, borders=SAME) == 4 and margin(3, borders=UNetBorders("same")) == 0
    # Only pooling constrains a same-padded input: every pooled size must be even.
    assert valid_input_sizes(2, max_input=24, borders=UNetBorders("same")) == [4, 8, 12, 16, 20, 24]
    assert valid_input_sizes(2, min_output=10, max_input=24, borders=SAME) == [20, 24]
    assert input_size_for_output(21, 3, borders=SAME) == 32
    with pytest.raises(ValueError, match="input size 62 "):
        output_size(62, 2, borders=SAME)
    with pytest.raises(ValueError, match="output crop of 4"):
        output_size(8, 2, borders=SAME)
    with pytest.raises(ValueError, match="padding must be one of"):
        UNetBorders("reflect")
    # A valid U-Net with a crop has the crop added to its margin.
    assert output_size(108, 3, borders=UNetBorders("valid", 2)) == 16


@settings(max_examples=25, deadline=None)
@given(depth=st.integers(1, 3), size=st.integers(4, 40), crop=st.integers(0, 3))
def test_same_padded_network_output_matches_size_arithmetic(depth: int, size: int, crop: int) -> None:
    borders = UNetBorders("same", crop)
    net = UNet3D(1, 1, base_filters=1, depth=depth, borders=borders).eval()
    other = input_size_for_output(1, depth, borders=borders)
    x = torch.zeros(1, 1, size, other, other)
    if not is_valid_input_size(size, depth, borders=borders):
        with pytest.raises(ValueError, match=f"input size {size} "):
            net(x)
        return
    assert output_size(size, depth, borders=borders) == size - 2 * crop
    with torch.no_grad():
        assert net(x).logits.shape[2:] == (size - 2 * crop, other - 2 * crop, other - 2 * crop)


@pytest.mark.parametrize("borders", [UNetBorders(), SAME])
def test_flop_count_matches_the_layers_that_run(borders: UNetBorders) -> None:
    """The planner's FLOP formula against the convolutions the network actually executes."""
    size, depth, base, extra = (44, 48, 52), 2, 2, {0: 3}
    net = UNet3D(1, 2, base_filters=base, depth=depth, extra_skip_channels=extra, borders=borders)
    counted = 0.0

    def count(module, inputs, output) -> None:
        nonlocal counted
        kernel = module.weight.shape[2:].numel()
        cin = module.in_channels if isinstance(module, torch.nn.Conv3d) else module.out_channels
        # A transposed convolution does cin·cout·k multiply-adds per input voxel.
        voxels = (output if isinstance(module, torch.nn.Conv3d) else inputs[0])[0, 0].numel()
        counted += 2.0 * cin * module.out_channels * kernel * voxels

    for module in net.modules():
        if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            module.register_forward_hook(count)
    skip = trace_sizes(size[0], depth, borders=borders).skips[0]
    with torch.no_grad():
        net(torch.zeros(1, 1, *size), {0: torch.zeros(1, 3, skip, *(trace_sizes(s, depth, borders=borders).skips[0]
                                                                       for s in size[1:]))})
    assert unet_forward_flops(size, 1, base, depth, 2, extra, borders=borders) == pytest.approx(counted, rel=1e-9)


def test_same_padded_dual_network_shapes_and_gradients() -> None:
    net = DualResolutionUNet(4, 4, 2, 2, high_input_size=(40,) * 3, low_input_size=(16,) * 3,
                             high_borders=SAME, low_borders=UNetBorders("same"))
    out = net(torch.randn(1, 1, 40, 40, 40), torch.randn(1, 1, 16, 16, 16))
    assert out.high_logits.shape == (1, 2, 32, 32, 32)
    assert out.low_logits.shape == (1, 1, 16, 16, 16)
    # 16 low voxels x 4 = 64 high voxels, centre-cropped to the 40-voxel high input.
    assert out.mask.shape == (1, 1, 40, 40, 40)
    out.high_logits.mean().backward()
    assert net.low.head.weight.grad is not None and net.low.head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize("normalisation, same_in_both_modes", [("instance", True), ("batch", False)])
def test_instance_norm_infers_as_it_trained_with_batch_size_one(normalisation: str, same_in_both_modes: bool) -> None:
    """Batch-1 batch norm trains on per-patch statistics but infers with running averages;
    instance norm uses the patch's own statistics in both modes (docs/interpretation.md)."""
    net = DualResolutionUNet(4, 4, 2, 2, high_input_size=(44,) * 3, low_input_size=(44,) * 3,
                             normalisation=normalisation)
    high, low = torch.randn(1, 1, 44, 44, 44) * 3 + 1, torch.randn(1, 1, 44, 44, 44) * 3 + 1
    with torch.no_grad():
        net.train()
        trained = net(high, low).high_logits
        net.eval()
        inferred = net(high, low).high_logits
    assert torch.allclose(trained, inferred, atol=1e-5) == same_in_both_modes
    kinds = {type(m).__name__ for m in net.high.modules() if "Norm" in type(m).__name__}
    assert kinds == {"InstanceNorm3d" if normalisation == "instance" else "BatchNorm3d"}
