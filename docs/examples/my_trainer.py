"""A trainer plugin: the single 3D U-Net baseline trained with soft Dice only.

Use it without editing kitspipe:

    kitspipe train WORK --fold 0 --plugin docs/examples/my_trainer.py --trainer DiceOnlyUNetTrainer

Subclassing registers the class under its name; overriding one hook is the whole variant.
"""

from torch import nn

from kitspipe.losses import SegmentationLoss
from kitspipe.trainers.builtin import UNet3DTrainer


class DiceOnlyUNetTrainer(UNet3DTrainer):
    def build_loss(self) -> nn.Module:
        return SegmentationLoss(dice_weight=1.0, ce_weight=0.0, topk_fraction=1.0)
