"""Detection models with torchvision's builders, arguments and state_dict keys, fused."""
from fastbb.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_extractor
from fastbb.models.detection.retinanet import (AnchorGenerator, RetinaNet, RetinaNet_ResNet50_FPN_V2_Weights,
                                               RetinaNet_ResNet50_FPN_Weights, RetinaNetClassificationHead,
                                               RetinaNetHead, RetinaNetRegressionHead, retinanet_resnet50_fpn,
                                               retinanet_resnet50_fpn_v2)

__all__ = ["AnchorGenerator", "BackboneWithFPN", "RetinaNet", "RetinaNetClassificationHead", "RetinaNetHead",
           "RetinaNetRegressionHead", "RetinaNet_ResNet50_FPN_Weights",
           "RetinaNet_ResNet50_FPN_V2_Weights", "resnet_fpn_extractor", "retinanet_resnet50_fpn",
           "retinanet_resnet50_fpn_v2"]
