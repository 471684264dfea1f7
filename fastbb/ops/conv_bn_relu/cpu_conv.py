"""conv_bn_relu's CPU convs beside the plain F.conv2d, each with the predicate saying which calls it takes
(its table's `applies`):
- "cpp": the Winograd convs (fastbb_C::winograd_*, csrc/winograd_conv2d/) for 3x3 stride-1 convs with
  enough channels: eval, F(2x2, 3x3) with the shift, residual and ReLU in its output transform on a weight
  transformed once per folded weight; and training, forward and both gradients, F(4x4, 3x3) (F(2x2, 3x3)
  when dilated).
- "mkl": a 1x1 stride-1 conv as MKL's GEMM per image (fastbb/ops/_pointwise_gemm.py), eval and training.
- "onednn": the eval conv as oneDNN's conv with the ReLU (and a channels_last residual) as post-ops, on
  the folded weight packed once for the input's shape.
The eval functions take the eval table's arguments (x, weight, shift, residual, stride, padding, dilation,
groups, relu, packed_weights), the BN folded into weight and shift, and need no autograd; the training
functions take (x, weight, bias, stride, padding, dilation, groups) and are differentiable.
"""
import math

import torch

from fastbb.ops._common import kernel_lib, memory_format
from fastbb.ops._pointwise_gemm import (is_pointwise_gemm, pointwise_conv_gemm, pointwise_gemm_applies,
                                        pointwise_gemm_train)

# `tile` is the output tile's side: 2 for F(2x2, 3x3) (16 = 4x4 transformed values per kernel or patch), 4
# for F(4x4, 3x3) (36 = 6x6; dilation 1 only).
# weight (K, C, 3, 3) contiguous float32. Returns its Winograd transform u, (16 or 36, K, C).
kernel_lib.define("winograd_weight(Tensor weight, int tile=2) -> Tensor")
# The same for the conv whose output is the input gradient: the kernels transposed and turned by 180
# degrees, (16 or 36, C, K).
kernel_lib.define("winograd_weight_of_input_gradient(Tensor weight, int tile=2) -> Tensor")
# grad_u (16 or 36, K, C) contiguous float32 or float64, the gradient with respect to u: the gradient with
# respect to the weight, (K, C, 3, 3) (G^T grad_u G per kernel, the adjoint of winograd_weight).
kernel_lib.define("winograd_weight_backward(Tensor grad_u) -> Tensor")
# x (N, C, H, W) contiguous float32; u (16 or 36, K, C) from winograd_weight; shift (K,) or None; residual
# (N, K, H_out, W_out) contiguous float32 or None. Returns the 3x3 stride-1 conv + shift (+ residual)
# (+ ReLU), contiguous (N, K, H_out, W_out) with H_out = H + 2 pad_h - 2 dilation_h.
kernel_lib.define("winograd_conv2d(Tensor x, Tensor u, Tensor? shift, Tensor? residual, bool relu, int pad_h, "
                  "int pad_w, int dilation_h, int dilation_w) -> Tensor")
# x (N, C, H, W) and grad_y (N, K, H_out, W_out) contiguous float32: the gradient with respect to u of the
# winograd_conv2d of x with that padding and dilation, (16 or 36, K, C) (winograd_weight_backward maps it to
# the weight).
kernel_lib.define("winograd_weight_gradient(Tensor x, Tensor grad_y, int pad_h, int pad_w, int dilation_h, "
                  "int dilation_w, int tile=2) -> Tensor")
# F(4x4) with dilation 1, u (36, K, C) the forward's transform: (grad_x, grad_u), both gradients from one
# output-gradient transform (grad_V = u^T grad_M mapped back onto the input patches).
kernel_lib.define("winograd_backward(Tensor x, Tensor grad_y, Tensor u, int pad_h, int pad_w) -> (Tensor, Tensor)")

WINOGRAD_KERNEL = "fastbb_C::winograd_conv2d"

# ---------------------------------------------------------------------------------------------------------
# Winograd F(2x2, 3x3)

# u = G g G^T per 3x3 kernel g (csrc/winograd_conv2d/winograd_conv2d_cpu.cpp), by tile side.
_WINOGRAD_G = {2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
               4: ((1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
                   (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0))}
# Fewer channels make GEMMs too small to repay the transforms: oneDNN's direct conv is faster there.
_WINOGRAD_MIN_CHANNELS = 64
# Training convs run as Winograd convs from 256 channels in and out: F(4x4, 3x3) over 64 or more 4x4 output
# tiles (dilation 1), F(2x2, 3x3) where the 16 GEMMs of each pass multiply 2^25 or more (out channels x in
# channels x 2x2 tiles; dilated convs). Measured on a 2-core AVX-512 CPU (runs vary by 10-20% there), forward
# and both gradients against oneDNN's conv and backward, at 256 channels: F(4x4) 1.1-1.2x over 4x16x16 (64
# tiles), 1.4x over 2x32x32, 1.45-1.65x over 1x64x64 and 2x64x64 (F(2x2): 0.9-1.2x, 1.1-1.3x, 1.15-1.25x); at
# 512 channels 1.5x over 2x32x32 but 0.75x over 2x16x16 (32 tiles: GEMMs too thin for the transforms' cost),
# as at 256 channels over 4x8x8; at 128 channels within 1.15x of oneDNN either way. F(4x4)'s float32 error is
# about 30x a direct conv's (F(2x2)'s 1.2-1.6x): rounding that training absorbs (cuDNN's Winograd and TF32
# convs round more), left out of the eval table, whose results match oneDNN's to a few roundings.
_WINOGRAD_TRAIN_MIN_CHANNELS = 256
_WINOGRAD4_TRAIN_MIN_TILES = 64
_WINOGRAD_TRAIN_MIN_WORK = 2 ** 25


def winograd_weight_reference(weight, tile=2):
    """(16 or 36, K, C): the Winograd transform of each (K, C, 3, 3) kernel for tile x tile outputs, computed in
    float64, rounded once."""
    g = torch.tensor(_WINOGRAD_G[tile], dtype=torch.float64, device=weight.device)
    u = torch.einsum("ai,kcij,bj->abkc", g, weight.double(), g)
    return u.reshape((tile + 2) ** 2, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


def winograd_weight(weight, tile=2):
    """(16 or 36, K, C): the Winograd transform of a (K, C, 3, 3) float32 weight, by the C++ kernel."""
    return torch.ops.fastbb_C.winograd_weight(weight.contiguous(), tile)


def winograd_weight_backward(grad_u):
    """The gradient with respect to the (K, C, 3, 3) weight from the one with respect to its transform:
    G^T grad_u G per kernel (the adjoint of winograd_weight), by the C++ kernel."""
    return torch.ops.fastbb_C.winograd_weight_backward(grad_u.contiguous())


def winograd_weight_of_input_gradient(weight, tile=2):
    """(16 or 36, C, K): the transform of the conv whose output is the input gradient of the conv of the
    (K, C, 3, 3) float32 weight (kernels transposed and turned by 180 degrees), by the C++ kernel."""
    return torch.ops.fastbb_C.winograd_weight_of_input_gradient(weight.contiguous(), tile)


def _winograd_output_size(x, padding, dilation):
    """(H_out, W_out) of a 3x3 stride-1 conv of x."""
    return [size + 2 * p - 2 * d for size, p, d in zip(x.shape[2:], padding, dilation)]


def _winograd_tiles(x, padding, dilation):
    """The number of 2x2 output tiles of a 3x3 stride-1 conv of x (about that number with dilation)."""
    return x.shape[0] * math.prod((size + 1) // 2 for size in _winograd_output_size(x, padding, dilation))


def _winograd_shape_applies(x, weight, residual, stride, padding, dilation, groups):
    """Whether the Winograd conv runs this float32 conv and pays: a 3x3 stride-1 conv of contiguous NCHW x
    with enough channels for the image's size."""
    # Measured on a 2-core AVX2 CPU against oneDNN: 1.2x to 1.8x from 128 channels up, at every spatial
    # size; at 64 channels the GEMMs are too thin and only larger images (1024+ tiles) gain.
    channels = min(weight.shape[0], weight.shape[1])
    if (weight.shape[2] != 3 or weight.shape[3] != 3 or stride != (1, 1) or groups != 1
            or channels < _WINOGRAD_MIN_CHANNELS):
        return False
    if (min(_winograd_output_size(x, padding, dilation)) <= 0
            or (channels < 2 * _WINOGRAD_MIN_CHANNELS and _winograd_tiles(x, padding, dilation) < 1024)):
        return False
    return x.is_contiguous() and x.numel() > 0 and (residual is None or residual.dtype == torch.float32)


def winograd_eval_applies(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights):
    """The transform is made once per folded weight and kept with it: only for weights the inference cache
    keeps (packed_weights not None)."""
    return (x.dtype == torch.float32 and packed_weights is not None
            and _winograd_shape_applies(x, weight, residual, stride, padding, dilation, groups))


def winograd_eval(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights):
    u = packed_weights.get(("winograd",))
    if u is None:
        u = packed_weights[("winograd",)] = winograd_weight(weight)
    if residual is not None:
        residual = residual.contiguous()
    return torch.ops.fastbb_C.winograd_conv2d(x, u, shift, residual, relu, *padding, *dilation)


class _WinogradTrainConv(torch.autograd.Function):
    """The training conv as a Winograd conv: forward; the input gradient (a 3x3 stride-1 conv of the output
    gradient with the kernels transposed and turned, transformed from the weight by the C++ kernel); the weight
    gradient through the transform (16 GEMMs over the tiles, then G^T grad_u G). With create_graph, the
    backward is ATen's differentiable one."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation, tile):
        u = winograd_weight(weight, tile)
        # F(4x4)'s backward maps the output gradient back through u itself; F(2x2)'s does not need it.
        ctx.save_for_backward(x, weight, u if tile == 4 else None)
        ctx.padding, ctx.dilation, ctx.has_bias, ctx.tile = padding, dilation, bias is not None, tile
        return torch.ops.fastbb_C.winograd_conv2d(x, u, bias, None, False, *padding, *dilation)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, u = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        args = ([weight.shape[0]] if ctx.has_bias else None, [1, 1], list(ctx.padding), list(ctx.dilation), False,
                [0, 0], 1)
        if torch.is_grad_enabled():
            grads = torch.ops.aten.convolution_backward(grad_y, x, weight, *args, [need_x, need_w, need_b])
            return (*grads, None, None, None)
        grad_y = grad_y.contiguous()
        grad_b = grad_y.sum((0, 2, 3)) if need_b else None
        if ctx.tile == 4 and need_x and need_w:
            grad_x, grad_u = torch.ops.fastbb_C.winograd_backward(x, grad_y, u, *ctx.padding)
            return grad_x, winograd_weight_backward(grad_u), grad_b, None, None, None
        grad_x = None
        back_padding = [2 * d - p for p, d in zip(ctx.padding, ctx.dilation)]
        if need_x and min(back_padding) >= 0:
            grad_x = torch.ops.fastbb_C.winograd_conv2d(grad_y, winograd_weight_of_input_gradient(weight, ctx.tile),
                                                        None, None, False, *back_padding, *ctx.dilation)
        elif need_x:
            grad_x = torch.ops.aten.convolution_backward(grad_y, x, weight, *args, [True, False, False])[0]
        grad_w = None
        if need_w:
            grad_u = torch.ops.fastbb_C.winograd_weight_gradient(x, grad_y, *ctx.padding, *ctx.dilation, ctx.tile)
            grad_w = winograd_weight_backward(grad_u)
        return grad_x, grad_w, grad_b, None, None, None


def _float32_train_conv(x, bias):
    # torch.compile traces the plain conv instead (the C++ kernels have no fake functions here).
    return (x.dtype == torch.float32 and not torch.compiler.is_compiling() and x.numel() > 0
            and (bias is None or bias.dtype == torch.float32))


def _winograd4_tiles(x, padding):
    """The number of 4x4 output tiles of a 3x3 stride-1 undilated conv of x."""
    return x.shape[0] * math.prod((size + 3) // 4 for size in _winograd_output_size(x, padding, (1, 1)))


def _train_tile(x, weight, padding, dilation):
    """The Winograd tile side (4 or 2) for a training conv that runs as a Winograd conv, else None."""
    if min(weight.shape[0], weight.shape[1]) < _WINOGRAD_TRAIN_MIN_CHANNELS:
        return None
    if tuple(dilation) == (1, 1):
        return 4 if _winograd4_tiles(x, padding) >= _WINOGRAD4_TRAIN_MIN_TILES else None
    work = weight.shape[0] * weight.shape[1] * _winograd_tiles(x, padding, dilation)
    return 2 if work >= _WINOGRAD_TRAIN_MIN_WORK else None


def winograd_train_applies(x, weight, bias, stride, padding, dilation, groups):
    """Float32 3x3 stride-1 convs with enough channels and tiles (see the thresholds)."""
    return (_float32_train_conv(x, bias) and _winograd_shape_applies(x, weight, None, stride, padding, dilation, groups)
            and _train_tile(x, weight, padding, dilation) is not None)


def winograd_train_conv(x, weight, bias, stride, padding, dilation, groups, tile=None):
    """The training Winograd conv, F(tile x tile, 3x3) (by default the rule's: _train_tile)."""
    tile = tile or _train_tile(x, weight, padding, dilation) or 2
    return _WinogradTrainConv.apply(x, weight, bias, padding, dilation, tile)


# ---------------------------------------------------------------------------------------------------------
# 1x1 stride-1 convs as MKL's GEMMs

def pointwise_gemm_eval_applies(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights):
    return pointwise_gemm_applies(x, weight, residual, stride, padding, groups)


def pointwise_gemm_eval(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights):
    return pointwise_conv_gemm(x, weight, shift, residual, relu)


def pointwise_gemm_train_applies(x, weight, bias, stride, padding, dilation, groups):
    """A 1x1 stride-1 conv over 196+ pixels per image: MKL's GEMMs, forward and backward, run 1.2x oneDNN's
    conv and its backward on ResNet-50's 1x1 convs at batch 2, even at 14x14 and slower at 7x7."""
    return (_float32_train_conv(x, bias) and is_pointwise_gemm(x, weight, stride, padding, groups)
            and x.shape[2] * x.shape[3] >= 196)


def pointwise_gemm_train_conv(x, weight, bias, stride, padding, dilation, groups):
    return pointwise_gemm_train(x, weight, bias)


# ---------------------------------------------------------------------------------------------------------
# oneDNN's conv with post-ops

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


def onednn_eval_applies(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights):
    """Float32; a residual joins the conv as an add post-op only when it is laid out as the output will be
    (channels_last x and residual)."""
    if x.dtype != torch.float32:
        return False
    return residual is None or (memory_format(x) == torch.channels_last and _HAS_ONEDNN_BINARY
                                and residual.dtype == torch.float32
                                and residual.is_contiguous(memory_format=torch.channels_last))


def onednn_eval(x, weight, shift, residual, stride, padding, dilation, groups, relu, packed_weights):
    """oneDNN's conv with the residual and the ReLU as its post-ops: one pass over the output. The packed
    weight only for channels_last x: for NCHW x oneDNN would answer in channels_last, not eager's layout."""
    if packed_weights is not None and _HAS_ONEDNN_PACKING and memory_format(x) == torch.channels_last:
        weight = _packed_weight(packed_weights, weight, x, stride, padding, dilation, groups)
    conv_args = (weight, shift, list(padding), list(stride), list(dilation), groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, *conv_args, "relu" if relu else "none", [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, *conv_args, "add", None,
                                                          "relu" if relu else None, [], "")
