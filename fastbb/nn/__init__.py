"""Drop-in modules for torchvision / OpenMMLab layers."""
from fastbb.nn.box_coder import BoxCoder, DeltaXYWHBBoxCoder
from fastbb.nn.conv_bn_relu import ConvBNReLU2d, FrozenBatchNorm2d
from fastbb.nn.focal_loss import FocalLoss, SigmoidFocalLoss
from fastbb.nn.fpn import FPN, ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

__all__ = ["BoxCoder", "ConvBNReLU2d", "DeltaXYWHBBoxCoder", "ExtraFPNBlock", "FPN", "FeaturePyramidNetwork",
           "FocalLoss", "FrozenBatchNorm2d", "LastLevelMaxPool", "LastLevelP6P7", "SigmoidFocalLoss"]
