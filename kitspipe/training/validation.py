"""Validation on whole cases with the real tiling, so the number matches later inference."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kitspipe.inference.predictor import normalise, predict_volume
from kitspipe.metrics import dice
from kitspipe.plans import Plans


def whole_case_metrics(network: nn.Module, case, plans: Plans, device: torch.device, low_only: bool) -> dict[str, float]:
    """Dice of thresholded probabilities (> 0.5, as in post-processing) against the
    preprocessed labels of one case.

    Args:
        case: a ``PreprocessedCase`` (arrays on the plan grids).
        low_only: score only the low-resolution network (its pre-training phase).
    """
    low_image = normalise(np.asarray(case.low_image), plans)
    low_label = np.asarray(case.low_label)
    if low_only:
        from kitspipe.devices import autocast, autocast_dtype, unwrap
        from kitspipe.inference.predictor import _low_probability

        model = unwrap(network)
        was_training = model.training
        model.eval()
        try:
            # The precision inference will use, as predict_volume does for the full network.
            with torch.no_grad(), autocast(device, autocast_dtype(plans.inference.mixed_precision, device)):
                probability = _low_probability(model, low_image, plans, device, progress=False)
        finally:
            model.train(was_training)
        return {"val_low_dice": dice(probability > 0.5, low_label > 0)}
    prediction = predict_volume(network, normalise(np.asarray(case.high_image), plans), low_image, plans,
                                device=device)
    label = np.asarray(case.high_label)
    metrics = {"val_kidney_dice": dice(prediction.regions[0] > 0.5, label > 0),
               "val_tumour_dice": dice(prediction.regions[1] > 0.5, label == 2)}
    if prediction.low_on_high is not None:
        metrics["val_low_dice"] = dice(prediction.low_on_high > 0.5, label > 0)
    return metrics
