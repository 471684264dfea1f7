"""conv_bn_relu: `relu(bn(conv2d(x)) [+ residual])` with BatchNorm in every mode PyTorch has.

- eval / frozen BN (running statistics; FrozenBatchNorm2d passes its eps read at call time): the BN is
  folded into the conv (weight * scale per output channel, the shift as its bias), so the conv is the
  only pass over memory, with the residual and ReLU after it or inside it. The folding is plain
  differentiable PyTorch, so gradients reach x, the conv weight/bias and the BN affine parameters; calls
  that need no autograd reuse folded weights from a cache. The folded conv runs as the table "conv_bn_relu"
  chooses: on the CPU (float32, no autograd) the Winograd conv ("cpp"), a 1x1 conv as MKL's GEMM ("mkl")
  or oneDNN's conv with post-ops ("onednn"); on CUDA (no autograd) the fastest for the shape, timed at its
  first call, of cuDNN's fused conv ("cudnn"), the Triton epilogue conv ("triton") and the plain conv
  with an in-place add and ReLU ("reference"), which also runs everywhere else.
- training BN (batch statistics): the conv (table "conv_bn_relu.train_conv": on the CPU in float32 large
  3x3 stride-1 convs as Winograd convs, forward and both gradients, and 1x1 stride-1 convs as batched
  GEMMs; else F.conv2d), then ONE fused pass computing the per-channel mean and variance and writing the
  normalized, affine, residual-added, ReLU'd output (fastbb::bn_relu_train, tables
  "conv_bn_relu.bn_relu_train" and "conv_bn_relu.bn_relu_train_backward"); its backward is one fused pass
  too. The running statistics are updated in place as nn.BatchNorm2d does (momentum, or the cumulative
  average when momentum is None: the caller passes 1 / num_batches_tracked).
A backend forced with fastbb.use_backend / FASTBB_BACKEND runs, in each of these tables, its
implementation where one applies to the call, and the table's reference elsewhere.

The package, one concern a file:
  __init__.py       the public function, its input checks, the eval conv's table and reference, the
                    training conv's table
  bn_relu_train.py  the training BN: its kernels' schemas, references, custom ops, tables and autograd
  fold.py           BN folding and the inference cache of folded (and packed) weights
  cpu_conv.py       the CPU convs: Winograd (eval and training) and its weight transforms, the 1x1 GEMMs,
                    oneDNN with post-ops on packed weights
  cuda_conv.py      the CUDA eval convs (cuDNN fused, Triton) and the per-shape timing that picks one
"""
import functools

import torch
import torch.nn.functional as F

from fastbb._tracing import fx_leaf
from fastbb import _backend
from fastbb.ops._common import FLOAT_DTYPES, autocast_dtype, check_float, check_same_device, check_tensor
from fastbb.ops.conv_bn_relu import cpu_conv, cuda_conv
from fastbb.ops.conv_bn_relu.bn_relu_train import (bn_relu_backward_reference, bn_relu_forward_reference,
                                                   bn_relu_train)
from fastbb.ops.conv_bn_relu.fold import folded

__all__ = ["conv_bn_relu", "eval_conv_reference", "bn_relu_forward_reference", "bn_relu_backward_reference",
           "TABLE", "TRAIN_CONV_TABLE"]

_OP = "fastbb.conv_bn_relu"

_AUTOCAST = ("as conv2d then batch_norm under autocast: x, the conv weight and bias (in eval the weight and shift "
             "with the BN folded into them in float32) cast to the autocast dtype, float64 left as it is; the BN's "
             "statistics, running statistics and affine in float32; the output, and a residual added to it, in the "
             "conv's dtype")


# ---------------------------------------------------------------------------------------------------------
# The eval conv: the BN folded into weight and shift. Every implementation takes (x, weight, shift,
# residual, stride, padding, dilation, groups, relu, packed_weights); packed_weights is the dict kept with a
# cached folded weight, where the CPU convs keep their packed forms of it (None: the weight is not cached).

def _needs_autograd(x, weight, shift, residual):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, shift, residual))


def _without_autograd(applies):
    """applies, for calls that need no autograd graph, outside torch.compile: the fast paths have no
    backward, and torch.compile traces the reference (the fused ops have no fake functions, the kernels
    need real tensors) and optimizes it itself."""
    @functools.wraps(applies)
    def fast_path_applies(x, weight, shift, residual, *rest):
        return (applies(x, weight, shift, residual, *rest) and not torch.compiler.is_compiling()
                and not _needs_autograd(x, weight, shift, residual))
    return fast_path_applies


def eval_conv_reference(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights=None):
    """The folded conv in plain PyTorch: F.conv2d with the folded weight and the shift as its bias, then the
    residual add and the ReLU, in place on the conv's output when no autograd graph is needed."""
    in_place = not _needs_autograd(x, weight, shift, residual)
    out = F.conv2d(x, weight, shift, stride, padding, dilation, groups)
    if residual is not None:
        out = out.add_(residual) if in_place else out + residual
    if relu:
        out = out.relu_() if in_place else F.relu(out)
    return out


def _pick(candidates, args):
    """Among the CUDA implementations (the candidates for CUDA tensors), the fastest for the call's shape of
    them and the reference, timed at the shape's first call (cuda_conv); among the CPU ones the first."""
    if "cuda" not in candidates[0].devices:
        return candidates[0]
    return cuda_conv.fastest(TABLE.reference, candidates, args)


TABLE = _backend.OpTable("conv_bn_relu", [
    _backend.Implementation("cudnn", cuda_conv.cudnn_eval, devices=("cuda",),
                            applies=_without_autograd(cuda_conv.cudnn_eval_applies),
                            what="cuDNN's fused conv + bias (+ residual add) + ReLU (relu=True; float16, bfloat16, "
                                 "float32)"),
    _backend.Implementation("triton", cuda_conv.triton_eval, devices=("cuda",),
                            applies=_without_autograd(cuda_conv.triton_eval_applies),
                            what="the Triton implicit-GEMM conv with the shift, residual and ReLU in its epilogue "
                                 "(groups=1; float16, bfloat16, float32)"),
    _backend.Implementation("cpp", cpu_conv.winograd_eval, devices=("cpu",), kernel=cpu_conv.WINOGRAD_KERNEL,
                            applies=_without_autograd(cpu_conv.winograd_eval_applies),
                            what="the C++ Winograd F(2x2, 3x3) conv (3x3 stride-1 float32 NCHW, 64+ channels, any "
                                 "dilation), shift, residual and ReLU in its output transform"),
    _backend.Implementation("mkl", cpu_conv.pointwise_gemm_eval, devices=("cpu",),
                            applies=_without_autograd(cpu_conv.pointwise_gemm_eval_applies),
                            what="a 1x1 stride-1 float32 NCHW conv (batch 1 or 1024+ pixels) as MKL's GEMM per "
                                 "image from the shift, then residual and ReLU"),
    _backend.Implementation("onednn", cpu_conv.onednn_eval, devices=("cpu",),
                            applies=_without_autograd(cpu_conv.onednn_eval_applies),
                            what="oneDNN's float32 conv with the ReLU (and a channels_last residual) as post-ops, "
                                 "on the folded weight packed once (channels_last)"),
    _backend.Implementation("reference", eval_conv_reference,
                            what="F.conv2d with the folded weight and shift, then add and ReLU (in place without "
                                 "autograd); on CUDA also the baseline the timing weighs the others against"),
], autocast=_AUTOCAST, pick=_pick)


# ---------------------------------------------------------------------------------------------------------
# The training conv, before the fused BN. Every implementation takes (x, weight, bias, stride, padding,
# dilation, groups) and is differentiable.

TRAIN_CONV_TABLE = _backend.OpTable("conv_bn_relu.train_conv", [
    _backend.Implementation("cpp", cpu_conv.winograd_train_conv, devices=("cpu",), kernel=cpu_conv.WINOGRAD_KERNEL,
                            applies=cpu_conv.winograd_train_applies,
                            what="the C++ Winograd conv, forward and both gradients (3x3 stride-1 float32 NCHW, "
                                 "256+ channels: F(4x4, 3x3) over 64+ 4x4 tiles, dilated F(2x2, 3x3) at 2^25+ "
                                 "multiplies per pass)"),
    _backend.Implementation("mkl", cpu_conv.pointwise_gemm_train_conv, devices=("cpu",),
                            applies=cpu_conv.pointwise_gemm_train_applies,
                            what="a 1x1 stride-1 float32 NCHW conv over 196+ pixels as one batched MKL GEMM, "
                                 "with autograd"),
    _backend.Implementation("reference", F.conv2d, what="F.conv2d"),
], autocast="the conv in the autocast dtype, as conv2d (conv_bn_relu casts its inputs before this stage)",
   stage_of="conv_bn_relu")


# ---------------------------------------------------------------------------------------------------------
# The autocast policy
#
# Under torch.autocast conv2d casts its floating inputs (float64 excepted) to the autocast dtype, and
# batch_norm runs on that output with its parameters and running statistics as they are (float32): its
# statistics and affine in float32, its output in the input's dtype. conv_bn_relu casts the same way, here,
# before anything runs: x and, in training, the conv's weight and bias; in eval the BN is first folded into
# the weight and shift in float32 (float64 by the inference cache) and the folded pair is then cast, once
# per folded weight where the cache keeps it. The BN's own tensors are never cast.
# Why here and not torch.library.register_autocast or an Autocast-key kernel: register_autocast casts
# every floating input, BN parameters and running statistics included (the running statistics would then
# be updated in a copy); and conv_bn_relu is a composition (the fold, the conv's table, the fused
# fastbb::bn_relu_train), not one dispatcher op that could carry an Autocast kernel. Plain Python before the
# composition is what torch.compile and torch.export trace: dynamo folds torch.is_autocast_enabled and
# torch.get_autocast_dtype to constants and guards on the autocast state, and export runs it as written.

def _autocast_eligible(t, dtype):
    """Whether autocast casts t (autocast's own rule: a floating tensor that is not float64)."""
    return (dtype is not None and isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
            and t.dtype != dtype)


def _autocast_cast(t, dtype):
    return t.to(dtype) if _autocast_eligible(t, dtype) else t


def _conv_dtype(t, dtype):
    """The dtype t enters the conv in: the autocast dtype where autocast casts it, else its own."""
    return dtype if _autocast_eligible(t, dtype) else t.dtype


def _autocast_folded(folded_weight, shift, packed_weights, dtype):
    """The folded weight and shift cast to the autocast dtype, with the packed-weights dict that goes with
    the cast weight; cast once and kept with a folded weight the inference cache keeps."""
    if not _autocast_eligible(folded_weight, dtype):
        return folded_weight, shift, packed_weights
    if packed_weights is None:
        return folded_weight.to(dtype), shift.to(dtype), None
    key = ("autocast", dtype)
    if key not in packed_weights:
        packed_weights[key] = (folded_weight.to(dtype), shift.to(dtype), {})
    return packed_weights[key]


# ---------------------------------------------------------------------------------------------------------
# The public op

def _pair(name, value):
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in value):
        return tuple(value)
    raise ValueError(f"{_OP}: {name} must be an int or a pair of ints, got {value!r}")


def _check(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, groups,
           training, momentum, eps, residual, amp_dtype):
    check_tensor(_OP, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "weight", weight, dtypes=FLOAT_DTYPES)
    if x.dim() != 4:
        raise ValueError(f"{_OP}: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{_OP}: weight must be 4-D (C_out, C_in / groups, kH, kW), got shape {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{_OP}: groups must be an integer >= 1, got {groups!r}")
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"{_OP}: weight {tuple(weight.shape)} with groups={groups} does not fit x with "
                         f"{x.shape[1]} channels")
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{_OP}: stride and dilation must be >= 1 and padding >= 0, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    channels = weight.shape[0]
    tensors = {"x": x, "weight": weight}
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        check_tensor(_OP, name, t, dtypes=FLOAT_DTYPES)
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{_OP}: {name} must be (C_out,) = ({channels},) for the conv's {channels} output "
                             f"channels, got shape {tuple(t.shape)}")
        tensors[name] = t
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{_OP}: eval mode (training=False) needs running_mean and running_var")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{_OP}: running_mean and running_var must be given together")
    eps = check_float(_OP, "eps", eps, 0.0)
    if training and momentum is not None:
        momentum = check_float(_OP, "momentum", momentum, 0.0, 1.0)
    if residual is not None:
        check_tensor(_OP, "residual", residual, dtypes=FLOAT_DTYPES)
        out_size = [(size + 2 * p - d * (k - 1) - 1) // s + 1
                    for size, p, d, k, s in zip(x.shape[2:], padding, dilation, weight.shape[2:], stride)]
        if list(residual.shape) != [x.shape[0], channels, *out_size]:
            raise ValueError(f"{_OP}: residual must have the output's shape {(x.shape[0], channels, *out_size)}, "
                             f"got {tuple(residual.shape)}")
        tensors["residual"] = residual
    check_same_device(_OP, **tensors)
    # As conv2d: the dtypes the conv sees (after autocast's casts) must agree, else a RuntimeError.
    x_dtype = _conv_dtype(x, amp_dtype)
    if _conv_dtype(weight, amp_dtype) != x_dtype or (bias is not None and _conv_dtype(bias, amp_dtype)
                                                           != x_dtype):
        raise RuntimeError(f"{_OP}: weight and bias must have x's dtype {x_dtype}, got "
                           f"{_conv_dtype(weight, amp_dtype)}"
                           f"{'' if bias is None else f' and {_conv_dtype(bias, amp_dtype)}'}")
    return stride, padding, dilation, eps, momentum


@fx_leaf("fastbb.ops.conv_bn_relu")
def conv_bn_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 bn_weight: torch.Tensor | None = None, bn_bias: torch.Tensor | None = None,
                 running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None, *,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, training: bool = False,
                 momentum: float | None = 0.1, eps: float = 1e-5, relu: bool = True,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """Conv2d, BatchNorm, residual add and ReLU as one op: ``relu(batch_norm(conv2d(x)) + residual)``, what
    ``nn.Conv2d`` -> ``nn.BatchNorm2d`` (or ``FrozenBatchNorm2d``) -> ``(+ residual)`` -> ``nn.ReLU`` compute.

    Args:
        x (Tensor[N, C_in, H, W]): the input, NCHW or channels_last; float16, bfloat16, float32 or float64.
        weight (Tensor[C_out, C_in / groups, kH, kW]): the conv's weight, of x's dtype (outside autocast).
        bias (Tensor[C_out], optional): the conv's bias, of x's dtype (outside autocast).
        bn_weight (Tensor[C_out], optional): the BN's scale (gamma); None means 1 (``affine=False``).
        bn_bias (Tensor[C_out], optional): the BN's shift (beta); None means 0.
        running_mean (Tensor[C_out], optional): the BN's running mean: used in eval, updated in place in
            training (when given, with ``running_var``).
        running_var (Tensor[C_out], optional): the BN's running variance, as ``running_mean``.
        stride (int or Tuple[int, int]): the conv's stride. Default: 1.
        padding (int or Tuple[int, int]): the conv's zero padding. Default: 0.
        dilation (int or Tuple[int, int]): the conv's dilation. Default: 1.
        groups (int): the conv's groups. Default: 1.
        training (bool): False: normalize with the running statistics (BN in eval mode, or a frozen BN),
            folded into the conv. True: with the batch's statistics, as BatchNorm2d trains, updating the
            running statistics. Default: False.
        momentum (float, optional): the running statistics' update in training, as BatchNorm2d's; pass
            ``1 / num_batches_tracked`` for its cumulative average (``momentum=None``). Default: 0.1.
        eps (float): added to the variance, as BatchNorm2d's. Default: 1e-5.
        relu (bool): apply the ReLU. Default: True.
        residual (Tensor[N, C_out, H_out, W_out], optional): added after the BN, before the ReLU.

    Returns:
        Tensor[N, C_out, H_out, W_out]: the result, in x's dtype and, like ``F.conv2d``'s, in channels_last
        when x or the weight is. Differentiable in x, weight, bias, bn_weight, bn_bias and residual.

    Under ``torch.autocast`` it runs as ``conv2d`` then ``batch_norm`` do: x, the conv's weight and bias (in
    eval, the weight and shift with the BN folded into them in float32) are cast to the autocast dtype
    (float64 tensors are not), while the BN's statistics, running statistics and affine stay in float32; the
    result is in the autocast dtype. Outside autocast, x, weight and bias of different dtypes raise a
    RuntimeError, as ``conv2d`` does. A residual of another dtype is added as ``out += residual`` adds
    it: the result keeps the conv's dtype.
    """
    amp_dtype = autocast_dtype(x)
    stride, padding, dilation, eps, momentum = _check(x, weight, bias, bn_weight, bn_bias, running_mean,
                                                      running_var, stride, padding, dilation, groups, training,
                                                      momentum, eps, residual, amp_dtype)
    x = _autocast_cast(x, amp_dtype)
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)  # as `out += residual`: the sum is kept in the output's dtype
    if not training:
        folded_weight, shift, packed_weights = _autocast_folded(
            *folded(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps), amp_dtype)
        if not _needs_autograd(x, folded_weight, shift, residual):
            return TABLE(x.device.type, x, folded_weight, shift, residual, stride, padding, dilation, groups, relu,
                         packed_weights)
        # Training with frozen BN: the folded conv through the training-conv table (its forward and gradients
        # where they beat F.conv2d's), then the residual add and the ReLU.
        out = TRAIN_CONV_TABLE(x.device.type, x, folded_weight, shift, stride, padding, dilation, groups)
        if residual is not None:
            out = out + residual
        return F.relu(out) if relu else out
    weight, bias = _autocast_cast(weight, amp_dtype), _autocast_cast(bias, amp_dtype)
    y = TRAIN_CONV_TABLE(x.device.type, x, weight, bias, stride, padding, dilation, groups)
    count = y.numel() // max(y.shape[1], 1)
    if count <= 1:
        raise ValueError(f"{_OP}: expected more than 1 value per channel when training, got input size "
                         f"{list(y.shape)}")
    out, mean, invstd = bn_relu_train(y, bn_weight, bn_bias, residual, eps, relu)
    if running_mean is not None and momentum is not None:
        with torch.no_grad():
            var = (invstd.pow(-2) - eps) * (count / (count - 1))
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
    return out
