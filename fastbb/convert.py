"""fastbb.convert(model): run an existing model's conv -> BN [-> ReLU] chains fused, in place.

What it swaps (state_dict keys, parameters and outputs stay the same; only forwards change):
- ResNet blocks (torchvision's and OpenMMLab's BasicBlock / Bottleneck: conv1/bn1, conv2/bn2[, conv3/bn3]
  and a conv -> BN downsample): their forward becomes the fused one, the residual add and the last ReLU
  inside the last conv_bn_relu call. OpenMMLab blocks with plugins or a non-BN norm are left alone.
- a torchvision ResNet (with its `fc`): its forward, so the stem conv1 -> bn1 -> relu is fused too.
- nn.Sequential(Conv2d, BatchNorm2d / SyncBatchNorm / FrozenBatchNorm2d[, ReLU]) (torchvision's
  Conv2dNormActivation, stems, downsample pairs outside ResNet blocks): replaced by a ConvBNReLU2d holding
  the same modules under the same names.
- torchvision detection models: FeaturePyramidNetwork (its forward becomes the fused one), the stem of a
  ResNet body (IntermediateLayerGetter), RetinaNet (anchors computed once per shape, the training loss
  and the post-processing for the whole batch at once; see fastbb.models.detection.RetinaNet) and its
  RetinaNetHead when its branches are torchvision's (large levels channels_last in CPU inference; see
  fastbb.models.detection.retinanet_head).
"""
import functools
import types

from torch import nn

from fastbb._tracing import not_scriptable_error
from fastbb.models.resnet import _basic_block_forward, _bottleneck_forward, _resnet_forward
from fastbb.nn.conv_bn_relu import ConvBNReLU2d, _fusable


def _has(module, *names):
    return all(hasattr(module, name) for name in names)


def _block_kind(module):
    """'Bottleneck' / 'BasicBlock' when module is a ResNet block whose forward the fused one reproduces."""
    kind = type(module).__name__
    if getattr(module, "with_plugins", False) or getattr(module, "with_cp", False):
        return None
    if kind == "Bottleneck" and _has(module, "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample") \
            and all(_fusable(module.get_submodule(c), module.get_submodule(b))
                    for c, b in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))):
        return kind
    if kind == "BasicBlock" and _has(module, "conv1", "bn1", "conv2", "bn2", "downsample") \
            and all(_fusable(module.get_submodule(c), module.get_submodule(b)) for c, b in (("conv1", "bn1"),
                                                                                          ("conv2", "bn2"))):
        return kind
    return None


def _sequential_chain(module):
    """The (conv, bn, relu or None) of an nn.Sequential conv -> BN [-> ReLU], else None."""
    # Subclasses that keep Sequential's forward (torchvision's Conv2dNormActivation) count too.
    if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward \
            or len(module) not in (2, 3):
        return None
    children = list(module)
    if not _fusable(children[0], children[1]):
        return None
    if len(children) == 3 and not isinstance(children[2], nn.ReLU):
        return None
    return children[0], children[1], children[2] if len(children) == 3 else None


def _refuse_scripting(module, name):
    """torch.jit.script of the module (or of a model holding it) raises an error that says why and what to use,
    rather than failing inside the fused forward it was given. (A partial of a module-level function, so the
    model still pickles.)"""
    module.__prepare_scriptable__ = functools.partial(_raise_not_scriptable, type(module).__name__, name)


def _raise_not_scriptable(kind, name):
    raise not_scriptable_error(f"fastbb.convert: {kind} {name or '(the model)'}",
                               "its forward was replaced by fastbb's fused forward, which runs Python TorchScript "
                               "cannot compile (script the model before converting it to keep it unfused)")


def _convert_detection(model, report):
    """torchvision's detection parts: FeaturePyramidNetwork (fused merges), a ResNet body's stem, RetinaNet
    (cached anchors, the batched loss and post-processing) and its head's branches (large levels channels_last
    in CPU inference). Nothing without torchvision."""
    try:
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
        from torchvision.ops import FeaturePyramidNetwork as TorchvisionFPN
    except ImportError:
        return
    from fastbb.models.detection.backbone_utils import _FusedLayerGetter
    from fastbb.models.detection.retinanet import (AnchorGenerator, RetinaNet, _TorchvisionClassificationHead,
                                                   _TorchvisionHead, _TorchvisionRegressionHead,
                                                   _TorchvisionRetinaNet)
    from fastbb.models.detection.retinanet_head import RetinaNetClassificationHead, RetinaNetRegressionHead
    from fastbb.nn.fpn import FeaturePyramidNetwork

    for name, module in list(model.named_modules()):
        label = name or "(model)"
        if type(module) is TorchvisionFPN:
            module.forward = types.MethodType(FeaturePyramidNetwork.forward, module)
            report.append(f"{label}: FeaturePyramidNetwork (fused lateral conv + upsample + add merges)")
        elif type(module) is IntermediateLayerGetter and list(module._modules)[:3] == ["conv1", "bn1", "relu"] \
                and _fusable(module.conv1, module.bn1):
            module.forward = types.MethodType(_FusedLayerGetter.forward, module)
            report.append(f"{label}: IntermediateLayerGetter stem conv1 + bn1 + relu")
        elif type(module) is _TorchvisionRetinaNet:
            module.compute_loss = types.MethodType(RetinaNet.compute_loss, module)
            module.postprocess_detections = types.MethodType(RetinaNet.postprocess_detections, module)
            parts = "batched loss and post-processing"
            if type(module.anchor_generator) is TorchvisionAnchorGenerator:
                module.anchor_generator = AnchorGenerator(module.anchor_generator.sizes,
                                                          module.anchor_generator.aspect_ratios)
                parts = "anchors cached per shape, " + parts
            report.append(f"{label}: RetinaNet ({parts})")
        elif type(module) is _TorchvisionHead \
                and type(module.classification_head) is _TorchvisionClassificationHead \
                and type(module.regression_head) is _TorchvisionRegressionHead:
            for branch_name, fastbb_class in (("classification_head", RetinaNetClassificationHead),
                                              ("regression_head", RetinaNetRegressionHead)):
                branch = getattr(module, branch_name)
                branch.forward = types.MethodType(fastbb_class.forward, branch)
                _refuse_scripting(branch, f"{name}.{branch_name}" if name else branch_name)
            report.append(f"{label}: RetinaNetHead (large levels channels_last in CPU inference)")
        else:
            continue
        _refuse_scripting(module, name)


def convert(model: nn.Module) -> list[str]:
    """
    Fuses, in place, the conv -> BN [-> ReLU] chains of a torchvision or OpenMMLab model (see the module
    docstring for what is swapped). The model keeps its parameters, buffers and state_dict keys and
    computes the same outputs; only forwards change. The converted model works under torch.export,
    torch.compile and torch.fx (which traces the root module's class forward: a converted ResNet traced as
    the root keeps its stem unfused); torch.jit.script of it raises fastbb's NotScriptableError, which says so.

    Args:
        model (nn.Module): the model to convert.

    Returns:
        list[str]: what was converted, one ``"name: what"`` line each (also useful to check that nothing
        was missed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastbb.convert: model must be an nn.Module, got {type(model).__name__}")
    report = []
    blocks = set()
    for name, module in model.named_modules():
        kind = _block_kind(module)
        if kind is not None:
            forward = _bottleneck_forward if kind == "Bottleneck" else _basic_block_forward
            module.forward = types.MethodType(forward, module)
            _refuse_scripting(module, name)
            blocks.add(id(module))
            report.append(f"{name}: {kind} (conv + BN + ReLU fused, residual in the last)")
        elif type(module).__name__ == "ResNet" and _has(module, "conv1", "bn1", "maxpool", "layer1", "layer2", "layer3",
                                                         "layer4", "avgpool", "fc") \
                and _fusable(module.conv1, module.bn1):
            module.forward = types.MethodType(_resnet_forward, module)
            _refuse_scripting(module, name)
            report.append(f"{name or '(model)'}: ResNet stem conv1 + bn1 + relu")
    _convert_detection(model, report)
    for parent_name, parent in list(model.named_modules()):
        if id(parent) in blocks:
            continue  # its downsample pair is fused by the block's forward
        for child_name, child in list(parent.named_children()):
            chain = _sequential_chain(child)
            if chain is None:
                continue
            names = tuple(child_name for child_name, _ in child.named_children()) + ("2",) * (3 - len(child))
            setattr(parent, child_name, ConvBNReLU2d.from_modules(*chain, names=names[:3]))
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            report.append(f"{full}: Sequential(Conv2d, {type(chain[1]).__name__}{', ReLU' if chain[2] else ''})")
    return report
