"""Focal loss modules with torchvision's and mmdet's interfaces, on the fused fastbb.ops focal loss."""
from torch import Tensor, nn

from fastbb._fallback import FallsBackToOriginal, NotFusedError
from fastbb._registry import register
from fastbb._tracing import fx_leaf, not_scriptable
from fastbb.ops._common import ValueAssertionError
from fastbb.ops.focal_loss import _sigmoid_focal_loss_labels, _sigmoid_focal_loss_weighted, sigmoid_focal_loss

_FOCAL_LOSS = "fastbb.nn.FocalLoss"  # how FocalLoss's error messages name it


@not_scriptable
class SigmoidFocalLoss(nn.Module):
    """
    torchvision.ops.sigmoid_focal_loss as a module (:func:`fastbb.ops.sigmoid_focal_loss`), with dense
    targets.

    Args:
        alpha (float): Weighting factor in range [0, 1] to balance positive vs negative examples or -1 for
            ignore. Default: ``0.25``.
        gamma (float): Exponent of the modulating factor (1 - p_t) to balance easy vs hard examples.
            Default: ``2.0``.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'none'``.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none") -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """
        Args:
            inputs (Tensor): the predictions (logits), of any shape; a floating-point dtype.
            targets (Tensor): the binary (or soft) targets, of inputs' shape.

        Returns:
            Tensor: the loss with the reduction applied, in inputs' dtype (float32 under
            ``torch.autocast``, as torchvision's).
        """
        return sigmoid_focal_loss(inputs, targets, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


@fx_leaf(_FOCAL_LOSS)
def _focal_loss(pred, target, weight, gamma, alpha, reduction, avg_factor):
    """FocalLoss's loss before loss_weight: dense targets of pred's shape, or class labels. One leaf call under
    torch.fx symbolic tracing (which form it is depends on the shapes)."""
    if pred.dim() == target.dim():
        return _sigmoid_focal_loss_weighted(_FOCAL_LOSS, pred, target, weight, gamma, alpha, reduction, avg_factor)
    return _sigmoid_focal_loss_labels(_FOCAL_LOSS, ("pred", "target"), pred, target, gamma, alpha, weight, reduction,
                                      avg_factor, -100)


@register("FocalLoss", scopes=("mmdet",))
@not_scriptable
class FocalLoss(nn.Module, metaclass=FallsBackToOriginal, original="mmdet.models.losses.focal_loss.FocalLoss"):
    """
    mmdet's ``FocalLoss`` (sigmoid form), on the fused focal loss.

    Args:
        use_sigmoid (bool): must be True: only the sigmoid focal loss exists (as in mmdet). Default: True.
        gamma (float): Exponent of the modulating factor. Default: 2.0.
        alpha (float): Weighting factor of the positive class. Default: 0.25.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. Default: ``'mean'``.
        loss_weight (float): Factor of the loss. Default: 1.0.
        activated (bool): must be False: the predictions are logits (mmdet's ``activated=True``, for
            probabilities, is not supported). Default: False.
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25, reduction: str = "mean",
                 loss_weight: float = 1.0, activated: bool = False) -> None:
        super().__init__()
        if not use_sigmoid:
            raise ValueAssertionError(f"{_FOCAL_LOSS}: use_sigmoid must be True (only the sigmoid focal loss "
                                      f"exists, as in mmdet)")
        if activated:
            raise NotFusedError(f"{_FOCAL_LOSS}: activated=True (probabilities as predictions) is not supported; "
                                f"pass logits with activated=False")
        self.use_sigmoid = use_sigmoid
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = reduction
        self.loss_weight = loss_weight
        self.activated = activated

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        """
        Args:
            pred (Tensor[N, C]): the predictions (logits).
            target (Tensor): class labels ``(N,)`` with C as background, or dense one-hot / soft targets of
                pred's shape.
            weight (Tensor, optional): the weight of each prediction: per anchor ``(N,)`` or per element.
            avg_factor (float or Tensor, optional): with ``'mean'``, the loss is the sum divided by it.
            reduction_override (str, optional): ``'none'`` | ``'mean'`` | ``'sum'`` in place of
                ``reduction``.

        Returns:
            Tensor: ``loss_weight`` times the loss with the reduction applied, in pred's dtype (float32
            under ``torch.autocast``, as binary_cross_entropy_with_logits gives there).
        """
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueAssertionError(f"{_FOCAL_LOSS}: reduction_override must be None, 'none', 'mean' or 'sum', "
                                      f"got {reduction_override!r}")
        reduction = reduction_override if reduction_override else self.reduction
        return self.loss_weight * _focal_loss(pred, target, weight, self.gamma, self.alpha, reduction, avg_factor)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, alpha={self.alpha}, reduction={self.reduction!r}, "
                f"loss_weight={self.loss_weight}")
