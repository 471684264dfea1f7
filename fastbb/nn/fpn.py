"""Drop-in FPNs whose top-down merges run fused: torchvision's FeaturePyramidNetwork and mmdet's FPN.

Each merge `lateral_conv(x) + interpolate(last, size=lateral's, mode="nearest")` runs as fastbb.ops.fpn_merge
(1x1 conv with the upsample-add fused in) when the lateral conv is a plain biased/unbiased conv, and as
fastbb.ops.upsample_nearest_add after the lateral block when it has a norm or an activation. torchvision's FPN
runs its 3x3 output convs through fastbb's conv tables (fastbb.nn.conv_layers: the Winograd conv on the CPU).
Parameters, state_dict keys and outputs are those of the originals.
"""
from collections import OrderedDict
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from fastbb._fallback import FallsBackToOriginal, NotFusedError
from fastbb._registry import register
from fastbb._tracing import not_scriptable
from fastbb.nn.conv_layers import layer_forward, runs_fused_convs
from fastbb.ops._common import TypeAssertionError, ValueAssertionError
from fastbb.ops.fpn_merge import fpn_merge
from fastbb.ops.upsample_nearest_add import upsample_nearest_add


def _plain_conv1x1(block):
    """The block's conv when the block is a plain 1x1 conv with nothing after it, else None."""
    if isinstance(block, nn.Sequential):
        conv = block[0] if len(block) == 1 else None
    elif isinstance(block, ConvModule):
        conv = block.conv if block.is_plain_conv else None
    else:
        conv = None
    if (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1):
        return conv
    return None


def _merge(lateral_block, x, top):
    """lateral_block(x) + upsample(top, size of the lateral): fused into the 1x1 conv when the block is that
    conv alone, else the block then the fused upsample-add."""
    conv = _plain_conv1x1(lateral_block)
    if conv is not None:
        return fpn_merge(x, conv.weight, conv.bias, top)
    return upsample_nearest_add(top, lateral_block(x))


# ---------------------------------------------------------------------------------------------------------
# torchvision: torchvision.ops.FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

def _conv_norm(in_channels, out_channels, kernel_size, norm_layer):
    """torchvision's Conv2dNormActivation without activation: keys `0.*` (conv) and `1.*` (norm)."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2,
                        bias=norm_layer is None)]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    return nn.Sequential(*layers)


def _run_block(blocks, x, idx):
    """blocks[idx](x), negative idx counting from the end, or x when no block has that index."""
    idx = idx + len(blocks) if idx < 0 else idx
    return blocks[idx](x) if 0 <= idx < len(blocks) else x


class ExtraFPNBlock(nn.Module):
    """torchvision's base class for the extra block in the FPN, run on its outputs."""

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """
        Args:
            results (List[Tensor]): the result of the FPN
            x (List[Tensor]): the original feature maps
            names (List[str]): the names for each one of the original feature maps

        Returns:
            results (List[Tensor]): the extended set of results of the FPN
            names (List[str]): the extended set of names for the results
        """
        raise NotImplementedError


class LastLevelMaxPool(ExtraFPNBlock):
    """
    torchvision's: applies a max_pool2d (not actual max_pool2d, we just subsample) on top of the last
    feature map, as level "pool".
    """

    def forward(self, x: list[Tensor], y: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """
        Args:
            x (List[Tensor]): the result of the FPN, extended in place.
            y (List[Tensor]): the original feature maps (unused).
            names (List[str]): the names of the results, extended in place.

        Returns:
            x (List[Tensor]): the results with ``max_pool2d(x[-1], 1, 2, 0)`` appended.
            names (List[str]): the names with "pool" appended.
        """
        names.append("pool")
        x.append(F.max_pool2d(x[-1], kernel_size=1, stride=2, padding=0))
        return x, names


class LastLevelP6P7(ExtraFPNBlock):
    """
    torchvision's: adds the P6 and P7 levels of RetinaNet by 3x3 stride-2 convs, P6 from P5 when
    ``in_channels == out_channels``, else from C5.

    Args:
        in_channels (int): the channels of the map P6 is computed from.
        out_channels (int): the channels of P6 and P7.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for module in (self.p6, self.p7):
            nn.init.kaiming_uniform_(module.weight, a=1)
            nn.init.constant_(module.bias, 0)
        self.use_P5 = in_channels == out_channels

    def forward(self, p: list[Tensor], c: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        """
        Args:
            p (List[Tensor]): the result of the FPN, extended in place.
            c (List[Tensor]): the original feature maps.
            names (List[str]): the names of the results, extended in place.

        Returns:
            p (List[Tensor]): the results with P6 and P7 appended.
            names (List[str]): the names with "p6" and "p7" appended.
        """
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        p7 = self.p7(F.relu(p6))
        p.extend([p6, p7])
        names.extend(["p6", "p7"])
        return p, names


@not_scriptable
class FeaturePyramidNetwork(nn.Module):
    """
    torchvision.ops.FeaturePyramidNetwork with fused top-down merges: a FPN on top of a set of feature
    maps, as in `"Feature Pyramid Network for Object Detection" <https://arxiv.org/abs/1612.03144>`_.

    The feature maps are supposed to be in increasing depth order (highest resolution first). state_dict
    keys are torchvision's, ``inner_blocks.i.0.*`` and ``layer_blocks.i.0.*`` (older
    ``inner_blocks.i.weight`` checkpoints are upgraded on load, as torchvision does). Under
    ``torch.autocast`` every intermediate and output map has the dtype torchvision's has under the same
    autocast (the fused merges follow :func:`fastbb.ops.fpn_merge`'s autocast rule).

    Args:
        in_channels_list (List[int]): number of channels for each feature map that is passed to the module.
        out_channels (int): number of channels of the FPN representation.
        extra_blocks (ExtraFPNBlock, optional): if provided, extra operations will be performed. It is
            expected to take the fpn features, the original features and the names of the original
            features as input, and returns a new list of feature maps and their corresponding names.
        norm_layer (Callable[..., nn.Module], optional): Module specifying the normalization layer to use.
            Default: None.
    """

    _version = 2

    def __init__(self, in_channels_list: list[int], out_channels: int, extra_blocks: ExtraFPNBlock | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        self.inner_blocks = nn.ModuleList()
        self.layer_blocks = nn.ModuleList()
        for in_channels in in_channels_list:
            if in_channels == 0:
                raise ValueError("fastbb.nn.FeaturePyramidNetwork: in_channels=0 is not supported (as in torchvision)")
            self.inner_blocks.append(_conv_norm(in_channels, out_channels, 1, norm_layer))
            self.layer_blocks.append(_conv_norm(out_channels, out_channels, 3, norm_layer))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        if extra_blocks is not None and not isinstance(extra_blocks, nn.Module):
            raise TypeError(f"fastbb.nn.FeaturePyramidNetwork: extra_blocks must be an ExtraFPNBlock module, "
                            f"got {type(extra_blocks).__name__}")
        self.extra_blocks = extra_blocks

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            for i in range(len(self.inner_blocks)):
                for block in ("inner_blocks", "layer_blocks"):
                    for kind in ("weight", "bias"):
                        old_key = f"{prefix}{block}.{i}.{kind}"
                        if old_key in state_dict:
                            state_dict[f"{prefix}{block}.{i}.0.{kind}"] = state_dict.pop(old_key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_result_from_inner_blocks(self, x: Tensor, idx: int) -> Tensor:
        """
        torchvision's equivalent of ``self.inner_blocks[idx](x)`` (written for TorchScript there).

        Args:
            x (Tensor): the input of the block.
            idx (int): the block's index; negative counts from the end.

        Returns:
            Tensor: the block's output, or x itself when no block has that index (as in torchvision).
        """
        return _run_block(self.inner_blocks, x, idx)

    def get_result_from_layer_blocks(self, x: Tensor, idx: int) -> Tensor:
        """
        :meth:`get_result_from_inner_blocks` for the output convs: ``self.layer_blocks[idx](x)``.

        Args:
            x (Tensor): a merged map.
            idx (int): which 3x3 output block runs it, counted from the end when negative.

        Returns:
            Tensor: that block's output (x when there is no such block).
        """
        return _run_block(self.layer_blocks, x, idx)

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """
        Computes the FPN for a set of feature maps.

        Args:
            x (OrderedDict[str, Tensor]): feature maps for each feature level.

        Returns:
            results (OrderedDict[str, Tensor]): feature maps after FPN layers. They are ordered from the
            highest resolution first.
        """
        names = list(x.keys())
        features = list(x.values())
        if len(features) != len(self.inner_blocks):
            raise ValueError(f"fastbb.nn.FeaturePyramidNetwork: expected {len(self.inner_blocks)} feature maps, "
                             f"got {len(features)}")
        # the output convs through fastbb's conv tables in eager float32 CPU computation (fastbb.nn.conv_layers)
        output_block = layer_forward if runs_fused_convs(features) else (lambda block, x: block(x))
        last_inner = self.inner_blocks[-1](features[-1])
        results = [output_block(self.layer_blocks[-1], last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            last_inner = _merge(self.inner_blocks[idx], features[idx], last_inner)
            results.insert(0, output_block(self.layer_blocks[idx], last_inner))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        return OrderedDict(zip(names, results))


# ---------------------------------------------------------------------------------------------------------
# mmdet: mmdet.models.necks.FPN with mmcv ConvModules

_NORM_NAMES = {"BN": "bn", "BN2d": "bn", "SyncBN": "bn", "GN": "gn"}
_ACTIVATIONS = {"ReLU": nn.ReLU, "LeakyReLU": nn.LeakyReLU, "ReLU6": nn.ReLU6, "SiLU": nn.SiLU,
                "Swish": nn.SiLU, "GELU": nn.GELU}


def _norm_module(norm_cfg, channels):
    cfg = dict(norm_cfg)
    kind = cfg.pop("type", None)
    requires_grad = cfg.pop("requires_grad", True)
    if kind in ("BN", "BN2d"):
        norm = nn.BatchNorm2d(channels, **cfg)
    elif kind == "SyncBN":
        norm = nn.SyncBatchNorm(channels, **cfg)
    elif kind == "GN":
        if "num_groups" not in cfg:
            raise ValueError("fastbb.nn.FPN: norm_cfg of type 'GN' needs num_groups")
        norm = nn.GroupNorm(num_channels=channels, **cfg)
    else:
        raise NotFusedError(f"fastbb.nn.FPN: norm_cfg type {kind!r} is not supported; supported: "
                            f"{sorted(_NORM_NAMES)}")
    for p in norm.parameters():
        p.requires_grad = requires_grad
    return norm


class ConvModule(nn.Module):
    """mmcv's ConvModule in its FPN uses: conv -> norm -> activation, keys `conv.*`, `bn.*` / `gn.*`.

    bias only without a norm (mmcv's bias='auto'); norm as norm_cfg (BN, SyncBN, GN), activation as
    act_cfg (ReLU, LeakyReLU, ReLU6, SiLU/Swish, GELU), none when None. conv_cfg: None or Conv2d.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, conv_cfg=None, norm_cfg=None,
                 act_cfg=None):
        super().__init__()
        if conv_cfg is not None and dict(conv_cfg).get("type") not in ("Conv2d", "Conv"):
            raise NotFusedError(f"fastbb.nn.FPN: conv_cfg {conv_cfg!r} is not supported; only None or type 'Conv2d'")
        self.norm_name = None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=norm_cfg is None)
        if norm_cfg is not None:
            self.norm_name = _NORM_NAMES.get(dict(norm_cfg).get("type"), "bn")
            self.add_module(self.norm_name, _norm_module(norm_cfg, out_channels))
        self.activate = None
        if act_cfg is not None:
            cfg = dict(act_cfg)
            kind = cfg.pop("type", None)
            if kind not in _ACTIVATIONS:
                raise NotFusedError(f"fastbb.nn.FPN: act_cfg type {kind!r} is not supported; "
                                 f"supported: {sorted(_ACTIVATIONS)}")
            cfg.pop("inplace", None)  # mmdet's FPN builds its activations with inplace=False
            self.activate = _ACTIVATIONS[kind](**cfg)

    @property
    def is_plain_conv(self):
        return self.norm_name is None and self.activate is None

    def forward(self, x):
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


@register("FPN", scopes=("mmdet",))
@not_scriptable
class FPN(nn.Module, metaclass=FallsBackToOriginal, original="mmdet.models.necks.fpn.FPN"):
    """
    mmdet.models.necks.FPN with fused top-down merges: same arguments, state_dict keys and outputs (a
    tuple), the Feature Pyramid Network of `"Feature Pyramid Networks for Object Detection"
    <https://arxiv.org/abs/1612.03144>`_. Under ``torch.autocast`` its maps have the dtypes mmdet's have
    under the same autocast.

    Args:
        in_channels (List[int]): Number of input channels per scale.
        out_channels (int): Number of output channels (used at each scale).
        num_outs (int): Number of output scales.
        start_level (int): Index of the start input backbone level used to build the feature pyramid.
            Default: 0.
        end_level (int): Index of the end input backbone level (inclusive) to build the feature pyramid.
            Default: -1, which means the last level.
        add_extra_convs (bool or str): If bool, whether to add convs on top of the original feature maps
            (True means 'on_input'). If str, where the extra convs start: 'on_input' (the last feat map of
            the neck inputs, i.e. the backbone feature), 'on_lateral' (the last feat map after the lateral
            convs) or 'on_output' (the last output feat map after the fpn convs). Default: False.
        relu_before_extra_convs (bool): Whether to apply relu before the extra conv. Default: False.
        no_norm_on_lateral (bool): Whether to apply norm on lateral. Default: False.
        conv_cfg (dict, optional): Config dict for convolution layer: None or type 'Conv2d'. Default: None.
        norm_cfg (dict, optional): Config dict for normalization layer: type 'BN', 'BN2d', 'SyncBN' or
            'GN'. Default: None.
        act_cfg (dict, optional): Config dict for activation layer in ConvModule: type 'ReLU',
            'LeakyReLU', 'ReLU6', 'SiLU', 'Swish' or 'GELU'. Default: None.
        upsample_cfg (dict): Config dict for interpolate layer (F.interpolate's keywords). The fused
            merge serves mode='nearest' with no scale_factor; every other setting runs mmdet's own
            interpolate + add. Default: dict(mode='nearest').
        init_cfg (dict or list[dict], optional): accepted for config compatibility and not read: the
            convs start Xavier-uniform initialised with zero bias, mmdet's default init_cfg. Default: None
            (mmdet's default is that Xavier init_cfg).
    """

    def __init__(self, in_channels: list[int], out_channels: int, num_outs: int, start_level: int = 0,
                 end_level: int = -1, add_extra_convs: bool | str = False, relu_before_extra_convs: bool = False,
                 no_norm_on_lateral: bool = False, conv_cfg: dict | None = None, norm_cfg: dict | None = None,
                 act_cfg: dict | None = None, upsample_cfg: dict = dict(mode="nearest"),
                 init_cfg: dict | list[dict] | None = None) -> None:
        super().__init__()
        if not isinstance(in_channels, (list, tuple)) or not in_channels:
            raise ValueAssertionError(f"fastbb.nn.FPN: in_channels must be a non-empty list of channel counts, "
                                      f"got {in_channels!r}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_ins = len(in_channels)
        self.num_outs = num_outs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.no_norm_on_lateral = no_norm_on_lateral
        self.upsample_cfg = dict(upsample_cfg)
        if not 0 <= start_level < self.num_ins:
            raise ValueAssertionError(f"fastbb.nn.FPN: start_level must be in [0, {self.num_ins}), got {start_level}")
        if end_level == -1 or end_level == self.num_ins - 1:
            self.backbone_end_level = self.num_ins
            if num_outs < self.num_ins - start_level:
                raise ValueAssertionError(f"fastbb.nn.FPN: num_outs must be >= len(in_channels) - start_level = "
                                          f"{self.num_ins - start_level}, got {num_outs}")
        else:
            if not start_level <= end_level < self.num_ins:
                raise ValueAssertionError(f"fastbb.nn.FPN: end_level must be -1 or in [start_level, {self.num_ins}), "
                                          f"got {end_level}")
            if num_outs != end_level - start_level + 1:
                raise ValueAssertionError(f"fastbb.nn.FPN: with end_level {end_level}, num_outs must be end_level - "
                                          f"start_level + 1 = {end_level - start_level + 1} (no extra levels), "
                                          f"got {num_outs}")
            self.backbone_end_level = end_level + 1
        self.start_level = start_level
        self.end_level = end_level
        if isinstance(add_extra_convs, str):
            if add_extra_convs not in ("on_input", "on_lateral", "on_output"):
                raise ValueAssertionError(f"fastbb.nn.FPN: add_extra_convs must be a bool or one of 'on_input', "
                                          f"'on_lateral', 'on_output', got {add_extra_convs!r}")
        elif not isinstance(add_extra_convs, bool):
            raise TypeAssertionError(f"fastbb.nn.FPN: add_extra_convs must be a bool or a str, "
                                     f"got {type(add_extra_convs).__name__}")
        elif add_extra_convs:
            add_extra_convs = "on_input"
        self.add_extra_convs = add_extra_convs
        mode = self.upsample_cfg.get("mode", "nearest")
        self._fused_merge = mode == "nearest" and "scale_factor" not in self.upsample_cfg and \
            set(self.upsample_cfg) <= {"mode"}

        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(self.start_level, self.backbone_end_level):
            self.lateral_convs.append(ConvModule(in_channels[i], out_channels, 1, conv_cfg=conv_cfg,
                                                 norm_cfg=None if no_norm_on_lateral else norm_cfg, act_cfg=act_cfg))
            self.fpn_convs.append(ConvModule(out_channels, out_channels, 3, padding=1, conv_cfg=conv_cfg,
                                             norm_cfg=norm_cfg, act_cfg=act_cfg))
        extra_levels = num_outs - self.backbone_end_level + self.start_level
        if self.add_extra_convs and extra_levels >= 1:
            for i in range(extra_levels):
                if i == 0 and self.add_extra_convs == "on_input":
                    extra_in = self.in_channels[self.backbone_end_level - 1]
                else:
                    extra_in = out_channels
                self.fpn_convs.append(ConvModule(extra_in, out_channels, 3, stride=2, padding=1, conv_cfg=conv_cfg,
                                                 norm_cfg=norm_cfg, act_cfg=act_cfg))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def _top_down(self, inputs):
        """The laterals after the top-down merges, highest resolution first, and the top one unmerged."""
        used = len(self.lateral_convs)
        top = self.lateral_convs[-1](inputs[self.backbone_end_level - 1])
        laterals = [top]
        for i in range(used - 2, -1, -1):
            x = inputs[i + self.start_level]
            if self._fused_merge:
                merged = _merge(self.lateral_convs[i], x, laterals[0])
            else:
                lateral = self.lateral_convs[i](x)
                if "scale_factor" in self.upsample_cfg:
                    merged = lateral + F.interpolate(laterals[0], **self.upsample_cfg)
                else:
                    merged = lateral + F.interpolate(laterals[0], size=lateral.shape[2:], **self.upsample_cfg)
            laterals.insert(0, merged)
        return laterals, top

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """
        Args:
            inputs (Tuple[Tensor]): the backbone's feature maps, one per entry of ``in_channels``,
                highest resolution first.

        Returns:
            Tuple[Tensor]: the ``num_outs`` output maps, highest resolution first.
        """
        if len(inputs) != len(self.in_channels):
            raise ValueAssertionError(f"fastbb.nn.FPN: expected {len(self.in_channels)} inputs, got {len(inputs)}")
        laterals, top_lateral = self._top_down(inputs)
        used = len(laterals)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > used:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                if self.add_extra_convs == "on_input":
                    source = inputs[self.backbone_end_level - 1]
                elif self.add_extra_convs == "on_lateral":
                    source = top_lateral
                else:
                    source = outs[-1]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    outs.append(self.fpn_convs[i](F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]))
        return tuple(outs)
