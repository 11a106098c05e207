"""How many voxels a fast-mode input tile may have on a GPU, from its free memory.

``inference.max_tile_voxels`` is a fixed budget that must fit the smallest card a plan is
used on. On CUDA, fast mode instead takes the largest tile whose activations fit the memory
that ``torch.cuda.mem_get_info()`` reports free, capped by the plan's budget (so a plan never
gets larger tiles than it asks for, only smaller ones on a smaller card).

The estimate is of inference under ``torch.no_grad()``: no activation is kept for a backward
pass, so the peak is the working set at the finest level of the decoder, where the U-Net
holds, per input voxel (``b`` = base filters, ``e`` = channels of the dual network's
masked-image branch joining the first skip):

    skip 2b + branch e + upsampled 4b + their concatenation 6b + e
    + convolution and batch-norm outputs 2 × 2b                     = 16b + 2e channels

(``UNet3D.forward`` keeps every skip until it returns; the coarser levels add ``1/8 + 1/64 +
...`` of their larger channel counts, about a quarter more), times the bytes of the compute
dtype, plus the float32 input channels. A safety factor covers cuDNN workspaces and allocator
fragmentation, and a reserve the CUDA context, the weights and the stitched output on the
host side that is not GPU memory anyway. ``bench/infer.py --device cuda`` prints this estimate
next to the measured ``torch.cuda.max_memory_allocated()``.
"""

from __future__ import annotations

# Coarser levels: 2× the channels at 1/8 of the voxels per level, summed over the levels.
_COARSER_LEVELS = 1.25
DEFAULT_SAFETY = 1.5
DEFAULT_RESERVE_BYTES = 2 * 1024**3


def activation_bytes_per_voxel(base_filters: int, branch_channels: int, element_bytes: int,
                               input_channels: int = 2) -> float:
    """Peak bytes of GPU memory per input-tile voxel of one no-grad U-Net forward (see module doc).

    Args:
        base_filters: filters of the U-Net's first convolution.
        branch_channels: channels joining the finest skip from outside the U-Net (the dual
            network's masked-image branch), 0 for a plain U-Net.
        element_bytes: 2 under bf16 autocast, 4 in float32.
        input_channels: float32 channels of the input tile (image and mask: 2).
    """
    finest = 16 * base_filters + 2 * branch_channels
    return element_bytes * finest * _COARSER_LEVELS + 4 * input_channels


def tile_voxels_for_memory(free_bytes: int, base_filters: int, branch_channels: int, element_bytes: int,
                           cap: int, safety: float = DEFAULT_SAFETY,
                           reserve_bytes: int = DEFAULT_RESERVE_BYTES) -> int:
    """The largest input-tile voxel count whose estimated activations fit ``free_bytes``, at most ``cap``.

    Never below 1: the tiler keeps its own floor (the training patch, which is known to fit).

    Example::

        # an 80 GB H100 with 79 GiB free, the paper's 1 mm network (32 filters + 32-channel
        # branch) in bf16: ~38 M voxels fit, so the plan's 8 M cap decides
        tile_voxels_for_memory(79 * 2**30, 32, 32, 2, cap=8_000_000)  # -> 8_000_000
    """
    if cap < 1:
        raise ValueError(f"cap must be positive, got {cap}")
    per_voxel = safety * activation_bytes_per_voxel(base_filters, branch_channels, element_bytes)
    usable = max(0, free_bytes - reserve_bytes)
    return max(1, min(cap, int(usable // per_voxel)))
