"""How the network runs on its device: mixed precision, ``torch.compile``, channels-last, unwrapping.

Training (``kitspipe.training``) and inference (``kitspipe.inference``) read the plan's settings
through these helpers, so that "auto" means the same thing in both and a wrapped network
(DistributedDataParallel, ``torch.compile``) is unwrapped the same way everywhere.

* Mixed precision is bf16 autocast only. bf16 has float32's exponent range, so unlike fp16 it
  needs no GradScaler; losses and probabilities are still computed in float32 (the callers
  cast logits with ``.float()``), because a sigmoid or a sum over a million voxels in bf16
  loses digits that the Dice and the 0.5 threshold depend on.
* ``torch.compile`` and channels-last are opt-in: compile costs minutes of start-up per new
  input shape, and channels-last only pays off on CUDA tensor cores.
* Deterministic kernels are the default on the CPU, where they make a run repeatable bit for
  bit. On CUDA a run is not repeatable bit for bit in any case (``training.identity``), and
  restricting cuDNN to deterministic convolution algorithms, without timing them, costs speed
  (docs/performance.md), so ``auto`` lets cuDNN time its algorithms there instead.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator

import torch
from torch import nn

from kitspipe.plans import Determinism, MixedPrecision

MIXED_PRECISION_CHOICES: tuple[str, ...] = typing.get_args(MixedPrecision)
DETERMINISM_CHOICES: tuple[str, ...] = typing.get_args(Determinism)


def autocast_dtype(setting: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype a plan's ``mixed_precision`` asks for on ``device``; None means float32.

    ``auto`` is bf16 where the hardware runs bf16 natively: a CUDA device that supports it
    (Ampere and later), or a CPU with AVX512_BF16/AMX as oneDNN reports it (1.8-2.2x faster
    training steps on such a CPU, docs/performance.md). Elsewhere, e.g. an AVX2 laptop, bf16
    convolutions fall back to slow emulation, so ``auto`` stays float32 there. ``bf16`` is bf16
    on any device (CPU autocast supports it everywhere); ``off`` is float32, for runs that must
    match float32 results.
    """
    if setting not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {setting!r}")
    device = torch.device(device)
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively on this CPU (AVX512_BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN, or without this query
        return False


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``device`` in ``dtype``, or a no-op when ``dtype`` is None."""
    device = torch.device(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    """``bf16`` or ``fp32``, for logs and benchmark records."""
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.").replace("bfloat16", "bf16")


def deterministic_kernels(setting: str, device: torch.device | str) -> bool:
    """Whether a plan's ``training.deterministic`` asks for deterministic kernels on ``device``:
    ``on`` and ``off`` say so; ``auto`` is on except on CUDA (see the module docstring)."""
    if setting not in DETERMINISM_CHOICES:
        raise ValueError(f"deterministic must be one of {', '.join(DETERMINISM_CHOICES)}, got {setting!r}")
    if setting == "auto":
        return torch.device(device).type != "cuda"
    return setting == "on"


def configure_determinism(setting: str, device: torch.device | str) -> bool:
    """Set this process's kernel choice for ``training.deterministic``; returns whether it is deterministic.

    Deterministic: ``torch.use_deterministic_algorithms`` in warn-only mode (an operation without a
    deterministic version warns instead of stopping the run), without its NaN fill of new
    tensors, which bench/train_step.py measured at a quarter of a cpu-preset step and which
    repeatable results do not need. Otherwise: cuDNN times its convolution algorithms for each
    new input shape (``cudnn.benchmark``) and keeps the fastest, deterministic or not.
    """
    deterministic = deterministic_kernels(setting, device)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = not deterministic
    return deterministic


@contextlib.contextmanager
def kernel_choice(setting: str, device: torch.device | str) -> Iterator[bool]:
    """:func:`configure_determinism` for the block, the process's previous choice afterwards.

    Training chooses for itself; inference run later in the same process (cross-validation with
    one job, the demo) keeps the choice it would make on its own, e.g. no cuDNN timing for each
    of its case-dependent tile shapes.
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.utils.deterministic.fill_uninitialized_memory)
    try:
        yield configure_determinism(setting, device)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
        torch.utils.deterministic.fill_uninitialized_memory = saved[3]


def unwrap(network: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel and ``torch.compile`` wrappers.

    Checkpoints save this module's ``state_dict``, so a compiled or data-parallel run writes the
    same keys as a plain one (no ``module.`` or ``_orig_mod.`` prefixes) and loads anywhere.
    """
    while True:
        if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            network = network._orig_mod
        else:
            return network


def channels_last_active(requested: bool, device: torch.device | str) -> bool:
    """Channels-last 3D is applied only on CUDA, where cuDNN's NDHWC kernels use it."""
    return bool(requested) and torch.device(device).type == "cuda"


def to_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """5-D tensors in ``torch.channels_last_3d``; other tensors unchanged (the format needs 5 dims)."""
    return tensor.contiguous(memory_format=torch.channels_last_3d) if tensor.dim() == 5 else tensor


def batch_to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """Move a batch's tensors to ``device``.

    ``non_blocking`` lets the copy from the loader's pinned memory overlap with the previous
    step's GPU work; it is a plain copy on the CPU.
    """
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last:
                value = to_channels_last(value)
        moved[key] = value
    return moved


def set_memory_format(network: nn.Module, channels_last: bool, device: torch.device | str) -> nn.Module:
    """Weights in channels-last 3D on CUDA when asked (before any DDP wrapper is built, whose
    gradient buckets take the parameters' strides at construction)."""
    if channels_last_active(channels_last, device):
        network = network.to(memory_format=torch.channels_last_3d)
    return network


def maybe_compile(network: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(network)`` when enabled, applied last: around DistributedDataParallel,
    as the PyTorch DDP + compile notes recommend. Use :func:`unwrap` for the weights."""
    return torch.compile(network) if enabled else network


def describe(device: torch.device, dtype: torch.dtype | None, **flags: bool) -> str:
    """``cuda in bf16, compile`` and the like, for the log line a stage starts with."""
    return f"{device} in {precision_name(dtype)}" + "".join(f", {k.replace('_', '-')}" for k, on in flags.items() if on)
