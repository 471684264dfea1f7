"""torchvision's RetinaNet head (RetinaNetHead, RetinaNetClassificationHead, RetinaNetRegressionHead) with a
faster forward: the same classes (subclasses), constructor arguments, submodules, state_dict keys (torchvision's
v1 -> v2 key upgrade included), random initialisation order and outputs.

What the forward changes, and why:

- The two branches run as one: the first conv of both reads the same features, so it is one conv with the two
  weights concatenated (512 output channels); each following conv is one grouped conv (groups=2) over both
  branches' maps, and a GroupNorm(G, C) of each branch is one GroupNorm(2G, 2C) (the same groups of C/G
  channels). Half the conv calls, and wider GEMMs for oneDNN. The weights are concatenated at each call (a
  few MB), so gradients flow back to each branch's own parameters.
- In inference (no autograd) of float32 CPU features the head runs channels_last: oneDNN then runs each conv
  without reordering activations into and out of its blocked layout, and the last convs' (N, H, W, A*K)
  outputs are already in torchvision's (level, h, w, anchor, class) order, so the per-level permute is a view
  and the concatenation is the only copy of the logits.

A head whose layers are not torchvision's 3x3 conv [-> GroupNorm] -> ReLU stacks (another norm layer, a
replaced submodule) runs as torchvision's. Under torch.fx symbolic tracing the head runs as torchvision's
(every op of it is recorded); under torch.compile, torch.export and torch.jit.trace the merged branches are
traced as they are, in the input's layout.
"""
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import retinanet as tv_retinanet

from fastbb._tracing import not_scriptable, traced

__all__ = ["RetinaNetClassificationHead", "RetinaNetHead", "RetinaNetRegressionHead"]


# Levels with at least this many positions run channels_last in CPU inference. On a 2-core AVX-512 CPU (oneDNN,
# one thread), a chain of four 256 -> 256 3x3 conv + ReLU costs the same in both layouts at 64x64, and
# channels_last is slower on small maps (1.2x at 16x16, 2.5x at 4x4); the large levels' 819-channel logits
# are then in torchvision's order without a transposing copy.
_CHANNELS_LAST_MIN_POSITIONS = 1024


def _eager_cpu_inference(features: list[Tensor]) -> bool:
    """Whether the head runs eagerly in CPU inference: 4-D floating-point CPU features, no autograd, no tracing."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and all(f.device.type == "cpu" and f.is_floating_point() and f.dim() == 4 for f in features))


def _in_level_layout(x: Tensor, choose_layout: bool) -> Tensor:
    """x channels_last when the layout is ours to choose and x is a large float32 level (oneDNN's); otherwise,
    as it is."""
    if choose_layout and x.dtype == torch.float32 and x.shape[-2] * x.shape[-1] >= _CHANNELS_LAST_MIN_POSITIONS:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _to_level_order(out: Tensor, columns: int) -> Tensor:
    """(N, A * columns, H, W) -> (N, H * W * A, columns), torchvision's (h, w, anchor) row order: a view when
    out is channels_last, one copy otherwise."""
    n = out.shape[0]
    return out.permute(0, 2, 3, 1).reshape(n, -1, columns)


def _conv3x3_layers(branch: nn.Module) -> list[tuple[nn.Conv2d, nn.GroupNorm | None]] | None:
    """[(conv, GroupNorm or None)] of a branch's ``conv`` stack when each layer is torchvision's
    Conv2dNormActivation 3x3 conv (stride 1, padding 1) [-> GroupNorm] -> ReLU, else None."""
    stack = getattr(branch, "conv", None)
    if type(stack) is not nn.Sequential:
        return None
    layers = []
    for layer in stack:
        if not isinstance(layer, nn.Sequential) or type(layer).forward is not nn.Sequential.forward:
            return None
        parts = list(layer)
        if len(parts) == 2:
            (conv, act), norm = parts, None
        elif len(parts) == 3:
            conv, norm, act = parts
            if type(norm) is not nn.GroupNorm:
                return None
        else:
            return None
        if not _is_same_3x3(conv) or type(act) is not nn.ReLU:
            return None
        layers.append((conv, norm))
    return layers


def _is_same_3x3(conv: nn.Module) -> bool:
    """Whether conv is a plain 3x3, stride-1, zero-padded ("same") nn.Conv2d."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _same_shapes(a: Tensor | None, b: Tensor | None) -> bool:
    return (a is None) == (b is None) and (a is None or a.shape == b.shape)


def _mergeable_layers(head: nn.Module) -> list | None:
    """The (cls conv, cls norm, reg conv, reg norm) of each stacked layer when the two branches can run as one
    (the same number of layers, equal conv shapes, both without norm or both GroupNorm with the same groups,
    eps and affinity, square convs so that each layer's output feeds the next), else None."""
    cls_head, reg_head = head.classification_head, head.regression_head
    if type(cls_head) not in _CLASSIFICATION_HEADS or type(reg_head) not in _REGRESSION_HEADS:
        return None
    cls_layers, reg_layers = _conv3x3_layers(cls_head), _conv3x3_layers(reg_head)
    if not cls_layers or not reg_layers or len(cls_layers) != len(reg_layers):
        return None
    merged = []
    for (cls_conv, cls_norm), (reg_conv, reg_norm) in zip(cls_layers, reg_layers):
        if not _same_shapes(cls_conv.weight, reg_conv.weight) or not _same_shapes(cls_conv.bias, reg_conv.bias) \
                or cls_conv.out_channels != cls_conv.in_channels:
            return None
        if (cls_norm is None) != (reg_norm is None):
            return None
        if cls_norm is not None and (
                (cls_norm.num_groups, cls_norm.num_channels, cls_norm.eps, cls_norm.affine)
                != (reg_norm.num_groups, reg_norm.num_channels, reg_norm.eps, reg_norm.affine)):
            return None
        merged.append((cls_conv, cls_norm, reg_conv, reg_norm))
    if not _is_same_3x3(cls_head.cls_logits) or not _is_same_3x3(reg_head.bbox_reg):
        return None
    return merged


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None else torch.cat([a, b])


def _merged_forward(head: nn.Module, layers: list, features: list[Tensor]) -> dict[str, Tensor]:
    """In CPU inference, both branches of the head as one conv stack (see the module docstring), then each
    branch's last conv."""
    cls_head, reg_head = head.classification_head, head.regression_head
    weights = [(torch.cat([cls_conv.weight, reg_conv.weight]), _cat(cls_conv.bias, reg_conv.bias),
                cls_norm, _cat(getattr(cls_norm, "weight", None), getattr(reg_norm, "weight", None)),
                _cat(getattr(cls_norm, "bias", None), getattr(reg_norm, "bias", None)))
               for cls_conv, cls_norm, reg_conv, reg_norm in layers]
    channels = layers[0][0].out_channels
    all_cls_logits, all_bbox_regression = [], []
    for x in features:
        x = _in_level_layout(x, True)
        for index, (weight, bias, norm, norm_weight, norm_bias) in enumerate(weights):
            x = F.conv2d(x, weight, bias, padding=1, groups=1 if index == 0 else 2)
            if norm is not None:
                x = F.group_norm(x, 2 * norm.num_groups, norm_weight, norm_bias, norm.eps)
            x = torch.relu_(x)
        cls_logits = cls_head.cls_logits(x[:, :channels])
        bbox_regression = reg_head.bbox_reg(x[:, channels:])
        all_cls_logits.append(_to_level_order(cls_logits, cls_head.num_classes))
        all_bbox_regression.append(_to_level_order(bbox_regression, 4))
    return {"cls_logits": torch.cat(all_cls_logits, dim=1), "bbox_regression": torch.cat(all_bbox_regression, dim=1)}


def _branch_forward(stack: nn.Module, last: nn.Module, columns: int, features: list[Tensor]) -> Tensor:
    """One branch as torchvision runs it, channels_last in CPU inference, its levels reordered by one view and
    concatenated by one copy."""
    choose_layout = _eager_cpu_inference(features)
    outputs = []
    for x in features:
        x = _in_level_layout(x, choose_layout)
        outputs.append(_to_level_order(last(stack(x)), columns))
    return torch.cat(outputs, dim=1)


@not_scriptable
class RetinaNetClassificationHead(tv_retinanet.RetinaNetClassificationHead):
    """
    torchvision's RetinaNetClassificationHead (same arguments, submodules, keys, initialisation and outputs),
    run channels_last in CPU inference.

    Args:
        in_channels (int): the channels of the input features.
        num_anchors (int): anchors per location.
        num_classes (int): classes to predict.
        prior_probability (float): the initial foreground probability (sets the logits' bias). Default: 0.01.
        norm_layer (Callable[..., nn.Module], optional): the stacked layers' norm. Default: None.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, prior_probability: float = 0.01,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__(in_channels, num_anchors, num_classes, prior_probability=prior_probability,
                         norm_layer=norm_layer)

    def forward(self, x: list[Tensor]) -> Tensor:
        """
        Args:
            x (List[Tensor[N, C, H, W]]): the features of each level.

        Returns:
            Tensor[N, sum(H * W * A), K]: the logits, ordered (level, h, w, anchor).
        """
        if traced(*x):
            return tv_retinanet.RetinaNetClassificationHead.forward(self, x)
        return _branch_forward(self.conv, self.cls_logits, self.num_classes, x)


@not_scriptable
class RetinaNetRegressionHead(tv_retinanet.RetinaNetRegressionHead):
    """
    torchvision's RetinaNetRegressionHead (same arguments, submodules, keys, initialisation and outputs), run
    channels_last in CPU inference.

    Args:
        in_channels (int): the channels of the input features.
        num_anchors (int): anchors per location.
        norm_layer (Callable[..., nn.Module], optional): the stacked layers' norm. Default: None.
    """

    def __init__(self, in_channels: int, num_anchors: int, norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__(in_channels, num_anchors, norm_layer=norm_layer)

    def forward(self, x: list[Tensor]) -> Tensor:
        """
        Args:
            x (List[Tensor[N, C, H, W]]): the features of each level.

        Returns:
            Tensor[N, sum(H * W * A), 4]: the box deltas, ordered (level, h, w, anchor).
        """
        if traced(*x):
            return tv_retinanet.RetinaNetRegressionHead.forward(self, x)
        return _branch_forward(self.conv, self.bbox_reg, 4, x)


_CLASSIFICATION_HEADS = (tv_retinanet.RetinaNetClassificationHead, RetinaNetClassificationHead)
_REGRESSION_HEADS = (tv_retinanet.RetinaNetRegressionHead, RetinaNetRegressionHead)


def _retinanet_head_forward(self, x: list[Tensor]) -> dict[str, Tensor]:
    """
    torchvision RetinaNetHead.forward, the two branches merged (see the module docstring).

    Args:
        x (List[Tensor[N, C, H, W]]): the features of each level.

    Returns:
        Dict[str, Tensor]: ``cls_logits`` (N, sum(H * W * A), K) and ``bbox_regression`` (N, sum(H * W * A), 4),
        ordered (level, h, w, anchor).
    """
    layers = _mergeable_layers(self) if x and not traced(*x) and _eager_cpu_inference(x) else None
    if layers is None:
        return tv_retinanet.RetinaNetHead.forward(self, x)
    return _merged_forward(self, layers, x)


@not_scriptable
class RetinaNetHead(tv_retinanet.RetinaNetHead):
    """
    torchvision's RetinaNetHead (same arguments, submodules, state_dict keys, random initialisation order and
    outputs; an instance of torchvision's class) whose two branches run as one conv stack, channels_last in
    CPU inference (see :mod:`fastbb.models.detection.retinanet_head`).

    Args:
        in_channels (int): the channels of the input features.
        num_anchors (int): anchors per location.
        num_classes (int): classes to predict.
        norm_layer (Callable[..., nn.Module], optional): the stacked layers' norm (``partial(nn.GroupNorm, 32)``
            in RetinaNet v2). Default: None.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        nn.Module.__init__(self)
        # torchvision's order: the classification head's parameters are drawn first.
        self.classification_head = RetinaNetClassificationHead(in_channels, num_anchors, num_classes,
                                                               norm_layer=norm_layer)
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, norm_layer=norm_layer)

    forward = _retinanet_head_forward

