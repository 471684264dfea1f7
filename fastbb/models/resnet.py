"""torchvision's ResNet with every conv -> BN [-> ReLU] (and the residual add) run as one conv_bn_relu call.

Same constructor arguments (incl. replace_stride_with_dilation and norm_layer), same module tree and
state_dict keys, same outputs with the same weights, in train and eval mode. The builders take torchvision's
`weights=` (its enum members and their names, loaded through torchvision's weights API) and also a state_dict
or a local file path.
"""
import enum
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fastbb._tracing import not_scriptable, traced
from fastbb.nn.conv_bn_relu import _fused_conv_bn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """
    torchvision's 3x3 convolution with padding (= dilation), without bias.

    Args:
        in_planes (int): input channels.
        out_planes (int): output channels.
        stride (int): the stride. Default: 1.
        groups (int): the groups. Default: 1.
        dilation (int): the dilation, and the padding. Default: 1.

    Returns:
        nn.Conv2d: the convolution.
    """
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """
    torchvision's 1x1 convolution, without bias.

    Args:
        in_planes (int): input channels.
        out_planes (int): output channels.
        stride (int): the stride. Default: 1.

    Returns:
        nn.Conv2d: the convolution.
    """
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _shortcut(block, x):
    """The identity branch: x, or the downsample's [AvgPool2d ->] conv -> BN, the pair fused."""
    downsample = block.downsample
    if downsample is None:
        return x
    layers = list(downsample) if isinstance(downsample, nn.Sequential) else []
    if len(layers) == 3 and isinstance(layers[0], nn.AvgPool2d):  # mmdet's avg_down
        x = layers[0](x)
        layers = layers[1:]
    if len(layers) == 2 and isinstance(layers[0], nn.Conv2d):
        return _fused_conv_bn(layers[0], layers[1], x, relu=False)
    return downsample(x)


def _basic_block_forward(self, x: Tensor) -> Tensor:
    """
    torchvision BasicBlock.forward, fused: two conv_bn_relu calls, the second with the residual.

    Args:
        x (Tensor[N, C, H, W]): the input.

    Returns:
        Tensor: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).
    """
    out = _fused_conv_bn(self.conv1, self.bn1, x)
    return _fused_conv_bn(self.conv2, self.bn2, out, residual=_shortcut(self, x))


def _bottleneck_forward(self, x: Tensor) -> Tensor:
    """
    torchvision Bottleneck.forward, fused: three conv_bn_relu calls, the last with the residual.

    Args:
        x (Tensor[N, C, H, W]): the input.

    Returns:
        Tensor: the block's output, relu(bn3(conv3(...)) + shortcut(x)).
    """
    out = _fused_conv_bn(self.conv1, self.bn1, x)
    out = _fused_conv_bn(self.conv2, self.bn2, out)
    return _fused_conv_bn(self.conv3, self.bn3, out, residual=_shortcut(self, x))


@not_scriptable
class BasicBlock(nn.Module):
    """
    torchvision's ResNet BasicBlock (two 3x3 convs), its conv -> BN -> ReLU chains and residual add fused.

    Args:
        inplanes (int): input channels.
        planes (int): output channels.
        stride (int): the first conv's stride. Default: 1.
        downsample (nn.Module, optional): the shortcut's conv -> BN, where the shape changes.
        groups (int): must be 1. Default: 1.
        base_width (int): must be 64. Default: 64.
        dilation (int): must be 1. Default: 1.
        norm_layer (Callable[..., nn.Module], optional): the norm layer. Default: nn.BatchNorm2d.
    """
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("fastbb.models.BasicBlock: BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("fastbb.models.BasicBlock: Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    forward = _basic_block_forward


@not_scriptable
class Bottleneck(nn.Module):
    """
    torchvision's ResNet Bottleneck (1x1, 3x3, 1x1 convs, the stride on the 3x3: ResNet V1.5), its
    conv -> BN -> ReLU chains and residual add fused.

    Args:
        inplanes (int): input channels.
        planes (int): the width of the 3x3 conv at groups=1, base_width=64; the output has
            ``planes * 4`` channels.
        stride (int): the 3x3 conv's stride. Default: 1.
        downsample (nn.Module, optional): the shortcut's conv -> BN, where the shape changes.
        groups (int): the 3x3 conv's groups (ResNeXt). Default: 1.
        base_width (int): the width per group (Wide ResNet, ResNeXt). Default: 64.
        dilation (int): the 3x3 conv's dilation. Default: 1.
        norm_layer (Callable[..., nn.Module], optional): the norm layer. Default: nn.BatchNorm2d.
    """
    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    forward = _bottleneck_forward


def runs_channels_last(model: nn.Module, x: Tensor) -> bool:
    """Whether a ResNet's forward of x runs channels_last inside: contiguous float32 images on the CPU, in
    inference (eval, no autograd) and in training (train mode, autograd), not while torch.fx, torch.compile
    or torch.export trace it (they keep the caller's layout and choose their own).

    oneDNN, which runs the CPU convs that fastbb's own kernels do not take, works in a blocked layout: for
    NCHW activations it reorders into and out of it at every conv and its backward, for channels_last hardly,
    and PyTorch's max pooling and BatchNorm are faster there too. Measured on 2-core CPUs, ResNet-50: inference
    at 1x3x224x224 1.2x (AVX2); a training step at 8x3x224x224, forward and backward (AVX-512), 1.2x for
    torchvision's model and 1.1x for fastbb's, whose NCHW Winograd and GEMM convs then step aside; mmdet's
    RetinaNet training step (frozen stem and BN) unchanged. Eval with autograd keeps the caller's layout.
    """
    return (not traced(x) and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous()
            and model.training == torch.is_grad_enabled())


def _resnet_forward_features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """
    The stem and layer1..4 of a torchvision-style ResNet, the stem fused.

    Args:
        x (Tensor[N, 3, H, W]): the images.

    Returns:
        Tuple[Tensor, Tensor, Tensor, Tensor]: the outputs C2, C3, C4, C5 of layer1..4.
    """
    x = self.maxpool(_fused_conv_bn(self.conv1, self.bn1, x))
    c2 = self.layer1(x)
    c3 = self.layer2(c2)
    c4 = self.layer3(c3)
    return c2, c3, c4, self.layer4(c4)


def _resnet_forward(self, x: Tensor) -> Tensor:
    """
    torchvision ResNet.forward, fused.

    Contiguous float32 images on the CPU run channels_last inside, in inference and in training (see
    runs_channels_last). The logits are a 2-D tensor either way; their error against a float64 run stays
    that of torchvision's own channels_last forward (tested). forward_features keeps the caller's layout.

    Args:
        x (Tensor[N, 3, H, W]): the images.

    Returns:
        Tensor[N, num_classes]: the logits.
    """
    if runs_channels_last(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
    x = _resnet_forward_features(self, x)[-1]
    return self.fc(torch.flatten(self.avgpool(x), 1))


@not_scriptable
class ResNet(nn.Module):
    """
    torchvision.models.ResNet with every conv -> BN [-> ReLU] (and the residual add) fused: same module
    tree, state_dict keys and outputs. ``forward(x)`` returns the logits, ``forward_features(x)`` the C2..C5
    maps.

    Args:
        block (type[BasicBlock] or type[Bottleneck]): the residual block.
        layers (List[int]): the number of blocks of each of the four stages.
        num_classes (int): the classifier's outputs. Default: 1000.
        zero_init_residual (bool): zero-initialize the last BN of each residual branch, so that each block
            starts as an identity. Default: False.
        groups (int): the 3x3 convs' groups (ResNeXt). Default: 1.
        width_per_group (int): the width per group (Wide ResNet, ResNeXt). Default: 64.
        replace_stride_with_dilation (List[bool], optional): for each of stages 2..4, whether its stride is
            replaced by a dilation. Default: None (no stage).
        norm_layer (Callable[..., nn.Module], optional): the norm layer. Default: nn.BatchNorm2d.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: list[bool] | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("fastbb.models.ResNet: replace_stride_with_dilation should be None or a 3-element "
                             "tuple, got "
                             f"{replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    forward_features = _resnet_forward_features
    forward = _resnet_forward


# What `weights=` takes: a member of torchvision's weights enum (ResNet50_Weights.IMAGENET1K_V2) or its name
# ("DEFAULT", "IMAGENET1K_V1"), a state_dict, the path of a file holding one, or None.
_Weights = enum.Enum | str | Mapping[str, Tensor] | os.PathLike | None

# The torchvision weights enum of each builder.
_WEIGHTS_ENUMS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
                  "resnet101": "ResNet101_Weights", "resnet152": "ResNet152_Weights"}


def _weights_enum(builder: str) -> type[enum.Enum] | None:
    """torchvision's weights enum of `builder`, or None without torchvision (weights are then a state_dict
    or a file)."""
    try:
        from torchvision import models
    except ImportError:
        return None
    return getattr(models, _WEIGHTS_ENUMS[builder])


def _names_enum_member(weights_enum: type[enum.Enum] | None, name: str) -> bool:
    """Whether `name` is a member's name in torchvision's spelling ("DEFAULT" or "ResNet50_Weights.DEFAULT")."""
    return weights_enum is not None and name.removeprefix(f"{weights_enum.__name__}.") in weights_enum.__members__


def _state_dict(builder: str, weights: _Weights, progress: bool, kwargs: dict[str, Any]) -> Mapping[str, Tensor] | None:
    """The state_dict `weights` stands for (None for none). torchvision's weights are resolved by its enum's
    ``verify`` (raising what torchvision's builder raises: KeyError for a name the enum lacks, TypeError for
    another enum's member), loaded through its weights API (torch.hub's cache under
    $TORCH_HOME/hub/checkpoints, downloaded there when missing), and set ``num_classes`` in kwargs to their
    categories' count, as torchvision's builders do. A str that names no member but a file is that file."""
    if weights is None or isinstance(weights, Mapping):
        return weights
    weights_enum = _weights_enum(builder)
    names_a_member = isinstance(weights, str) and _names_enum_member(weights_enum, weights)
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and not names_a_member
                                            and os.path.isfile(weights)):
        return torch.load(weights, map_location="cpu", weights_only=True)
    enum_name = _WEIGHTS_ENUMS[builder]
    if not isinstance(weights, (str, enum.Enum)):
        raise TypeError(f"fastbb.models.{builder}: weights must be a {enum_name} member or name, a state_dict or "
                        f"the path of one, got {type(weights).__name__}")
    if weights_enum is None:
        raise KeyError(f"fastbb.models.{builder}: weights {weights!r} is not a file, and torchvision, whose "
                       f"{enum_name} it may name, is not installed")
    try:
        weights = weights_enum.verify(weights)
    except (KeyError, TypeError, ValueError) as error:
        detail = (f"weights {weights!r} is neither a {enum_name} name ({', '.join(weights_enum.__members__)}) "
                  f"nor a file" if isinstance(weights, str) else f"weights: {error}")
        raise type(error)(f"fastbb.models.{builder}: {detail}") from None
    categories = len(weights.meta["categories"])
    if kwargs.setdefault("num_classes", categories) != categories:
        raise ValueError(f"fastbb.models.{builder}: the parameter 'num_classes' expected value {categories} "
                         f"(the categories of {weights}) but got {kwargs['num_classes']} instead")
    return weights.get_state_dict(progress=progress, check_hash=True)


def _legacy_weights(builder: str, weights: Any, kwargs: dict[str, Any]) -> Any:
    """torchvision's deprecated forms, with its deprecation warning: ``pretrained=True`` / ``False`` (when
    weights is not given) and ``weights=True`` / ``False`` stand for ``IMAGENET1K_V1`` / None, as
    torchvision's builders take them. (``pretrained`` beside a given ``weights`` stays in kwargs, and the
    model raises the TypeError torchvision's does.)"""
    enum_name = _WEIGHTS_ENUMS[builder]
    if isinstance(weights, bool):
        pretrained, given = weights, "weights"
    elif weights is None and "pretrained" in kwargs:
        pretrained, given = kwargs.pop("pretrained"), "pretrained"
    else:
        return weights
    equivalent = f"weights={enum_name}.IMAGENET1K_V1" if pretrained else "weights=None"
    warnings.warn(f"fastbb.models.{builder}: {given}={pretrained!r} is deprecated (as in torchvision since "
                  f"0.13); it is equivalent to {equivalent}", UserWarning, stacklevel=4)
    return "IMAGENET1K_V1" if pretrained else None


def _resnet(builder: str, block: type[BasicBlock | Bottleneck], layers: list[int], weights: _Weights,
            progress: bool, **kwargs: Any) -> ResNet:
    weights = _legacy_weights(builder, weights, kwargs)
    state_dict = _state_dict(builder, weights, progress, kwargs)
    model = ResNet(block, layers, **kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


_BUILDER_ARGS = """
    Args:
        weights ({enum} or str or dict[str, Tensor] or os.PathLike, optional): the pretrained weights:
            a member of torchvision's ``{enum}`` or its name (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...),
            loaded through torchvision's weights API as torchvision's builder loads it (from torch.hub's
            cache under ``$TORCH_HOME/hub/checkpoints``, downloaded there when missing; ``num_classes``
            then follows the weights' categories); or a state_dict (torchvision's keys) or the path of a file
            holding one. None leaves the model randomly initialized. torchvision's deprecated forms
            ``pretrained=True`` / ``weights=True`` (IMAGENET1K_V1) and their ``False`` (None) work too, with
            its deprecation warning. Default: None.
        progress (bool): whether a download shows a progress bar. Default: True.
        **kwargs: passed to :class:`ResNet` (``num_classes``, ``norm_layer``,
            ``replace_stride_with_dilation``, ...).

    Returns:
        ResNet: the model.
"""


def resnet18(*, weights: _Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__,
    as torchvision.models.resnet18, fused.
    """
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights: _Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__,
    as torchvision.models.resnet34, fused.
    """
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights: _Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__,
    as torchvision.models.resnet50 (the stride on the 3x3 conv: ResNet V1.5), fused.
    """
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights: _Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__,
    as torchvision.models.resnet101, fused.
    """
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights: _Weights = None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 from `Deep Residual Learning for Image Recognition <https://arxiv.org/abs/1512.03385>`__,
    as torchvision.models.resnet152, fused.
    """
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], weights, progress, **kwargs)


for _builder in (resnet18, resnet34, resnet50, resnet101, resnet152):
    if _builder.__doc__ is not None:  # None under python -OO
        _builder.__doc__ += _BUILDER_ARGS.format(enum=_WEIGHTS_ENUMS[_builder.__name__])
