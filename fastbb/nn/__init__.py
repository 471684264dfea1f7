"""Drop-in modules for torchvision / OpenMMLab layers."""
from fastbb.nn.box_coder import BoxCoder, DeltaXYWHBBoxCoder
from fastbb.nn.focal_loss import FocalLoss, SigmoidFocalLoss

__all__ = ["BoxCoder", "DeltaXYWHBBoxCoder", "FocalLoss", "SigmoidFocalLoss"]
