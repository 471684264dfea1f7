"""An ``mmcv._ext`` backed by fastbb, for mmcv installs without compiled ops (mmcv-lite).

mmcv's Python ops (``mmcv.ops.*``) call their kernels through the module ``mmcv._ext``, and each ``mmcv.ops``
module, on import, asserts that ``mmcv._ext`` has every function it will call. mmcv-lite ships no
``mmcv._ext``, so ``import mmcv.ops`` (and with it ``import mmdet.models``) fails there. This module can stand
in for it (:func:`install_if_missing` puts it into ``sys.modules["mmcv._ext"]``); it provides, under mmcv's
names and calling conventions, the ops a RetinaNet-style detector needs, on fastbb's kernels:

- ``nms(boxes, scores, iou_threshold, offset)``: the kept indices, sorted by decreasing score (what
  ``mmcv.ops.nms``, and ``mmcv.ops.batched_nms`` through it, call);
- ``sigmoid_focal_loss_forward`` / ``sigmoid_focal_loss_backward`` (what ``mmcv.ops.sigmoid_focal_loss`` and
  ``mmcv.ops.SigmoidFocalLoss`` call);
- ``get_compiler_version`` / ``get_compiling_cuda_version``, which report that no mmcv ops were compiled
  (``mmcv.utils.collect_env`` calls them and handles only a missing ``mmcv.ops``).

Every other name mmcv asks for is a function that raises NotImplementedError naming the op: those need mmcv's
compiled ops (a full mmcv build).

nms, as mmcv's kernel defines it: boxes are visited by decreasing score, a box's width is x2 - x1 + offset
(height alike), and a box whose IoU with a kept box is > iou_threshold is dropped, the threshold being a C++
float there (so it is rounded to float32 here). Where this differs from mmcv's kernel: equal scores rank lower
index first (mmcv's sort is not stable: this is one of its orders); offset 1 is computed on the boxes grown by
1 at their far corner, (x2 + 1) - x1 instead of x2 - x1 + 1, the same for integer coordinates and within a
rounding otherwise; float16, bfloat16 (IoU in float32) and float64 boxes are taken too (mmcv's takes float32).

Semantics of the focal loss functions, as mmcv's kernels define them, for input (N, C) and target (N,):
element (n, c) is positive when target[n] == c, negative otherwise (so target C, background, makes a row all
negative); with p = sigmoid(x),
    positive: -alpha (1 - p)^gamma log(p),    negative: -(1 - alpha) p^gamma log(1 - p),
alpha taken as given (no "alpha < 0 turns it off" rule here, unlike fastbb's own losses), times weight[target[n]]
when a (C,) weight is given (an empty weight is no weight). Where this differs from mmcv's kernels, and why:

- A background row (target C) with a weight is scaled by 1. mmcv's kernels read weight[C], one element past the
  end of the (C,) weight (undefined: whatever lies there), so no result of mmcv's can be matched. 1 is what the
  row gets without a weight; raising instead would make a class weight unusable for any detection batch (most
  anchors are background), and checking for such rows would make the host wait for the device on CUDA.
- Targets outside [0, C] raise ValueError on the CPU. On CUDA that check would make the host wait for the
  device, so it is not made there; such rows count as background (weight 1). mmcv does not check them either.
- mmcv takes log(max(p, FLT_MIN)) and log(max(1 - p, FLT_MIN)) of p and 1 - p rounded in the input's dtype.
  fastbb takes -log p and -log(1 - p) as softplus of the logit, exact for every logit. The losses therefore
  agree to rounding except where mmcv's rounding dominates: a negative element with a logit above about 16.6
  in float32 (36.7 in float64), where 1 - p rounds to 0 and mmcv's loss jumps to (1 - alpha) p^gamma * 87.34
  (-log FLT_MIN) while the exact loss is about (1 - alpha) x (below that, mmcv's float32 loss already loses
  precision to the cancellation in 1 - p: a relative error of about 1e-5 at a logit of 9, 1e-2 at 15); and a
  positive element with a logit below -87.34, where mmcv's loss stops at alpha * 87.34 and the exact one is
  alpha * |x|. The gradients agree everywhere (mmcv's gradient formula tends to the same limits).
- gamma < 0 (which up-weights easy examples, not a focal loss) raises ValueError.

Inputs may be float16, bfloat16, float32 or float64 (computed in float32, float64 for float64), on any device
fastbb runs on. Errors name the function as ``mmcv._ext.<name>`` and raise a class deriving from both
ValueError / TypeError and RuntimeError (RuntimeError being what mmcv's compiled checks raise).
"""
import importlib
import importlib.util
import re
import sys
import warnings

import torch

from fastbb.ops._common import (FLOAT_DTYPES, TypeRuntimeError, ValueRuntimeError, check_float, check_same_device,
                                check_tensor, compute_dtype)
from fastbb.ops.focal_loss import _focal_loss_op
from fastbb.ops.nms import nms as _fastbb_nms

__all__ = ["get_compiler_version", "get_compiling_cuda_version", "install_if_missing", "nms",
           "sigmoid_focal_loss_backward", "sigmoid_focal_loss_forward"]

_MODULE = "mmcv._ext"
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# fastbb's label kernels zero the rows labelled ignore_index; mmcv has no such label. On the CPU targets are
# checked to be in [0, C] first, so this value never occurs there; on CUDA an unchecked target equal to it
# would be zeroed instead of counted as background, the one target value of all 2^64 that is.
_NO_IGNORE_INDEX = -(2 ** 63)
_NOTICE = ("fastbb.mm: mmcv's compiled ops (mmcv._ext) are missing; fastbb provides nms / batched_nms / "
           "sigmoid_focal_loss for mmcv-lite; other mmcv ops need a full mmcv")


# ---------------------------------------------------------------------------------------------------------
# nms
# ---------------------------------------------------------------------------------------------------------

def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """
    Non-maximum suppression as mmcv's compiled ``nms``, which ``mmcv.ops.nms`` and ``mmcv.ops.batched_nms``
    call: boxes are visited by decreasing score and a box is dropped when its IoU with a kept box is
    > iou_threshold. Equal scores rank by lower index first (mmcv's sort is not stable, so this is one of
    the orders mmcv may give), on fastbb's nms kernels.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)``; float16, bfloat16, float32 or float64.
        scores (Tensor[N]): floating point.
        iou_threshold (float): the IoU above which a lower-scoring box is dropped; rounded to float32 first,
            as mmcv's kernels take it (a C++ float).
        offset (int): 0, or 1 for mmcv's legacy pixel convention where a box's width is x2 - x1 + 1 (areas
            and intersections count the last row and column): the IoUs of the boxes with x2 and y2 grown by 1.

    Returns:
        Tensor: int64 indices of the kept boxes, sorted by decreasing score; empty for no boxes.
    """
    op = f"{_MODULE}.nms"
    check_tensor(op, "boxes", boxes, ndim=2, last_dim=4, dtypes=FLOAT_DTYPES)
    check_tensor(op, "scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueRuntimeError(f"{op}: scores must have shape (N,) with N = boxes.shape[0] = {boxes.shape[0]}, "
                                f"got {tuple(scores.shape)}")
    check_same_device(op, boxes=boxes, scores=scores)
    iou_threshold = check_float(op, "iou_threshold", iou_threshold, allow_nonfinite=True)
    # mmcv's kernels take the threshold as a C++ float: rounded to float32, it decides IoUs that equal it in
    # float32 (an IoU of 0.3f against 0.3 would otherwise be suppressed, and mmcv keeps it).
    iou_threshold = float(torch.tensor(iou_threshold, dtype=torch.float32))
    if isinstance(offset, bool) or offset not in (0, 1):
        raise ValueRuntimeError(f"{op}: offset must be 0 or 1, got {offset!r}")
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if offset:
        # Widened first, so that the +1 is not rounded away in float16 / bfloat16 (IoUs are computed in
        # float32 for those anyway).
        boxes = boxes.to(compute_dtype(boxes.dtype))
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)
    return _fastbb_nms(boxes, scores, iou_threshold)


# ---------------------------------------------------------------------------------------------------------
# sigmoid focal loss
# ---------------------------------------------------------------------------------------------------------

def _focal_arguments(op, input, target, weight, out, out_name, gamma, alpha):
    """Checks mmcv's arguments and turns them into the fastbb op's: (labels, weight or None, alpha, gamma).

    The weight handed to fastbb is (N, C) in the compute dtype: weight[target] per row (1 for background rows),
    as an expanded view, times alpha_t per element where alpha < 0 (fastbb's kernels read alpha < 0 as "no
    alpha weighting", mmcv's formula takes it as it is)."""
    check_tensor(op, "input", input, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(op, "target", target, ndim=1)
    if target.dtype not in _INTEGER_DTYPES:
        raise TypeRuntimeError(f"{op}: target must be an integer tensor (class indices, C for background), "
                               f"got dtype {target.dtype}")
    rows, num_classes = input.shape
    if target.shape[0] != rows:
        raise ValueRuntimeError(f"{op}: target must have shape (N,) with N = input.shape[0] = {rows}, "
                                f"got {tuple(target.shape)}")
    check_tensor(op, "weight", weight)
    check_tensor(op, out_name, out)
    if out.shape != input.shape or out.dtype != input.dtype:
        raise ValueRuntimeError(f"{op}: {out_name} must have input's shape {tuple(input.shape)} and dtype "
                                f"{input.dtype}, got shape {tuple(out.shape)} and dtype {out.dtype}")
    check_same_device(op, input=input, target=target, weight=weight, **{out_name: out})
    gamma = check_float(op, "gamma", gamma)
    if gamma < 0:
        raise ValueRuntimeError(f"{op}: gamma must be >= 0, got {gamma}")
    alpha = check_float(op, "alpha", alpha)
    target = target.to(torch.int64)
    if target.device.type == "cpu" and rows:
        bad = (target < 0) | (target > num_classes)
        if bool(bad.any()):
            raise ValueRuntimeError(f"{op}: target must be in [0, {num_classes}] (C = {num_classes} is background), "
                                    f"got {target[bad][0].item()}")
    compute = compute_dtype(input.dtype)
    row_weight = None
    if weight.numel() != 0:  # mmcv passes an empty tensor for "no weight"
        if weight.dim() != 1 or weight.shape[0] != num_classes:
            raise ValueRuntimeError(f"{op}: weight must be empty (no weight) or have shape (C,) = ({num_classes},), "
                                    f"got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeRuntimeError(f"{op}: weight must be a floating-point tensor, got dtype {weight.dtype}")
        # Index C (background, and on CUDA any unchecked target outside [0, C]) reads the appended 1.
        padded = torch.cat([weight.to(compute), weight.new_ones(1, dtype=compute)])
        index = torch.where((target >= 0) & (target < num_classes), target, num_classes)
        row_weight = padded[index][:, None].expand(rows, num_classes)
    if alpha >= 0:
        return target, row_weight, alpha, gamma
    positive = target[:, None] == torch.arange(num_classes, device=target.device)
    alpha_t = torch.where(positive, alpha, 1.0 - alpha).to(compute)
    return target, alpha_t if row_weight is None else alpha_t * row_weight, -1.0, gamma


def sigmoid_focal_loss_forward(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                               output: torch.Tensor, gamma: float, alpha: float) -> None:
    """
    mmcv's compiled ``sigmoid_focal_loss_forward``: the per-element sigmoid focal loss, written into
    ``output`` (see the module docstring for the formula and where it differs from mmcv's kernels). One pass
    of fastbb's focal loss kernel.

    Args:
        input (Tensor[N, C]): the logits; float16, bfloat16, float32 or float64.
        target (Tensor[N]): integer class per row in [0, C]; C is background (every element negative).
        weight (Tensor): empty for no weight, or (C,) floating point: row n is scaled by weight[target[n]]
            (by 1 where target[n] is C).
        output (Tensor[N, C]): of input's dtype; overwritten with the loss.
        gamma (float): exponent of the modulating factor; >= 0.
        alpha (float): weight of the positive elements; the negatives get 1 - alpha.

    Returns:
        None: the result is in ``output``.
    """
    op = f"{_MODULE}.sigmoid_focal_loss_forward"
    labels, weight, alpha, gamma = _focal_arguments(op, input, target, weight, output, "output", gamma, alpha)
    with torch.no_grad():  # mmcv's compiled functions are not recorded by autograd; nor is this one
        loss, _ = _focal_loss_op(input.contiguous(), None, labels, weight, alpha, gamma, _NO_IGNORE_INDEX,
                                 False, 1.0, False)
        output.copy_(loss)


def sigmoid_focal_loss_backward(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                                grad_input: torch.Tensor, gamma: float, alpha: float) -> None:
    """
    mmcv's compiled ``sigmoid_focal_loss_backward``: the derivative of the sum of
    :func:`sigmoid_focal_loss_forward`'s loss with respect to each element of input, written into
    ``grad_input`` (the caller scales it by the incoming gradient and the reduction). One pass of fastbb's
    focal loss kernel (its loss sum, a scalar, is discarded).

    Args:
        input (Tensor[N, C]): the logits; float16, bfloat16, float32 or float64.
        target (Tensor[N]): integer class per row in [0, C]; C is background.
        weight (Tensor): empty for no weight, or (C,) floating point, as in the forward.
        grad_input (Tensor[N, C]): of input's dtype; overwritten with the gradient.
        gamma (float): exponent of the modulating factor; >= 0.
        alpha (float): weight of the positive elements; the negatives get 1 - alpha.

    Returns:
        None: the result is in ``grad_input``.
    """
    op = f"{_MODULE}.sigmoid_focal_loss_backward"
    labels, weight, alpha, gamma = _focal_arguments(op, input, target, weight, grad_input, "grad_input", gamma,
                                                    alpha)
    with torch.no_grad():
        _, grad = _focal_loss_op(input.contiguous(), None, labels, weight, alpha, gamma, _NO_IGNORE_INDEX,
                                 True, 1.0, True)
        grad_input.copy_(grad)


# ---------------------------------------------------------------------------------------------------------
# Information functions, and every other name
# ---------------------------------------------------------------------------------------------------------

def get_compiler_version() -> str:
    """
    What mmcv's ``get_compiler_version`` reports for a build with compiled ops: here, that there is none.

    Returns:
        str: a note that no mmcv ops were compiled.
    """
    return "n/a (no compiled mmcv ops: mmcv._ext provided by fastbb)"


def get_compiling_cuda_version() -> str:
    """
    What mmcv's ``get_compiling_cuda_version`` reports for a build with compiled ops: here, that there is none.

    Returns:
        str: a note that no mmcv ops were compiled.
    """
    return "n/a (no compiled mmcv ops: mmcv._ext provided by fastbb)"


# mmcv's op names are lower-case identifiers; other names (dunders that importlib, pickle or inspect probe
# for, private names) stay missing.
_OP_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def _not_provided(name):
    def not_provided(*args, **kwargs):
        raise NotImplementedError(
            f"{_MODULE}.{name}: this mmcv op is not provided by fastbb's mmcv._ext (fastbb.mm._ext provides nms "
            f"and sigmoid_focal_loss_forward / _backward); {name} needs mmcv's compiled ops, a full mmcv build "
            f"(pip install mmcv, not mmcv-lite)")
    not_provided.__name__ = not_provided.__qualname__ = name
    return not_provided


def __getattr__(name):
    # Every mmcv.ops module checks on import that mmcv._ext has each function it may call (mmcv's load_ext
    # asserts hasattr); answering every op name lets those imports succeed, and each missing op fails only
    # when called, with an error that names it.
    if not _OP_NAME.match(name):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _not_provided(name)


# ---------------------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------------------

def _importable(module):
    try:
        importlib.import_module(module)
    except ImportError:  # absent, or a build that fails to load (for another torch, missing symbols)
        return False
    return True


def install_if_missing() -> bool:
    """
    Makes this module ``mmcv._ext`` where mmcv is installed and its own ``mmcv._ext`` cannot be imported
    (mmcv-lite, or a build that fails to load), and warns once that it did. Nothing is done when
    ``mmcv._ext`` is already in ``sys.modules`` (mmcv's own, this module, or another stand-in).

    Call it before ``mmcv.ops`` is first imported (``import fastbb.mm`` does). After a failed
    ``import mmcv.ops`` it still takes effect for later imports, but a module that caught that ImportError
    and fell back to something else keeps its fallback.

    Returns:
        bool: True if this module was installed as ``mmcv._ext`` by this call.
    """
    if _MODULE in sys.modules or importlib.util.find_spec("mmcv") is None:
        return False
    # A broken mmcv (its package fails to import) has no ops to stand in for; a loadable mmcv._ext is mmcv's own.
    if not _importable("mmcv") or _importable(_MODULE):
        return False
    module = sys.modules[__name__]
    sys.modules[_MODULE] = module
    # A module found in sys.modules is not set as its package's attribute by the import system; without it
    # `import mmcv._ext; mmcv._ext.nms` would fail.
    sys.modules["mmcv"]._ext = module
    warnings.warn(_NOTICE, stacklevel=2)
    return True
