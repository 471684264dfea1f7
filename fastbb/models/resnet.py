"""torchvision's ResNet with every conv -> BN [-> ReLU] (and the residual add) run as one conv_bn_relu call.

Same constructor arguments (incl. replace_stride_with_dilation and norm_layer), same module tree and
state_dict keys, same outputs with the same weights, in train and eval mode. No weights are downloaded:
`weights=` takes a state_dict or a local file path.
"""
import os

import torch
from torch import nn

from fastbb.nn.conv_bn_relu import fused_conv_bn


def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1):
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
        return fused_conv_bn(layers[0], layers[1], x, relu=False)
    return downsample(x)


def basic_block_forward(block, x):
    """torchvision BasicBlock.forward, fused: two conv_bn_relu calls, the second with the residual."""
    out = fused_conv_bn(block.conv1, block.bn1, x)
    return fused_conv_bn(block.conv2, block.bn2, out, residual=_shortcut(block, x))


def bottleneck_forward(block, x):
    """torchvision Bottleneck.forward, fused: three conv_bn_relu calls, the last with the residual."""
    out = fused_conv_bn(block.conv1, block.bn1, x)
    out = fused_conv_bn(block.conv2, block.bn2, out)
    return fused_conv_bn(block.conv3, block.bn3, out, residual=_shortcut(block, x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    forward = basic_block_forward


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None):
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

    forward = bottleneck_forward


def resnet_forward_features(model, x):
    """The stem and layer1..4 of a torchvision-style ResNet, the stem fused; returns C2..C5."""
    x = model.maxpool(fused_conv_bn(model.conv1, model.bn1, x))
    c2 = model.layer1(x)
    c3 = model.layer2(c2)
    c4 = model.layer3(c3)
    return c2, c3, c4, model.layer4(c4)


def resnet_forward(model, x):
    """torchvision ResNet.forward, fused.

    An inference forward (eval, no autograd) of contiguous float32 images on the CPU runs channels_last
    inside: oneDNN then runs every conv on its weight packed once, where for NCHW it reorders activations
    into and out of its blocked layout at each conv (ResNet-50 at 1x3x224x224 on a 2-core AVX2 CPU: 1.2x).
    The logits are a 2-D tensor either way; their error against a float64 run stays that of torchvision's
    own channels_last forward (tested). resnet_forward_features keeps the caller's layout.
    """
    if (not model.training and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and x.is_contiguous() and not torch.compiler.is_compiling()):
        x = x.contiguous(memory_format=torch.channels_last)
    x = resnet_forward_features(model, x)[-1]
    return model.fc(torch.flatten(model.avgpool(x), 1))


class ResNet(nn.Module):
    """torchvision.models.ResNet, fused. `forward_features(x)` returns the C2..C5 maps."""

    def __init__(self, block, layers, num_classes=1000, zero_init_residual=False, groups=1, width_per_group=64,
                 replace_stride_with_dilation=None, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, got "
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

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
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

    forward_features = resnet_forward_features
    forward = resnet_forward


def _resnet(block, layers, weights, **kwargs):
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        if isinstance(weights, (str, os.PathLike)):
            weights = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(weights, dict):
            raise TypeError(f"weights must be a state_dict or a path to one, got {type(weights).__name__}")
        model.load_state_dict(weights)
    return model


def resnet18(*, weights=None, **kwargs):
    return _resnet(BasicBlock, [2, 2, 2, 2], weights, **kwargs)


def resnet34(*, weights=None, **kwargs):
    return _resnet(BasicBlock, [3, 4, 6, 3], weights, **kwargs)


def resnet50(*, weights=None, **kwargs):
    return _resnet(Bottleneck, [3, 4, 6, 3], weights, **kwargs)


def resnet101(*, weights=None, **kwargs):
    return _resnet(Bottleneck, [3, 4, 23, 3], weights, **kwargs)


def resnet152(*, weights=None, **kwargs):
    return _resnet(Bottleneck, [3, 8, 36, 3], weights, **kwargs)
