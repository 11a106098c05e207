"""The trainers kitspipe ships: the paper's network, the baseline it improves on, and the
cascade it replaces. Each differs from the others only in the hooks it overrides."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from kitspipe.devices import unwrap
from kitspipe.losses import DualResolutionLoss, DualTargets, LossTerms, SegmentationLoss
from kitspipe.networks.dual_resolution import DualResolutionUNet
from kitspipe.networks.unet3d import UNet3D
from kitspipe.trainers.base import Phase, Trainer


def build_dual_network(plans) -> DualResolutionUNet:
    n = plans.network
    return DualResolutionUNet(
        low_base_filters=plans.low.base_filters, high_base_filters=plans.high.base_filters,
        low_depth=plans.low.depth, high_depth=plans.high.depth, scale=plans.scale,
        high_input_size=plans.high.input_patch, low_input_size=plans.low.input_patch,
        mask_join=n.mask_join, mask_upsampling=n.mask_upsampling, mask_branch_filters=n.mask_branch_filters,
        classification=n.classification_head, head_conv_filters=n.head_conv_filters,
        head_fc_widths=n.head_fc, head_joint_widths=n.head_fc_after_volume,
        high_borders=plans.high.borders, low_borders=plans.low.borders, normalisation=n.normalisation)


def dual_targets(batch: dict[str, torch.Tensor]) -> DualTargets:
    return DualTargets(low=batch["low_target"], high=batch["high_target"], tumour_present=batch["tumour_present"])


class DualResolutionTrainer(Trainer):
    """The paper: one network, two phases (section 3).

    Phase ``low``: the low-resolution U-Net alone until its whole-case validation Dice reaches
    ``pretraining_dice_threshold`` (0.90 in the paper). Phase ``full``: the whole network with
    the low-resolution U-Net frozen except its last ``trainable_low_blocks`` blocks; gradients
    of the high-resolution loss still reach those blocks.
    """

    def build_network(self) -> nn.Module:
        return build_dual_network(self.plans)

    def build_loss(self) -> nn.Module:
        loss = self.plans.loss
        return DualResolutionLoss(loss.high_weight, loss.classification_weight, loss.low_weight, loss.dice_weight,
                                  loss.ce_weight, loss.topk_fraction, loss.high_positive_weights,
                                  loss.low_positive_weight)

    def phases(self) -> list[Phase]:
        t = self.plans.training
        phases = []
        if t.low_resolution_pretraining:
            phases.append(Phase("low", t.pretraining_max_epochs, "val_low_dice", stop_at=t.pretraining_dice_threshold))
        phases.append(Phase("full", t.max_epochs, "val_score", patience=t.patience))
        return phases

    def frozen_low_blocks(self, network: DualResolutionUNet) -> list[nn.Module]:
        blocks = unwrap(network).low.blocks()
        keep = self.plans.training.trainable_low_blocks
        return blocks[: max(0, len(blocks) - keep)]

    def trainable_parameters(self, network: nn.Module, phase: Phase) -> Iterable[nn.Parameter]:
        for parameter in network.parameters():
            parameter.requires_grad_(True)
        if phase.name == "low":
            return list(unwrap(network).low.parameters())
        if self.plans.training.low_resolution_pretraining:
            for block in self.frozen_low_blocks(network):
                for parameter in block.parameters():
                    parameter.requires_grad_(False)
        return [p for p in network.parameters() if p.requires_grad]

    def set_train_mode(self, network: nn.Module, phase: Phase) -> None:
        network.train()
        core = unwrap(network)
        if phase.name != "low" and self.plans.training.low_resolution_pretraining:
            for block in self.frozen_low_blocks(core):
                block.eval()

    def loss(self, network: nn.Module, loss_fn: nn.Module, batch: dict[str, torch.Tensor], phase: Phase) -> LossTerms:
        if phase.name == "low":
            low = loss_fn.low_term(network(None, batch["low_image"], low_only=True), batch["low_target"])
            zero = low.new_zeros(())
            return LossTerms(total=low, high=zero, low=low, classification=zero)
        return loss_fn(network(batch["high_image"], batch["low_image"]), dual_targets(batch))

    def validation_metrics(self, network: nn.Module, case, phase: Phase, device: torch.device) -> dict[str, float]:
        from kitspipe.training.validation import whole_case_metrics

        return whole_case_metrics(network, case, self.plans, device, low_only=phase.name == "low")


class TwoStageCascadeTrainer(DualResolutionTrainer):
    """The cascade the paper replaces: the low-resolution network is trained alone, then frozen
    completely, and the high-resolution network learns on its detached output."""

    def phases(self) -> list[Phase]:
        t = self.plans.training
        return [Phase("low", t.pretraining_max_epochs, "val_low_dice", stop_at=t.pretraining_dice_threshold),
                Phase("full", t.max_epochs, "val_score", patience=t.patience)]

    def trainable_parameters(self, network: nn.Module, phase: Phase) -> Iterable[nn.Parameter]:
        for parameter in network.parameters():
            parameter.requires_grad_(True)
        if phase.name == "low":
            return list(unwrap(network).low.parameters())
        for parameter in unwrap(network).low.parameters():
            parameter.requires_grad_(False)
        return [p for p in network.parameters() if p.requires_grad]

    def set_train_mode(self, network: nn.Module, phase: Phase) -> None:
        network.train()
        if phase.name != "low":
            core = unwrap(network)
            core.low.eval()  # a frozen first stage, batch norm statistics included

    def loss(self, network: nn.Module, loss_fn: nn.Module, batch: dict[str, torch.Tensor], phase: Phase) -> LossTerms:
        if phase.name == "low":
            return super().loss(network, loss_fn, batch, phase)
        # The first stage is fixed: its loss term is computed without gradient, so it is
        # reported in the log but changes nothing.
        output = network(batch["high_image"], batch["low_image"], frozen_low=True)
        return loss_fn(output, dual_targets(batch))


class UNet3DTrainer(Trainer):
    """The baseline: a single 3D U-Net on the high-resolution patch, 0.2 Dice + 0.8 top-k BCE."""

    def build_network(self) -> nn.Module:
        return UNet3D(1, 2, self.plans.high.base_filters, self.plans.high.depth, borders=self.plans.high.borders,
                      normalisation=self.plans.network.normalisation)

    def build_loss(self) -> nn.Module:
        loss = self.plans.loss
        return SegmentationLoss(loss.dice_weight, loss.ce_weight, loss.topk_fraction, loss.high_positive_weights)

    def loss(self, network: nn.Module, loss_fn: nn.Module, batch: dict[str, torch.Tensor], phase: Phase) -> LossTerms:
        high = loss_fn(network(batch["high_image"]).logits, batch["high_target"])
        zero = high.new_zeros(())
        return LossTerms(total=high, high=high, low=zero, classification=zero)
