"""The exponential moving average of the weights used for validation and inference."""

import pytest
import torch
from torch import nn

from kitspipe.training.weight_average import WeightAverage


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))


def test_average_follows_the_warm_up_then_the_decay():
    net = _net()
    start = net[0].weight.detach().clone()
    average = WeightAverage(net, decay=0.99)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    average.update(net)  # first decay min(0.99, 1/10) = 0.1: 90 % of the new weights
    assert torch.allclose(average.state_dict()["0.weight"], start + 0.9)
    average.update(net)  # then min(0.99, 2/11)
    assert torch.allclose(average.state_dict()["0.weight"], start + 1 - 0.1 * 2 / 11)
    for _ in range(2000):
        average.update(net)
    assert torch.allclose(average.state_dict()["0.weight"], start + 1, atol=1e-6)
    # Integer buffers are copied, not averaged.
    assert average.state_dict()["1.num_batches_tracked"].dtype == torch.int64


def test_applied_swaps_in_the_average_and_restores_the_weights():
    net = _net()
    average = WeightAverage(net, decay=0.5)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    trained = net[0].weight.detach().clone()
    with average.applied(net):
        assert torch.equal(net[0].weight, own["0.weight"])
    assert torch.equal(net[0].weight, trained)


def test_decay_zero_is_the_weights_and_bad_values_are_refused():
    net = _net()
    average = WeightAverage(net, decay=0.0)
    with torch.no_grad():
        net[0].weight.mul_(-2.0)
    average.update(net)
    assert torch.equal(average.state_dict()["0.weight"], net[0].weight)
    with pytest.raises(ValueError, match="weight_average_decay: must be within"):
        WeightAverage(net, decay=1.0)
    with pytest.raises(ValueError, match="do not match the network"):
        average.load({"0.weight": net[0].weight}, 3)
