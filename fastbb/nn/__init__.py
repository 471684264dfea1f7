"""Drop-in modules for torchvision / OpenMMLab layers."""
from fastbb.nn.box_coder import BoxCoder, DeltaXYWHBBoxCoder
from fastbb.nn.focal_loss import FocalLoss, SigmoidFocalLoss
from fastbb.nn.fpn import FPN, ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

__all__ = ["BoxCoder", "DeltaXYWHBBoxCoder", "ExtraFPNBlock", "FPN", "FeaturePyramidNetwork", "FocalLoss",
           "LastLevelMaxPool", "LastLevelP6P7", "SigmoidFocalLoss"]
