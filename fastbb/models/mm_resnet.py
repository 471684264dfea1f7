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

import torch
from torch import nn
from torch.utils import checkpoint

from fastbb._registry import register
from fastbb.models.resnet import basic_block_forward, bottleneck_forward
from fastbb.nn.conv_bn_relu import fused_conv_bn

_NORM_TYPES = {"BN": nn.BatchNorm2d, "BN2d": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm}
_NORM_KEYS = {"type", "requires_grad", "eps", "momentum", "affine", "track_running_stats"}


def build_norm(norm_cfg, num_features):
    """The BatchNorm an mmcv norm_cfg names (BN, BN2d, SyncBN), with its requires_grad flag applied."""
    if not isinstance(norm_cfg, dict) or "type" not in norm_cfg:
        raise TypeError(f"norm_cfg must be a dict with a 'type' key, got {norm_cfg!r}")
    if norm_cfg["type"] not in _NORM_TYPES:
        raise ValueError(f"norm_cfg type {norm_cfg['type']!r} is not supported by fastbb's ResNet; supported: "
                         f"{sorted(_NORM_TYPES)}")
    unknown = sorted(set(norm_cfg) - _NORM_KEYS)
    if unknown:
        raise ValueError(f"norm_cfg key(s) {unknown} are not supported by fastbb's ResNet; supported: "
                         f"{sorted(_NORM_KEYS)}")
    args = {k: v for k, v in norm_cfg.items() if k not in ("type", "requires_grad")}
    norm = _NORM_TYPES[norm_cfg["type"]](num_features, **args)
    for param in norm.parameters():
        param.requires_grad = norm_cfg.get("requires_grad", True)
    return norm


def _conv(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     bias=False)


class _Checkpointed:
    """mmdet's with_cp: recompute the block in backward instead of keeping its activations. As in mmdet,
    a training-mode BN updates its running statistics again during the recomputation."""

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


class MMBasicBlock(_Checkpointed, nn.Module):
    """mmdet's BasicBlock: the dilation is on conv1 only (conv2 is a plain 3x3)."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, style="pytorch", with_cp=False,
                 norm_cfg=None):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation)
        self.bn1 = build_norm(norm_cfg, planes)
        self.conv2 = _conv(planes, planes, 3, padding=1)
        self.bn2 = build_norm(norm_cfg, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.with_cp = with_cp

    fused_forward = basic_block_forward


class MMBottleneck(_Checkpointed, nn.Module):
    """mmdet's Bottleneck: the stride on the 3x3 conv ('pytorch') or on the first 1x1 ('caffe')."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, style="pytorch", with_cp=False,
                 norm_cfg=None):
        super().__init__()
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = _conv(inplanes, planes, 1, stride=conv1_stride)
        self.bn1 = build_norm(norm_cfg, planes)
        self.conv2 = _conv(planes, planes, 3, stride=conv2_stride, padding=dilation, dilation=dilation)
        self.bn2 = build_norm(norm_cfg, planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1)
        self.bn3 = build_norm(norm_cfg, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.style = style
        self.with_cp = with_cp

    fused_forward = bottleneck_forward

    @property
    def norm3(self):
        return self.bn3


def make_res_layer(block, inplanes, planes, num_blocks, stride, dilation, style, avg_down, with_cp, norm_cfg,
                   multi_grid=None, contract_dilation=False):
    """One stage (mmseg's ResLayer, of which mmdet's is the contract_dilation=False, multi_grid=None case)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        layers = []
        conv_stride = stride
        if avg_down:  # mmdet inserts the pool in every stage, also where the stride is 1 (then an identity)
            conv_stride = 1
            layers.append(nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False))
        layers += [_conv(inplanes, planes * block.expansion, 1, stride=conv_stride),
                   build_norm(norm_cfg, planes * block.expansion)]
        downsample = nn.Sequential(*layers)
    if multi_grid is not None:
        if len(multi_grid) != num_blocks:
            raise ValueError(f"multi_grid must give one dilation per block of the last stage ({num_blocks}), "
                             f"got {tuple(multi_grid)}")
        block_dilations = list(multi_grid)
    else:
        first = dilation // 2 if dilation > 1 and contract_dilation else dilation
        block_dilations = [first] + [dilation] * (num_blocks - 1)
    blocks = [block(inplanes, planes, stride, block_dilations[0], downsample, style, with_cp, norm_cfg)]
    for d in block_dilations[1:]:
        blocks.append(block(planes * block.expansion, planes, 1, d, None, style, with_cp, norm_cfg))
    return nn.Sequential(*blocks)


def _load_pretrained(model, checkpoint_path):
    """init_cfg=dict(type='Pretrained', checkpoint=PATH) with a local file: an mmengine checkpoint
    ({'state_dict': ...}) or a bare state_dict; a classifier head ('fc.*') is dropped as mmengine does."""
    if not isinstance(checkpoint_path, (str, os.PathLike)) or not os.path.isfile(checkpoint_path):
        raise ValueError(f"init_cfg checkpoint must be a local file (fastbb downloads nothing), got "
                         f"{checkpoint_path!r}")
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    state = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("fc.")}
    model.load_state_dict(state)


@register("ResNet")
class MMResNet(nn.Module):
    """mmdet / mmseg `ResNet` (see the module docstring). `fastbb.models.MMResNet` avoids a clash with
    fastbb.models.ResNet, torchvision's classifier; in configs its type name is 'ResNet'."""

    arch_settings = {
        18: (MMBasicBlock, (2, 2, 2, 2)),
        34: (MMBasicBlock, (3, 4, 6, 3)),
        50: (MMBottleneck, (3, 4, 6, 3)),
        101: (MMBottleneck, (3, 4, 23, 3)),
        152: (MMBottleneck, (3, 8, 36, 3)),
    }

    def __init__(self, depth, in_channels=3, stem_channels=None, base_channels=64, num_stages=4,
                 strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), out_indices=(0, 1, 2, 3), style="pytorch",
                 deep_stem=False, avg_down=False, frozen_stages=-1, conv_cfg=None,
                 norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True, dcn=None,
                 stage_with_dcn=(False, False, False, False), plugins=None, multi_grid=None,
                 contract_dilation=False, with_cp=False, zero_init_residual=True, pretrained=None, init_cfg=None):
        super().__init__()
        if depth not in self.arch_settings:
            raise KeyError(f"invalid depth {depth} for resnet; expected one of {sorted(self.arch_settings)}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must be in [1, 4], got {num_stages}")
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ValueError(f"strides and dilations must have num_stages ({num_stages}) entries, got "
                             f"strides={tuple(strides)}, dilations={tuple(dilations)}")
        out_indices = tuple(out_indices)
        if not out_indices or max(out_indices) >= num_stages or min(out_indices) < 0:
            raise ValueError(f"out_indices must be stage indices in [0, {num_stages}), got {out_indices}")
        if style not in ("pytorch", "caffe"):
            raise ValueError(f"style must be 'pytorch' or 'caffe', got {style!r}")
        if conv_cfg is not None and conv_cfg.get("type") not in ("Conv", "Conv2d"):
            raise ValueError(f"conv_cfg {conv_cfg!r} is not supported by fastbb's ResNet (only Conv2d)")
        if dcn is not None or any(stage_with_dcn[:num_stages]):
            raise ValueError("dcn (deformable convolution) is not supported by fastbb's ResNet; use dcn=None")
        if plugins is not None:
            raise ValueError("plugins are not supported by fastbb's ResNet; use plugins=None")
        if init_cfg is not None and pretrained is not None:
            raise ValueError("init_cfg and pretrained cannot be set at the same time")
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
            layer = make_res_layer(self.block, inplanes, planes, num_blocks, strides[i], dilations[i], style,
                                   avg_down, with_cp, norm_cfg,
                                   multi_grid=multi_grid if i == len(self.stage_blocks) - 1 else None,
                                   contract_dilation=contract_dilation)
            inplanes = planes * self.block.expansion
            self.add_module(f"layer{i + 1}", layer)
            self.res_layers.append(f"layer{i + 1}")
        self.feat_dim = self.block.expansion * base_channels * 2 ** (len(self.stage_blocks) - 1)
        self.init_weights()
        if pretrained is not None:
            _load_pretrained(self, pretrained)
        elif init_cfg is not None:
            if not (isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained"):
                raise ValueError(f"init_cfg {init_cfg!r} is not supported by fastbb's ResNet (only "
                                 f"dict(type='Pretrained', checkpoint=LOCAL_PATH))")
            _load_pretrained(self, init_cfg.get("checkpoint"))
        self._freeze_stages()

    def _make_stem_layer(self, in_channels, stem_channels):
        if self.deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                _conv(in_channels, half, 3, stride=2, padding=1), build_norm(self.norm_cfg, half), nn.ReLU(True),
                _conv(half, half, 3, padding=1), build_norm(self.norm_cfg, half), nn.ReLU(True),
                _conv(half, stem_channels, 3, padding=1), build_norm(self.norm_cfg, stem_channels), nn.ReLU(True))
        else:
            self.conv1 = _conv(in_channels, stem_channels, 7, stride=2, padding=3)
            self.bn1 = build_norm(self.norm_cfg, stem_channels)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    @property
    def norm1(self):
        return self.bn1

    def init_weights(self):
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

    def train(self, mode=True):
        """Training mode, keeping the frozen stages frozen and, with norm_eval, every BN in eval mode."""
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
            x = fused_conv_bn(s[0], s[1], x)
            x = fused_conv_bn(s[3], s[4], x)
            x = fused_conv_bn(s[6], s[7], x)
        else:
            x = fused_conv_bn(self.conv1, self.bn1, x)
        return self.maxpool(x)

    def forward(self, x):
        x = self._stem_forward(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


@register("ResNetV1c")
class ResNetV1c(MMResNet):
    """ResNet with the deep stem (three 3x3 convs in place of the 7x7)."""

    def __init__(self, **kwargs):
        super().__init__(deep_stem=True, avg_down=False, **kwargs)


@register("ResNetV1d")
class ResNetV1d(MMResNet):
    """ResNet with the deep stem and an AvgPool2d before every downsample 1x1 conv (which keeps stride 1)."""

    def __init__(self, **kwargs):
        super().__init__(deep_stem=True, avg_down=True, **kwargs)
