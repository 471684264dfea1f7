"""State-dict compatible model builders whose conv -> BN -> ReLU chains run fused."""
from fastbb.models.mm_classifier import (ClsHead, ClsPrediction, CrossEntropyLoss, GlobalAveragePooling,
                                         ImageClassifier, LinearClsHead)
from fastbb.models.mm_resnet import (MMPretrainResNet, MMPretrainResNetV1c, MMPretrainResNetV1d, MMResNet, MMSegResNet,
                                     MMSegResNetV1c, MMSegResNetV1d, ResNetV1c, ResNetV1d)
from fastbb.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152

__all__ = ["BasicBlock", "Bottleneck", "MMPretrainResNet", "MMPretrainResNetV1c", "MMPretrainResNetV1d", "MMResNet",
           "MMSegResNet", "MMSegResNetV1c", "MMSegResNetV1d", "ResNet", "ResNetV1c", "ResNetV1d", "resnet18",
           "resnet34", "resnet50", "resnet101", "resnet152"]
__all__ += ["ClsHead", "ClsPrediction", "CrossEntropyLoss", "GlobalAveragePooling", "ImageClassifier",
            "LinearClsHead"]


def __getattr__(name):
    # fastbb.models.detection needs torchvision: imported on first use, not with fastbb.
    if name == "detection":
        import importlib
        return importlib.import_module("fastbb.models.detection")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
