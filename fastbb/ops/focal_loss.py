"""Sigmoid focal loss (RetinaNet) in one pass: the loss and, when needed, its gradient from one read.

Two forms:
- `sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)`: torchvision's, dense float targets.
- `sigmoid_focal_loss_labels(logits, labels, ...)`: class labels (..., ) for logits (..., C), as mmcv /
  mmdet's FocalLoss: a label in [0, C) is that class, C or -1 is background (every class negative),
  `ignore_index` adds nothing to loss or gradient; optional weight broadcastable to (..., C).

With p = sigmoid(x), q = 1 - p, target t, m = p (1 - t) + q t (the probability of the wrong answer):
    ce = t softplus(-x) + (1 - t) softplus(x),  loss = alpha_t ce m^gamma,
    d loss / dx = alpha_t ((p - t) m^gamma + gamma ce m^(gamma - 1) p q (1 - 2t)),
alpha_t = alpha t + (1 - alpha)(1 - t), or 1 when alpha < 0. softplus and q are taken from exp(-|x|),
so logits of +-1e4 give finite, exact results. The forward saves the gradient of each element (weighted,
not yet scaled by the reduction), so backward is a single multiplication by the incoming gradient
(measured faster on the CPU than computing it again in backward; benchmarks/study_focal_loss_backward.py).
A double backward (create_graph=True) computes the gradient again in differentiable PyTorch ops.
float16 / bfloat16 are computed in float32; sums accumulate in float32 (float64 for float64).
Under torch.autocast the floating inputs (logits, dense targets, weight) are cast to float32, as autocast
casts binary_cross_entropy_with_logits' (float64 stays float64), so the loss is float32 as torchvision's and
mmdet's are there: by the op's autocast rule, and by the public functions before their own normalisation
(so that soft targets are not first rounded to the logits' dtype).
"""
import math

import torch
import torch.nn.functional as F

from fastbb._tracing import fx_leaf
from fastbb import _backend
from fastbb.ops._common import (FLOAT_DTYPES, autocast_cast, check_float, check_same_device, check_tensor,
                                compute_dtype, kernel_lib, register_autocast_rule)

_OP = "fastbb.sigmoid_focal_loss"  # how error messages name the op
_LABELS_OP = "fastbb.sigmoid_focal_loss_labels"
_REDUCTIONS = ("none", "mean", "sum")
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# The compiled kernels take logits (N, C) contiguous, either targets (N, C) of logits' dtype or labels (N,)
# int64, and weight (N, C) in the compute dtype with any strides (expanded views welcome). They return
# (loss, grad): loss (N, C) in logits' dtype, or with `reduce` its sum as a 0-d tensor in the compute dtype;
# grad (N, C) in logits' dtype when compute_grad, else an empty tensor.
kernel_lib.define("sigmoid_focal_loss(Tensor logits, Tensor? targets, Tensor? labels, Tensor? weight, float alpha, "
                  "float gamma, int ignore_index, bool reduce, bool compute_grad) -> (Tensor, Tensor)")
# t's shape, dtype and device, contiguous and uninitialised; on the CPU, from 8 MiB up, advised onto transparent
# huge pages before its first write (csrc/cpu_alloc.h): the backward's gradient, as large as the logits, is
# otherwise faulted in 4 KiB at a time (41 ms of the 44 ms the scaling took for 8 x 49,104 x 91 floats).
kernel_lib.define("empty_like_huge_pages(Tensor t) -> Tensor")
torch.library.register_fake("fastbb_C::empty_like_huge_pages", lambda t: torch.empty_like(
    t, memory_format=torch.contiguous_format), lib=kernel_lib)


def _label_targets(labels, num_classes, ignore_index, dtype):
    """One-hot targets of labels (background rows all zero) and the per-row mask of non-ignored rows."""
    positive = (labels >= 0) & (labels < num_classes)
    one_hot = F.one_hot(labels.clamp(0, max(num_classes - 1, 0)), max(num_classes, 1))[..., :num_classes]
    targets = (one_hot * positive[..., None]).to(dtype)
    return targets, (labels != ignore_index).to(dtype)[..., None]


def _check_label_range(labels, num_classes, ignore_index):
    bad = ((labels < -1) | (labels > num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"{_LABELS_OP}: labels must be in [-1, {num_classes}] or ignore_index ({ignore_index}), "
                         f"got {labels[bad][0].item()}")


def _focal_rows(logits, targets, labels, weight, alpha, gamma, ignore_index, reduce, compute_grad):
    """The kernels' contract in PyTorch: (loss or its sum, weighted per-element gradient)."""
    compute = compute_dtype(logits.dtype)
    x = logits.to(compute)
    if labels is not None:
        if labels.device.type == "cpu":
            _check_label_range(labels, logits.shape[-1], ignore_index)
        t, keep = _label_targets(labels, logits.shape[-1], ignore_index, compute)
        weight = keep if weight is None else weight.to(compute) * keep
    else:
        t = targets.to(compute)
    sp_pos = F.softplus(x)  # -log(1 - p)
    sp_neg = F.softplus(-x)  # -log(p)
    p = torch.exp(-sp_neg)
    q = torch.exp(-sp_pos)
    ce = t * sp_neg + (1 - t) * sp_pos
    m = p * (1 - t) + q * t
    m_gamma = m.pow(gamma)
    scale = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else torch.ones_like(t)
    if weight is not None:
        scale = scale * weight
    loss = scale * ce * m_gamma
    loss = loss.sum() if reduce else loss.to(logits.dtype)
    if not compute_grad:
        return loss, logits.new_empty(0)
    if gamma == 0:
        # No gamma term: its gradient is 0, as PyTorch's pow backward is for exponent 0 (the general form
        # would give 0 * inf = NaN where m is subnormal, float32 |x| in about (87, 104), and m^-1 overflows).
        m_gamma_1 = torch.zeros_like(m)
    elif gamma == 1:
        m_gamma_1 = torch.ones_like(m)
    else:
        # m^(gamma - 1) where m > 0, else 0; the pow never sees 0, so a double backward stays finite.
        m_positive = m > 0
        m_gamma_1 = torch.where(m_positive, torch.where(m_positive, m, 1.0).pow(gamma - 1), 0.0)
    grad = scale * ((p - t) * m_gamma + gamma * ce * m_gamma_1 * p * q * (1 - 2 * t))
    return loss, grad.to(logits.dtype)


def _compiled(*args):
    return torch.ops.fastbb_C.sigmoid_focal_loss(*args)


def _triton(logits, targets, labels, weight, alpha, gamma, ignore_index, reduce, compute_grad):
    from fastbb.kernels import focal_loss
    if labels is not None and labels.device.type == "cpu":
        _check_label_range(labels, logits.shape[-1], ignore_index)
    return focal_loss.sigmoid_focal_loss(logits, targets, labels, weight, alpha, gamma, ignore_index, reduce,
                                         compute_grad)


# Every implementation takes (logits, targets, labels, weight, alpha, gamma, ignore_index, reduce,
# compute_grad) and returns (loss or its sum, weighted per-element gradient).
TABLE = _backend.OpTable("sigmoid_focal_loss", [
    _backend.Implementation("cuda", _compiled, devices=("cuda",), kernel="fastbb_C::sigmoid_focal_loss",
                            what="one CUDA pass: loss (or per-block partial sums) and gradient"),
    _backend.Implementation("triton", _triton, devices=("cuda",), what="the same single pass in Triton"),
    _backend.Implementation("cpp", _compiled, devices=("cpu",), kernel="fastbb_C::sigmoid_focal_loss",
                            what="one vectorised C++ pass (OpenMP)"),
    _backend.Implementation("reference", _focal_rows, what="plain PyTorch: softplus, pow, the analytic gradient"),
], autocast="logits, targets and weight cast to float32 (float64 stays float64): computes and returns float32, as "
            "binary_cross_entropy_with_logits does under autocast")


def _autocast_float32(device_type, *tensors):
    """The loss's inputs as autocast casts binary_cross_entropy_with_logits' when it is on for device_type:
    floating tensors to float32 (float64, integer labels and None as they are)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    return tuple(autocast_cast(t, device_type, torch.float32) for t in tensors)


@torch.library.custom_op("fastbb::sigmoid_focal_loss", mutates_args=())
def _focal_loss_op(logits: torch.Tensor, targets: torch.Tensor | None, labels: torch.Tensor | None,
                   weight: torch.Tensor | None, alpha: float, gamma: float, ignore_index: int, reduce: bool,
                   scale: float, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = TABLE(logits.device.type, logits, targets, labels, weight, alpha, gamma, ignore_index, reduce,
                       compute_grad)
    if reduce:
        loss = (loss * scale).to(logits.dtype)
    return loss, grad


@_focal_loss_op.register_fake
def _(logits, targets, labels, weight, alpha, gamma, ignore_index, reduce, scale, compute_grad):
    loss = logits.new_empty(()) if reduce else torch.empty_like(logits)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return loss, grad


def _setup_context(ctx, inputs, output):
    logits, targets, labels, weight = inputs[:4]
    # The inputs are kept (references, no copies) for a double backward only.
    ctx.save_for_backward(output[1], logits, targets, labels, weight)
    ctx.alpha, ctx.gamma, ctx.ignore_index, ctx.reduce, ctx.scale, ctx.compute_grad = inputs[4:]
    ctx.mark_non_differentiable(output[1])
    # The saved-gradient output never receives a gradient: not filling one with zeros spares a pass over
    # (..., C) memory at every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _):
    if grad_loss is None:
        return (None,) * 10
    grad, logits, targets, labels, weight = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (a double backward): the saved gradient is a constant to autograd, so the
        # gradient is computed again in differentiable PyTorch ops.
        _, grad = _focal_rows(logits, targets, labels, weight, ctx.alpha, ctx.gamma, ctx.ignore_index,
                              True, True)
    elif not ctx.compute_grad:
        raise RuntimeError(f"{_OP}: the forward ran without gradient tracking; no gradient was saved")
    factor = grad_loss.to(compute_dtype(grad.dtype)) * ctx.scale if ctx.reduce else grad_loss
    if (grad.device.type == "cpu" and not grad.requires_grad and grad.is_contiguous()
            and _backend.has_kernel("fastbb_C::empty_like_huge_pages", "CPU")):
        grad_logits = torch.mul(grad, factor, out=torch.ops.fastbb_C.empty_like_huge_pages(grad))
    else:
        grad_logits = grad * factor
    return (grad_logits,) + (None,) * 9


_focal_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_args(device_type, args):
    logits, targets, labels, weight, *options = args
    logits, targets, weight = (autocast_cast(t, device_type, torch.float32) for t in (logits, targets, weight))
    return (logits, targets, labels, weight, *options)


register_autocast_rule("sigmoid_focal_loss", _autocast_args)


# ---------------------------------------------------------------------------------------------------------
# Public functions: checks and normalisation to the op's (N, C) layout. The checks take the name errors
# give the caller (fastbb.nn.FocalLoss runs them too) and the caller's names of its arguments.

def _broadcasts_to(shape, target_shape):
    """Whether a tensor of `shape` broadcasts to exactly `target_shape`."""
    try:
        return torch.broadcast_shapes(shape, target_shape) == target_shape
    except RuntimeError:
        return False


def _check_common(op, gamma, alpha, reduction):
    gamma = check_float(op, "gamma", gamma)
    if gamma < 0:
        raise ValueError(f"{op}: gamma must be >= 0, got {gamma}")
    alpha = check_float(op, "alpha", alpha)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return gamma, alpha


def _check_avg_factor(op, avg_factor, reduction):
    """avg_factor as a Python float, or as a tensor (divided afterwards: no host sync); None if absent."""
    if avg_factor is None:
        return None
    if reduction == "sum":
        raise ValueError(f"{op}: avg_factor can not be used with reduction 'sum'")
    if isinstance(avg_factor, torch.Tensor):
        if avg_factor.numel() != 1:
            raise ValueError(f"{op}: avg_factor must be a number or a one-element tensor, "
                             f"got shape {tuple(avg_factor.shape)}")
        if avg_factor.device.type != "cpu" or torch.compiler.is_compiling():
            return avg_factor.reshape(())  # its sign is not checked here: that would wait for the device
        avg_factor = avg_factor.item()
    avg_factor = check_float(op, "avg_factor", avg_factor)
    if avg_factor <= 0:
        raise ValueError(f"{op}: avg_factor must be > 0, got {avg_factor}")
    return avg_factor


def _run(logits, targets, labels, weight, alpha, gamma, ignore_index, reduction, avg_factor):
    """logits (..., C) -> the op on (N, C) rows, reduced as asked, in logits' shape for 'none'."""
    shape = logits.shape
    num_classes = shape[-1] if logits.dim() > 0 else 1
    rows = logits.reshape(math.prod(shape[:-1]), num_classes).contiguous()
    if targets is not None:
        targets = targets.to(logits.dtype).reshape(rows.shape).contiguous()
    if labels is not None:
        labels = labels.to(torch.int64).reshape(-1).contiguous()
    if weight is not None:
        weight = weight.to(compute_dtype(logits.dtype))
        if labels is not None and weight.shape == shape[:-1]:
            weight = weight[..., None]  # per anchor
        weight = weight.broadcast_to(shape).reshape(rows.shape)
    reduce = reduction != "none"
    tensor_factor = isinstance(avg_factor, torch.Tensor)
    if reduction == "mean" and avg_factor is not None and not tensor_factor:
        scale = 1.0 / avg_factor
    elif reduction == "mean" and not tensor_factor:
        scale = 1.0 / rows.numel() if rows.numel() > 0 else math.nan
    else:
        scale = 1.0
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _focal_loss_op(rows, targets, labels, weight, alpha, gamma, ignore_index, reduce, scale,
                             compute_grad)
    if tensor_factor:
        loss = loss / avg_factor.to(loss.dtype)
    return loss if reduce else loss.reshape(shape)


def _focal_loss_reference(logits, targets, alpha, gamma, weight=None):
    """Per-element focal loss in plain PyTorch (autograd gives its gradient), in the compute dtype."""
    compute = compute_dtype(logits.dtype)
    x = logits.to(compute)
    t = targets.to(compute)
    ce = t * F.softplus(-x) + (1 - t) * F.softplus(x)
    m = torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t
    loss = ce * m.pow(gamma)
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    if weight is not None:
        loss = loss * weight
    return loss


def _reduce(loss, reduction, dtype, avg_factor=None):
    if reduction == "none":
        return loss.to(dtype)
    if reduction == "sum":
        return loss.sum().to(dtype)
    if avg_factor is not None:
        return (loss.sum() / avg_factor).to(dtype)
    return loss.mean().to(dtype)


def _check_dense(op, inputs, targets, reduction, gamma, alpha, names=("inputs", "targets")):
    inputs_name, targets_name = names
    check_tensor(op, inputs_name, inputs, dtypes=FLOAT_DTYPES)
    check_tensor(op, targets_name, targets)
    if not (targets.is_floating_point() or targets.dtype == torch.bool or targets.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{op}: {targets_name} must be real numbers, got dtype {targets.dtype}")
    if targets.shape != inputs.shape:
        raise ValueError(f"{op}: {targets_name} must have the shape of {inputs_name} {tuple(inputs.shape)}, "
                         f"got {tuple(targets.shape)}")
    check_same_device(op, **{inputs_name: inputs, targets_name: targets})
    return _check_common(op, gamma, alpha, reduction)


@fx_leaf("fastbb.ops.sigmoid_focal_loss")
def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2,
                       reduction: str = "none") -> torch.Tensor:
    """
    Loss used in RetinaNet for dense detection: https://arxiv.org/abs/1708.02002, as
    torchvision.ops.sigmoid_focal_loss, with the loss and its gradient computed in one pass.

    Args:
        inputs (Tensor): A float tensor of arbitrary shape: the predictions (logits) for each example;
            float16, bfloat16, float32 or float64 (computed in float32, float64 for float64).
        targets (Tensor): A tensor with the same shape as inputs. Stores the binary classification label
            for each element in inputs (0 for the negative class and 1 for the positive class; values
            in between are soft targets).
        alpha (float): Weighting factor in range [0, 1] to balance positive vs negative examples or -1
            (any negative value) for ignore. Default: ``0.25``.
        gamma (float): Exponent of the modulating factor (1 - p_t) to balance easy vs hard examples;
            >= 0. Default: ``2``.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``
            ``'none'``: No reduction will be applied to the output.
            ``'mean'``: The output will be averaged.
            ``'sum'``: The output will be summed. Default: ``'none'``.

    Returns:
        Tensor: Loss tensor with the reduction option applied, in inputs' dtype (float32 under
        ``torch.autocast``, as torchvision's). Differentiable in inputs (and in targets, which then take the
        plain PyTorch formula).
    """
    gamma, alpha = _check_dense(_OP, inputs, targets, reduction, gamma, alpha)
    inputs, targets = _autocast_float32(inputs.device.type, inputs, targets)
    if targets.requires_grad and torch.is_grad_enabled():
        return _reduce(_focal_loss_reference(inputs, targets, alpha, gamma), reduction, inputs.dtype)
    return _run(inputs, targets, None, None, alpha, gamma, -100, reduction, None)


def sigmoid_focal_loss_reference(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                                 gamma: float = 2, reduction: str = "none") -> torch.Tensor:
    """:func:`sigmoid_focal_loss` in plain PyTorch (the ground truth): same arguments, checks and results."""
    gamma, alpha = _check_dense(_OP, inputs, targets, reduction, gamma, alpha)
    inputs, targets = _autocast_float32(inputs.device.type, inputs, targets)
    return _reduce(_focal_loss_reference(inputs, targets, alpha, gamma), reduction, inputs.dtype)


def _check_labels(op, logits, labels, weight, reduction, gamma, alpha, avg_factor, ignore_index,
                  names=("logits", "labels")):
    logits_name, labels_name = names
    check_tensor(op, logits_name, logits, dtypes=FLOAT_DTYPES)
    check_tensor(op, labels_name, labels)
    if logits.dim() == 0:
        raise ValueError(f"{op}: {logits_name} must be (..., C), got a 0-d tensor")
    if labels.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"{op}: {labels_name} must be an integer tensor (class indices), got dtype {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"{op}: {labels_name} must have shape {tuple(logits.shape[:-1])} (that of {logits_name} "
                         f"without the class dimension), got {tuple(labels.shape)}")
    check_same_device(op, **{logits_name: logits, labels_name: labels})
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if weight is not None:
        check_tensor(op, "weight", weight)
        if not weight.is_floating_point():
            raise TypeError(f"{op}: weight must be a floating-point tensor, got dtype {weight.dtype}")
        check_same_device(op, **{logits_name: logits, "weight": weight})
        if weight.shape != logits.shape[:-1]:
            if not _broadcasts_to(weight.shape, logits.shape):
                raise ValueError(f"{op}: weight must be per anchor {tuple(logits.shape[:-1])} or broadcastable "
                                 f"to {logits_name} {tuple(logits.shape)}, got shape {tuple(weight.shape)}")
    gamma, alpha = _check_common(op, gamma, alpha, reduction)
    return gamma, alpha, _check_avg_factor(op, avg_factor, reduction)


def _sigmoid_focal_loss_labels(op, names, logits, labels, gamma, alpha, weight, reduction, avg_factor,
                               ignore_index):
    gamma, alpha, avg_factor = _check_labels(op, logits, labels, weight, reduction, gamma, alpha, avg_factor,
                                             ignore_index, names)
    logits, weight = _autocast_float32(logits.device.type, logits, weight)
    return _run(logits, None, labels, weight, alpha, gamma, ignore_index, reduction, avg_factor)


@fx_leaf("fastbb.ops.sigmoid_focal_loss_labels")
def sigmoid_focal_loss_labels(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25,
                              weight: torch.Tensor | None = None, reduction: str = "mean",
                              avg_factor: float | torch.Tensor | None = None,
                              ignore_index: int = -100) -> torch.Tensor:
    """
    Sigmoid focal loss of logits against class labels, as mmdet's ``FocalLoss`` computes it on labels, in
    one pass. The arguments come in the order of ``mmcv.ops.sigmoid_focal_loss(input, target, gamma, alpha,
    weight, reduction)``, then mmdet's ``avg_factor`` and ``ignore_index``, but the semantics are this
    function's own, not mmcv's op's: ``'mean'`` averages over every element (mmcv's op divides the sum by the
    number of rows), alpha < 0 turns the alpha weighting off (mmcv's op applies alpha as given), labels may
    be -1 or ``ignore_index``, and a ``(C,)`` weight scales each class's column (mmcv's scales each row by
    the weight of its label). ``fastbb.mm._ext`` provides mmcv's op with mmcv's semantics, on the same
    kernels.

    Labels outside [-1, C] other than ``ignore_index`` raise on CPU; on CUDA that check would wait for the
    device, so it is not made and such labels count as background.

    Args:
        logits (Tensor[..., C]): the predictions; float16, bfloat16, float32 or float64 (computed in
            float32, float64 for float64).
        labels (Tensor[...]): integer class labels: a label in [0, C) is that class, C or -1 is background
            (every class negative).
        gamma (float): Exponent of the modulating factor (1 - p_t); >= 0. Default: ``2.0``.
        alpha (float): Weighting factor of the positive class in [0, 1], or a negative value for no
            weighting. Default: ``0.25``.
        weight (Tensor, optional): per anchor ``(...)`` or ``(..., 1)``, per class ``(C,)``, or any shape
            broadcastable to logits; floating point. Where the per-anchor and per-class shapes coincide
            (logits ``(C, C)``) it is per anchor.
        reduction (str): ``'none'`` | ``'mean'`` | ``'sum'``. ``'mean'`` averages over all ``(..., C)``
            elements, as torchvision does on the one-hot targets (the sum divided by ``avg_factor`` when
            given). Default: ``'mean'``.
        avg_factor (float or Tensor, optional): > 0, the divisor of ``'mean'``; a one-element tensor on the
            device is divided by without a host synchronisation. Not with ``'sum'``.
        ignore_index (int): rows with this label add nothing to the loss or its gradient. Default: ``-100``.

    Returns:
        Tensor: Loss tensor with the reduction option applied, in logits' dtype (float32 under
        ``torch.autocast``), of logits' shape for ``'none'``. Differentiable in logits.
    """
    return _sigmoid_focal_loss_labels(_LABELS_OP, ("logits", "labels"), logits, labels, gamma, alpha, weight,
                                      reduction, avg_factor, ignore_index)


def sigmoid_focal_loss_labels_reference(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0,
                                        alpha: float = 0.25, weight: torch.Tensor | None = None,
                                        reduction: str = "mean", avg_factor: float | torch.Tensor | None = None,
                                        ignore_index: int = -100) -> torch.Tensor:
    """:func:`sigmoid_focal_loss_labels` in plain PyTorch (the ground truth): same arguments, checks and results."""
    gamma, alpha, avg_factor = _check_labels(_LABELS_OP, logits, labels, weight, reduction, gamma, alpha, avg_factor,
                                             ignore_index)
    if labels.device.type == "cpu":
        _check_label_range(labels, logits.shape[-1], ignore_index)
    logits, weight = _autocast_float32(logits.device.type, logits, weight)
    compute = compute_dtype(logits.dtype)
    targets, keep = _label_targets(labels.long(), logits.shape[-1], ignore_index, compute)
    if weight is not None:
        weight = weight.to(compute)
        keep = keep * (weight[..., None] if weight.shape == logits.shape[:-1] else weight)
    loss = _focal_loss_reference(logits, targets, alpha, gamma, keep)
    return _reduce(loss, reduction, logits.dtype, avg_factor)


def _sigmoid_focal_loss_weighted(op, pred, target, weight, gamma, alpha, reduction, avg_factor):
    """Dense targets with mmdet's weight and avg_factor (fastbb.nn.FocalLoss on one-hot / soft targets)."""
    gamma, alpha = _check_dense(op, pred, target, reduction, gamma, alpha, names=("pred", "target"))
    avg_factor = _check_avg_factor(op, avg_factor, reduction)
    if weight is not None:
        check_tensor(op, "weight", weight)
        check_same_device(op, pred=pred, weight=weight)
    pred, target, weight = _autocast_float32(pred.device.type, pred, target, weight)
    if weight is not None:
        if weight.shape != pred.shape and pred.dim() == 2 and weight.numel() == pred.shape[0]:
            weight = weight.reshape(-1, 1)  # per anchor, as mmdet
        if not _broadcasts_to(weight.shape, pred.shape):
            raise ValueError(f"{op}: weight must be per anchor or broadcastable to pred {tuple(pred.shape)}, "
                             f"got shape {tuple(weight.shape)}")
    if target.requires_grad and torch.is_grad_enabled():
        loss = _focal_loss_reference(pred, target, alpha, gamma, weight)
        return _reduce(loss, reduction, pred.dtype, avg_factor)
    return _run(pred, target, None, weight, alpha, gamma, -100, reduction, avg_factor)
