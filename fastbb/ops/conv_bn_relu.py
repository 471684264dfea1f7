"""conv_bn_relu: `relu(bn(conv(x)) [+ residual])` with BatchNorm in every mode PyTorch has.

- eval / frozen BN (running statistics; FrozenBatchNorm2d passes its eps read at call time): the BN is
  folded into the conv (weight * scale per output channel, shift as the bias), so the conv is the only
  pass over memory; residual and ReLU follow in place. On the CPU without autograd, in float32 on NCHW, a
  3x3 stride-1 conv with enough channels runs as a Winograd F(2x2, 3x3) conv (2.25x fewer multiplies; C++
  transforms around MKL's batched GEMM, the shift, residual and ReLU in the output transform; any
  dilation) and a 1x1 stride-1 conv as MKL's GEMM per image (the shift its initial value); other folded
  convs run as oneDNN's conv with the ReLU (and a channels_last residual) as post-ops, on weights packed
  once for channels_last input. On CUDA without autograd it runs as the fastest, timed
  per shape at the shape's first call, of cuDNN's fused conv + bias (+ add) + ReLU, the Triton
  implicit-GEMM conv with shift, residual and ReLU in its epilogue, and the plain conv then an in-place
  add and ReLU; a forced backend picks one ("cuda"/"cpp": cuDNN's, "triton", "reference": the plain
  ops). The folding is plain differentiable PyTorch, so gradients reach x, the conv weight/bias and the BN
  affine parameters.
- training BN (batch statistics): the conv (oneDNN / cuDNN; on the CPU in float32 large 3x3 stride-1 convs
  as Winograd convs, forward and both gradients, and 1x1 stride-1 convs as batched GEMMs), then ONE fused
  pass computing the
  per-channel mean and variance and writing the normalized, affine, residual-added, ReLU'd output
  (fastbb::bn_relu_train); backward is one fused kernel too (ReLU mask, the two per-channel sums, grad).
  The running statistics are updated in place as nn.BatchNorm2d does (momentum, or the cumulative
  average when momentum is None: the caller passes 1 / num_batches_tracked).
Backends of the fused BN pass: cpu "cpp"; cuda "triton"; "reference" (plain PyTorch).
"""
import functools
import math
import weakref

import torch
import torch.nn.functional as F

from fastbb import _backend
from fastbb.ops._common import FLOAT_DTYPES, check_float, check_same_device, check_tensor, kernel_lib
from fastbb.ops._pointwise_gemm import (is_pointwise_gemm, pointwise_conv_gemm, pointwise_gemm_applies,
                                        pointwise_gemm_train)

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
# weight (K, C, 3, 3) contiguous float32. Returns its Winograd transform u, (16, K, C).
kernel_lib.define("winograd_weight(Tensor weight) -> Tensor")
# x (N, C, H, W) contiguous float32; u (16, K, C) from winograd_weight; shift (K,) or None; residual
# (N, K, H_out, W_out) contiguous float32 or None. Returns the 3x3 stride-1 conv + shift (+ residual)
# (+ ReLU), contiguous (N, K, H_out, W_out) with H_out = H + 2 pad_h - 2 dilation_h.
kernel_lib.define("winograd_conv2d(Tensor x, Tensor u, Tensor? shift, Tensor? residual, bool relu, int pad_h, "
                  "int pad_w, int dilation_h, int dilation_w) -> Tensor")
# x (N, C, H, W) and grad_y (N, K, H_out, W_out) contiguous float32: the gradient with respect to u of the
# winograd_conv2d of x with that padding and dilation, (16, K, C) (winograd_weight_backward maps it to the weight).
kernel_lib.define("winograd_weight_gradient(Tensor x, Tensor grad_y, int pad_h, int pad_w, int dilation_h, "
                  "int dilation_w) -> Tensor")


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

def _bn_relu_train_forward(y, weight, bias, residual, eps, relu):
    """The fused BN pass on the chosen backend: the body of fastbb::bn_relu_train."""
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


@torch.library.custom_op("fastbb::bn_relu_train", mutates_args=())
def _bn_relu_train_op(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      residual: torch.Tensor | None, eps: float, relu: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bn_relu_train_forward(y, weight, bias, residual, eps, relu)


@_bn_relu_train_op.register_fake
def _(y, weight, bias, residual, eps, relu):
    return _forward_shapes(y)


def _bn_relu_train_backward(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    """The fused BN backward on the chosen backend: the body of fastbb::bn_relu_train_backward."""
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


@torch.library.custom_op("fastbb::bn_relu_train_backward", mutates_args=())
def _bn_relu_train_backward_op(grad_out: torch.Tensor, out: torch.Tensor, y: torch.Tensor, mean: torch.Tensor,
                               invstd: torch.Tensor, weight: torch.Tensor | None, relu: bool, residual_grad: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bn_relu_train_backward(grad_out, out, y, mean, invstd, weight, relu, residual_grad)


@_bn_relu_train_backward_op.register_fake
def _(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    return _backward_shapes(grad_out, y, residual_grad)


def _setup_context(ctx, inputs, output):
    y, weight, bias, residual, eps, relu = inputs
    out, mean, invstd = output
    ctx.save_for_backward(out, y, mean, invstd, weight)
    ctx.relu, ctx.eps = relu, eps
    ctx.has_weight = weight is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, invstd)


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


def _backward(ctx, grad_out, _grad_mean, _grad_invstd, kernel=None):
    """kernel: the backward to run (default the custom op fastbb::bn_relu_train_backward)."""
    out, y, mean, invstd, weight = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _differentiable_backward(ctx, grad_out, out, y, weight)
    needs_residual = ctx.needs_input_grad[3]
    grad_y, grad_weight, grad_bias, grad_residual = (kernel or torch.ops.fastbb.bn_relu_train_backward)(
        grad_out, out, y, mean, invstd, weight, ctx.relu, needs_residual)
    grad_weight = grad_weight.to(weight.dtype) if ctx.has_weight and ctx.needs_input_grad[1] else None
    grad_bias = grad_bias.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
    return grad_y, grad_weight, grad_bias, grad_residual if needs_residual else None, None, None


_bn_relu_train_op.register_autograd(_backward, setup_context=_setup_context)


class _BnReluTrainFunction(torch.autograd.Function):
    """fastbb::bn_relu_train's forward and backward without the custom-op dispatch, for eager calls: that
    dispatch costs about 0.2 ms per layer and step on a CPU, several percent of a ResNet-50 training step
    at batch 2. torch.compile traces the custom op instead."""

    @staticmethod
    def forward(y, weight, bias, residual, eps, relu):
        return _bn_relu_train_forward(y, weight, bias, residual, eps, relu)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_invstd):
        return _backward(ctx, grad_out, grad_mean, grad_invstd, kernel=_bn_relu_train_backward)


def _bn_relu_train(y, weight, bias, residual, eps, relu):
    if torch.compiler.is_compiling():
        return torch.ops.fastbb.bn_relu_train(y, weight, bias, residual, eps, relu)
    return _BnReluTrainFunction.apply(y, weight, bias, residual, eps, relu)


# ---------------------------------------------------------------------------------------------------------
# The eval conv (BN folded into weight and shift)

def _eager_eval(x, weight, shift, residual, stride, padding, dilation, groups, relu, in_place=True):
    out = F.conv2d(x, weight, shift, stride, padding, dilation, groups)
    if residual is not None:
        out = out.add_(residual) if in_place else out + residual
    if relu:
        out = out.relu_() if in_place else F.relu(out)
    return out


def _conv_output_format(x, weight):
    # cuDNN's rule (F.conv2d and the fused cuDNN ops alike): channels_last when x or the weight is.
    return torch.channels_last if torch.channels_last in (_layout(x), _layout(weight)) else torch.contiguous_format


def _cudnn_eval(x, weight, shift, residual, stride, padding, dilation, groups, relu):
    """cuDNN's fused conv + bias (+ residual) + ReLU; offered only with relu=True."""
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, shift, stride, padding, dilation, groups)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, shift, stride, padding, dilation, groups)


def _triton_eval(x, weight, shift, residual, stride, padding, dilation, groups, relu):
    """The Triton implicit-GEMM conv with shift, residual and ReLU in its epilogue (groups=1)."""
    from fastbb.kernels import conv_bn_relu
    scale = torch.ones(weight.shape[0], dtype=torch.float32, device=x.device)  # the BN scale is in the weight
    out = conv_bn_relu.conv2d_epilogue(x, weight, scale, shift.float(), residual, relu, stride, padding, dilation)
    # The kernel writes channels_last; every candidate returns eager's layout, whichever one runs.
    return out.contiguous(memory_format=_conv_output_format(x, weight))


_CUDA_EVAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HAS_CUDNN_FUSED = hasattr(torch, "cudnn_convolution_relu") and hasattr(torch, "cudnn_convolution_add_relu")


def _cuda_candidates(x, weight, shift, residual, stride, padding, dilation, groups, relu):
    """{name: zero-argument callable} of the implementations usable for this call, "eager" first."""
    args = (x, weight, shift, residual, stride, padding, dilation, groups, relu)
    candidates = {"eager": functools.partial(_eager_eval, *args)}
    if x.dtype not in _CUDA_EVAL_DTYPES:
        return candidates
    # The fused cuDNN ops pass deterministic=False to cuDNN whatever torch's setting, so they stay out
    # when determinism is asked for; their residual must have x's dtype (the eager add casts it).
    if (relu and _HAS_CUDNN_FUSED and torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()
            and not torch.backends.cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()
            and (residual is None or residual.dtype == x.dtype)):
        candidates["cudnn"] = functools.partial(_cudnn_eval, *args)
    if groups == 1 and _backend.backend_usable("triton", "cuda"):
        candidates["triton"] = functools.partial(_triton_eval, *args)
    return candidates


def _time_candidate(fn, warmup=2, repeats=5):
    """Milliseconds per call of fn on the current CUDA stream: the mean of `repeats` calls after `warmup`
    (which also absorb cuDNN's and Triton's own first-call autotuning and compilation)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def _can_time():
    # Timing runs the candidates and waits for the device: impossible inside a CUDA graph capture, and
    # meaningless while torch.compile traces with fake tensors.
    return not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()


def _same_layout(out, reference):
    return out.shape == reference.shape and out.dtype == reference.dtype and _layout(out) == _layout(reference)


class _ConvAlgorithmCache:
    """The fastest implementation of the eval conv per shape, timed at the first call of each key and
    remembered, as torch.backends.cudnn.benchmark does for cuDNN's algorithms.

    Timed rather than ruled: cuDNN's fused conv + bias (+ add) + ReLU wins on some shapes, the Triton
    implicit-GEMM conv with its epilogue on others, and on others still the plain cuDNN conv followed by the
    in-place add and ReLU (cuDNN's fused engines do not cover every shape as well as its plain ones). The
    winner moves with channels, spatial size, stride, dtype, layout and GPU, and no static rule holds
    across them. Like cudnn.benchmark, the choice (and so the rounding of the result) can differ between
    runs when two candidates time alike; force a backend for a fixed one.
    """

    def __init__(self):
        self._winners = {}

    def choose(self, key, candidates):
        """The name of the candidate to run for `key`.

        candidates: {name: zero-argument callable}, with "eager", the implementation that always works.
        A candidate that raises on its trial, or returns another shape, dtype or layout than eager, is
        dropped for this key. Without timing (compiling, capturing a CUDA graph): the remembered winner,
        else eager.
        """
        if len(candidates) == 1:
            return "eager"
        winner = self._winners.get(key)
        if winner in candidates:
            return winner
        if not _can_time():
            return "eager"
        reference = candidates["eager"]()
        timings = {"eager": _time_candidate(candidates["eager"])}
        for name, fn in candidates.items():
            if name == "eager":
                continue
            try:
                if _same_layout(fn(), reference):
                    timings[name] = _time_candidate(fn)
            except Exception:  # no kernel for this shape, dtype or layout, or out of memory: keep the others
                continue
        winner = min(timings, key=timings.get)  # eager comes first: it wins ties
        self._winners[key] = winner
        return winner


_conv_algorithms = _ConvAlgorithmCache()

# A forced backend (FASTBB_BACKEND, fastbb.use_backend) names the eval candidate to run; when that one is
# not offered for the call (relu=False for cuDNN, groups > 1 for Triton, ...), eager runs.
_FORCED_CANDIDATE = {"reference": "eager", "cpp": "cudnn", "cuda": "cudnn", "triton": "triton"}


def _cuda_eval_forward(x, weight, shift, residual, stride, padding, dilation, groups, relu):
    args = (x, weight, shift, residual, stride, padding, dilation, groups, relu)
    if torch.compiler.is_compiling():
        # Only the plain ops trace: the fused cuDNN ops have no fake (meta) kernel and the Triton launcher
        # needs real tensors. torch.compile optimizes the plain ops itself.
        return _eager_eval(*args)
    candidates = _cuda_candidates(*args)
    forced = _backend.forced_backend()
    if forced is not None:
        return candidates.get(_FORCED_CANDIDATE[forced], candidates["eager"])()
    key = (x.device, x.dtype, _layout(x), _layout(weight), tuple(x.shape), tuple(weight.shape), stride, padding,
           dilation, groups, None if residual is None else (residual.dtype, _layout(residual)), relu)
    with torch.cuda.device(x.device):  # time, and check for a capture, on x's device
        name = _conv_algorithms.choose(key, candidates)
    return candidates[name]()


_HAS_ONEDNN_PACKING = hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")
_HAS_ONEDNN_BINARY = hasattr(torch.ops.mkldnn, "_convolution_pointwise") and hasattr(
    torch.ops.mkldnn._convolution_pointwise, "binary")
_PACKED_SHAPES_PER_WEIGHT = 4  # input shapes whose packed weight is kept (varying image sizes evict)


def _packed_weight(packed_weights, weight, x, stride, padding, dilation, groups):
    """The folded weight in oneDNN's blocked layout for x's shape, packed once and kept with the folded
    weight: otherwise oneDNN reorders every weight on every call, which at batch 1 costs as much as the
    BN the folding removed."""
    key = ("onednn", tuple(x.shape), stride, padding, dilation, groups)
    packed = packed_weights.get(key)
    if packed is None:
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, list(padding), list(stride), list(dilation),
                                                              groups, list(x.shape))
        shapes = [k for k in packed_weights if k[0] == "onednn"]
        if len(shapes) >= _PACKED_SHAPES_PER_WEIGHT:
            packed_weights.pop(shapes[0])  # the oldest shape
        packed_weights[key] = packed
    return packed


# Winograd F(2x2, 3x3): u = G g G^T per 3x3 kernel g (csrc/conv_bn_relu/winograd_cpu.cpp).
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# Fewer channels make GEMMs too small to repay the transforms: oneDNN's direct conv is faster there.
_WINOGRAD_MIN_CHANNELS = 64
# Training convs run as Winograd convs only from 128 channels in and out and over 4096 output positions:
# measured on a 2-core AVX2 CPU, forward + input gradient against oneDNN's, 1.3x at 256 channels and
# 64x64 but slower at ResNet-50's 64- and 128-channel 3x3 convs at batch 2 (the weight is transformed
# afresh at every step, and the thinner GEMMs gain less).
_WINOGRAD_TRAIN_MIN_CHANNELS = 128
_WINOGRAD_TRAIN_MIN_POSITIONS = 4096


def winograd_weight_reference(weight):
    """(16, K, C): the Winograd transform of each (K, C, 3, 3) kernel, computed in float64, rounded once."""
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abkc", g, weight.double(), g)
    return u.reshape(16, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


def winograd_weight(weight):
    return torch.ops.fastbb_C.winograd_weight(weight.contiguous())


def winograd_weight_backward(grad_u):
    """The gradient with respect to the (K, C, 3, 3) weight from the one with respect to its transform:
    G^T grad_u G per kernel (the adjoint of winograd_weight)."""
    g = torch.tensor(_WINOGRAD_G, dtype=grad_u.dtype, device=grad_u.device)
    k, c = grad_u.shape[1:]
    return torch.einsum("ai,abkc,bj->kcij", g, grad_u.view(4, 4, k, c), g).contiguous()


# Turning a kernel by 180 degrees reverses G's columns, which for this G swaps its rows 0 and 3 (G J = P G):
# the turned kernel's transform is u with both of its 4-indices mapped by 0 <-> 3.
_TURNED = (15, 13, 14, 12, 7, 5, 6, 4, 11, 9, 10, 8, 3, 1, 2, 0)


def winograd_weight_of_input_gradient(u):
    """(16, C, K): the transform of the conv whose output is the input gradient of the conv transformed in u
    (16, K, C): kernels transposed and turned by 180 degrees, taken from u by a copy."""
    return u[list(_TURNED)].transpose(1, 2).contiguous()


def _winograd_output_size(x, padding, dilation):
    """(H_out, W_out) of a 3x3 stride-1 conv of x."""
    return [size + 2 * p - 2 * d for size, p, d in zip(x.shape[2:], padding, dilation)]


def _winograd_applies(x, weight, residual, stride, padding, dilation, groups):
    out_size = _winograd_output_size(x, padding, dilation)
    if tuple(weight.shape[2:]) != (3, 3) or stride != (1, 1) or groups != 1 or min(out_size) <= 0:
        return False
    # Measured on a 2-core AVX2 CPU against oneDNN: 1.2x to 1.8x from 128 channels up, at every spatial
    # size; at 64 channels the GEMMs are too thin and only larger images (1024+ tiles) gain.
    channels = min(weight.shape[0], weight.shape[1])
    tiles = x.shape[0] * ((out_size[0] + 1) // 2) * ((out_size[1] + 1) // 2)
    if channels < _WINOGRAD_MIN_CHANNELS or (channels < 2 * _WINOGRAD_MIN_CHANNELS and tiles < 1024):
        return False
    return (x.is_contiguous() and x.numel() > 0 and (residual is None or residual.dtype == torch.float32)
            and _backend.forced_backend() in (None, "cpp")
            and _backend.has_kernel("fastbb_C::winograd_conv2d", "CPU"))


class _WinogradTrainConv(torch.autograd.Function):
    """The training conv as a Winograd conv: forward; the input gradient (a 3x3 stride-1 conv of the output
    gradient with the kernels transposed and turned, whose transform is a copy of the forward's); the weight
    gradient through the transform (16 GEMMs over the tiles, then G^T grad_u G). With create_graph, the
    backward is ATen's differentiable one."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):
        u = winograd_weight(weight)
        ctx.save_for_backward(x, weight, u)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        return torch.ops.fastbb_C.winograd_conv2d(x, u, bias, None, False, *padding, *dilation)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, u = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        args = ([weight.shape[0]] if ctx.has_bias else None, [1, 1], list(ctx.padding), list(ctx.dilation), False,
                [0, 0], 1)
        if torch.is_grad_enabled():
            grads = torch.ops.aten.convolution_backward(grad_y, x, weight, *args, [need_x, need_w, need_b])
            return (*grads, None, None)
        grad_y = grad_y.contiguous()
        grad_x = None
        back_padding = [2 * d - p for p, d in zip(ctx.padding, ctx.dilation)]
        if need_x and min(back_padding) >= 0:
            grad_x = torch.ops.fastbb_C.winograd_conv2d(grad_y, winograd_weight_of_input_gradient(u), None, None,
                                                        False, *back_padding, *ctx.dilation)
        elif need_x:
            grad_x = torch.ops.aten.convolution_backward(grad_y, x, weight, *args, [True, False, False])[0]
        grad_w = grad_b = None
        if need_w:
            grad_u = torch.ops.fastbb_C.winograd_weight_gradient(x, grad_y, *ctx.padding, *ctx.dilation)
            grad_w = winograd_weight_backward(grad_u)
        if need_b:
            grad_b = grad_y.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _train_conv(x, weight, bias, stride, padding, dilation, groups):
    """The conv before a training BN. On the CPU in float32: the Winograd conv for 3x3 stride-1 convs with
    enough channels over enough output positions; a 1x1 stride-1 conv over 196+ pixels per image as a
    batched GEMM with autograd (MKL's GEMMs, forward and backward, 1.2x oneDNN's conv and its backward on
    ResNet-50's 1x1 convs at batch 2, even at 14x14 and slower at 7x7); otherwise F.conv2d."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.compiler.is_compiling() or x.numel() == 0
            or (bias is not None and bias.dtype != torch.float32)):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if (_winograd_applies(x, weight, None, stride, padding, dilation, groups)
            and min(weight.shape[0], weight.shape[1]) >= _WINOGRAD_TRAIN_MIN_CHANNELS
            and x.shape[0] * math.prod(_winograd_output_size(x, padding, dilation)) >= _WINOGRAD_TRAIN_MIN_POSITIONS):
        return _WinogradTrainConv.apply(x, weight, bias, padding, dilation)
    if is_pointwise_gemm(x, weight, stride, padding, groups) and x.shape[2] * x.shape[3] >= 196:
        return pointwise_gemm_train(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _winograd_eval(x, weight, shift, residual, padding, dilation, relu, packed_weights):
    u = packed_weights.get(("winograd",))
    if u is None:
        u = packed_weights[("winograd",)] = winograd_weight(weight)
    if residual is not None:
        residual = residual.contiguous()
    return torch.ops.fastbb_C.winograd_conv2d(x, u, shift, residual, relu, *padding, *dilation)


def _eval_forward(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights=None):
    """The folded conv + residual + ReLU. packed_weights: a dict kept with a cached folded weight, where the
    CPU path keeps that weight packed for oneDNN and Winograd-transformed (None: the weight is not cached,
    nothing is packed or transformed)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, shift, residual))
    if not needs_grad and x.device.type == "cuda":
        return _cuda_eval_forward(x, weight, shift, residual, stride, padding, dilation, groups, relu)
    cpu_float32 = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()
    if (not needs_grad and cpu_float32 and packed_weights is not None
            and _winograd_applies(x, weight, residual, stride, padding, dilation, groups)):
        return _winograd_eval(x, weight, shift, residual, padding, dilation, relu, packed_weights)
    if not needs_grad and cpu_float32 and pointwise_gemm_applies(x, weight, residual, stride, padding, groups):
        return pointwise_conv_gemm(x, weight, shift, residual, relu)
    channels_last = _layout(x) == torch.channels_last
    # A residual joins oneDNN's conv as an add post-op when it is laid out as the output will be (channels_last).
    fused_residual = residual is None or (channels_last and _HAS_ONEDNN_BINARY and residual.dtype == torch.float32
                                          and residual.is_contiguous(memory_format=torch.channels_last))
    if not needs_grad and fused_residual and cpu_float32 and torch.backends.mkldnn.is_available():
        # oneDNN's conv with the residual and the ReLU as its post-ops: one pass over the output. The packed
        # weight only for channels_last x: for NCHW x oneDNN would answer in channels_last, not eager's layout.
        if packed_weights is not None and _HAS_ONEDNN_PACKING and channels_last:
            weight = _packed_weight(packed_weights, weight, x, stride, padding, dilation, groups)
        conv_args = (weight, shift, list(padding), list(stride), list(dilation), groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, *conv_args, "relu" if relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *conv_args, "add", None,
                                                              "relu" if relu else None, [], "")
    return _eager_eval(x, weight, shift, residual, stride, padding, dilation, groups, relu, in_place=not needs_grad)


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


def _fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, compute=None):
    """The eval BN folded into the conv: weight * scale per output channel, and the shift as its bias.

    compute: the dtype of the folding (default float32, float64 for float64 weights). The inference
    cache folds once in float64, so each folded weight carries a single rounding: as close to the unfused
    conv -> BN as folding comes (a float32 scale adds its own few ulps to every weight).
    """
    compute = compute or _compute_dtype(weight.dtype)
    scale = torch.rsqrt(running_var.to(compute) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(compute)
    shift = -running_mean.to(compute) * scale if bias is None else (bias.to(compute) - running_mean.to(compute)) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(compute)
    return (weight.to(compute) * scale[:, None, None, None]).to(weight.dtype), shift.to(weight.dtype)


class _FoldCache:
    """Folded (weight, shift) pairs, and on the CPU their oneDNN-packed forms, reused across inference
    calls until one of their sources changes.

    Folding reads and writes every conv weight: at batch 1 that is a third of a CPU ResNet-50 forward,
    for a result that only changes when the parameters or BN statistics do. An entry is keyed by the
    identity (a weak reference, so a replaced tensor never matches), the in-place version counter and the
    storage of each source tensor, plus eps: load_state_dict, an optimizer step or a running-statistics
    update bump a version, and module.to() / .double() swap the storage. Only calls that need no
    autograd graph use it, outside torch.compile (which traces the folding into its own graph). The
    folded weights live as long as the conv weight they came from.
    """

    def __init__(self):
        # id(weight) -> (source references, versions, eps, folded weight, shift, packed weights by shape)
        self._entries = {}

    @staticmethod
    def usable(sources):
        if torch.compiler.is_compiling():
            return False
        present = [t for t in sources if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in present):
            return False
        return not any(t.is_inference() for t in present)  # inference tensors keep no version counter

    def get(self, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
        sources = (weight, bias, bn_weight, bn_bias, running_mean, running_var)
        # The storage pointer too: module.to() / .half() swap a parameter's .data without a version bump.
        versions = tuple(None if t is None else (t._version, t.data_ptr()) for t in sources)
        entry = self._entries.get(id(weight))
        if entry is not None:
            refs, cached_versions, cached_eps, folded, shift, packed_weights = entry
            if (cached_versions == versions and cached_eps == eps
                    and all((r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, sources))):
                return folded, shift, packed_weights
        # Normal tensors even under torch.inference_mode: a later call whose x needs a gradient saves the
        # folded weight for backward, which autograd refuses for inference tensors. inference_mode(False)
        # turns grad mode back on, so no_grad as well: a graph on the folded weight would hold the source
        # weight, and the entry (which goes when its weight does) would then keep it alive for ever.
        with torch.inference_mode(False), torch.no_grad():
            folded, shift = _fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, torch.float64)
        key = id(weight)
        # The entry goes when its weight does (the callback runs before that id can be reused).
        refs = tuple(None if t is None else weakref.ref(t) for t in sources[1:])
        refs = (weakref.ref(weight, lambda _, key=key: self._entries.pop(key, None)),) + refs
        packed_weights = {}
        self._entries[key] = (refs, versions, eps, folded, shift, packed_weights)
        return folded, shift, packed_weights


_fold_cache = _FoldCache()


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
        sources = (weight, bias, bn_weight, bn_bias, running_mean, running_var)
        if _FoldCache.usable(sources):
            folded_weight, shift, packed_weights = _fold_cache.get(*sources, eps)
        else:
            folded_weight, shift = _fold(*sources, eps)
            packed_weights = None
        return _eval_forward(x, folded_weight, shift, residual, stride, padding, dilation, groups, relu,
                             packed_weights)
    y = _train_conv(x, weight, bias, stride, padding, dilation, groups)
    count = y.numel() // max(y.shape[1], 1)
    if count <= 1:
        raise ValueError(f"{_OP}: expected more than 1 value per channel when training, got input size "
                         f"{list(y.shape)}")
    out, mean, invstd = _bn_relu_train(y, bn_weight, bn_bias, residual, eps, relu)
    if running_mean is not None and momentum is not None:
        with torch.no_grad():
            var = (invstd.pow(-2) - eps) * (count / (count - 1))
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
    return out
