"""torchvision's RetinaNet head (RetinaNetHead, RetinaNetClassificationHead, RetinaNetRegressionHead) with
faster CPU convs: the same classes (subclasses), constructor arguments, submodules, state_dict keys
(torchvision's v1 -> v2 key upgrade included), random initialisation order and outputs.

What changes, and why: the head is twenty 3x3 convs over five levels (for 91 classes at 512x512, more than half
of RetinaNet R50-FPN's multiply-adds, the last classification conv alone a fifth), and on the CPU in float32
they run as the conv tables of fastbb.ops.conv_bn_relu choose:
- without autograd (inference): the eval table, on each conv's weight as it is (no BN to fold); on a 2-core
  AVX-512 CPU its Winograd F(2x2, 3x3) conv runs the 256-channel convs 1.4x to 1.6x as fast as oneDNN's from
  8x8 up, with the conv's bias and the ReLU in its output transform, at 1.2x to 1.6x oneDNN's rounding error
  against float64. Each conv's Winograd weight is made once and kept until the weight changes in place or is
  replaced. Levels under 8x8 run torchvision's convs (oneDNN's direct conv is 4x faster at 4x4).
  (fastbb.nn.conv_layers runs the layers; the FPN's output convs run the same way.)
- under autograd (training): the training-conv table (the Winograd F(4x4, 3x3) conv with both gradients on 256
  channels over 64+ 4x4 output tiles, e.g. 4x16x16, or P3 and P4 at batch 2 at 512x512), then the layer's norm
  and ReLU modules; without a
  norm (v1) the small levels (under 512 output positions over the batch) share one call per conv on one
  zero-separated canvas (fastbb.nn.conv_layers.levels_forward), which saves oneDNN's fixed cost per call.
Other dtypes and devices, autocast, torch.compile, torch.export and TorchScript / torch.fx tracing compute as
torchvision's.
"""
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models.detection import retinanet as tv_retinanet

from fastbb._tracing import not_scriptable
from fastbb.nn.conv_layers import levels_forward, runs_fused_convs

__all__ = ["RetinaNetClassificationHead", "RetinaNetHead", "RetinaNetRegressionHead"]


def _branch_forward(stack: nn.Module, last: nn.Module, columns: int, features: list[Tensor]) -> Tensor:
    """
    A branch's forward with fastbb's convs.

    Args:
        stack (nn.Module): the branch's stacked conv [-> norm] -> ReLU layers.
        last (nn.Module): its last conv (A * columns output channels).
        columns (int): K for the classification branch, 4 for the regression branch.
        features (List[Tensor[N, C, H, W]]): the features of each level.

    Returns:
        Tensor[N, sum(H * W * A), columns]: the levels' outputs in torchvision's (level, h, w, anchor) order.
    """
    # (N, A * columns, H, W) -> (N, H * W * A, columns)
    return torch.cat([out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, columns)
                      for out in levels_forward(stack, last, features)], dim=1)


@not_scriptable
class RetinaNetClassificationHead(tv_retinanet.RetinaNetClassificationHead):
    """
    torchvision's RetinaNetClassificationHead (same arguments, submodules, keys, initialisation and outputs),
    its float32 CPU convs through fastbb's conv tables.

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
        if not x or not runs_fused_convs(x):
            return tv_retinanet.RetinaNetClassificationHead.forward(self, x)
        return _branch_forward(self.conv, self.cls_logits, self.num_classes, x)


@not_scriptable
class RetinaNetRegressionHead(tv_retinanet.RetinaNetRegressionHead):
    """
    torchvision's RetinaNetRegressionHead (same arguments, submodules, keys, initialisation and outputs), its
    float32 CPU convs through fastbb's conv tables.

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
        if not x or not runs_fused_convs(x):
            return tv_retinanet.RetinaNetRegressionHead.forward(self, x)
        return _branch_forward(self.conv, self.bbox_reg, 4, x)


@not_scriptable
class RetinaNetHead(tv_retinanet.RetinaNetHead):
    """
    torchvision's RetinaNetHead (same arguments, submodules, state_dict keys, random initialisation order and
    outputs; an instance of torchvision's class) over fastbb's :class:`RetinaNetClassificationHead` and
    :class:`RetinaNetRegressionHead` (float32 CPU convs through fastbb's conv tables; see
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
