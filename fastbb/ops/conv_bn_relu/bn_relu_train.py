"""conv_bn_relu's training-mode BatchNorm, after the conv: the batch statistics, the normalized, affine,
residual-added, ReLU'd output in one fused pass, and its backward in one more.

- fastbb::bn_relu_train(y, weight, bias, residual, eps, relu) -> (out, mean, invstd) and
  fastbb::bn_relu_train_backward: the custom ops, what torch.compile traces (through their fake
  functions). Each runs through its stage table: cpu "cpp" (fastbb_C::bn_relu_forward / _backward,
  csrc/bn_relu/), cuda "triton" (fastbb.kernels.bn_relu), and the plain-PyTorch "reference".
- bn_relu_train(...): the one autograd path, _BnReluTrain. Called eagerly it runs the tables directly:
  the custom ops' dispatch costs about 0.1-0.2 ms per layer and step on a CPU, several percent of a
  ResNet-50 training step at batch 2. Under torch.compile the same Function calls the custom ops. The
  custom op's registered autograd is this Function's setup_context and backward, so a direct call of
  torch.ops.fastbb.bn_relu_train differentiates the same way.
"""
import torch
import torch.nn.functional as F

from fastbb import _backend
from fastbb.ops._common import compute_dtype, kernel_lib, memory_format

# y (N, C, H, W) NCHW or channels_last; weight/bias (C,) or None; residual like y or None. Returns out
# (y's dtype and layout) and the batch mean and 1 / sqrt(biased var + eps), (C,) in the compute dtype.
kernel_lib.define("bn_relu_forward(Tensor y, Tensor? weight, Tensor? bias, Tensor? residual, float eps, bool relu) "
                  "-> (Tensor, Tensor, Tensor)")
# Returns grad_y, grad_weight, grad_bias ((C,) compute dtype) and grad_residual (empty unless asked).
kernel_lib.define("bn_relu_backward(Tensor grad_out, Tensor out, Tensor y, Tensor mean, Tensor invstd, "
                  "Tensor? weight, bool relu, bool residual_grad) -> (Tensor, Tensor, Tensor, Tensor)")


def _forward_outputs(y):
    channels = y.shape[1]
    stats = y.new_empty(channels, dtype=compute_dtype(y.dtype))
    return torch.empty_like(y, memory_format=memory_format(y)), stats, stats.clone()


def _backward_outputs(grad_out, y, residual_grad):
    channels = y.shape[1]
    stats = y.new_empty(channels, dtype=compute_dtype(y.dtype))
    layout = memory_format(y)
    grad_residual = torch.empty_like(grad_out, memory_format=layout) if residual_grad else grad_out.new_empty(0)
    return torch.empty_like(y, memory_format=layout), stats, stats.clone(), grad_residual


@torch.library.register_fake("fastbb_C::bn_relu_forward", lib=kernel_lib)
def _(y, weight, bias, residual, eps, relu):
    return _forward_outputs(y)


@torch.library.register_fake("fastbb_C::bn_relu_backward", lib=kernel_lib)
def _(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    return _backward_outputs(grad_out, y, residual_grad)


def bn_relu_forward_reference(y, weight, bias, residual, eps, relu):
    """The fused BN pass in plain PyTorch: (out, mean, invstd) as fastbb_C::bn_relu_forward returns them."""
    compute = compute_dtype(y.dtype)
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
    return out.to(y.dtype).contiguous(memory_format=memory_format(y)), mean, invstd


def bn_relu_backward_reference(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    """The fused BN backward in plain PyTorch: (grad_y, grad_weight, grad_bias, grad_residual) as
    fastbb_C::bn_relu_backward returns them."""
    compute = compute_dtype(y.dtype)
    layout = memory_format(y)
    g = grad_out.to(compute)
    if relu:
        g = g * (out > 0)
    xhat = (y.to(compute) - mean[:, None, None]) * invstd[:, None, None]
    grad_bias = g.sum((0, 2, 3))
    grad_weight = (g * xhat).sum((0, 2, 3))
    count = y.numel() // max(y.shape[1], 1)
    scale = invstd if weight is None else invstd * weight.to(compute)
    grad_y = scale[:, None, None] * (g - grad_bias[:, None, None] / count - xhat * (grad_weight[:, None, None] / count))
    grad_residual = g.to(grad_out.dtype).contiguous(memory_format=layout) if residual_grad else grad_out.new_empty(0)
    return grad_y.to(y.dtype).contiguous(memory_format=layout), grad_weight, grad_bias, grad_residual


def _forward_cpp(*args):
    return torch.ops.fastbb_C.bn_relu_forward(*args)


def _backward_cpp(*args):
    return torch.ops.fastbb_C.bn_relu_backward(*args)


def _forward_triton(*args):
    from fastbb.kernels import bn_relu
    return bn_relu.bn_relu_forward(*args)


def _backward_triton(*args):
    from fastbb.kernels import bn_relu
    return bn_relu.bn_relu_backward(*args)


_AUTOCAST = ("as batch_norm under autocast: statistics, normalization and affine in float32 (float64 for float64 "
             "y), the output in y's dtype")

# Each implementation takes (y, weight, bias, residual, eps, relu), every tensor in y's memory format.
FORWARD_TABLE = _backend.OpTable("conv_bn_relu.bn_relu_train", [
    _backend.Implementation("cpp", _forward_cpp, devices=("cpu",), kernel="fastbb_C::bn_relu_forward",
                            what="one C++ pass per channel block: statistics (Chan's merge in float64), then the "
                                 "normalized, affine, residual-added, ReLU'd output while y is in cache"),
    _backend.Implementation("triton", _forward_triton, devices=("cuda",),
                            what="Triton: per-program statistics merged in a fixed order, then one elementwise pass"),
    _backend.Implementation("reference", bn_relu_forward_reference,
                            what="plain PyTorch: mean, biased var, normalize, affine, add, clamp"),
], autocast=_AUTOCAST, stage_of="conv_bn_relu")

# Each implementation takes (grad_out, out, y, mean, invstd, weight, relu, residual_grad).
BACKWARD_TABLE = _backend.OpTable("conv_bn_relu.bn_relu_train_backward", [
    _backend.Implementation("cpp", _backward_cpp, devices=("cpu",), kernel="fastbb_C::bn_relu_backward",
                            what="one C++ pass for the ReLU mask and the two per-channel sums, one for the gradients"),
    _backend.Implementation("triton", _backward_triton, devices=("cuda",),
                            what="Triton: one reduction pass (sums merged in a fixed order), one elementwise pass"),
    _backend.Implementation("reference", bn_relu_backward_reference,
                            what="plain PyTorch: the batch-norm backward formula, term by term"),
], autocast=_AUTOCAST, stage_of="conv_bn_relu")


def _forward(y, weight, bias, residual, eps, relu):
    """The fused BN pass on its table's choice, every activation in y's memory format."""
    layout = memory_format(y)
    y = y.contiguous(memory_format=layout)
    if residual is not None:
        residual = residual.contiguous(memory_format=layout)
    return FORWARD_TABLE(y.device.type, y, weight, bias, residual, eps, relu)


def _backward(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    """The fused BN backward on its table's choice, every activation in y's memory format."""
    layout = memory_format(y)
    grad_out, out, y = (t.contiguous(memory_format=layout) for t in (grad_out, out, y))
    return BACKWARD_TABLE(y.device.type, grad_out, out, y, mean, invstd, weight, relu, residual_grad)


@torch.library.custom_op("fastbb::bn_relu_train", mutates_args=())
def _bn_relu_train_op(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      residual: torch.Tensor | None, eps: float, relu: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(y, weight, bias, residual, eps, relu)


@_bn_relu_train_op.register_fake
def _(y, weight, bias, residual, eps, relu):
    return _forward_outputs(y)


@torch.library.custom_op("fastbb::bn_relu_train_backward", mutates_args=())
def _bn_relu_train_backward_op(grad_out: torch.Tensor, out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
                               invstd: torch.Tensor, weight: torch.Tensor | None, relu: bool, residual_grad: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, out, y, mean, invstd, weight, relu, residual_grad)


@_bn_relu_train_backward_op.register_fake
def _(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    return _backward_outputs(grad_out, y, residual_grad)


def _differentiable_backward(ctx, grad_out, out, y, weight):
    """The gradients in differentiable PyTorch, for a backward with create_graph (a gradient penalty): the
    BN is recomputed from y, so the graph holds how the batch statistics depend on y (the kernel's mean and
    invstd are constants to autograd). The ReLU mask is taken from out, as eager's ReLU backward does."""
    g = grad_out * (out > 0) if ctx.relu else grad_out
    wanted = [t for t, need in ((y, ctx.needs_input_grad[0]), (weight, ctx.needs_input_grad[1]))
              if need and t is not None]
    grads = []
    if wanted:
        normalized = F.batch_norm(y, None, None, weight, None, training=True, momentum=0.0, eps=ctx.eps)
        grads = list(torch.autograd.grad(normalized, wanted, g.to(normalized.dtype), create_graph=True))
    grad_y = grads.pop(0) if ctx.needs_input_grad[0] else None
    grad_weight = grads.pop(0) if ctx.needs_input_grad[1] and weight is not None else None
    grad_bias = g.sum((0, 2, 3)).to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] \
        else None
    return grad_y, grad_weight, grad_bias, g if ctx.needs_input_grad[3] else None, None, None


def _traced(t):
    """Whether the call is being traced (torch.compile, torch.export, AOT autograd): activations are then
    fake, functional or proxy tensors, not plain ones."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


class _BnReluTrain(torch.autograd.Function):
    """fastbb::bn_relu_train with its gradient. Eager calls run the tables directly; traced ones go through
    the custom ops, whose fake functions give the shapes (the kernels need real tensors)."""

    @staticmethod
    def forward(y, weight, bias, residual, eps, relu):
        if _traced(y):
            return torch.ops.fastbb.bn_relu_train(y, weight, bias, residual, eps, relu)
        return _forward(y, weight, bias, residual, eps, relu)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, weight, bias, residual, eps, relu = inputs
        out, mean, invstd = output
        ctx.save_for_backward(out, y, mean, invstd, weight)
        ctx.relu, ctx.eps = relu, eps
        ctx.has_weight = weight is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        out, y, mean, invstd, weight = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_out, out, y, weight)
        needs_residual = ctx.needs_input_grad[3]
        backward = torch.ops.fastbb.bn_relu_train_backward if _traced(grad_out) else _backward
        grad_y, grad_weight, grad_bias, grad_residual = backward(grad_out, out, y, mean, invstd, weight, ctx.relu,
                                                                 needs_residual)
        grad_weight = grad_weight.to(weight.dtype) if ctx.has_weight and ctx.needs_input_grad[1] else None
        grad_bias = grad_bias.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return grad_y, grad_weight, grad_bias, grad_residual if needs_residual else None, None, None


_bn_relu_train_op.register_autograd(_BnReluTrain.backward, setup_context=_BnReluTrain.setup_context)


def bn_relu_train(y, weight, bias, residual, eps, relu):
    """relu?(batch_norm(y) * weight + bias (+ residual)) with y's batch statistics, differentiable:
    (out, mean, invstd), mean and invstd (C,) in the compute dtype with the biased variance."""
    return _BnReluTrain.apply(y, weight, bias, residual, eps, relu)
