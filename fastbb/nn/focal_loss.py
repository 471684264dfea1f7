"""Focal loss modules with torchvision's and mmdet's interfaces, on the fused fastbb.ops focal loss."""
from torch import Tensor, nn

from fastbb._registry import register
from fastbb.ops.focal_loss import _sigmoid_focal_loss_weighted, sigmoid_focal_loss, sigmoid_focal_loss_labels


class SigmoidFocalLoss(nn.Module):
    """torchvision.ops.sigmoid_focal_loss as a module: forward(inputs, targets) with dense targets."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none") -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


@register("FocalLoss")
class FocalLoss(nn.Module):
    """mmdet's FocalLoss (sigmoid form). target: class labels (N,) with C as background, or dense one-hot /
    soft targets of pred's shape; weight per anchor (N,) or per element; 'mean' with avg_factor divides the
    sum by avg_factor."""

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25, reduction: str = "mean",
                 loss_weight: float = 1.0) -> None:
        super().__init__()
        if not use_sigmoid:
            raise ValueError("FocalLoss: use_sigmoid must be True (only the sigmoid focal loss exists, as in mmdet)")
        self.use_sigmoid = use_sigmoid
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = reduction
        self.loss_weight = loss_weight

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor=None,
                reduction_override: str | None = None) -> Tensor:
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueError(f"FocalLoss: reduction_override must be None, 'none', 'mean' or 'sum', "
                             f"got {reduction_override!r}")
        reduction = reduction_override if reduction_override else self.reduction
        if pred.dim() == target.dim():
            loss = _sigmoid_focal_loss_weighted(pred, target, weight, self.gamma, self.alpha, reduction, avg_factor)
        else:
            loss = sigmoid_focal_loss_labels(pred, target, self.gamma, self.alpha, weight, reduction, avg_factor)
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"loss_weight={self.loss_weight}")
