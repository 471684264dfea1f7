"""torchvision's ResNet + FPN detection backbone (backbone_utils.BackboneWithFPN, _resnet_fpn_extractor) over
fastbb's fused modules: the same modules under the same names (state_dict keys ``body.*`` and ``fpn.*``), the
same parameters frozen, the same random initialisation order, so that a model built with the same seed as
torchvision's has the same weights."""
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import backbone_utils as tv_backbone_utils

from fastbb._tracing import traced
from fastbb.nn.conv_bn_relu import _fused_conv_bn
from fastbb.nn.fpn import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

_STEM = ("conv1", "bn1", "relu")


class _FusedLayerGetter(IntermediateLayerGetter):
    """torchvision's IntermediateLayerGetter (same children, same keys) whose ResNet stem conv1 -> bn1 -> relu
    runs as one fused call; the other children (fused ResNet stages) run as they are."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = OrderedDict()
        names = list(self._modules)
        # NCHW in and out, channels_last between (see _runs_channels_last)
        channels_last = _runs_channels_last(self, x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        start = 0
        if (names[:3] == list(_STEM) and isinstance(self.relu, nn.ReLU)
                and not any(name in self.return_layers for name in _STEM)):
            x = _fused_conv_bn(self.conv1, self.bn1, x)
            start = 3
        for name in names[start:]:
            x = self._modules[name](x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x.contiguous() if channels_last else x
        return out


def _runs_channels_last(getter: nn.Module, x: Tensor) -> bool:
    """
    Whether the body runs channels_last: eager float32 CPU computation of contiguous images needing no autograd
    (inference, or training with the stem and stages frozen). oneDNN then runs each conv on its weight packed
    once, and the max pool vectorized over the channels: on R50 at 1x3x512x512 on a 2-core AVX-512 CPU the stem
    conv and max pool take 8 ms instead of 35, and the four stages 216 ms instead of 275 (NCHW: the Winograd
    conv and MKL's GEMMs). The returned maps are made NCHW again (3 ms there).
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in getter.parameters()))
    return (not needs_grad and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.is_contiguous() and not traced(x) and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and not torch.is_autocast_enabled("cpu")
            and not any(m.training for m in getter.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)))


class BackboneWithFPN(tv_backbone_utils.BackboneWithFPN):
    """
    torchvision's BackboneWithFPN: a FPN on top of a model's intermediate layers, with fastbb's fused stem
    and :class:`fastbb.nn.FeaturePyramidNetwork`. Same arguments, attributes and state_dict keys.

    Args:
        backbone (nn.Module): the model whose layers feed the FPN.
        return_layers (Dict[str, str]): the modules whose outputs are returned, and the names given to them.
        in_channels_list (List[int]): the channels of each returned feature map.
        out_channels (int): the channels of the FPN's maps.
        extra_blocks (ExtraFPNBlock, optional): extra FPN levels. Default: LastLevelMaxPool.
        norm_layer (Callable[..., nn.Module], optional): the FPN's norm layer. Default: None.
    """

    def __init__(self, backbone: nn.Module, return_layers: dict[str, str], in_channels_list: list[int],
                 out_channels: int, extra_blocks: ExtraFPNBlock | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        nn.Module.__init__(self)
        if extra_blocks is None:
            extra_blocks = LastLevelMaxPool()
        self.body = _FusedLayerGetter(backbone, return_layers=return_layers)
        self.fpn = FeaturePyramidNetwork(in_channels_list=in_channels_list, out_channels=out_channels,
                                         extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.out_channels = out_channels


def resnet_fpn_extractor(backbone: nn.Module, trainable_layers: int, returned_layers: list[int] | None = None,
                         extra_blocks: ExtraFPNBlock | None = None,
                         norm_layer: Callable[..., nn.Module] | None = None) -> BackboneWithFPN:
    """
    torchvision's ``_resnet_fpn_extractor``: freezes the backbone's parameters outside its last
    ``trainable_layers`` stages (5: all, the stem's BN included) and puts a FPN on the ``returned_layers``
    stages, with fastbb's modules.

    Args:
        backbone (ResNet): a torchvision-style ResNet (fastbb's or torchvision's).
        trainable_layers (int): in [0, 5].
        returned_layers (List[int], optional): stages in [1, 4] feeding the FPN. Default: [1, 2, 3, 4].
        extra_blocks (ExtraFPNBlock, optional): extra FPN levels. Default: LastLevelMaxPool.
        norm_layer (Callable[..., nn.Module], optional): the FPN's norm layer. Default: None.

    Returns:
        BackboneWithFPN: the backbone; its ``out_channels`` is 256.
    """
    if trainable_layers < 0 or trainable_layers > 5:
        raise ValueError(f"fastbb.models.detection: trainable_layers should be in the range [0,5], got "
                         f"{trainable_layers}")
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in backbone.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    if extra_blocks is None:
        extra_blocks = LastLevelMaxPool()
    if returned_layers is None:
        returned_layers = [1, 2, 3, 4]
    if min(returned_layers) <= 0 or max(returned_layers) >= 5:
        raise ValueError(f"fastbb.models.detection: each returned layer should be in the range [1,4], got "
                         f"{returned_layers}")
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}
    in_channels_stage2 = backbone.inplanes // 8
    in_channels_list = [in_channels_stage2 * 2 ** (i - 1) for i in returned_layers]
    return BackboneWithFPN(backbone, return_layers, in_channels_list, 256, extra_blocks=extra_blocks,
                           norm_layer=norm_layer)
