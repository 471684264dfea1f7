"""Triton kernels of fastbb's training-mode BatchNorm (+ residual) + ReLU, run after the convolution has
produced y (fastbb::bn_relu_train and its backward, fastbb/ops/conv_bn_relu/bn_relu_train.py).

Forward: BatchNorm's batch statistics, then the normalized, affine, residual-added, ReLU'd output, in two
passes over y.
  1. Statistics: each program reduces a run of tiles to per-channel (count, mean, M2) partials. Inside a
     tile the deviations are taken around the tile's own mean (two passes over registers, one over
     memory), and tiles are merged with Chan's formula in float64, so a channel whose mean is large
     against its spread loses nothing to cancellation. A small kernel then merges the programs' partials
     in a fixed order into mean and invstd.
  2. One elementwise pass: out = relu((y - mean) * invstd * weight + bias + residual).
Backward: one reduction pass (per-program float64 partials of sum(g) and sum(g * (y - mean)), merged in
a fixed order) and one elementwise pass for grad_y and grad_residual. No atomics anywhere, so repeated
runs give the same bits.

The kernels see dense NCHW or channels_last tensors (the launchers give every operand y's format),
viewed as N images of (C, H*W) or as one image of (N*H*W, C): a tile is BLOCK_C channels by BLOCK_R
positions along the reduction axis, laid out so that its fast axis is the contiguous one in memory.
Values are converted to float32 on load (float64 stays float64) and rounded once on store.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from fastbb.kernels._common import (INT32_MAX, GRID_YZ_MAX, INTERPRET, compute_dtype, on_device, output_format,
                                     output_value, round_bf16, torch_compute_dtype)

# BN tiles hold 2048 elements on a GPU (16 per thread with 4 warps). The interpreter runs each program in
# Python: small tiles, and two per reduction program, so that small test shapes still cover several
# tiles, channel blocks, partial merges and every edge mask.
_BN_TILE = 64 if INTERPRET else 2048
_BN_MAX_CHANNEL_BLOCK = 16 if INTERPRET else 128
_BN_NUM_WARPS = 4
# Reduction programs per SM: enough to fill the GPU, few enough that the partials stay a small fraction
# of y and their merge is short.
_BN_PROGRAMS_PER_SM = 8
_BN_INTERPRET_TILES_PER_PROGRAM = 2
# The merge of partials: partial rows by channels per step.
_MERGE_BLOCK_P = 16 if INTERPRET else 64
_MERGE_BLOCK_C = 16 if INTERPRET else 64


@triton.jit
def _bn_tile(tile, channel_block, C, length, tiles_per_image,
             CHANNELS_LAST: tl.constexpr, OFFSET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Element offsets, mask, channels, and the number of positions per channel of one tile.

    NCHW: tile = image * tiles_per_image + block of H*W positions; a [BLOCK_C, BLOCK_R] tile.
    channels_last: one image of `length` = N*H*W positions; a [BLOCK_R, BLOCK_C] tile.
    """
    image = tile // tiles_per_image
    start = (tile - image * tiles_per_image) * BLOCK_R
    position = start + tl.arange(0, BLOCK_R)
    channel = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        offsets = position.to(OFFSET)[:, None] * C + channel[None, :]
        mask = (position < length)[:, None] & (channel < C)[None, :]
    else:
        offsets = ((image.to(OFFSET) * C + channel) * length)[:, None] + position[None, :]
        mask = (channel < C)[:, None] & (position < length)[None, :]
    count = tl.minimum(length - start, BLOCK_R)
    return offsets, mask, channel, count


@triton.jit
def _per_channel(values, CHANNELS_LAST: tl.constexpr):
    """A per-channel vector broadcast against a tile."""
    if CHANNELS_LAST:
        result = values[None, :]
    else:
        result = values[:, None]
    return result


@triton.jit
def _channel_sums(tile, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        result = tl.sum(tile, axis=0)
    else:
        result = tl.sum(tile, axis=1)
    return result


@triton.jit
def _bn_stats_kernel(y_ptr, count_ptr, mean_ptr, m2_ptr, C, length, tiles_per_image, num_tiles,
                     tiles_per_program, CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr,
                     OFFSET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    program = tl.program_id(0)
    channel_block = tl.program_id(1)
    first = program * tiles_per_program
    last = tl.minimum(first + tiles_per_program, num_tiles)
    # The running count is a vector (equal in every lane) so that every loop-carried value is a tensor.
    total_count = tl.zeros([BLOCK_C], dtype=tl.float64)
    total_mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    total_m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for tile in range(first, last):
        offsets, mask, channel, count = _bn_tile(tile, channel_block, C, length, tiles_per_image,
                                                 CHANNELS_LAST, OFFSET, BLOCK_R, BLOCK_C)
        x = tl.load(y_ptr + offsets, mask=mask, other=0).to(COMPUTE)
        center = _channel_sums(x, CHANNELS_LAST) / count.to(COMPUTE)
        deviation = tl.where(mask, x - _per_channel(center, CHANNELS_LAST), 0)
        # The center is the tile mean up to rounding; s1 carries what rounding left over, exactly enough.
        s1 = _channel_sums(deviation, CHANNELS_LAST).to(tl.float64)
        s2 = _channel_sums(deviation * deviation, CHANNELS_LAST).to(tl.float64)
        n = count.to(tl.float64)
        tile_mean = center.to(tl.float64) + s1 / n
        tile_m2 = s2 - s1 * s1 / n
        merged_count = total_count + n
        delta = tile_mean - total_mean
        total_mean += delta * (n / merged_count)
        total_m2 += tile_m2 + delta * delta * (total_count * n / merged_count)
        total_count = merged_count
    channel = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < C
    partial = program * C + channel
    tl.store(count_ptr + partial, total_count, mask=channel_ok)
    tl.store(mean_ptr + partial, total_mean, mask=channel_ok)
    tl.store(m2_ptr + partial, total_m2, mask=channel_ok)


@triton.jit
def _bn_stats_merge_kernel(count_ptr, mean_ptr, m2_ptr, mean_out_ptr, invstd_out_ptr, C, num_partials,
                           total, eps: tl.float64, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Two passes over the partials in program order: the mean first, then the deviations around it.
    channel = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < C
    weighted_sum = tl.zeros([BLOCK_C], dtype=tl.float64)
    for first in range(0, num_partials, BLOCK_P):
        row = first + tl.arange(0, BLOCK_P)
        ok = (row < num_partials)[:, None] & channel_ok[None, :]
        offsets = row[:, None] * C + channel[None, :]
        count = tl.load(count_ptr + offsets, mask=ok, other=0)
        mean = tl.load(mean_ptr + offsets, mask=ok, other=0)
        weighted_sum += tl.sum(count * mean, axis=0)
    channel_mean = weighted_sum / total
    squares = tl.zeros([BLOCK_C], dtype=tl.float64)
    for first in range(0, num_partials, BLOCK_P):
        row = first + tl.arange(0, BLOCK_P)
        ok = (row < num_partials)[:, None] & channel_ok[None, :]
        offsets = row[:, None] * C + channel[None, :]
        count = tl.load(count_ptr + offsets, mask=ok, other=0)
        mean = tl.load(mean_ptr + offsets, mask=ok, other=0)
        m2 = tl.load(m2_ptr + offsets, mask=ok, other=0)
        delta = mean - channel_mean[None, :]
        squares += tl.sum(m2 + count * delta * delta, axis=0)
    invstd = 1.0 / tl.sqrt(squares / total + eps)
    tl.store(mean_out_ptr + channel, channel_mean.to(mean_out_ptr.dtype.element_ty), mask=channel_ok)
    tl.store(invstd_out_ptr + channel, invstd.to(invstd_out_ptr.dtype.element_ty), mask=channel_ok)


@triton.jit
def _bn_relu_forward_kernel(y_ptr, residual_ptr, out_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
                            C, length, tiles_per_image, weight_stride, bias_stride,
                            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                            RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr,
                            OFFSET: tl.constexpr, ROUND_BF16: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offsets, mask, channel, _ = _bn_tile(tl.program_id(0), tl.program_id(1), C, length, tiles_per_image,
                                         CHANNELS_LAST, OFFSET, BLOCK_R, BLOCK_C)
    channel_ok = channel < C
    mean = tl.load(mean_ptr + channel, mask=channel_ok, other=0).to(COMPUTE)
    invstd = tl.load(invstd_ptr + channel, mask=channel_ok, other=0).to(COMPUTE)
    x = tl.load(y_ptr + offsets, mask=mask, other=0).to(COMPUTE)
    value = (x - _per_channel(mean, CHANNELS_LAST)) * _per_channel(invstd, CHANNELS_LAST)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + channel * weight_stride, mask=channel_ok, other=0).to(COMPUTE)
        value = value * _per_channel(weight, CHANNELS_LAST)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channel * bias_stride, mask=channel_ok, other=0).to(COMPUTE)
        value = value + _per_channel(bias, CHANNELS_LAST)
    if HAS_RESIDUAL:
        value = value + tl.load(residual_ptr + offsets, mask=mask, other=0).to(COMPUTE)
    if RELU:
        value = tl.where(value < 0, 0, value)  # NaN stays NaN, as in torch.relu
    tl.store(out_ptr + offsets, output_value(value, ROUND_BF16).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_gradient(grad_out_ptr, out_ptr, offsets, mask, RELU: tl.constexpr, COMPUTE: tl.constexpr):
    """g = grad_out where the forward output is > 0 (out > 0 <=> the pre-ReLU value > 0), as autograd's
    threshold_backward: zero where out <= 0."""
    g = tl.load(grad_out_ptr + offsets, mask=mask, other=0).to(COMPUTE)
    if RELU:
        out = tl.load(out_ptr + offsets, mask=mask, other=0).to(COMPUTE)
        g = tl.where(out <= 0, 0, g)
    return g


@triton.jit
def _bn_backward_reduce_kernel(grad_out_ptr, out_ptr, y_ptr, mean_ptr, sum_g_ptr, sum_gx_ptr,
                               C, length, tiles_per_image, num_tiles, tiles_per_program,
                               RELU: tl.constexpr, CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr,
                               OFFSET: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    program = tl.program_id(0)
    channel_block = tl.program_id(1)
    channel = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < C
    mean = _per_channel(tl.load(mean_ptr + channel, mask=channel_ok, other=0).to(COMPUTE), CHANNELS_LAST)
    first = program * tiles_per_program
    last = tl.minimum(first + tiles_per_program, num_tiles)
    # tile sums in float32 (a tree), tiles and programs added in float64
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float64)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float64)
    for tile in range(first, last):
        offsets, mask, channel, _ = _bn_tile(tile, channel_block, C, length, tiles_per_image,
                                             CHANNELS_LAST, OFFSET, BLOCK_R, BLOCK_C)
        g = _relu_gradient(grad_out_ptr, out_ptr, offsets, mask, RELU, COMPUTE)
        x = tl.load(y_ptr + offsets, mask=mask, other=0).to(COMPUTE)
        centered = tl.where(mask, x - mean, 0)
        sum_g += _channel_sums(g, CHANNELS_LAST).to(tl.float64)
        sum_gx += _channel_sums(g * centered, CHANNELS_LAST).to(tl.float64)
    partial = program * C + channel
    tl.store(sum_g_ptr + partial, sum_g, mask=channel_ok)
    tl.store(sum_gx_ptr + partial, sum_gx, mask=channel_ok)


@triton.jit
def _bn_backward_merge_kernel(sum_g_ptr, sum_gx_ptr, invstd_ptr, grad_weight_ptr, grad_bias_ptr, C,
                              num_partials, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    channel = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_ok = channel < C
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float64)
    sum_gx = tl.zeros([BLOCK_C], dtype=tl.float64)
    for first in range(0, num_partials, BLOCK_P):
        row = first + tl.arange(0, BLOCK_P)
        ok = (row < num_partials)[:, None] & channel_ok[None, :]
        offsets = row[:, None] * C + channel[None, :]
        sum_g += tl.sum(tl.load(sum_g_ptr + offsets, mask=ok, other=0), axis=0)
        sum_gx += tl.sum(tl.load(sum_gx_ptr + offsets, mask=ok, other=0), axis=0)
    invstd = tl.load(invstd_ptr + channel, mask=channel_ok, other=0).to(tl.float64)
    tl.store(grad_bias_ptr + channel, sum_g.to(grad_bias_ptr.dtype.element_ty), mask=channel_ok)
    tl.store(grad_weight_ptr + channel, (sum_gx * invstd).to(grad_weight_ptr.dtype.element_ty), mask=channel_ok)


@triton.jit
def _bn_relu_backward_kernel(grad_out_ptr, out_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, grad_weight_ptr,
                             grad_bias_ptr, grad_y_ptr, grad_residual_ptr, C, length, tiles_per_image,
                             weight_stride, total,
                             HAS_WEIGHT: tl.constexpr, RELU: tl.constexpr, GRAD_RESIDUAL: tl.constexpr,
                             CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr, OFFSET: tl.constexpr,
                             ROUND_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offsets, mask, channel, _ = _bn_tile(tl.program_id(0), tl.program_id(1), C, length, tiles_per_image,
                                         CHANNELS_LAST, OFFSET, BLOCK_R, BLOCK_C)
    channel_ok = channel < C
    g = _relu_gradient(grad_out_ptr, out_ptr, offsets, mask, RELU, COMPUTE)
    if GRAD_RESIDUAL:
        # g is grad_out or 0: exact in grad_out's dtype, no rounding to fix
        tl.store(grad_residual_ptr + offsets, g.to(grad_residual_ptr.dtype.element_ty), mask=mask)
    mean = tl.load(mean_ptr + channel, mask=channel_ok, other=0).to(COMPUTE)
    invstd = tl.load(invstd_ptr + channel, mask=channel_ok, other=0).to(COMPUTE)
    # total is an integer (exact in the division); a float argument would arrive as float32 under the
    # interpreter
    mean_g = tl.load(grad_bias_ptr + channel, mask=channel_ok, other=0).to(COMPUTE) / total
    mean_gx = tl.load(grad_weight_ptr + channel, mask=channel_ok, other=0).to(COMPUTE) / total
    gain = invstd
    if HAS_WEIGHT:
        gain = gain * tl.load(weight_ptr + channel * weight_stride, mask=channel_ok, other=0).to(COMPUTE)
    x = tl.load(y_ptr + offsets, mask=mask, other=0).to(COMPUTE)
    xhat = (x - _per_channel(mean, CHANNELS_LAST)) * _per_channel(invstd, CHANNELS_LAST)
    grad_y = _per_channel(gain, CHANNELS_LAST) * (g - _per_channel(mean_g, CHANNELS_LAST)
                                                   - xhat * _per_channel(mean_gx, CHANNELS_LAST))
    tl.store(grad_y_ptr + offsets, output_value(grad_y, ROUND_BF16).to(grad_y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# The launchers' names in their error messages.
_FORWARD = "fastbb.bn_relu_forward"
_BACKWARD = "fastbb.bn_relu_backward"


class _BNGeometry:
    """Tiling of a dense (N, C, H, W) tensor for the BN kernels (see _bn_tile)."""

    def __init__(self, y, channels_last, op):
        N, C, H, W = y.shape
        self.channels_last = channels_last
        if channels_last:
            self.length = N * H * W
            self.block_c = min(triton.next_power_of_2(C), _BN_MAX_CHANNEL_BLOCK)
            self.block_r = min(_BN_TILE // self.block_c, triton.next_power_of_2(self.length))
            self.tiles_per_image = triton.cdiv(self.length, self.block_r)
            self.num_tiles = self.tiles_per_image
        else:
            self.length = H * W
            self.block_r = min(triton.next_power_of_2(self.length), _BN_TILE)
            self.block_c = min(_BN_TILE // self.block_r, triton.next_power_of_2(C))
            self.tiles_per_image = triton.cdiv(self.length, self.block_r)
            self.num_tiles = N * self.tiles_per_image
        self.channel_blocks = triton.cdiv(C, self.block_c)
        if self.num_tiles > INT32_MAX or self.channel_blocks > GRID_YZ_MAX:
            raise ValueError(f"{op}: shape {tuple(y.shape)} is too large for the Triton kernels")
        # int32 offsets unless some lane of a tile (masked ones too) could pass 2**31
        reach = y.numel() + self.block_r * C + self.block_c * self.length
        self.offset = tl.int64 if reach > INT32_MAX else tl.int32
        if INTERPRET or not y.is_cuda:
            self.tiles_per_program = _BN_INTERPRET_TILES_PER_PROGRAM
        else:
            wanted = max(1, _BN_PROGRAMS_PER_SM * _sm_count(y.device.index or 0) // self.channel_blocks)
            self.tiles_per_program = triton.cdiv(self.num_tiles, wanted)
        self.num_programs = triton.cdiv(self.num_tiles, self.tiles_per_program)

    def tile_args(self):
        return dict(CHANNELS_LAST=self.channels_last, OFFSET=self.offset, BLOCK_R=self.block_r,
                    BLOCK_C=self.block_c)


def _bn_operand(t, fmt, name, shape, op):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t.contiguous(memory_format=fmt)


def bn_relu_forward(y, weight, bias, residual, eps, relu):
    """Training-mode BatchNorm with batch statistics, + residual, ReLU, in two passes over y.

    y (N, C, H, W) float32/float64/float16/bfloat16, NCHW or channels_last; weight, bias (C,) any float
    dtype or None (1 and 0); residual None or y's shape (made to follow y's format). Returns
    (out, mean, invstd): out = relu?((y - mean) * invstd * weight + bias (+ residual)) computed in float32
    (float64 for float64) and rounded once to y's dtype, in y's memory format; mean and invstd (C,)
    float32 (float64 for float64), with the biased variance. With N*H*W == 0: mean 0, invstd 1/sqrt(eps).
    """
    N, C, H, W = y.shape
    fmt = output_format(y)
    y = y.contiguous(memory_format=fmt)
    if residual is not None:
        residual = _bn_operand(residual, fmt, "residual", y.shape, _FORWARD)
    stat_dtype = torch_compute_dtype(y.dtype)
    out = torch.empty_like(y, memory_format=fmt)
    total = N * H * W
    if total == 0 or C == 0:
        mean = torch.zeros(C, dtype=stat_dtype, device=y.device)
        invstd = torch.full((C,), 1.0 / math.sqrt(eps), dtype=stat_dtype, device=y.device)
        return out, mean, invstd
    mean = torch.empty(C, dtype=stat_dtype, device=y.device)
    invstd = torch.empty(C, dtype=stat_dtype, device=y.device)
    geometry = _BNGeometry(y, fmt == torch.channels_last, _FORWARD)
    partials = torch.empty((3, geometry.num_programs, C), dtype=torch.float64, device=y.device)
    count_partial, mean_partial, m2_partial = partials.unbind(0)
    compute = compute_dtype(y.dtype)
    with on_device(y):
        _bn_stats_kernel[(geometry.num_programs, geometry.channel_blocks)](
            y, count_partial, mean_partial, m2_partial, C, geometry.length, geometry.tiles_per_image,
            geometry.num_tiles, geometry.tiles_per_program, COMPUTE=compute, num_warps=_BN_NUM_WARPS,
            **geometry.tile_args())
        _bn_stats_merge_kernel[(triton.cdiv(C, _MERGE_BLOCK_C),)](
            count_partial, mean_partial, m2_partial, mean, invstd, C, geometry.num_programs, total, float(eps),
            BLOCK_P=_MERGE_BLOCK_P, BLOCK_C=_MERGE_BLOCK_C)
        _bn_relu_forward_kernel[(geometry.num_tiles, geometry.channel_blocks)](
            y, residual if residual is not None else y, out, mean, invstd,
            weight if weight is not None else mean, bias if bias is not None else mean,
            C, geometry.length, geometry.tiles_per_image,
            weight.stride(0) if weight is not None else 0, bias.stride(0) if bias is not None else 0,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            RELU=bool(relu), COMPUTE=compute, ROUND_BF16=round_bf16(out.dtype), num_warps=_BN_NUM_WARPS,
            **geometry.tile_args())
    return out, mean, invstd


def bn_relu_backward(grad_out, out, y, mean, invstd, weight, relu, residual_grad):
    """Backward of bn_relu_forward: one reduction pass, one elementwise pass.

    g = grad_out * (out > 0) if relu else grad_out; xhat = (y - mean) * invstd; grad_bias = sum(g),
    grad_weight = sum(g * xhat) per channel ((C,) float32, float64 for float64, summed in float64 in a
    fixed order); grad_y = weight * invstd * (g - grad_bias / M - xhat * grad_weight / M) in y's dtype and
    memory format, M = N*H*W; grad_residual = g in grad_out's dtype and y's memory format when
    residual_grad, else an empty tensor. out is only read when relu.
    Returns (grad_y, grad_weight, grad_bias, grad_residual).
    """
    N, C, H, W = y.shape
    fmt = output_format(y)
    y = y.contiguous(memory_format=fmt)
    grad_out = _bn_operand(grad_out, fmt, "grad_out", y.shape, _BACKWARD)
    if relu:
        out = _bn_operand(out, fmt, "out", y.shape, _BACKWARD)
    stat_dtype = torch_compute_dtype(y.dtype)
    grad_y = torch.empty_like(y, memory_format=fmt)
    grad_weight = torch.zeros(C, dtype=stat_dtype, device=y.device)
    grad_bias = torch.zeros(C, dtype=stat_dtype, device=y.device)
    if residual_grad:
        grad_residual = torch.empty(y.shape, dtype=grad_out.dtype, device=y.device, memory_format=fmt)
    else:
        grad_residual = grad_out.new_empty(0)
    total = N * H * W
    if total == 0 or C == 0:
        return grad_y, grad_weight, grad_bias, grad_residual
    mean = mean.contiguous()
    invstd = invstd.contiguous()
    geometry = _BNGeometry(y, fmt == torch.channels_last, _BACKWARD)
    partials = torch.empty((2, geometry.num_programs, C), dtype=torch.float64, device=y.device)
    sum_g_partial, sum_gx_partial = partials.unbind(0)
    compute = compute_dtype(y.dtype)
    out_arg = out if relu else grad_out
    with on_device(y):
        _bn_backward_reduce_kernel[(geometry.num_programs, geometry.channel_blocks)](
            grad_out, out_arg, y, mean, sum_g_partial, sum_gx_partial, C, geometry.length,
            geometry.tiles_per_image, geometry.num_tiles, geometry.tiles_per_program, RELU=bool(relu),
            COMPUTE=compute, num_warps=_BN_NUM_WARPS, **geometry.tile_args())
        _bn_backward_merge_kernel[(triton.cdiv(C, _MERGE_BLOCK_C),)](
            sum_g_partial, sum_gx_partial, invstd, grad_weight, grad_bias, C, geometry.num_programs,
            BLOCK_P=_MERGE_BLOCK_P, BLOCK_C=_MERGE_BLOCK_C)
        _bn_relu_backward_kernel[(geometry.num_tiles, geometry.channel_blocks)](
            grad_out, out_arg, y, mean, invstd, weight if weight is not None else mean, grad_weight, grad_bias,
            grad_y, grad_residual if residual_grad else grad_y, C, geometry.length, geometry.tiles_per_image,
            weight.stride(0) if weight is not None else 0, total,
            HAS_WEIGHT=weight is not None, RELU=bool(relu), GRAD_RESIDUAL=bool(residual_grad), COMPUTE=compute,
            ROUND_BF16=round_bf16(grad_y.dtype), num_warps=_BN_NUM_WARPS, **geometry.tile_args())
    return grad_y, grad_weight, grad_bias, grad_residual
