"""Two more looks at one training step for ``bench/train_step.py``, after the timed steps:
the FLOPs it really runs, and where its time goes."""

from __future__ import annotations


def profile_step(trainer, network, loss_fn, phase, batch, device: str, dtype, optimiser) -> str:
    """``torch.profiler``'s table of one more step (the last batch again), the operators and
    kernels that took the most time on the device: where a step's time goes besides the
    convolutions."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kitspipe.devices import autocast

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        optimiser.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            terms = trainer.loss(network, loss_fn, batch, phase)
        terms.total.backward()
        optimiser.step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)


def counted_step_gflop(trainer, network, loss_fn, phase, batch, device: str, dtype) -> float:
    """The GFLOP one step really runs (forward and backward, every convolution and matrix
    product, the mask branch and the head included), counted by PyTorch's FlopCounterMode on
    the last batch: the planner's estimate leaves out the mask branch and the head."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kitspipe.devices import autocast

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(device, dtype):
            terms = trainer.loss(network, loss_fn, batch, phase)
        terms.total.backward()
    network.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return counter.get_total_flops() / 1e9
