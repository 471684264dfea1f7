"""Drop-in modules for torchvision / OpenMMLab layers."""
from fastbb.nn.box_coder import BoxCoder, DeltaXYWHBBoxCoder

__all__ = ["BoxCoder", "DeltaXYWHBBoxCoder"]
