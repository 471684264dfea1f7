"""Triton kernels of the FPN merges: nearest-upsample + add (forward and backward) and the 1x1 lateral
convolution with that merge as its epilogue.

Nearest index per axis, as PyTorch's legacy `F.interpolate(mode="nearest")` computes it:
    scale = float32(src) / float32(dst),  src_index(d) = min(floor(float32(d) * scale), src - 1)
with the product a float32 multiply, so the kernels pick the same pixels bit for bit, odd ratios included.
The scale is passed as its float32 bit pattern, so the GPU and the interpreter multiply by the same float32.

Every tensor comes with its four strides, so NCHW, channels_last and other strided views all work; the
tile's fast axis (x for NCHW, channels for channels_last) is chosen from the layout only for coalescing.
16-bit inputs are converted to float32 on load and rounded once on store (float64 stays float64).
"""
import functools
import struct

import torch
import triton
import triton.language as tl

from fastbb.kernels._common import (INT32_MAX, GRID_YZ_MAX, INTERPRET, TunedKernel, compute_dtype, on_device,
                                     output_format, output_value, round_bf16, span)

_TILE_ELEMENTS = 2048  # elementwise tiles: 16 elements per thread with 4 warps
_MAX_FAST_BLOCK = 128


@triton.jit
def _float32_from_bits(bits):
    return tl.full([1], bits, tl.int32).to(tl.float32, bitcast=True)




@triton.jit
def _nearest_source(dst_index, scale, src_size):
    """PyTorch's nearest source index of destination indices: min(floor(float32(d) * scale), src - 1)."""
    src = tl.floor(dst_index.to(tl.float32) * scale).to(tl.int32)
    return tl.minimum(src, src_size - 1)


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
    scale_y = _float32_from_bits(scale_y_bits)
    scale_x = _float32_from_bits(scale_x_bits)
    if CHANNELS_LAST:
        x = rows % W
        rest = rows // W
        y = rest % H
        n = (rest // H).to(tl.int64)
        c = fast.to(tl.int64)
        sy = _nearest_source(y, scale_y, h).to(tl.int64)
        sx = _nearest_source(x, scale_x, w).to(tl.int64)
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
        sy = _nearest_source(y, scale_y, h).to(tl.int64)
        sx = _nearest_source(fast, scale_x, w).to(tl.int64)
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
    scale_y = _float32_from_bits(scale_y_bits)
    scale_x = _float32_from_bits(scale_x_bits)
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


@triton.jit
def _fpn_merge_kernel(x_ptr, weight_ptr, bias_ptr, top_ptr, out_ptr, Cin, Cout, H, W, h, w,
                      scale_y_bits, scale_x_bits, x_sn, x_sc, x_sh, x_sw, w_so, w_si, b_s,
                      top_sn, top_sc, top_sh, top_sw, out_sn, out_sc, out_sp,
                      HAS_BIAS: tl.constexpr, X_PIXELS_FLAT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                      ACC: tl.constexpr, OFFSET: tl.constexpr, ROUND_BF16: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program order: output-channel blocks fastest, so the programs sharing one tile of x run together
    # and find it in L2. Tiles never straddle two images, so a pixel's offset is linear in its index
    # whenever x's rows are packed (X_PIXELS_FLAT), which lets the compiler see the contiguous axis.
    # Offsets inside one image are OFFSET (int32 unless an image spans 2**31 elements): int64 ones over
    # the whole output tile cost enough registers to spill the accumulator.
    pid = tl.program_id(0)
    num_pixels = H * W
    n_blocks = tl.cdiv(Cout, BLOCK_N)
    m_blocks = tl.cdiv(num_pixels, BLOCK_M)
    n_block = pid % n_blocks
    rest = pid // n_blocks
    m_block = rest % m_blocks
    image = (rest // m_blocks).to(tl.int64)

    pixel = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    out_ch = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    pixel_ok = pixel < num_pixels
    out_ch_ok = out_ch < Cout
    y = pixel // W
    x = pixel - y * W
    if X_PIXELS_FLAT:
        x_pixel_off = pixel.to(OFFSET) * x_sw
    else:
        x_pixel_off = y.to(OFFSET) * x_sh + x.to(OFFSET) * x_sw
    x_image = x_ptr + image * x_sn
    k_lane = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, Cin, BLOCK_K):
        k = k0 + k_lane
        k_ok = k < Cin
        a = tl.load(x_image + (x_pixel_off[:, None] + (k.to(OFFSET) * x_sc)[None, :]),
                    mask=pixel_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(weight_ptr + (k.to(OFFSET)[:, None] * w_si + out_ch.to(OFFSET)[None, :] * w_so),
                    mask=k_ok[:, None] & out_ch_ok[None, :], other=0)
        # out_dtype=ACC: Triton 3.6 requires the accumulator's dtype to equal out_dtype (float32 by default),
        # which a float64 accumulator does not
        if DOT_IN_FP32:
            # full-precision products: float32 inputs (no TF32), and 16-bit inputs under the
            # interpreter, whose own 16-bit arithmetic is unreliable (bf16 products are exact in fp32)
            acc = tl.dot(a.to(ACC), b.to(ACC), acc, input_precision="ieee", out_dtype=ACC)
        else:
            acc = tl.dot(a, b, acc, out_dtype=ACC)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + out_ch * b_s, mask=out_ch_ok, other=0).to(ACC)
        acc += bias[None, :]
    scale_y = _float32_from_bits(scale_y_bits)
    scale_x = _float32_from_bits(scale_x_bits)
    sy = _nearest_source(y, scale_y, h).to(OFFSET)
    sx = _nearest_source(x, scale_x, w).to(OFFSET)
    out_mask = pixel_ok[:, None] & out_ch_ok[None, :]
    top_off = (sy * top_sh + sx * top_sw)[:, None] + (out_ch.to(OFFSET) * top_sc)[None, :]
    acc += tl.load(top_ptr + image * top_sn + top_off, mask=out_mask, other=0).to(ACC)
    out_off = (pixel.to(OFFSET) * out_sp)[:, None] + (out_ch.to(OFFSET) * out_sc)[None, :]
    tl.store(out_ptr + image * out_sn + out_off, output_value(acc, ROUND_BF16).to(out_ptr.dtype.element_ty),
             mask=out_mask)


# Configs for H100/H200-class GPUs: 16-bit dots run on the tensor cores, float32 ones at full precision
# on the FMA units, where the 64 x 64 tile is the one that keeps its accumulator without spilling. The
# pinned config (FASTBB_TRITON_AUTOTUNE=0) compiles without spills for every dtype on sm_90 and with at
# most 32 bytes (float32) on sm_80, under Triton 3.6 and 3.8 (tests/triton_compile.py prints the table).
_FPN_MERGE_PINNED = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4)
_FPN_MERGE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    _FPN_MERGE_PINNED,
]
# float64 accumulators take twice the registers and its tiles twice the shared memory: 128 x 128 tiles
# spill hundreds of bytes, and 128 x 128 x 64 at 3 stages needs 256 KiB of shared memory, over Hopper's
# 227 KiB and A100's 163 KiB. These need at most 96 KiB and compile without spills on sm_80 and sm_90.
_FPN_MERGE_FP64_PINNED = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)
_FPN_MERGE_FP64_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    _FPN_MERGE_FP64_PINNED,
]
_FPN_MERGE = TunedKernel(_fpn_merge_kernel, _FPN_MERGE_CONFIGS, _FPN_MERGE_PINNED, key=["Cin", "Cout"])
_FPN_MERGE_FP64 = TunedKernel(_fpn_merge_kernel, _FPN_MERGE_FP64_CONFIGS, _FPN_MERGE_FP64_PINNED,
                              key=["Cin", "Cout"])
# The interpreter runs each program in Python: one small config (>= 16 per side, as tl.dot needs), so
# that small test shapes still cover several blocks and every edge mask.
_FPN_MERGE_INTERPRET_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}


def _fpn_merge_tuned(dtype):
    """The autotuned fpn_merge for inputs of dtype: float64 has its own configs."""
    return _FPN_MERGE_FP64 if dtype == torch.float64 else _FPN_MERGE


def _is_channels_last(t):
    """Whether t's memory order is NHWC (its own format when dense, the stride order else): this only
    orients the elementwise tiles for coalescing."""
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.stride(1) < min(t.stride(2), t.stride(3))



@functools.lru_cache(maxsize=256)
def _nearest_scale(src_size, dst_size):
    """Bit pattern of the float32 quotient float32(src) / float32(dst), which the kernels receive."""
    scale = torch.tensor(src_size, dtype=torch.float32) / torch.tensor(dst_size, dtype=torch.float32)
    return struct.unpack("<i", struct.pack("<f", float(scale)))[0]


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
        raise ValueError(f"upsample_nearest_add: cannot upsample an empty top {tuple(top.shape)} to {(H, W)}")
    channels_last = _is_channels_last(out)
    num_rows, fast_len = _rows_and_fast(N, C, H, W, channels_last)
    block_rows, block_fast = _elementwise_tile(fast_len)
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(fast_len, block_fast))
    if num_rows + block_rows > INT32_MAX or grid[1] > GRID_YZ_MAX:
        raise ValueError(f"upsample_nearest_add: shape {tuple(lateral.shape)} is too large for the Triton kernel")
    with on_device(out):
        _upsample_nearest_add_kernel[grid](
            top, lateral, out, num_rows, fast_len, C, H, W, h, w, _nearest_scale(h, H), _nearest_scale(w, W),
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
    channels_last = _is_channels_last(grad_out)
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
        raise ValueError(f"upsample_nearest_backward: shape {tuple(grad_out.shape)} is too large for the Triton kernel")
    with on_device(grad_out):
        _upsample_nearest_backward_kernel[grid](
            grad_out, grad_top, num_rows, fast_len, C, H, W, h, w, _nearest_scale(h, H), _nearest_scale(w, W),
            _max_window(h, H), _max_window(w, W), *grad_out.stride(), *grad_top.stride(),
            CHANNELS_LAST=channels_last, COMPUTE=compute_dtype(grad_out.dtype),
            ROUND_BF16=round_bf16(grad_out.dtype),
            SEARCH_STEPS_Y=H.bit_length(), SEARCH_STEPS_X=W.bit_length(),
            BLOCK_ROWS=block_rows, BLOCK_FAST=block_fast)
    return grad_top


def fpn_merge(x, weight, bias, top, *, block_m=None, block_n=None, block_k=None):
    """out = F.conv2d(x, weight, bias) + F.interpolate(top, size=x.shape[-2:], mode="nearest"), as one
    GEMM over input channels whose epilogue adds the bias and the upsampled top.

    x (N, Cin, H, W) and top (N, Cout, h, w) with any strides, weight (Cout, Cin, 1, 1), bias (Cout,) or
    None. Accumulates in float32 (float64 for float64); float32 products are full precision, not TF32.
    Returns (N, Cout, H, W) in x's dtype and memory format. block_m/n/k (all three, each a power of two
    >= 16) fix the tile instead of the autotuned (GPU) or default (interpreter) one.
    """
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    h, w = top.shape[-2:]
    out = torch.empty((N, Cout, H, W), dtype=x.dtype, device=x.device, memory_format=output_format(x))
    if out.numel() == 0:
        return out
    if h == 0 or w == 0:
        raise ValueError(f"fpn_merge: cannot upsample an empty top {tuple(top.shape)} to {(H, W)}")
    num_pixels = H * W
    # Program ids and pixel indices are int32 (offsets are int64); 16 x 16 is the smallest tile.
    if num_pixels + 128 > INT32_MAX or N * triton.cdiv(num_pixels, 16) * triton.cdiv(Cout, 16) > INT32_MAX:
        raise ValueError(f"fpn_merge: shape {tuple(x.shape)} is too large for the Triton kernel")
    # Pixels are addressed by one stride when x's rows are packed back to back (always for out).
    x_pixels_flat = H == 1 or x.stride(2) == W * x.stride(3)
    w2d = weight.reshape(Cout, Cin)
    if Cin == 0:  # the K loop does not run; any valid pointer stands in for the empty operands
        x_arg, w_arg = out, out
    else:
        x_arg, w_arg = x, w2d
    args = (x_arg, w_arg, bias if bias is not None else out, top, out, Cin, Cout, H, W, h, w,
            _nearest_scale(h, H), _nearest_scale(w, W), *x.stride(), *w2d.stride(),
            bias.stride(0) if bias is not None else 0, *top.stride(), out.stride(0), out.stride(1), out.stride(3))
    kwargs = dict(HAS_BIAS=bias is not None, X_PIXELS_FLAT=x_pixels_flat,
                  DOT_IN_FP32=x.dtype in (torch.float32, torch.float64) or INTERPRET,
                  ACC=compute_dtype(x.dtype), ROUND_BF16=round_bf16(x.dtype),
                  OFFSET=tl.int64 if max(span(x, 1), span(w2d), span(top, 1), span(out, 1)) > INT32_MAX
                  else tl.int32)
    fixed = (block_m, block_n, block_k)
    if any(b is not None for b in fixed):
        if any(b is None or b < 16 or b & (b - 1) for b in fixed):
            raise ValueError("fpn_merge: block_m, block_n, block_k must all be powers of two >= 16")
        kernel = _fpn_merge_kernel
        kwargs.update(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    elif INTERPRET:
        kernel = _fpn_merge_kernel
        kwargs.update(_FPN_MERGE_INTERPRET_BLOCKS)
    else:
        kernel = _fpn_merge_tuned(x.dtype).launcher()

    def grid(meta):
        return (N * triton.cdiv(num_pixels, meta["BLOCK_M"]) * triton.cdiv(Cout, meta["BLOCK_N"]),)

    with on_device(x):
        kernel[grid](*args, **kwargs)
    return out
