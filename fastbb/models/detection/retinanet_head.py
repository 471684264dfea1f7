"""torchvision's RetinaNet head (RetinaNetHead, RetinaNetClassificationHead, RetinaNetRegressionHead) with a
faster CPU inference: the same classes (subclasses), constructor arguments, submodules, state_dict keys
(torchvision's v1 -> v2 key upgrade included), random initialisation order and outputs.

What changes, and why: in CPU inference (no autograd) each branch runs its large levels (1024 positions or more:
P3 and P4 at 512x512, P3..P5 at 800x1333) channels_last. oneDNN then runs their convs without reordering
activations into and out of its blocked layout, and the last conv's (N, H, W, A * K) output is already in
torchvision's (h, w, anchor, class) order: the per-level permute is a view and the concatenation of the levels
is the only copy of the logits, where torchvision copies them twice (reshape, then cat). Small levels run NCHW
(channels_last inputs included), where channels_last is slower.

Measured on a 2-core AVX-512 CPU (one thread, CPU time, R50-FPN shapes, 91 classes; several runs on a loaded
machine): 1.02x to 1.08x for the head at 800x1344 batch 2 (v1 and v2); the same time as torchvision's at
512x512 batch 1, whose convs already run near the FMA peak (about 105 GFLOP/s a core). Two other ideas measured no faster there and are not used: running both branches as one conv
stack (the first conv with both weights, then grouped convs; GroupNorm as one GroupNorm of twice the groups):
within +-1.5% in inference, 2% slower for v2 at 512x512 and under autograd; and channels_last under autograd.

Under autograd, torch.compile, torch.export and TorchScript / torch.fx tracing the head computes as
torchvision's, in the input's layout.
"""
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection import retinanet as tv_retinanet

from fastbb._tracing import not_scriptable, traced

__all__ = ["RetinaNetClassificationHead", "RetinaNetHead", "RetinaNetRegressionHead"]

# Levels with at least this many positions run channels_last in CPU inference. On a 2-core AVX-512 CPU (oneDNN,
# one thread), a chain of four 256 -> 256 3x3 conv + ReLU costs the same in both layouts at 64x64, and
# channels_last is slower on small maps (1.2x at 16x16, 2.5x at 4x4).
_CHANNELS_LAST_MIN_POSITIONS = 1024


def _chooses_layout(features: list[Tensor]) -> bool:
    """Whether the head may choose each level's layout: eager CPU inference (no autograd, no tracing)."""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not traced(*features) and all(f.device.type == "cpu" and f.dim() == 4 for f in features))


def _in_level_layout(x: Tensor) -> Tensor:
    """A float32 level (oneDNN's convs) channels_last when it is large, else NCHW; other dtypes as they are."""
    if x.dtype != torch.float32:
        return x
    if x.shape[-2] * x.shape[-1] >= _CHANNELS_LAST_MIN_POSITIONS:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def _branch_forward(stack: nn.Module, last: nn.Module, columns: int, features: list[Tensor]) -> Tensor:
    """
    A branch's forward in CPU inference: torchvision's convs, large levels channels_last.

    Args:
        stack (nn.Module): the branch's stacked conv [-> norm] -> ReLU layers.
        last (nn.Module): its last conv (A * columns output channels).
        columns (int): K for the classification branch, 4 for the regression branch.
        features (List[Tensor[N, C, H, W]]): the features of each level.

    Returns:
        Tensor[N, sum(H * W * A), columns]: the levels' outputs in torchvision's (level, h, w, anchor) order.
    """
    outputs = []
    for x in features:
        out = last(stack(_in_level_layout(x)))
        # (N, A * columns, H, W) -> (N, H * W * A, columns): a view of a channels_last output, else a copy
        outputs.append(out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, columns))
    return torch.cat(outputs, dim=1)


@not_scriptable
class RetinaNetClassificationHead(tv_retinanet.RetinaNetClassificationHead):
    """
    torchvision's RetinaNetClassificationHead (same arguments, submodules, keys, initialisation and outputs),
    its large levels run channels_last in CPU inference.

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
        if not x or not _chooses_layout(x):
            return tv_retinanet.RetinaNetClassificationHead.forward(self, x)
        return _branch_forward(self.conv, self.cls_logits, self.num_classes, x)


@not_scriptable
class RetinaNetRegressionHead(tv_retinanet.RetinaNetRegressionHead):
    """
    torchvision's RetinaNetRegressionHead (same arguments, submodules, keys, initialisation and outputs), its
    large levels run channels_last in CPU inference.

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
        if not x or not _chooses_layout(x):
            return tv_retinanet.RetinaNetRegressionHead.forward(self, x)
        return _branch_forward(self.conv, self.bbox_reg, 4, x)


@not_scriptable
class RetinaNetHead(tv_retinanet.RetinaNetHead):
    """
    torchvision's RetinaNetHead (same arguments, submodules, state_dict keys, random initialisation order and
    outputs; an instance of torchvision's class) over fastbb's :class:`RetinaNetClassificationHead` and
    :class:`RetinaNetRegressionHead` (large levels channels_last in CPU inference; see
    :mod:`fastbb.models.detection.retinanet_head`).

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
