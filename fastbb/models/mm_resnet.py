"""OpenMMLab's ResNet backbones, fused: mmdet's, mmseg's and mmpretrain's ``ResNet``, ``ResNetV1c`` and
``ResNetV1d``, each with its own package's signature, defaults, module tree and state_dict keys, so that its
configs and checkpoints work unchanged. ``forward`` returns the tuple of the ``out_indices`` stage outputs;
every conv -> BN [-> ReLU] (and the residual add) runs as one fastbb.ops.conv_bn_relu call.

- mmdet (MMResNet, ResNetV1c, ResNetV1d): ``stem_channels=None`` (base_channels), ``norm_eval=True``. mmdet has
  no ResNetV1c: fastbb's, for mmdet configs, is its ResNet with the deep stem.
- mmseg (MMSegResNet, MMSegResNetV1c, MMSegResNetV1d): ``stem_channels=64``, ``norm_eval=False``,
  ``multi_grid`` and ``contract_dilation``.
- mmpretrain (MMPretrainResNet, MMPretrainResNetV1c, MMPretrainResNetV1d): ``out_indices=(3,)``, ``expansion``,
  ``drop_path_rate``; the deep stem is three ConvModules (keys ``stem.0.conv.weight``, ``stem.0.bn.*``, ...),
  and ResNetV1d pools only before the downsample convs of stride 2.

mmdet and mmseg keys: ``conv1``, ``bn1``, ``layerX.Y.conv{1,2,3}``, ``layerX.Y.bn{1,2,3}``,
``layerX.0.downsample.{0,1}`` (with avg_down ``downsample.{1,2}`` after the AvgPool2d, in every stage), a deep
stem ``stem.{0,1,3,4,6,7}``.

As in OpenMMLab, construction leaves PyTorch's default initialisation and ``init_weights()`` (which mmengine's
runner calls) applies ``init_cfg``: by default Kaiming convs, unit BNs and, with ``zero_init_residual``, the
last BN of every block zeroed; ``dict(type='Pretrained', checkpoint=...)`` (or ``pretrained=PATH``) loads a
checkpoint. The modules are built in the originals' order, so the same seed gives the same weights.

An option fastbb does not fuse (a norm other than BatchNorm, a conv_cfg other than Conv2d, dcn, plugins,
an mmpretrain block activation other than ReLU) builds the package's original class instead, unfused, with
a warning; only where that package is not installed does it raise, naming the option.
"""
import copy
import importlib.util
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import checkpoint

from fastbb._fallback import FallsBackBeforeInit
from fastbb._registry import register
from fastbb._tracing import not_scriptable
from fastbb.models.resnet import _basic_block_forward, _bottleneck_forward, _shortcut, runs_channels_last
from fastbb.nn.conv_bn_relu import _fused_conv_bn
from fastbb.ops._common import ValueAssertionError

# The norms the fused path runs: mmcv's registry names and the classes a config may give directly.
_BN_TYPES = {"BN": nn.BatchNorm2d, "BN2d": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm,
             nn.BatchNorm2d: nn.BatchNorm2d, nn.SyncBatchNorm: nn.SyncBatchNorm}
_CONV_TYPES = ("Conv", "Conv2d", nn.Conv2d)
_RELU_TYPES = ("ReLU", nn.ReLU)

# mmengine's default init_cfg of the three packages' ResNets (mmpretrain writes layer=['Conv2d']).
_DEFAULT_INIT_CFG = [dict(type="Kaiming", layer="Conv2d"),
                     dict(type="Constant", val=1, layer=["_BatchNorm", "GroupNorm"])]
# mmpretrain's blocks use DropPath only above this rate (below it, an identity).
_DROP_PATH_MIN_RATE = 1.0e-5


class _ValueIndexError(ValueError, IndexError):
    """A bad argument where the original indexes past the end of a sequence (IndexError)."""


def _is_type(value, table):
    return isinstance(value, (str, type)) and value in table


def _norm_option(norm_cfg):
    """The unfused option a norm_cfg names ("norm_cfg type 'GN'"), or None (a BN; or a malformed config,
    which the constructor refuses with the original's error)."""
    if isinstance(norm_cfg, dict) and "type" in norm_cfg and not _is_type(norm_cfg["type"], _BN_TYPES):
        return f"norm_cfg type {norm_cfg['type']!r}"
    return None


def _conv_option(conv_cfg):
    """The unfused option a conv_cfg names, or None (a plain Conv2d, or malformed)."""
    if isinstance(conv_cfg, dict) and "type" in conv_cfg:
        if not _is_type(conv_cfg["type"], _CONV_TYPES) or len(conv_cfg) > 1:  # Conv2d arguments of its own too
            return f"conv_cfg {conv_cfg!r}"
    return None


def _act_option(act_cfg):
    """The unfused option an mmpretrain block's act_cfg names, or None (ReLU)."""
    if isinstance(act_cfg, dict) and "type" in act_cfg:
        if not _is_type(act_cfg["type"], _RELU_TYPES) or set(act_cfg) - {"type", "inplace"}:
            return f"act_cfg {act_cfg!r}"
    return None


def _check_cfg(name, key, cfg):
    """mmcv's checks of a layer config (build_norm_layer / build_conv_layer): a dict with a 'type'."""
    if not isinstance(cfg, dict):
        raise TypeError(f"{name}: {key} must be a dict, got {cfg!r}")
    if "type" not in cfg:
        raise KeyError(f"{name}: {key} must have a 'type' key, got {cfg!r}")


def _build_norm(name, norm_cfg, num_features):
    """The BatchNorm a norm_cfg names (as mmcv's build_norm_layer: eps 1e-5 unless given, the other keys passed
    to the class, requires_grad applied to its parameters)."""
    _check_cfg(name, "norm_cfg", norm_cfg)
    option = _norm_option(norm_cfg)
    if option is not None:
        raise ValueError(f"{name}: {option} is not fused by fastbb")
    args = {k: v for k, v in norm_cfg.items() if k not in ("type", "requires_grad")}
    args.setdefault("eps", 1e-5)
    try:
        norm = _BN_TYPES[norm_cfg["type"]](num_features, **args)
    except TypeError as error:
        raise TypeError(f"{name}: norm_cfg {norm_cfg!r}: {error}") from None
    for param in norm.parameters():
        param.requires_grad = norm_cfg.get("requires_grad", True)
    return norm


def _check_conv_cfg(name, conv_cfg):
    if conv_cfg is not None:
        _check_cfg(name, "conv_cfg", conv_cfg)
        option = _conv_option(conv_cfg)
        if option is not None:
            raise ValueError(f"{name}: {option} is not fused by fastbb")


def _conv(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1):
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     bias=False)


# ---------------------------------------------------------------------------------------------------------
# Blocks

@not_scriptable
class _Block(FallsBackBeforeInit, nn.Module):
    """What every fused block shares: mmdet's checkpointing (with_cp: the block recomputed in backward
    instead of keeping its activations) and the norm accessors. The recomputation runs the whole block
    (early_stop=False), so that a training-mode BN updates its running statistics a second time, every one of
    them, as it does under the originals' (reentrant) checkpointing."""
    _public_module = "fastbb.models.mm_resnet"
    norm1_name, norm2_name, norm3_name = "bn1", "bn2", "bn3"

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor[N, C, H, W]): the input.

        Returns:
            Tensor: the block's output, relu(branch(x) + shortcut(x)).
        """
        if self.with_cp and x.requires_grad and torch.is_grad_enabled():
            return checkpoint.checkpoint(self._fused_forward, x, use_reentrant=False, early_stop=False)
        return self._fused_forward(x)

    @property
    def norm1(self) -> nn.Module:
        return self.bn1

    @property
    def norm2(self) -> nn.Module:
        return self.bn2


class _MMDetBlock(_Block):
    """mmdet's (and mmseg's, the same) BasicBlock / Bottleneck arguments; its original is mmdet's class."""

    @classmethod
    def _unfused(cls, a):
        if a["dcn"] is not None:
            return "dcn (deformable convolution)"
        if a["plugins"] is not None:
            return "plugins"
        return _norm_option(a["norm_cfg"]) or _conv_option(a["conv_cfg"])

    def _setup(self, a):
        name = self._public_name()
        option = self._unfused(a)
        if option is not None:
            raise ValueError(f"{name}: {option} is not fused by fastbb")
        _check_conv_cfg(name, a["conv_cfg"])
        self.init_cfg = copy.deepcopy(a["init_cfg"])
        return name


class MMBasicBlock(_MMDetBlock):
    """
    mmdet's ResNet BasicBlock, fused: two 3x3 convs, the dilation on conv1 only (conv2 is a plain 3x3).

    Args:
        inplanes (int): input channels.
        planes (int): output channels.
        stride (int): conv1's stride. Default: 1.
        dilation (int): conv1's dilation (and padding). Default: 1.
        downsample (nn.Module, optional): the shortcut's [AvgPool2d ->] conv -> BN, where the shape changes.
        style (str): unused, as in mmdet. Default: 'pytorch'.
        with_cp (bool): recompute the block in backward instead of keeping its activations. Default: False.
        conv_cfg (dict, optional): None or type 'Conv' / 'Conv2d'. Default: None.
        norm_cfg (dict): the norm: type 'BN', 'BN2d' or 'SyncBN'. Default: dict(type='BN').
        dcn (dict, optional): must be None, as in mmdet. Default: None.
        plugins (list[dict], optional): must be None, as in mmdet. Default: None.
        init_cfg (dict, optional): kept as ``init_cfg``, as mmengine's BaseModule does. Default: None.

    Other norms, convs, dcn and plugins build mmdet's BasicBlock (see the module docstring).
    """
    _original = "mmdet.models.backbones.resnet.BasicBlock"
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, style: str = "pytorch", with_cp: bool = False,
                 conv_cfg: dict | None = None, norm_cfg: dict = dict(type="BN"), dcn: dict | None = None,
                 plugins: list[dict] | None = None, init_cfg: dict | list[dict] | None = None) -> None:
        a = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        name = self._setup(a)
        norm1 = _build_norm(name, norm_cfg, planes)
        norm2 = _build_norm(name, norm_cfg, planes)
        self.conv1 = _conv(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation)
        self.bn1 = norm1
        self.conv2 = _conv(planes, planes, 3, padding=1)
        self.bn2 = norm2
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.with_cp = with_cp

    _fused_forward = _basic_block_forward


class MMBottleneck(_MMDetBlock):
    """
    mmdet's ResNet Bottleneck, fused: 1x1, 3x3, 1x1 convs, the stride on the 3x3 conv ('pytorch') or on the
    first 1x1 ('caffe').

    Args:
        inplanes (int): input channels.
        planes (int): the width of the 3x3 conv; the output has ``planes * 4`` channels.
        stride (int): the 3x3 conv's stride ('pytorch') or the first 1x1's ('caffe'). Default: 1.
        dilation (int): the 3x3 conv's dilation (and padding). Default: 1.
        downsample (nn.Module, optional): the shortcut's [AvgPool2d ->] conv -> BN, where the shape changes.
        style (str): where the stride is: 'pytorch' (3x3 conv) or 'caffe' (first 1x1). Default: 'pytorch'.
        with_cp (bool): recompute the block in backward instead of keeping its activations. Default: False.
        conv_cfg (dict, optional): None or type 'Conv' / 'Conv2d'. Default: None.
        norm_cfg (dict): the norm: type 'BN', 'BN2d' or 'SyncBN'. Default: dict(type='BN').
        dcn (dict, optional): None (deformable convs build mmdet's Bottleneck). Default: None.
        plugins (list[dict], optional): None (plugins build mmdet's Bottleneck). Default: None.
        init_cfg (dict, optional): kept as ``init_cfg``, as mmengine's BaseModule does. Default: None.
    """
    _original = "mmdet.models.backbones.resnet.Bottleneck"
    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, style: str = "pytorch", with_cp: bool = False,
                 conv_cfg: dict | None = None, norm_cfg: dict = dict(type="BN"), dcn: dict | None = None,
                 plugins: list[dict] | None = None, init_cfg: dict | list[dict] | None = None) -> None:
        a = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if style not in ("pytorch", "caffe"):
            raise ValueAssertionError(f"{self._public_name()}: style must be 'pytorch' or 'caffe', got {style!r}")
        name = self._setup(a)
        self.inplanes, self.planes, self.stride, self.dilation = inplanes, planes, stride, dilation
        self.style, self.with_cp, self.conv_cfg, self.norm_cfg = style, with_cp, conv_cfg, norm_cfg
        self.dcn, self.with_dcn, self.plugins, self.with_plugins = None, False, None, False
        self.conv1_stride, self.conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        norms = [_build_norm(name, norm_cfg, c) for c in (planes, planes, planes * self.expansion)]
        self.conv1 = _conv(inplanes, planes, 1, stride=self.conv1_stride)
        self.bn1 = norms[0]
        self.conv2 = _conv(planes, planes, 3, stride=self.conv2_stride, padding=dilation, dilation=dilation)
        self.bn2 = norms[1]
        self.conv3 = _conv(planes, planes * self.expansion, 1)
        self.bn3 = norms[2]
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    _fused_forward = _bottleneck_forward

    @property
    def norm3(self) -> nn.Module:
        return self.bn3


class DropPath(nn.Module):
    """
    Stochastic depth, as mmcv's DropPath that mmpretrain's blocks apply to their residual branch: in training,
    each sample's branch is kept with probability ``1 - drop_prob`` and then scaled by ``1 / (1 - drop_prob)``.
    It draws one ``torch.rand`` of shape (N, 1, ..., 1) in the input's dtype and device per call, as mmcv
    does, so that the same seed drops the same samples.

    Args:
        drop_prob (float): the probability of dropping a sample's branch. Default: 0.1.
    """

    def __init__(self, drop_prob: float = 0.1) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor[N, ...]): a residual branch's output.

        Returns:
            Tensor: x, or in training x scaled per sample by 0 or 1 / (1 - drop_prob).
        """
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        kept = torch.floor(keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device))
        return x / keep * kept


class _MMPretrainBlock(_Block):
    """mmpretrain's BasicBlock / Bottleneck arguments (in_channels, out_channels, expansion, act_cfg,
    drop_path_rate); with drop path active in training the residual add runs after it, unfused."""

    @classmethod
    def _unfused(cls, a):
        return _norm_option(a["norm_cfg"]) or _conv_option(a["conv_cfg"]) or _act_option(a["act_cfg"])

    def _setup(self, a):
        name = self._public_name()
        option = self._unfused(a)
        if option is not None:
            raise ValueError(f"{name}: {option} is not fused by fastbb")
        _check_conv_cfg(name, a["conv_cfg"])
        _check_cfg(name, "act_cfg", a["act_cfg"])
        if a["out_channels"] % a["expansion"] != 0:
            raise ValueAssertionError(f"{name}: out_channels ({a['out_channels']}) must be a multiple of expansion "
                                      f"({a['expansion']})")
        self.init_cfg = copy.deepcopy(a["init_cfg"])
        for key in ("in_channels", "out_channels", "expansion", "stride", "dilation", "style", "with_cp",
                    "conv_cfg", "norm_cfg"):
            setattr(self, key, a[key])
        self.mid_channels = a["out_channels"] // a["expansion"]
        return name

    def _finish(self, act_cfg, downsample, drop_path_rate):
        """The modules after the convs and norms, in mmpretrain's order (init_weights draws the downsample
        conv's weights after the block's own, as mmengine does)."""
        self.relu = nn.ReLU(inplace=act_cfg.get("inplace", False))
        self.downsample = downsample
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > _DROP_PATH_MIN_RATE else nn.Identity()

    def _fused_forward(self, x):
        drop_path = self.drop_path
        if not (isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob != 0.0):
            return self._fused_block_forward(x)
        # Drop path scales the branch before the add: the last conv -> BN fused, then the rest as mmpretrain.
        pairs = self._conv_bn_pairs()
        out = x
        for conv, bn in pairs[:-1]:
            out = _fused_conv_bn(conv, bn, out)
        out = _fused_conv_bn(*pairs[-1], out, relu=False)
        identity = _shortcut(self, x)
        return torch.relu(drop_path(out) + identity)


class MMPretrainBasicBlock(_MMPretrainBlock):
    """
    mmpretrain's ResNet BasicBlock, fused: two 3x3 convs (mid_channels = out_channels // expansion), the
    dilation on conv1 only.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        expansion (int): out_channels / mid_channels; must be 1, as in mmpretrain. Default: 1.
        stride (int): conv1's stride. Default: 1.
        dilation (int): conv1's dilation (and padding). Default: 1.
        downsample (nn.Module, optional): the shortcut's [AvgPool2d ->] conv -> BN, where the shape changes.
        style (str): unused, as in mmpretrain. Default: 'pytorch'.
        with_cp (bool): recompute the block in backward instead of keeping its activations. Default: False.
        conv_cfg (dict, optional): None or type 'Conv' / 'Conv2d'. Default: None.
        norm_cfg (dict): the norm: type 'BN', 'BN2d' or 'SyncBN'. Default: dict(type='BN').
        drop_path_rate (float): the stochastic depth rate of the residual branch. Default: 0.0.
        act_cfg (dict): the activation: type 'ReLU'. Default: dict(type='ReLU', inplace=True).
        init_cfg (dict, optional): kept as ``init_cfg``, as mmengine's BaseModule does. Default: None.
    """
    _original = "mmpretrain.models.backbones.resnet.BasicBlock"

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 1, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, style: str = "pytorch", with_cp: bool = False,
                 conv_cfg: dict | None = None, norm_cfg: dict = dict(type="BN"), drop_path_rate: float = 0.0,
                 act_cfg: dict = dict(type="ReLU", inplace=True),
                 init_cfg: dict | list[dict] | None = None) -> None:
        a = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if expansion != 1:
            raise ValueAssertionError(f"{self._public_name()}: expansion must be 1, got {expansion!r}")
        name = self._setup(a)
        norm1 = _build_norm(name, norm_cfg, self.mid_channels)
        norm2 = _build_norm(name, norm_cfg, out_channels)
        self.conv1 = _conv(in_channels, self.mid_channels, 3, stride=stride, padding=dilation, dilation=dilation)
        self.bn1 = norm1
        self.conv2 = _conv(self.mid_channels, out_channels, 3, padding=1)
        self.bn2 = norm2
        self._finish(act_cfg, downsample, drop_path_rate)

    _fused_block_forward = _basic_block_forward

    def _conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2)]


class MMPretrainBottleneck(_MMPretrainBlock):
    """
    mmpretrain's ResNet Bottleneck, fused: 1x1, 3x3, 1x1 convs (mid_channels = out_channels // expansion), the
    stride on the 3x3 conv ('pytorch') or on the first 1x1 ('caffe').

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        expansion (int): out_channels / mid_channels. Default: 4.
        stride (int): the 3x3 conv's stride ('pytorch') or the first 1x1's ('caffe'). Default: 1.
        dilation (int): the 3x3 conv's dilation (and padding). Default: 1.
        downsample (nn.Module, optional): the shortcut's [AvgPool2d ->] conv -> BN, where the shape changes.
        style (str): 'pytorch' or 'caffe'. Default: 'pytorch'.
        with_cp (bool): recompute the block in backward instead of keeping its activations. Default: False.
        conv_cfg (dict, optional): None or type 'Conv' / 'Conv2d'. Default: None.
        norm_cfg (dict): the norm: type 'BN', 'BN2d' or 'SyncBN'. Default: dict(type='BN').
        act_cfg (dict): the activation: type 'ReLU'. Default: dict(type='ReLU', inplace=True).
        drop_path_rate (float): the stochastic depth rate of the residual branch. Default: 0.0.
        init_cfg (dict, optional): kept as ``init_cfg``, as mmengine's BaseModule does. Default: None.
    """
    _original = "mmpretrain.models.backbones.resnet.Bottleneck"

    def __init__(self, in_channels: int, out_channels: int, expansion: int = 4, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, style: str = "pytorch", with_cp: bool = False,
                 conv_cfg: dict | None = None, norm_cfg: dict = dict(type="BN"),
                 act_cfg: dict = dict(type="ReLU", inplace=True), drop_path_rate: float = 0.0,
                 init_cfg: dict | list[dict] | None = None) -> None:
        a = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        if style not in ("pytorch", "caffe"):
            raise ValueAssertionError(f"{self._public_name()}: style must be 'pytorch' or 'caffe', got {style!r}")
        name = self._setup(a)
        self.conv1_stride, self.conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        mid = self.mid_channels
        norms = [_build_norm(name, norm_cfg, c) for c in (mid, mid, out_channels)]
        self.conv1 = _conv(in_channels, mid, 1, stride=self.conv1_stride)
        self.bn1 = norms[0]
        self.conv2 = _conv(mid, mid, 3, stride=self.conv2_stride, padding=dilation, dilation=dilation)
        self.bn2 = norms[1]
        self.conv3 = _conv(mid, out_channels, 1)
        self.bn3 = norms[2]
        self._finish(act_cfg, downsample, drop_path_rate)

    _fused_block_forward = _bottleneck_forward

    def _conv_bn_pairs(self):
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]

    @property
    def norm3(self) -> nn.Module:
        return self.bn3


class StemConvModule(nn.Module):
    """
    mmcv's ConvModule as mmpretrain's deep stem builds it: conv (no bias) -> BN -> ReLU, keys ``conv.*`` and
    ``bn.*``, run as one fused call. Like ConvModule it initialises itself when built (Kaiming normal, fan_out,
    for the conv; unit BN), drawing the same random numbers.

    Args:
        in_channels (int): input channels.
        out_channels (int): output channels.
        stride (int): the 3x3 conv's stride.
        norm_cfg (dict): the norm: type 'BN', 'BN2d' or 'SyncBN'.
        name (str): how errors name the backbone.
    """
    norm_name = "bn"
    with_norm = with_activation = True

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_cfg: dict, name: str) -> None:
        super().__init__()
        self.conv = _conv(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn = _build_norm(name, norm_cfg, out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        if self.bn.weight is not None:  # None without affine parameters
            nn.init.constant_(self.bn.weight, 1)
            nn.init.constant_(self.bn.bias, 0)

    @property
    def norm(self) -> nn.Module:
        return self.bn

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x (Tensor[N, C, H, W]): the input.

        Returns:
            Tensor: relu(bn(conv(x))).
        """
        return _fused_conv_bn(self.conv, self.bn, x)


# ---------------------------------------------------------------------------------------------------------
# Weight initialisation (init_weights, as mmengine's BaseModule with these backbones' init_cfg)

def _installed(package):
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _normalized_layers(cfg):
    cfg = dict(cfg)
    if isinstance(cfg.get("layer"), str):
        cfg["layer"] = [cfg["layer"]]
    return cfg


def _is_default_init(cfgs):
    return [_normalized_layers(c) for c in cfgs] == [_normalized_layers(c) for c in _DEFAULT_INIT_CFG]


def _init_cfgs(init_cfg):
    if not init_cfg:
        return []
    return [init_cfg] if isinstance(init_cfg, dict) else list(init_cfg)


def _is_pretrained(cfg):
    return isinstance(cfg, dict) and cfg.get("type") == "Pretrained"


def _check_init_cfg(name, init_cfg):
    """Without mmengine fastbb applies the default init_cfg and loads local Pretrained checkpoints itself;
    anything else needs mmengine's initialisers (installed with every OpenMMLab package)."""
    if _installed("mmengine"):
        return
    cfgs = _init_cfgs(init_cfg)
    others = [c for c in cfgs if not _is_pretrained(c)]
    if others and not _is_default_init(others):
        raise ValueError(f"{name}: init_cfg {init_cfg!r} needs mmengine's initialisers, and mmengine is not "
                         f"installed (fastbb applies the default init_cfg and local Pretrained checkpoints itself)")


def _default_init(model):
    """mmengine's Kaiming (normal, fan_out, ReLU) on every Conv2d, then Constant 1 on every BN / GroupNorm,
    each bias 0: the convs draw their random numbers in the order the modules were registered, as mmengine's
    module.apply does."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.constant_(m.weight, 1)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)


def _load_local_checkpoint(name, model, cfg):
    """dict(type='Pretrained', checkpoint=PATH, prefix=None, map_location='cpu') without mmengine: a local
    file, its 'state_dict' if it has one, loaded non-strictly as mmengine does ('module.' prefixes dropped;
    with prefix, only the keys under it), missing and unexpected keys reported in a warning."""
    path = cfg.get("checkpoint")
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"{name}: init_cfg checkpoint {path!r} is not a local file (other sources need mmengine, "
                         f"which is not installed)")
    state = torch.load(path, map_location=cfg.get("map_location", "cpu"), weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    prefix = cfg.get("prefix")
    if prefix is None:
        state = {k.removeprefix("module."): v for k, v in state.items()}
    else:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"{name}: init_cfg checkpoint {path!r} has no keys under prefix {prefix!r}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        warnings.warn(f"{name}: loading {path}: missing keys {result.missing_keys}, unexpected keys "
                      f"{result.unexpected_keys}", stacklevel=3)


def _initialize(name, model, cfgs):
    if not cfgs:
        return
    if all(not _is_pretrained(c) for c in cfgs) and _is_default_init(cfgs):
        _default_init(model)
    elif _installed("mmengine"):
        from mmengine.model.weight_init import initialize
        initialize(model, copy.deepcopy(cfgs))
    else:
        for cfg in cfgs:
            if not _is_pretrained(cfg):
                raise ValueError(f"{name}: init_cfg {cfg!r} needs mmengine's initialisers, and mmengine is not "
                                 f"installed")
            _load_local_checkpoint(name, model, cfg)


def _zero_last_norms(model):
    """zero_init_residual: the last BN of every block zeroed (weight and bias), so each block starts as the
    identity."""
    for m in model.modules():
        if isinstance(m, _Block):
            last = m.bn3 if hasattr(m, "conv3") else m.bn2
            if last.weight is not None:  # None without affine parameters
                nn.init.constant_(last.weight, 0)
                nn.init.constant_(last.bias, 0)


# ---------------------------------------------------------------------------------------------------------
# Backbones

_BACKBONE_ARGS = """
    Args:
        depth (int): Depth of resnet, from {{18, 34, 50, 101, 152}}.
        in_channels (int): Number of input image channels. Default: 3.
        stem_channels (int{stem_optional}): Number of stem channels. Default: {stem_default}.
        base_channels (int): Number of base channels of res layer. Default: 64.{expansion}
        num_stages (int): Resnet stages, in [1, 4]. Default: 4.
        strides (Sequence[int]): Strides of the first block of each stage. Default: (1, 2, 2, 2).
        dilations (Sequence[int]): Dilation of each stage. Default: (1, 1, 1, 1).
        out_indices (Sequence[int]): Output from which stages. Default: {out_indices}.
        style (str): 'pytorch' (the stride-two layer is the 3x3 conv) or 'caffe' (the first 1x1 conv).
            Default: 'pytorch'.
        deep_stem (bool): Replace the 7x7 conv in the input stem with three 3x3 convs. Default: False.
        avg_down (bool): Use AvgPool instead of stride conv when downsampling in the bottleneck
            ({avg_down}). Default: False.
        frozen_stages (int): Stages to be frozen (stop grad and set eval mode); -1 means not freezing any
            parameters. Default: -1.
        conv_cfg (dict, optional): None or type 'Conv' / 'Conv2d' (other convs build {package}'s ResNet).
            Default: None.
        norm_cfg (dict): the norm layers: type 'BN', 'BN2d' or 'SyncBN' (other norms build {package}'s ResNet).
            Default: dict(type='BN', requires_grad=True).
        norm_eval (bool): Whether to set norm layers to eval mode, namely, freeze running stats (mean and
            var). Default: {norm_eval}.{mmdet_args}
        with_cp (bool): Use checkpoint or not. Using checkpoint will save some memory while slowing down the
            training speed. Default: False.
        zero_init_residual (bool): Whether init_weights zeroes the last norm layer of every block, so that
            the blocks start as identities. Default: True.{pretrained}
        init_cfg (dict or list[dict], optional): what init_weights applies. Default: {init_default}.{drop_path}
"""
_MMDET_ARGS = """
        dcn (dict, optional): deformable convs in the stages of stage_with_dcn (build {package}'s ResNet).
            Default: None.
        stage_with_dcn (Sequence[bool]): the stages with dcn. Default: (False, False, False, False).
        plugins (list[dict], optional): None (plugins build {package}'s ResNet). Default: None."""
_MMSEG_ARGS = """
        multi_grid (Sequence[int], optional): the dilations of the blocks of the last stage. Default: None.
        contract_dilation (bool): whether the first block of a stage with dilation d > 1 uses d // 2.
            Default: False."""
_PRETRAINED_ARG = """
        pretrained (str, optional): a checkpoint init_weights loads (deprecated, as in {package}: use
            init_cfg=dict(type='Pretrained', checkpoint=...)). Default: None."""


def _backbone_doc(package, **fields):
    mmdet_like = package != "mmpretrain"
    values = dict(
        package=package, stem_optional=", optional" if package == "mmdet" else "",
        stem_default="None (base_channels)" if package == "mmdet" else "64",
        expansion="" if mmdet_like else ("\n        expansion (int, optional): out_channels / mid_channels of the "
                                          "blocks. Default: None (1 for BasicBlock, 4 for Bottleneck)."),
        out_indices="(3,)" if package == "mmpretrain" else "(0, 1, 2, 3)",
        avg_down="an AvgPool2d before every downsample conv" if mmdet_like
        else "an AvgPool2d before the downsample convs of stride > 1",
        norm_eval="True" if package == "mmdet" else "False",
        mmdet_args=(_MMDET_ARGS + (_MMSEG_ARGS if package == "mmseg" else "")).format(package=package)
        if mmdet_like else "",
        pretrained=_PRETRAINED_ARG.format(package=package) if mmdet_like else "",
        init_default=("None (the default: Kaiming convs, unit norms)" if mmdet_like
                      else "[dict(type='Kaiming', layer=['Conv2d']), dict(type='Constant', val=1, "
                           "layer=['_BatchNorm', 'GroupNorm'])]"),
        drop_path="" if mmdet_like else ("\n        drop_path_rate (float): stochastic depth rate, rising linearly "
                                          "over the blocks from 0. Default: 0.0."))
    values.update(fields)
    return _BACKBONE_ARGS.format(**values)


@not_scriptable
class _ResNetBackbone(FallsBackBeforeInit, nn.Module):
    """What the three packages' ResNets share: the stem, freezing, norm_eval, init_weights and the forward.
    Subclasses build the stages (_setup)."""

    arch_settings: dict = {}
    _package: str

    @classmethod
    def _unfused(cls, a):
        option = _norm_option(a["norm_cfg"]) or _conv_option(a["conv_cfg"])
        if option is None and a.get("dcn") is not None:
            stages = a["stage_with_dcn"]
            try:
                uses_dcn = len(stages) == a["num_stages"] and any(stages)
            except TypeError:
                uses_dcn = False
            option = "dcn (deformable convolution)" if uses_dcn else None
        if option is None and a.get("plugins") is not None:
            option = "plugins"
        return option

    def _check_stages(self, name, depth, num_stages, strides, dilations, out_indices):
        if depth not in self.arch_settings:
            raise KeyError(f"{name}: invalid depth {depth} for resnet; expected one of {sorted(self.arch_settings)}")
        if not 1 <= num_stages <= 4:
            raise ValueAssertionError(f"{name}: num_stages must be in [1, 4], got {num_stages}")
        if not len(strides) == len(dilations) == num_stages:
            raise ValueAssertionError(f"{name}: strides and dilations must have num_stages ({num_stages}) entries, "
                                      f"got strides={tuple(strides)}, dilations={tuple(dilations)}")
        # As the original: every index must be below num_stages (an empty sequence raises), negative ones are
        # accepted and never output.
        if not len(out_indices) or max(out_indices) >= num_stages:
            raise ValueAssertionError(f"{name}: out_indices must be stage indices below num_stages ({num_stages}), "
                                      f"got {tuple(out_indices)}")

    def _set_common(self, a, stem_channels):
        for key in ("depth", "base_channels", "num_stages", "strides", "dilations", "out_indices", "style",
                    "deep_stem", "avg_down", "frozen_stages", "conv_cfg", "norm_cfg", "with_cp", "norm_eval",
                    "zero_init_residual"):
            setattr(self, key, a[key])
        self.stem_channels = stem_channels
        self._is_init = False

    def _check_style(self, name):
        """The Bottleneck's check, named after the backbone (BasicBlock ResNets take any style, as the originals)."""
        if self.block in (MMBottleneck, MMPretrainBottleneck) and self.style not in ("pytorch", "caffe"):
            raise ValueAssertionError(f"{name}: style must be 'pytorch' or 'caffe', got {self.style!r}")

    def _make_stem_layer(self, name, in_channels, stem_channels):
        """mmdet / mmseg: conv1 (7x7) -> bn1 -> relu, or the deep stem as one Sequential (keys stem.{0,1,3,4,6,7})."""
        if self.deep_stem:
            half = stem_channels // 2
            convs = [_conv(in_channels, half, 3, stride=2, padding=1), _conv(half, half, 3, padding=1),
                     _conv(half, stem_channels, 3, padding=1)]
            layers = []
            for conv in convs:
                layers += [conv, _build_norm(name, self.norm_cfg, conv.out_channels), nn.ReLU(inplace=True)]
            self.stem = nn.Sequential(*layers)
        else:
            self.conv1 = _conv(in_channels, stem_channels, 7, stride=2, padding=3)
            self.norm1_name = "bn1"
            self.bn1 = _build_norm(name, self.norm_cfg, stem_channels)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def _stem_pairs(self):
        s = self.stem
        return [(s[0], s[1]), (s[3], s[4]), (s[6], s[7])]

    @property
    def norm1(self) -> nn.Module:
        return self.bn1

    @property
    def is_init(self) -> bool:
        return self._is_init

    @is_init.setter
    def is_init(self, value: bool) -> None:
        self._is_init = value

    def _zero_before_pretrained(self):
        return False

    def _zero_after_pretrained(self):
        return False

    def init_weights(self) -> None:
        """
        Applies ``init_cfg`` as mmengine's BaseModule does for the original (mmengine's runner calls this
        once): the default (Kaiming convs, unit norms and, with zero_init_residual, every block's last norm
        zeroed), or the initialisers and checkpoints ``init_cfg`` names. A second call does nothing, as in
        mmengine. Returns nothing.
        """
        name = self._public_name()
        if self._is_init:
            warnings.warn(f"{name}: init_weights has been called more than once; the second call does nothing",
                          stacklevel=2)
            return
        cfgs = _init_cfgs(self.init_cfg)
        _initialize(name, self, [c for c in cfgs if not _is_pretrained(c)])
        if self._zero_before_pretrained():
            _zero_last_norms(self)
        _initialize(name, self, [c for c in cfgs if _is_pretrained(c)])
        if self._zero_after_pretrained():
            _zero_last_norms(self)
        self._is_init = True

    def _freeze_stages(self):
        """frozen_stages=i: the stem and layer1..i stop training (no gradients, norms in eval mode)."""
        if self.frozen_stages >= 0:
            if self.deep_stem:
                self.stem.eval()
                frozen = [self.stem]
            else:
                self.bn1.eval()
                frozen = [self.conv1, self.bn1]
            for m in frozen:
                for param in m.parameters():
                    param.requires_grad = False
        for i in range(1, self.frozen_stages + 1):
            m = getattr(self, f"layer{i}")
            m.eval()
            for param in m.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> "_ResNetBackbone":
        """
        Sets training mode, keeping the frozen stages frozen and, with norm_eval, every BN in eval mode.

        Args:
            mode (bool): training (True) or eval (False) mode. Default: True.

        Returns:
            nn.Module: self.
        """
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """
        Args:
            x (Tensor[N, C, H, W]): the images.

        Returns:
            Tuple[Tensor]: the outputs of the stages in ``out_indices``, in stage order, in x's layout.
        """
        if self.training and runs_channels_last(self, x):
            # Training runs channels_last inside (see runs_channels_last); the outputs come back as the
            # caller laid x out.
            return tuple(out.contiguous() for out in self._forward(x.contiguous(memory_format=torch.channels_last)))
        return self._forward(x)

    def _forward(self, x):
        if self.deep_stem:
            for conv, bn in self._stem_pairs():
                x = _fused_conv_bn(conv, bn, x)
        else:
            x = _fused_conv_bn(self.conv1, self.bn1, x)
        x = self.maxpool(x)
        outs = []
        for i, layer_name in enumerate(self.res_layers):
            x = getattr(self, layer_name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


class _MMDetStyleResNet(_ResNetBackbone):
    """mmdet's and mmseg's ResNet (mmseg's adds multi_grid and contract_dilation)."""

    arch_settings = {
        18: (MMBasicBlock, (2, 2, 2, 2)),
        34: (MMBasicBlock, (3, 4, 6, 3)),
        50: (MMBottleneck, (3, 4, 6, 3)),
        101: (MMBottleneck, (3, 4, 23, 3)),
        152: (MMBottleneck, (3, 8, 36, 3)),
    }

    def _zero_before_pretrained(self):
        return self._zero_init_blocks  # mmdet's block init_cfg, applied before any Pretrained cfg

    def _setup(self, a):
        name = self._public_name()
        depth = a["depth"]
        if depth not in self.arch_settings:
            raise KeyError(f"{name}: invalid depth {depth} for resnet; expected one of {sorted(self.arch_settings)}")
        init_cfg, pretrained = copy.deepcopy(a["init_cfg"]), a["pretrained"]
        if init_cfg and pretrained:
            raise ValueAssertionError(f"{name}: init_cfg and pretrained cannot be set at the same time")
        self._zero_init_blocks = False
        if isinstance(pretrained, str):
            warnings.warn(f"{name}: pretrained is deprecated (as in {self._package}); use "
                          f"init_cfg=dict(type='Pretrained', checkpoint=...)", stacklevel=3)
            init_cfg = dict(type="Pretrained", checkpoint=pretrained)
        elif pretrained is None:
            if init_cfg is None:
                init_cfg = copy.deepcopy(_DEFAULT_INIT_CFG)
                self._zero_init_blocks = a["zero_init_residual"]
        else:
            raise TypeError(f"{name}: pretrained must be a str or None, got {type(pretrained).__name__}")
        self.init_cfg = init_cfg
        num_stages = a["num_stages"]
        self._check_stages(name, depth, num_stages, a["strides"], a["dilations"], a["out_indices"])
        if a["dcn"] is not None and len(a["stage_with_dcn"]) != num_stages:
            raise ValueAssertionError(f"{name}: stage_with_dcn must have num_stages ({num_stages}) entries, got "
                                      f"{tuple(a['stage_with_dcn'])}")
        option = self._unfused(a)
        if option is not None:  # only by calling __init__ directly: __new__ builds the original
            raise ValueError(f"{name}: {option} is not fused by fastbb")
        _check_conv_cfg(name, a["conv_cfg"])
        _check_init_cfg(name, init_cfg)
        stem_channels = a["base_channels"] if a["stem_channels"] is None else a["stem_channels"]
        self._set_common(a, stem_channels)
        self.dcn, self.stage_with_dcn, self.plugins = a["dcn"], a["stage_with_dcn"], a["plugins"]
        self.block, stage_blocks = self.arch_settings[depth]
        self.stage_blocks = stage_blocks[:num_stages]
        self.inplanes = stem_channels

        self._make_stem_layer(name, a["in_channels"], stem_channels)
        self._check_style(name)
        self.res_layers = []
        multi_grid, contract = a.get("multi_grid"), a.get("contract_dilation", False)
        for i, num_blocks in enumerate(self.stage_blocks):
            planes = a["base_channels"] * 2 ** i
            last_stage = i == len(self.stage_blocks) - 1
            layer = self._make_res_layer(name, planes, num_blocks, a["strides"][i], a["dilations"][i],
                                         multi_grid if last_stage else None, contract)
            self.inplanes = planes * self.block.expansion
            self.add_module(f"layer{i + 1}", layer)
            self.res_layers.append(f"layer{i + 1}")
        self._freeze_stages()
        self.feat_dim = self.block.expansion * a["base_channels"] * 2 ** (len(self.stage_blocks) - 1)

    def _make_res_layer(self, name, planes, num_blocks, stride, dilation, multi_grid, contract_dilation):
        """One stage, as mmseg's ResLayer (mmdet's is its multi_grid=None, contract_dilation=False case)."""
        block, inplanes = self.block, self.inplanes
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            layers = []
            conv_stride = stride
            if self.avg_down:  # in every stage, also where the stride is 1 (then an identity)
                conv_stride = 1
                layers.append(nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False))
            layers += [_conv(inplanes, planes * block.expansion, 1, stride=conv_stride),
                       _build_norm(name, self.norm_cfg, planes * block.expansion)]
            downsample = nn.Sequential(*layers)
        if multi_grid is not None:
            if len(multi_grid) < num_blocks:
                raise _ValueIndexError(f"{name}: multi_grid needs a dilation for each of the {num_blocks} blocks of "
                                       f"the last stage, got {tuple(multi_grid)}")
            block_dilations = list(multi_grid[:num_blocks])
        else:
            first = dilation // 2 if dilation > 1 and contract_dilation else dilation
            block_dilations = [first] + [dilation] * (num_blocks - 1)
        blocks = []
        for j, block_dilation in enumerate(block_dilations):
            blocks.append(block(inplanes if j == 0 else planes * block.expansion, planes, stride if j == 0 else 1,
                                block_dilation, downsample if j == 0 else None, self.style, self.with_cp,
                                conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg))
        return nn.Sequential(*blocks)


@register("ResNet", scopes=("mmdet",))
class MMResNet(_MMDetStyleResNet):
    __doc__ = """
    mmdet's ``ResNet`` backbone, fused (see the module docstring). ``fastbb.models.MMResNet`` avoids a clash
    with fastbb.models.ResNet, torchvision's classifier; in mmdet configs its type name is 'ResNet'.
    ``forward(x)`` returns the tuple of the ``out_indices`` stage outputs.
""" + _backbone_doc("mmdet")
    _package = "mmdet"
    _original = "mmdet.models.backbones.resnet.ResNet"

    def __init__(self, depth: int, in_channels: int = 3, stem_channels: int | None = None, base_channels: int = 64,
                 num_stages: int = 4, strides: Sequence[int] = (1, 2, 2, 2), dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Sequence[int] = (0, 1, 2, 3), style: str = "pytorch", deep_stem: bool = False,
                 avg_down: bool = False, frozen_stages: int = -1, conv_cfg: dict | None = None,
                 norm_cfg: dict = dict(type="BN", requires_grad=True), norm_eval: bool = True,
                 dcn: dict | None = None, stage_with_dcn: Sequence[bool] = (False, False, False, False),
                 plugins: list[dict] | None = None, with_cp: bool = False, zero_init_residual: bool = True,
                 pretrained: str | None = None, init_cfg: dict | list[dict] | None = None) -> None:
        a = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self._setup(a)


@register("ResNetV1c", scopes=("mmdet",))
class ResNetV1c(MMResNet):
    """
    A ResNetV1c for mmdet configs: :class:`MMResNet` with the deep stem (three 3x3 convs in place of the 7x7),
    from `Bag of Tricks for Image Classification with Convolutional Neural Networks
    <https://arxiv.org/abs/1812.01187>`_. mmdet has no class of this name: its unfused counterpart is mmdet's
    ResNet with ``deep_stem=True``.

    Args:
        **kwargs: :class:`MMResNet`'s arguments other than ``deep_stem`` and ``avg_down``.
    """
    _variant = dict(deep_stem=True, avg_down=False)
    _original_args = _variant

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._variant, **kwargs)


@register("ResNetV1d", scopes=("mmdet",))
class ResNetV1d(MMResNet):
    """
    mmdet's ``ResNetV1d``: :class:`MMResNet` with the deep stem and an AvgPool2d before every downsample 1x1 conv
    (which keeps stride 1), from `Bag of Tricks for Image Classification with Convolutional Neural Networks
    <https://arxiv.org/abs/1812.01187>`_.

    Args:
        **kwargs: :class:`MMResNet`'s arguments other than ``deep_stem`` and ``avg_down``.
    """
    _original = "mmdet.models.backbones.resnet.ResNetV1d"
    _variant = dict(deep_stem=True, avg_down=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._variant, **kwargs)


@register("ResNet", scopes=("mmseg",))
class MMSegResNet(_MMDetStyleResNet):
    __doc__ = """
    mmseg's ``ResNet`` backbone, fused (see the module docstring): mmdet's with ``stem_channels=64``,
    ``norm_eval=False``, ``multi_grid`` and ``contract_dilation``. In mmseg configs its type name is 'ResNet'.
    ``forward(x)`` returns the tuple of the ``out_indices`` stage outputs.
""" + _backbone_doc("mmseg")
    _package = "mmseg"
    _original = "mmseg.models.backbones.resnet.ResNet"

    def __init__(self, depth: int, in_channels: int = 3, stem_channels: int = 64, base_channels: int = 64,
                 num_stages: int = 4, strides: Sequence[int] = (1, 2, 2, 2), dilations: Sequence[int] = (1, 1, 1, 1),
                 out_indices: Sequence[int] = (0, 1, 2, 3), style: str = "pytorch", deep_stem: bool = False,
                 avg_down: bool = False, frozen_stages: int = -1, conv_cfg: dict | None = None,
                 norm_cfg: dict = dict(type="BN", requires_grad=True), norm_eval: bool = False,
                 dcn: dict | None = None, stage_with_dcn: Sequence[bool] = (False, False, False, False),
                 plugins: list[dict] | None = None, multi_grid: Sequence[int] | None = None,
                 contract_dilation: bool = False, with_cp: bool = False, zero_init_residual: bool = True,
                 pretrained: str | None = None, init_cfg: dict | list[dict] | None = None) -> None:
        a = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self._setup(a)
        self.pretrained = pretrained
        self.multi_grid = multi_grid
        self.contract_dilation = contract_dilation


@register("ResNetV1c", scopes=("mmseg",))
class MMSegResNetV1c(MMSegResNet):
    """
    mmseg's ``ResNetV1c``: :class:`MMSegResNet` with the deep stem (three 3x3 convs in place of the 7x7).

    Args:
        **kwargs: :class:`MMSegResNet`'s arguments other than ``deep_stem`` and ``avg_down``.
    """
    _original = "mmseg.models.backbones.resnet.ResNetV1c"
    _variant = dict(deep_stem=True, avg_down=False)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._variant, **kwargs)


@register("ResNetV1d", scopes=("mmseg",))
class MMSegResNetV1d(MMSegResNet):
    """
    mmseg's ``ResNetV1d``: :class:`MMSegResNet` with the deep stem and an AvgPool2d before every downsample conv.

    Args:
        **kwargs: :class:`MMSegResNet`'s arguments other than ``deep_stem`` and ``avg_down``.
    """
    _original = "mmseg.models.backbones.resnet.ResNetV1d"
    _variant = dict(deep_stem=True, avg_down=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._variant, **kwargs)


# mmpretrain's layer-wise learning-rate decay (get_layer_depth): for the stage depths of layer2 and layer3,
# how many blocks of each share one layer id.
_LAYER_DEPTH_GROUPS = {(4, 6): (2, 3), (4, 23): (2, 3), (8, 36): (4, 4), (24, 36): (4, 4), (30, 48): (5, 6)}


@register("ResNet", scopes=("mmpretrain",))
class MMPretrainResNet(_ResNetBackbone):
    __doc__ = """
    mmpretrain's ``ResNet`` backbone, fused (see the module docstring): ``out_indices=(3,)``, ``expansion``,
    ``drop_path_rate``, a deep stem of ConvModules. In mmpretrain configs its type name is 'ResNet'.
    ``forward(x)`` returns the tuple of the ``out_indices`` stage outputs.
""" + _backbone_doc("mmpretrain")
    _package = "mmpretrain"
    _original = "mmpretrain.models.backbones.resnet.ResNet"
    arch_settings = {
        18: (MMPretrainBasicBlock, (2, 2, 2, 2)),
        34: (MMPretrainBasicBlock, (3, 4, 6, 3)),
        50: (MMPretrainBottleneck, (3, 4, 6, 3)),
        101: (MMPretrainBottleneck, (3, 4, 23, 3)),
        152: (MMPretrainBottleneck, (3, 8, 36, 3)),
    }

    def __init__(self, depth: int, in_channels: int = 3, stem_channels: int = 64, base_channels: int = 64,
                 expansion: int | None = None, num_stages: int = 4, strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1), out_indices: Sequence[int] = (3,), style: str = "pytorch",
                 deep_stem: bool = False, avg_down: bool = False, frozen_stages: int = -1,
                 conv_cfg: dict | None = None, norm_cfg: dict = dict(type="BN", requires_grad=True),
                 norm_eval: bool = False, with_cp: bool = False, zero_init_residual: bool = True,
                 init_cfg: dict | list[dict] | None = [
                     dict(type="Kaiming", layer=["Conv2d"]),
                     dict(type="Constant", val=1, layer=["_BatchNorm", "GroupNorm"])],
                 drop_path_rate: float = 0.0) -> None:
        a = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        name = self._public_name()
        self.init_cfg = copy.deepcopy(init_cfg)
        self._check_stages(name, depth, num_stages, strides, dilations, out_indices)
        option = self._unfused(a)
        if option is not None:  # only by calling __init__ directly: __new__ builds the original
            raise ValueError(f"{name}: {option} is not fused by fastbb")
        _check_conv_cfg(name, conv_cfg)
        _check_init_cfg(name, init_cfg)
        self._set_common(a, stem_channels)
        self.block, stage_blocks = self.arch_settings[depth]
        self.stage_blocks = stage_blocks[:num_stages]
        if expansion is None:
            expansion = 1 if self.block is MMPretrainBasicBlock else 4
        elif not isinstance(expansion, int):
            raise TypeError(f"{name}: expansion must be an integer or None, got {expansion!r}")
        elif expansion <= 0:
            raise ValueAssertionError(f"{name}: expansion must be positive, got {expansion}")
        self.expansion = expansion

        self._make_stem_layer(name, in_channels, stem_channels)
        self._check_style(name)
        self.res_layers = []
        in_stage, out_stage = stem_channels, base_channels * expansion
        # Stochastic depth rises linearly over every block of the architecture (also those of stages
        # num_stages leaves out); the rates are float32 values, as torch.linspace gives them.
        rates = torch.linspace(0, drop_path_rate, sum(stage_blocks)).tolist()
        for i, num_blocks in enumerate(self.stage_blocks):
            layer = self._make_res_layer(name, num_blocks, in_stage, out_stage, strides[i], dilations[i],
                                         rates[:num_blocks])
            rates = rates[num_blocks:]
            in_stage, out_stage = out_stage, out_stage * 2
            self.add_module(f"layer{i + 1}", layer)
            self.res_layers.append(f"layer{i + 1}")
        self._freeze_stages()
        self.feat_dim = layer[-1].out_channels

    def _make_stem_layer(self, name, in_channels, stem_channels):
        if not self.deep_stem:
            return super()._make_stem_layer(name, in_channels, stem_channels)
        half = stem_channels // 2
        self.stem = nn.Sequential(StemConvModule(in_channels, half, 2, self.norm_cfg, name),
                                  StemConvModule(half, half, 1, self.norm_cfg, name),
                                  StemConvModule(half, stem_channels, 1, self.norm_cfg, name))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def _stem_pairs(self):
        return [(m.conv, m.bn) for m in self.stem]

    def _make_res_layer(self, name, num_blocks, in_channels, out_channels, stride, dilation, drop_path_rates):
        """One stage, as mmpretrain's ResLayer: the AvgPool2d (avg_down) only where the stride is not 1."""
        downsample = None
        if stride != 1 or in_channels != out_channels:
            layers = []
            conv_stride = stride
            if self.avg_down and stride != 1:
                conv_stride = 1
                layers.append(nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False))
            layers += [_conv(in_channels, out_channels, 1, stride=conv_stride),
                       _build_norm(name, self.norm_cfg, out_channels)]
            downsample = nn.Sequential(*layers)
        blocks = []
        for j in range(num_blocks):
            blocks.append(self.block(in_channels=in_channels if j == 0 else out_channels, out_channels=out_channels,
                                     expansion=self.expansion, stride=stride if j == 0 else 1, dilation=dilation,
                                     downsample=downsample if j == 0 else None, style=self.style,
                                     with_cp=self.with_cp, conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                                     drop_path_rate=drop_path_rates[j]))
        return nn.Sequential(*blocks)

    def _zero_after_pretrained(self):
        # mmpretrain zeroes the last norms after loading, unless init_cfg is one Pretrained dict.
        return self.zero_init_residual and not (isinstance(self.init_cfg, dict) and _is_pretrained(self.init_cfg))

    def get_layer_depth(self, param_name: str, prefix: str = "") -> tuple[int, int]:
        """
        The layer id of a parameter for layer-wise learning-rate decay, as mmpretrain's ResNet numbers them:
        the stem 0, layer1 1, then groups of blocks of layer2 and layer3, layer4 last, other modules after.

        Args:
            param_name (str): the parameter's name in the whole model (e.g. 'backbone.layer2.1.conv1.weight').
            prefix (str): the backbone's prefix in the model. Default: ''.

        Returns:
            Tuple[int, int]: the parameter's layer id and the number of layer ids.
        """
        depths = self.stage_blocks
        groups = _LAYER_DEPTH_GROUPS.get((depths[1], depths[2]))
        if groups is None:
            raise NotImplementedError(f"{self._public_name()}.get_layer_depth: no layer grouping for stage depths "
                                      f"{tuple(depths)}")
        # the number of layer ids layer2 and layer3 take (a small margin keeps whole quotients whole)
        ids2, ids3 = (math.ceil(d / g - 1e-5) for d, g in zip(depths[1:3], groups))
        last = 2 + ids2 + ids3
        count = last + 2
        if not param_name.startswith(prefix):
            return last + 1, count
        if not param_name.startswith("backbone.layer"):
            return 0, count
        stage, block = int(param_name.split(".")[1][len("layer"):]), int(param_name.split(".")[2])
        layer_id = {1: 1, 2: 2 + block // groups[0], 3: 2 + ids2 + block // groups[1]}.get(stage, last)
        return layer_id, count


@register("ResNetV1c", scopes=("mmpretrain",))
class MMPretrainResNetV1c(MMPretrainResNet):
    """
    mmpretrain's ``ResNetV1c``: :class:`MMPretrainResNet` with the deep stem (three ConvModules: keys
    ``stem.0.conv.weight``, ``stem.0.bn.*``, ...).

    Args:
        **kwargs: :class:`MMPretrainResNet`'s arguments other than ``deep_stem`` and ``avg_down``.
    """
    _original = "mmpretrain.models.backbones.resnet.ResNetV1c"
    _variant = dict(deep_stem=True, avg_down=False)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._variant, **kwargs)


@register("ResNetV1d", scopes=("mmpretrain",))
class MMPretrainResNetV1d(MMPretrainResNet):
    """
    mmpretrain's ``ResNetV1d``: :class:`MMPretrainResNet` with the deep stem and an AvgPool2d before the
    downsample convs of stride > 1 (layer1's downsample stays ``downsample.{0,1}``).

    Args:
        **kwargs: :class:`MMPretrainResNet`'s arguments other than ``deep_stem`` and ``avg_down``.
    """
    _original = "mmpretrain.models.backbones.resnet.ResNetV1d"
    _variant = dict(deep_stem=True, avg_down=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**self._variant, **kwargs)
