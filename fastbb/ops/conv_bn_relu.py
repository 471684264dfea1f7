"""conv_bn_relu: `relu(bn(conv(x)) [+ residual])` with BatchNorm in every mode PyTorch has.

- eval / frozen BN (running statistics; FrozenBatchNorm2d passes its eps read at call time): the BN is
  folded into the conv (weight * scale per output channel, shift as the bias), so the conv is the only
  pass over memory; residual and ReLU follow in place. On the CPU without autograd the folded conv runs
  as oneDNN's conv with the ReLU (and the residual add) as post-ops. The folding is plain differentiable
  PyTorch, so gradients reach x, the conv weight/bias and the BN affine parameters.
- training BN (batch statistics): the conv (oneDNN / cuDNN), then ONE fused pass computing the
  per-channel mean and variance and writing the normalized, affine, residual-added, ReLU'd output
  (fastbb::bn_relu_train); backward is one fused kernel too (ReLU mask, the two per-channel sums, grad).
  The running statistics are updated in place as nn.BatchNorm2d does (momentum, or the cumulative
  average when momentum is None: the caller passes 1 / num_batches_tracked).
Backends of the fused BN pass: cpu "cpp"; cuda "triton"; "reference" (plain PyTorch).
"""
import torch
import torch.nn.functional as F

from fastbb import _backend
from fastbb.ops._common import FLOAT_DTYPES, check_float, check_same_device, check_tensor, kernel_lib

_OP = "conv_bn_relu"
_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}
_FORWARD_KERNELS = {"cpp": "fastbb_C::bn_relu_forward"}
_BACKWARD_KERNELS = {"cpp": "fastbb_C::bn_relu_backward"}

# y (N, C, H, W) NCHW or channels_last; weight/bias (C,) or None; residual like y or None. Returns out
# (y's dtype and layout) and the batch mean and 1 / sqrt(biased var + eps), (C,) in the compute dtype.
kernel_lib.define("bn_relu_forward(Tensor y, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool relu) "
                  "-> (Tensor, Tensor, Tensor)")
# Returns grad_y, grad_weight, grad_bias ((C,) compute dtype) and grad_residual (empty unless asked).
kernel_lib.define("bn_relu_backward(Tensor grad_out, Tensor out, Tensor y, Tensor mean, Tensor invstd, "
                  "Tensor? weight, bool relu, bool residual_grad) -> (Tensor, Tensor, Tensor, Tensor)")


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(t):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _forward_shapes(y):
    channels = y.shape[1]
    stats = y.new_empty(channels, dtype=_compute_dtype(y.dtype))
    return torch.empty_like(y, memory_format=_layout(y)), stats, stats.clone()


def _backward_shapes(grad_out, y, residual_grad):
    channels = y.shape[1]
    stats = y.new_empty(channels, dtype=_compute_dtype(y.dtype))
    grad_residual = torch.empty_like(grad_out, memory_format=_layout(y)) if residual_grad else grad_out.new_empty(0)
    return torch.empty_like(y, memory_format=_layout(y)), stats, stats.clone(), grad_residual


@torch.library.register_fake("fastbb_C::bn_relu_forward", lib=kernel_lib)
def _(y, weight, bias, residual, eps, relu):
    return _forward_shapes(y)


@torch.library.register_fake("fastbb_C::bn_relu_backward", lib=kernel_lib)
def _(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    return _backward_shapes(grad_out, y, residual_grad)


# ---------------------------------------------------------------------------------------------------------
# Reference of the fused BN pass (plain PyTorch)

def bn_relu_forward_reference(y, weight, bias, residual, eps, relu):
    compute = _compute_dtype(y.dtype)
    values = y.to(compute)
    mean = values.mean((0, 2, 3))
    invstd = torch.rsqrt(values.var((0, 2, 3), unbiased=False) + eps)
    out = (values - mean[:, None, None]) * invstd[:, None, None]
    if weight is not None:
        out = out * weight.to(compute)[:, None, None]
    if bias is not None:
        out = out + bias.to(compute)[:, None, None]
    if residual is not None:
        out = out + residual.to(compute)
    if relu:
        out = out.clamp_min(0)
    return out.to(y.dtype).contiguous(memory_format=_layout(y)), mean, invstd


def bn_relu_backward_reference(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    compute = _compute_dtype(y.dtype)
    g = grad_out.to(compute)
    if relu:
        g = g * (out > 0)
    xhat = (y.to(compute) - mean[:, None, None]) * invstd[:, None, None]
    grad_bias = g.sum((0, 2, 3))
    grad_weight = (g * xhat).sum((0, 2, 3))
    count = y.numel() // max(y.shape[1], 1)
    scale = invstd if weight is None else invstd * weight.to(compute)
    grad_y = scale[:, None, None] * (g - grad_bias[:, None, None] / count - xhat * (grad_weight[:, None, None] / count))
    grad_residual = g.to(grad_out.dtype) if residual_grad else grad_out.new_empty(0)
    return (grad_y.to(y.dtype).contiguous(memory_format=_layout(y)), grad_weight, grad_bias,
            grad_residual.contiguous(memory_format=_layout(y)) if residual_grad else grad_residual)


# ---------------------------------------------------------------------------------------------------------
# The fused BN pass as custom ops

@torch.library.custom_op("fastbb::bn_relu_train", mutates_args=())
def _bn_relu_train_op(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      residual: torch.Tensor | None, eps: float, relu: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _backend.choose(_OP, y.device.type, _PREFERENCE, _FORWARD_KERNELS)
    layout = _layout(y)
    y = y.contiguous(memory_format=layout)
    if residual is not None:
        residual = residual.contiguous(memory_format=layout)
    if backend == "cpp":
        return torch.ops.fastbb_C.bn_relu_forward(y, weight, bias, residual, eps, relu)
    if backend == "triton":
        from fastbb.kernels import conv_bn_relu
        return conv_bn_relu.bn_relu_forward(y, weight, bias, residual, eps, relu)
    return bn_relu_forward_reference(y, weight, bias, residual, eps, relu)


@_bn_relu_train_op.register_fake
def _(y, weight, bias, residual, eps, relu):
    return _forward_shapes(y)


@torch.library.custom_op("fastbb::bn_relu_train_backward", mutates_args=())
def _bn_relu_train_backward_op(grad_out: torch.Tensor, out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
                               invstd: torch.Tensor, weight: torch.Tensor | None, relu: bool, residual_grad: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _backend.choose(_OP, y.device.type, _PREFERENCE, _BACKWARD_KERNELS)
    layout = _layout(y)
    grad_out = grad_out.contiguous(memory_format=layout)
    args = (grad_out, out.contiguous(memory_format=layout), y.contiguous(memory_format=layout), mean, invstd,
            weight, relu, residual_grad)
    if backend == "cpp":
        return torch.ops.fastbb_C.bn_relu_backward(*args)
    if backend == "triton":
        from fastbb.kernels import conv_bn_relu
        return conv_bn_relu.bn_relu_backward(*args)
    return bn_relu_backward_reference(*args)


@_bn_relu_train_backward_op.register_fake
def _(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    return _backward_shapes(grad_out, y, residual_grad)


def _setup_context(ctx, inputs, output):
    y, weight, bias, residual, eps, relu = inputs
    out, mean, invstd = output
    ctx.save_for_backward(out, y, mean, invstd, weight)
    ctx.relu = relu
    ctx.has_weight = weight is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, invstd)


def _backward(ctx, grad_out, _grad_mean, _grad_invstd):
    out, y, mean, invstd, weight = ctx.saved_tensors
    needs_residual = ctx.needs_input_grad[3]
    grad_y, grad_weight, grad_bias, grad_residual = torch.ops.fastbb.bn_relu_train_backward(
        grad_out, out, y, mean, invstd, weight, ctx.relu, needs_residual)
    grad_weight = grad_weight.to(weight.dtype) if ctx.has_weight and ctx.needs_input_grad[1] else None
    grad_bias = grad_bias.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
    return grad_y, grad_weight, grad_bias, grad_residual if needs_residual else None, None, None


_bn_relu_train_op.register_autograd(_backward, setup_context=_setup_context)


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
           training, momentum, eps, residual):
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
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"{_OP}: weight and bias must have x's dtype {x.dtype}, got {weight.dtype}"
                        f"{'' if bias is None else f' and {bias.dtype}'}")
    return stride, padding, dilation, eps, momentum


def _fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """The eval BN folded into the conv: weight * scale per output channel, and the shift as its bias."""
    compute = _compute_dtype(weight.dtype)
    scale = torch.rsqrt(running_var.to(compute) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(compute)
    shift = -running_mean.to(compute) * scale if bias is None else (bias.to(compute) - running_mean.to(compute)) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(compute)
    return (weight * scale.to(weight.dtype)[:, None, None, None]), shift.to(weight.dtype)


def _eval_forward(x, weight, shift, residual, stride, padding, dilation, groups, relu):
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, shift, residual))
    if not needs_grad and residual is None and x.device.type == "cpu" and x.dtype == torch.float32 \
            and torch.backends.mkldnn.is_available() and not torch.compiler.is_compiling():
        # oneDNN's conv with the ReLU as its post-op: one pass over the output.
        return torch.ops.mkldnn._convolution_pointwise(x, weight, shift, list(padding), list(stride), list(dilation),
                                                       groups, "relu" if relu else "none", [], "")
    out = F.conv2d(x, weight, shift, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual if needs_grad else out.add_(residual)
    if relu:
        out = F.relu(out) if needs_grad else out.relu_()
    return out


def conv_bn_relu(x, weight, bias=None, bn_weight=None, bn_bias=None, running_mean=None, running_var=None, *,
                 stride=1, padding=0, dilation=1, groups=1, training=False, momentum=0.1, eps=1e-5, relu=True,
                 residual=None):
    """relu(batch_norm(conv2d(x, weight, bias, stride, padding, dilation, groups)) [+ residual]).

    training=False: BN with running_mean / running_var (eval, or FrozenBatchNorm2d with its eps), folded
    into the conv. training=True: batch statistics; running_mean / running_var (if given) updated in place
    with `momentum` as nn.BatchNorm2d does (pass 1 / num_batches_tracked for its cumulative average).
    bn_weight / bn_bias None means 1 / 0 (affine=False). relu=False skips the ReLU; residual is added
    after the BN, before the ReLU. NCHW or channels_last, float32 / float16 / bfloat16 (/ float64).
    """
    stride, padding, dilation, eps, momentum = _check(x, weight, bias, bn_weight, bn_bias, running_mean,
                                                      running_var, stride, padding, dilation, groups, training,
                                                      momentum, eps, residual)
    if not training:
        folded_weight, shift = _fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
        return _eval_forward(x, folded_weight, shift, residual, stride, padding, dilation, groups, relu)
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    count = y.numel() // max(y.shape[1], 1)
    if count <= 1:
        raise ValueError(f"{_OP}: expected more than 1 value per channel when training, got input size "
                         f"{list(y.shape)}")
    out, mean, invstd = torch.ops.fastbb.bn_relu_train(y, bn_weight, bn_bias, residual, eps, relu)
    if running_mean is not None and momentum is not None:
        with torch.no_grad():
            var = (invstd.pow(-2) - eps) * (count / (count - 1))
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
    return out
