"""Triton kernels of fastbb.ops.upsample_nearest_add: `lateral + F.interpolate(top, size=lateral's,
mode="nearest")` (forward) and the top's gradient (backward), with PyTorch's nearest index (kernels/_nearest.py).

Every tensor comes with its four strides, so NCHW, channels_last and other strided views all work; the
tile's fast axis (x for NCHW, channels for channels_last) is chosen from the layout only for coalescing.
16-bit inputs are converted to float32 on load and rounded once on store (float64 stays float64).
"""
import functools

import torch
import triton
import triton.language as tl

from fastbb.kernels._common import (INT32_MAX, GRID_YZ_MAX, compute_dtype, on_device, output_format,
                                     output_value, round_bf16, tiles_channels_last)
from fastbb.kernels._nearest import float32_from_bits, nearest_scale, nearest_source

_TILE_ELEMENTS = 2048  # elementwise tiles: 16 elements per thread with 4 warps
_MAX_FAST_BLOCK = 128


@triton.jit
def _window_start(src_index, scale, src_size, dst_size, SEARCH_STEPS: tl.constexpr):
    """First destination index whose nearest source index is >= src_index (dst_size past the last).

    Binary search over [0, dst_size] on the same float32 product the forward uses, so the windows are
    exactly the preimages of the forward's mapping, empty ones included. For src_index <= src - 1 the
    clamp to src - 1 cannot change the comparison, so it is left out; src_index == src maps to dst_size.
    """
    lo = tl.zeros_like(src_index)
    hi = tl.zeros_like(src_index) + dst_size
    target = src_index.to(tl.float32)
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        reaches = (mid >= dst_size) | ((src_index < src_size) & (mid.to(tl.float32) * scale >= target))
        hi = tl.where(reaches, mid, hi)
        lo = tl.where(reaches, lo, mid + 1)
    return lo


@triton.jit
def _upsample_nearest_add_kernel(top_ptr, lateral_ptr, out_ptr, num_rows, fast_len, C, H, W, h, w,
                                 scale_y_bits, scale_x_bits,
                                 top_sn, top_sc, top_sh, top_sw, lat_sn, lat_sc, lat_sh, lat_sw,
                                 out_sn, out_sc, out_sh, out_sw,
                                 CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
                                 BLOCK_ROWS: tl.constexpr, BLOCK_FAST: tl.constexpr):
    # A tile is BLOCK_ROWS rows of (n, c, y) [NCHW] or (n, y, x) [channels_last] by BLOCK_FAST of the
    # fast axis (x, or c); the row decomposition is done once per row, not per element.
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    fast = tl.program_id(1) * BLOCK_FAST + tl.arange(0, BLOCK_FAST)
    mask = (rows < num_rows)[:, None] & (fast < fast_len)[None, :]
    scale_y = float32_from_bits(scale_y_bits)
    scale_x = float32_from_bits(scale_x_bits)
    if CHANNELS_LAST:
        x = rows % W
        rest = rows // W
        y = rest % H
        n = (rest // H).to(tl.int64)
        c = fast.to(tl.int64)
        sy = nearest_source(y, scale_y, h).to(tl.int64)
        sx = nearest_source(x, scale_x, w).to(tl.int64)
        y = y.to(tl.int64)
        x = x.to(tl.int64)
        lat_off = (n * lat_sn + y * lat_sh + x * lat_sw)[:, None] + (c * lat_sc)[None, :]
        out_off = (n * out_sn + y * out_sh + x * out_sw)[:, None] + (c * out_sc)[None, :]
        top_off = (n * top_sn + sy * top_sh + sx * top_sw)[:, None] + (c * top_sc)[None, :]
    else:
        y = rows % H
        rest = rows // H
        c = (rest % C).to(tl.int64)
        n = (rest // C).to(tl.int64)
        x = fast.to(tl.int64)
        sy = nearest_source(y, scale_y, h).to(tl.int64)
        sx = nearest_source(fast, scale_x, w).to(tl.int64)
        y = y.to(tl.int64)
        lat_off = (n * lat_sn + c * lat_sc + y * lat_sh)[:, None] + (x * lat_sw)[None, :]
        out_off = (n * out_sn + c * out_sc + y * out_sh)[:, None] + (x * out_sw)[None, :]
        top_off = (n * top_sn + c * top_sc + sy * top_sh)[:, None] + (sx * top_sw)[None, :]
    lateral = tl.load(lateral_ptr + lat_off, mask=mask, other=0).to(COMPUTE)
    top = tl.load(top_ptr + top_off, mask=mask, other=0).to(COMPUTE)
    result = lateral + top
    tl.store(out_ptr + out_off, output_value(result, ROUND_BF16).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_nearest_backward_kernel(grad_out_ptr, grad_top_ptr, num_rows, fast_len, C, H, W, h, w,
                                      scale_y_bits, scale_x_bits, max_window_h, max_window_w,
                                      go_sn, go_sc, go_sh, go_sw, gt_sn, gt_sc, gt_sh, gt_sw,
                                      CHANNELS_LAST: tl.constexpr, COMPUTE: tl.constexpr, ROUND_BF16: tl.constexpr,
                                      SEARCH_STEPS_Y: tl.constexpr, SEARCH_STEPS_X: tl.constexpr,
                                      BLOCK_ROWS: tl.constexpr, BLOCK_FAST: tl.constexpr):
    # One lane per top pixel: it sums its own window of grad_out, rows then columns in increasing order
    # (the order of PyTorch's kernels), so the result is deterministic and needs no atomics.
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    fast = tl.program_id(1) * BLOCK_FAST + tl.arange(0, BLOCK_FAST)
    mask = (rows < num_rows)[:, None] & (fast < fast_len)[None, :]
    scale_y = float32_from_bits(scale_y_bits)
    scale_x = float32_from_bits(scale_x_bits)
    if CHANNELS_LAST:
        j = rows % w
        rest = rows // w
        i = rest % h
        n = (rest // h).to(tl.int64)
        c = fast.to(tl.int64)
        y_begin = _window_start(i, scale_y, h, H, SEARCH_STEPS_Y)
        y_count = _window_start(i + 1, scale_y, h, H, SEARCH_STEPS_Y) - y_begin
        x_begin = _window_start(j, scale_x, w, W, SEARCH_STEPS_X)
        x_count = _window_start(j + 1, scale_x, w, W, SEARCH_STEPS_X) - x_begin
        row_base = n * go_sn + y_begin.to(tl.int64) * go_sh + x_begin.to(tl.int64) * go_sw
        go_base = row_base[:, None] + (c * go_sc)[None, :]
        gt_off = (n * gt_sn + i.to(tl.int64) * gt_sh + j.to(tl.int64) * gt_sw)[:, None] + (c * gt_sc)[None, :]
        y_count = y_count[:, None]
        x_count = x_count[:, None]
    else:
        i = rows % h
        rest = rows // h
        c = (rest % C).to(tl.int64)
        n = (rest // C).to(tl.int64)
        j = fast
        y_begin = _window_start(i, scale_y, h, H, SEARCH_STEPS_Y)
        y_count = _window_start(i + 1, scale_y, h, H, SEARCH_STEPS_Y) - y_begin
        x_begin = _window_start(j, scale_x, w, W, SEARCH_STEPS_X)
        x_count = _window_start(j + 1, scale_x, w, W, SEARCH_STEPS_X) - x_begin
        row_base = n * go_sn + c * go_sc + y_begin.to(tl.int64) * go_sh
        go_base = row_base[:, None] + (x_begin.to(tl.int64) * go_sw)[None, :]
        gt_off = (n * gt_sn + c * gt_sc + i.to(tl.int64) * gt_sh)[:, None] + (j.to(tl.int64) * gt_sw)[None, :]
        y_count = y_count[:, None]
        x_count = x_count[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_FAST], dtype=COMPUTE)
    row = go_base  # int64 offsets stepped by the strides: no int32 product to overflow
    for dy in range(0, max_window_h):
        in_rows = mask & (dy < y_count)
        offset = row
        for dx in range(0, max_window_w):
            take = in_rows & (dx < x_count)
            acc += tl.load(grad_out_ptr + offset, mask=take, other=0).to(COMPUTE)
            offset += go_sw
        row += go_sh
    tl.store(grad_top_ptr + gt_off, output_value(acc, ROUND_BF16).to(grad_top_ptr.dtype.element_ty),
             mask=mask)


@functools.lru_cache(maxsize=256)
def _max_window(src_size, dst_size):
    """Largest number of destination indices sharing one nearest source index: computed from sizes
    alone on the host CPU (never from device data), it bounds the backward's window loops."""
    if src_size == 0 or dst_size == 0:
        return 0
    scale = torch.tensor(src_size, dtype=torch.float32) / torch.tensor(dst_size, dtype=torch.float32)
    src = torch.floor(torch.arange(dst_size, dtype=torch.float32) * scale).clamp_(max=src_size - 1)
    return int(torch.bincount(src.to(torch.int64), minlength=src_size).max())


def _elementwise_tile(fast_len):
    block_fast = min(triton.next_power_of_2(max(fast_len, 1)), _MAX_FAST_BLOCK)
    return _TILE_ELEMENTS // block_fast, block_fast


def _rows_and_fast(N, C, H, W, channels_last):
    return (N * H * W, C) if channels_last else (N * C * H, W)


def upsample_nearest_add(top, lateral, out):
    """out = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest"), bit for bit.

    top (N, C, h, w), lateral and out (N, C, H, W) with h <= H, w <= W, any strides; out may be lateral.
    The sum is computed in float32 for 16-bit inputs and rounded once, as PyTorch's eager add does.
    Returns out.
    """
    N, C, H, W = lateral.shape
    h, w = top.shape[-2:]
    if out.numel() == 0:
        return out
    if h == 0 or w == 0:
        raise ValueError(f"fastbb.upsample_nearest_add: cannot upsample an empty top {tuple(top.shape)} to {(H, W)}")
    channels_last = tiles_channels_last(out)
    num_rows, fast_len = _rows_and_fast(N, C, H, W, channels_last)
    block_rows, block_fast = _elementwise_tile(fast_len)
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(fast_len, block_fast))
    if num_rows + block_rows > INT32_MAX or grid[1] > GRID_YZ_MAX:
        raise ValueError(f"fastbb.upsample_nearest_add: shape {tuple(lateral.shape)} is too large for the Triton kernel")
    with on_device(out):
        _upsample_nearest_add_kernel[grid](
            top, lateral, out, num_rows, fast_len, C, H, W, h, w, nearest_scale(h, H), nearest_scale(w, W),
            *top.stride(), *lateral.stride(), *out.stride(),
            CHANNELS_LAST=channels_last, COMPUTE=compute_dtype(out.dtype), ROUND_BF16=round_bf16(out.dtype),
            BLOCK_ROWS=block_rows, BLOCK_FAST=block_fast)
    return out


def upsample_nearest_backward(grad_out, top_height, top_width):
    """Gradient of the nearest upsample from (top_height, top_width) to grad_out's size: each top pixel
    sums its window of grad_out (float32 accumulation for 16-bit, one rounding; deterministic).

    grad_out (N, C, H, W), any strides. Returns (N, C, top_height, top_width) in grad_out's dtype and
    memory format.
    """
    N, C, H, W = grad_out.shape
    h, w = int(top_height), int(top_width)
    channels_last = tiles_channels_last(grad_out)
    grad_top = torch.empty((N, C, h, w), dtype=grad_out.dtype, device=grad_out.device,
                           memory_format=output_format(grad_out))
    if grad_top.numel() == 0:
        return grad_top
    if grad_out.numel() == 0:  # H or W is 0 (only when h or w is too): nothing flows back
        return grad_top.zero_()
    num_rows, fast_len = _rows_and_fast(N, C, h, w, channels_last)
    block_rows, block_fast = _elementwise_tile(fast_len)
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(fast_len, block_fast))
    if num_rows + block_rows > INT32_MAX or grid[1] > GRID_YZ_MAX or max(H, W) >= 2**24:
        raise ValueError(f"fastbb.upsample_nearest_add_backward: shape {tuple(grad_out.shape)} is too large for the Triton kernel")
    with on_device(grad_out):
        _upsample_nearest_backward_kernel[grid](
            grad_out, grad_top, num_rows, fast_len, C, H, W, h, w, nearest_scale(h, H), nearest_scale(w, W),
            _max_window(h, H), _max_window(w, W), *grad_out.stride(), *grad_top.stride(),
            CHANNELS_LAST=channels_last, COMPUTE=compute_dtype(grad_out.dtype),
            ROUND_BF16=round_bf16(grad_out.dtype),
            SEARCH_STEPS_Y=H.bit_length(), SEARCH_STEPS_X=W.bit_length(),
            BLOCK_ROWS=block_rows, BLOCK_FAST=block_fast)
    return grad_top
