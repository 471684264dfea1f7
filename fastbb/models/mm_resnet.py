"""OpenMMLab's ResNet backbones (mmdet / mmseg / mmpretrain `ResNet`, `ResNetV1c`, `ResNetV1d`), fused.

Same constructor arguments, module tree and state_dict keys as mmdet's and mmseg's (`conv1`, `bn1`,
`layerX.Y.conv{1,2,3}`, `layerX.Y.bn{1,2,3}`, `layerX.0.downsample.{0,1}` or, with avg_down,
`downsample.{1,2}` after the AvgPool2d; a deep stem is `stem.{0,1,3,4,6,7}`), so their checkpoints load
unchanged; `forward` returns the tuple of the `out_indices` stage outputs. Every conv -> BN [-> ReLU]
(and the residual add) runs as one fastbb.ops.conv_bn_relu call.

Defaults follow mmdet (`norm_eval=True`); mmseg configs pass `norm_eval=False` themselves, and its
`contract_dilation` and `multi_grid` are accepted here too. Registered for
fastbb.build(dict(type='ResNet' | 'ResNetV1c' | 'ResNetV1d', ...)).
"""
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import checkpoint

from fastbb._registry import register
from fastbb._tracing import not_scriptable
from fastbb.models.resnet import _basic_block_forward, _bottleneck_forward
from fastbb.nn.conv_bn_relu import _fused_conv_bn
from fastbb.ops._common import ValueAssertionError

_NORM_TYPES = {"BN": nn.BatchNorm2d, "BN2d": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm}
_NORM_KEYS = {"type", "requires_grad", "eps", "momentum", "affine", "track_running_stats"}


def _check_norm_cfg(name, norm_cfg):
    if not isinstance(norm_cfg, dict) or "type" not in norm_cfg:
        raise TypeError(f"{name}: norm_cfg must be a dict with a 'type' key, got {norm_cfg!r}")
    if norm_cfg["type"] not in _NORM_TYPES:
        raise ValueError(f"{name}: norm_cfg type {norm_cfg['type']!r} is not supported by fastbb's ResNet; "
                         f"supported: {sorted(_NORM_TYPES)}")
    unknown = sorted(set(norm_cfg) - _NORM_KEYS)
    if unknown:
        raise ValueError(f"{name}: norm_cfg key(s) {unknown} are not supported by fastbb's ResNet; supported: "
                         f"{sorted(_NORM_KEYS)}")


def _check_supported(name, conv_cfg, uses_dcn, plugins):
    """fastbb's ResNet runs plain convs without plugins: the other options mmdet offers raise, named."""
    if conv_cfg is not None and conv_cfg.get("type") not in ("Conv", "Conv2d"):
        raise ValueError(f"{name}: conv_cfg {conv_cfg!r} is not supported by fastbb's ResNet (only Conv2d)")
    if uses_dcn:
        raise ValueError(f"{name}: dcn (deformable convolution) is not supported by fastbb's ResNet; use dcn=None")
    if plugins is not None:
        raise ValueError(f"{name}: plugins are not supported by fastbb's ResNet; use plugins=None")


def _build_norm(name, norm_cfg, num_features):
    """The BatchNorm an mmcv norm_cfg names (BN, BN2d, SyncBN), with its requires_grad flag applied."""
    _check_norm_cfg(name, norm_cfg)
    args = {k: v for k, v in norm_cfg.items() if k not in ("type", "requires_grad")}
    norm = _NORM_TYPES[norm_cfg["type"]](num_features, **args)
    for param in norm.parameters():
        param.requires_grad = norm_cfg.get("requires_grad", True)
    return norm


def _model_name(model):
    """How error messages name the model class, e.g. fastbb.models.ResNetV1c."""
    return f"fastbb.models.{type(model).__name__}"


def _conv(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     bias=False)


@not_scriptable
class _MMBlock(nn.Module):
    """What mmdet's BasicBlock and Bottleneck share: their arguments and checks, the attributes mmdet sets,
    and with_cp, mmdet's checkpointing: the block recomputed in backward instead of keeping its
    activations (as in mmdet, a training-mode BN then updates its running statistics again)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, style: str = "pytorch", with_cp: bool = False,
                 conv_cfg: dict | None = None, norm_cfg: dict = dict(type="BN"), dcn: dict | None = None,
                 plugins: list[dict] | None = None, init_cfg: dict | None = None) -> None:
        super().__init__()
        name = f"fastbb.models.mm_resnet.{type(self).__name__}"
        _check_supported(name, conv_cfg, dcn is not None, plugins)
        self._make_layers(name, inplanes, planes, stride, dilation, style, norm_cfg)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.with_cp = with_cp

    def forward(self, x):
        if self.with_cp and x.requires_grad and torch.is_grad_enabled():
            return checkpoint.checkpoint(self.fused_forward, x, use_reentrant=False)
        return self.fused_forward(x)

    @property
    def norm1(self):
        return self.bn1

    @property
    def norm2(self):
        return self.bn2


class MMBasicBlock(_MMBlock):
    """mmdet's ResNet BasicBlock, fused: two 3x3 convs, the dilation on conv1 only (conv2 is a plain 3x3)."""
    expansion: int = 1

    def _make_layers(self, name, inplanes, planes, stride, dilation, style, norm_cfg):
        self.conv1 = _conv(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation)
        self.bn1 = _build_norm(name, norm_cfg, planes)
        self.conv2 = _conv(planes, planes, 3, padding=1)
        self.bn2 = _build_norm(name, norm_cfg, planes)

    fused_forward = _basic_block_forward


class MMBottleneck(_MMBlock):
    """mmdet's ResNet Bottleneck, fused: 1x1, 3x3, 1x1 convs, the stride on the 3x3 conv ('pytorch') or on
    the first 1x1 ('caffe')."""
    expansion: int = 4

    def _make_layers(self, name, inplanes, planes, stride, dilation, style, norm_cfg):
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = _conv(inplanes, planes, 1, stride=conv1_stride)
        self.bn1 = _build_norm(name, norm_cfg, planes)
        self.conv2 = _conv(planes, planes, 3, stride=conv2_stride, padding=dilation, dilation=dilation)
        self.bn2 = _build_norm(name, norm_cfg, planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1)
        self.bn3 = _build_norm(name, norm_cfg, planes * self.expansion)
        self.style = style

    fused_forward = _bottleneck_forward

    @property
    def norm3(self) -> nn.Module:
        return self.bn3


_BLOCK_ARGS = """
    Args:
        inplanes (int): input channels.
        planes (int): {planes}
        stride (int): {stride} Default: 1.
        dilation (int): {dilation} Default: 1.
        downsample (nn.Module, optional): the shortcut's [AvgPool2d ->] conv -> BN, where the shape changes.
        style (str): {style} Default: 'pytorch'.
        with_cp (bool): recompute the block in backward instead of keeping its activations (mmdet's
            checkpointing). Default: False.
        conv_cfg (dict, optional): None or type 'Conv' / 'Conv2d'. Default: None.
        norm_cfg (dict): the norm: type 'BN', 'BN2d' or 'SyncBN'. Default: dict(type='BN').
        dcn (dict, optional): must be None (deformable convolution is not supported). Default: None.
        plugins (list[dict], optional): must be None (plugins are not supported). Default: None.
        init_cfg (dict, optional): accepted for mmdet's signature and not read. Default: None.
"""
if MMBasicBlock.__doc__ is not None:  # None under python -OO
    MMBasicBlock.__doc__ += _BLOCK_ARGS.format(
        planes="output channels.", stride="conv1's stride.", dilation="conv1's dilation (and padding).",
        style="'pytorch' or 'caffe' (the same block either way).")
    MMBottleneck.__doc__ += _BLOCK_ARGS.format(
        planes="the width of the 3x3 conv; the output has ``planes * 4`` channels.",
        stride="the 3x3 conv's stride ('pytorch') or the first 1x1's ('caffe').",
        dilation="the 3x3 conv's dilation (and padding).",
        style="where the stride is: 'pytorch' (3x3 conv) or 'caffe' (first 1x1).")


def _make_res_layer(name, block, inplanes, planes, num_blocks, stride, dilation, style, avg_down, with_cp,
                    norm_cfg, multi_grid=None, contract_dilation=False):
    """One stage (mmseg's ResLayer, of which mmdet's is the contract_dilation=False, multi_grid=None case)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        layers = []
        conv_stride = stride
        if avg_down:  # mmdet inserts the pool in every stage, also where the stride is 1 (then an identity)
            conv_stride = 1
            layers.append(nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False))
        layers += [_conv(inplanes, planes * block.expansion, 1, stride=conv_stride),
                   _build_norm(name, norm_cfg, planes * block.expansion)]
        downsample = nn.Sequential(*layers)
    if multi_grid is not None:
        if len(multi_grid) != num_blocks:
            raise ValueError(f"{name}: multi_grid must give one dilation per block of the last stage ({num_blocks}), "
                             f"got {tuple(multi_grid)}")
        block_dilations = list(multi_grid)
    else:
        first = dilation // 2 if dilation > 1 and contract_dilation else dilation
        block_dilations = [first] + [dilation] * (num_blocks - 1)
    blocks = [block(inplanes, planes, stride, block_dilations[0], downsample, style, with_cp, norm_cfg=norm_cfg)]
    for d in block_dilations[1:]:
        blocks.append(block(planes * block.expansion, planes, 1, d, None, style, with_cp, norm_cfg=norm_cfg))
    return nn.Sequential(*blocks)


def _load_pretrained(name, model, checkpoint_path):
    """init_cfg=dict(type='Pretrained', checkpoint=PATH) with a local file: an mmengine checkpoint
    ({'state_dict': ...}) or a bare state_dict; a classifier head ('fc.*') is dropped as mmengine does."""
    if not isinstance(checkpoint_path, (str, os.PathLike)) or not os.path.isfile(checkpoint_path):
        raise ValueError(f"{name}: init_cfg checkpoint must be a local file (fastbb downloads nothing), got "
                         f"{checkpoint_path!r}")
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("fc.")}
    model.load_state_dict(state)


@register("ResNet")
@not_scriptable
class MMResNet(nn.Module):
    """
    mmdet / mmseg ``ResNet`` backbone, fused (see the module docstring). ``fastbb.models.MMResNet`` avoids a
    clash with fastbb.models.ResNet, torchvision's classifier; in configs its type name is 'ResNet'.
    ``forward(x)`` returns the tuple of the ``out_indices`` stage outputs.

    Args:
        depth (int): Depth of resnet, from {18, 34, 50, 101, 152}.
        in_channels (int): Number of input image channels. Default: 3.
        stem_channels (int, optional): Number of stem channels. Default: None (``base_channels``).
        base_channels (int): Number of base channels of res layer. Default: 64.
        num_stages (int): Resnet stages, in [1, 4]. Default: 4.
        strides (Sequence[int]): Strides of the first block of each stage. Default: (1, 2, 2, 2).
        dilations (Sequence[int]): Dilation of each stage. Default: (1, 1, 1, 1).
        out_indices (Sequence[int]): Output from which stages. Default: (0, 1, 2, 3).
        style (str): 'pytorch' (the stride-two layer is the 3x3 conv) or 'caffe' (the first 1x1 conv).
            Default: 'pytorch'.
        deep_stem (bool): Replace the 7x7 conv in the input stem with three 3x3 convs. Default: False.
        avg_down (bool): Use AvgPool instead of stride conv when downsampling in the bottleneck.
            Default: False.
        frozen_stages (int): Stages to be frozen (stop grad and set eval mode); -1 means not freezing any
            parameters. Default: -1.
        conv_cfg (dict, optional): None or type 'Conv' / 'Conv2d'. Default: None.
        norm_cfg (dict): Dictionary to construct and config the norm layer: type 'BN', 'BN2d' or 'SyncBN'.
            Default: dict(type='BN', requires_grad=True).
        norm_eval (bool): Whether to set norm layers to eval mode, namely, freeze running stats (mean and
            var). Default: True (mmdet's; mmseg configs pass False).
        dcn (dict, optional): must be None (deformable convolution is not supported). Default: None.
        stage_with_dcn (Sequence[bool]): must be all False. Default: (False, False, False, False).
        plugins (list[dict], optional): must be None (plugins are not supported). Default: None.
        multi_grid (Sequence[int], optional): mmseg's dilations of the blocks of the last stage.
            Default: None.
        contract_dilation (bool): mmseg's: whether to contract the first dilation of each stage.
            Default: False.
        with_cp (bool): Use checkpoint or not. Using checkpoint will save some memory while slowing down the
            training speed. Default: False.
        zero_init_residual (bool): Whether to use zero init for the last norm layer in resblocks to let them
            behave as identity. Default: True.
        pretrained (str, optional): the path of a local checkpoint to load. Default: None.
        init_cfg (dict, optional): None or dict(type='Pretrained', checkpoint=LOCAL_PATH). Default: None.
    """

    arch_settings = {
        18: (MMBasicBlock, (2, 2, 2, 2)),
        34: (MMBasicBlock, (3, 4, 6, 3)),
        50: (MMBottleneck, (3, 4, 6, 3)),
        101: (MMBottleneck, (3, 4, 23, 3)),
        152: (MMBottleneck, (3, 8, 36, 3)),
    }

    def __init__(self, depth: int, in_channels: int = 3, stem_channels: int | None = None, base_channels: int = 64,
                 num_stages: int = 4, strides: Sequence[int] = (1, 2, 2, 2), dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Sequence[int] = (0, 1, 2, 3), style: str = "pytorch", deep_stem: bool = False,
                 avg_down: bool = False, frozen_stages: int = -1, conv_cfg: dict | None = None,
                 norm_cfg: dict = dict(type="BN", requires_grad=True), norm_eval: bool = True,
                 dcn: dict | None = None, stage_with_dcn: Sequence[bool] = (False, False, False, False),
                 plugins: list[dict] | None = None, multi_grid: Sequence[int] | None = None,
                 contract_dilation: bool = False, with_cp: bool = False, zero_init_residual: bool = True,
                 pretrained: str | None = None, init_cfg: dict | None = None) -> None:
        super().__init__()
        name = _model_name(self)
        if depth not in self.arch_settings:
            raise KeyError(f"{name}: invalid depth {depth} for resnet; expected one of {sorted(self.arch_settings)}")
        if not 1 <= num_stages <= 4:
            raise ValueAssertionError(f"{name}: num_stages must be in [1, 4], got {num_stages}")
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueAssertionError(f"{name}: strides and dilations must have num_stages ({num_stages}) entries, got "
                                      f"strides={tuple(strides)}, dilations={tuple(dilations)}")
        out_indices = tuple(out_indices)
        if not out_indices or max(out_indices) >= num_stages or min(out_indices) < 0:
            raise ValueAssertionError(f"{name}: out_indices must be stage indices in [0, {num_stages}), "
                                      f"got {out_indices}")
        if style not in ("pytorch", "caffe"):
            raise ValueAssertionError(f"{name}: style must be 'pytorch' or 'caffe', got {style!r}")
        _check_supported(name, conv_cfg, dcn is not None or any(stage_with_dcn[:num_stages]), plugins)
        if init_cfg is not None and pretrained is not None:
            raise ValueAssertionError(f"{name}: init_cfg and pretrained cannot be set at the same time")
        _check_norm_cfg(name, norm_cfg)
        self.depth = depth
        self.stem_channels = base_channels if stem_channels is None else stem_channels
        self.base_channels = base_channels
        self.num_stages = num_stages
        self.strides = strides
        self.dilations = dilations
        self.out_indices = out_indices
        self.style = style
        self.deep_stem = deep_stem
        self.avg_down = avg_down
        self.frozen_stages = frozen_stages
        self.norm_cfg = norm_cfg
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.zero_init_residual = zero_init_residual
        self.block, stage_blocks = self.arch_settings[depth]
        self.stage_blocks = stage_blocks[:num_stages]

        self._make_stem_layer(in_channels, self.stem_channels)
        self.res_layers = []
        inplanes = self.stem_channels
        for i, num_blocks in enumerate(self.stage_blocks):
            planes = base_channels * 2 ** i
            layer = _make_res_layer(name, self.block, inplanes, planes, num_blocks, strides[i], dilations[i], style,
                                    avg_down, with_cp, norm_cfg,
                                    multi_grid=multi_grid if i == len(self.stage_blocks) - 1 else None,
                                    contract_dilation=contract_dilation)
            inplanes = planes * self.block.expansion
            self.add_module(f"layer{i + 1}", layer)
            self.res_layers.append(f"layer{i + 1}")
        self.feat_dim = self.block.expansion * base_channels * 2 ** (len(self.stage_blocks) - 1)
        self.init_weights()
        if pretrained is not None:
            _load_pretrained(name, self, pretrained)
        elif init_cfg is not None:
            if not (isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained"):
                raise ValueError(f"{name}: init_cfg {init_cfg!r} is not supported by fastbb's ResNet (only "
                                 f"dict(type='Pretrained', checkpoint=LOCAL_PATH))")
            _load_pretrained(name, self, init_cfg.get("checkpoint"))
        self._freeze_stages()

    def _make_stem_layer(self, in_channels, stem_channels):
        name = _model_name(self)
        if self.deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                _conv(in_channels, half, 3, stride=2, padding=1), _build_norm(name, self.norm_cfg, half),
                nn.ReLU(True),
                _conv(half, half, 3, padding=1), _build_norm(name, self.norm_cfg, half), nn.ReLU(True),
                _conv(half, stem_channels, 3, padding=1), _build_norm(name, self.norm_cfg, stem_channels),
                nn.ReLU(True))
        else:
            self.conv1 = _conv(in_channels, stem_channels, 7, stride=2, padding=3)
            self.bn1 = _build_norm(name, self.norm_cfg, stem_channels)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    @property
    def norm1(self) -> nn.Module:
        return self.bn1

    def init_weights(self) -> None:
        """mmdet's default initialisation: Kaiming (fan_out) convs, unit BN, and with zero_init_residual
        the last BN of every block zeroed, so each block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, MMBottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, MMBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _freeze_stages(self):
        """frozen_stages=i: the stem and layer1..i stop training (no gradients, BN in eval mode)."""
        if self.frozen_stages >= 0:
            stem = [self.stem] if self.deep_stem else [self.conv1, self.bn1]
            for m in stem:
                m.eval()
                for param in m.parameters():
                    param.requires_grad = False
        for i in range(1, self.frozen_stages + 1):
            m = getattr(self, f"layer{i}")
            m.eval()
            for param in m.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> "MMResNet":
        """
        Sets training mode, keeping the frozen stages frozen and, with norm_eval, every BN in eval mode.

        Args:
            mode (bool): training (True) or eval (False) mode. Default: True.

        Returns:
            MMResNet: self.
        """
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _stem_forward(self, x):
        if self.deep_stem:
            s = self.stem
            x = _fused_conv_bn(s[0], s[1], x)
            x = _fused_conv_bn(s[3], s[4], x)
            x = _fused_conv_bn(s[6], s[7], x)
        else:
            x = _fused_conv_bn(self.conv1, self.bn1, x)
        return self.maxpool(x)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """
        Args:
            x (Tensor[N, C, H, W]): the images.

        Returns:
            Tuple[Tensor]: the outputs of the stages in ``out_indices``, in their order.
        """
        x = self._stem_forward(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


@register("ResNetV1c")
class ResNetV1c(MMResNet):
    """
    mmdet / mmseg ``ResNetV1c``: the ResNet with the deep stem (three 3x3 convs in place of the 7x7), from
    `Bag of Tricks for Image Classification with Convolutional Neural Networks
    <https://arxiv.org/abs/1812.01187>`_.

    Args:
        **kwargs: :class:`MMResNet`'s arguments other than ``deep_stem`` and ``avg_down``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(deep_stem=True, avg_down=False, **kwargs)


@register("ResNetV1d")
class ResNetV1d(MMResNet):
    """
    mmdet / mmseg ``ResNetV1d``: the ResNet with the deep stem and an AvgPool2d before every downsample 1x1
    conv (which keeps stride 1), from `Bag of Tricks for Image Classification with Convolutional Neural
    Networks <https://arxiv.org/abs/1812.01187>`_.

    Args:
        **kwargs: :class:`MMResNet`'s arguments other than ``deep_stem`` and ``avg_down``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(deep_stem=True, avg_down=True, **kwargs)
