"""Triton kernel of fastbb.ops.fpn_merge: the FPN lateral 1x1 convolution as a GEMM over input channels whose
epilogue adds the bias and the nearest-upsampled coarser map (PyTorch's nearest index, kernels/_nearest.py)
before the single store. Accumulates in float32 (float64 for float64).
"""
import torch
import triton
import triton.language as tl

from fastbb.kernels._common import (INT32_MAX, INTERPRET, TunedKernel, compute_dtype, gemm_launch, on_device,
                                     output_format, output_value, round_bf16, span)
from fastbb.kernels._nearest import float32_from_bits, nearest_scale, nearest_source

_OP = "fastbb.fpn_merge"


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
    scale_y = float32_from_bits(scale_y_bits)
    scale_x = float32_from_bits(scale_x_bits)
    sy = nearest_source(y, scale_y, h).to(OFFSET)
    sx = nearest_source(x, scale_x, w).to(OFFSET)
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


def fpn_merge(x, weight, bias, top, *, block_m=None, block_n=None, block_k=None):
    """out = F.conv2d(x, weight, bias) + F.interpolate(top, size=x.shape[-2:], mode="nearest"), as one
    GEMM over input channels whose epilogue adds the bias and the upsampled top.

    x (N, Cin, H, W) and top (N, Cout, h, w) with any strides, weight (Cout, Cin, 1, 1), bias (Cout,) or
    None. Accumulates in float32 (float64 for float64); float32 products are full precision, not TF32.
    Returns (N, Cout, H, W) in x's memory format and the dtype of add's promotion of x's and top's (top of
    another dtype than x: autocast on CUDA upsamples in float32). block_m/n/k (all three, each a power of two
    >= 16) fix the tile instead of the autotuned (GPU) or default (interpreter) one.
    """
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    h, w = top.shape[-2:]
    out_dtype = torch.promote_types(x.dtype, top.dtype)
    out = torch.empty((N, Cout, H, W), dtype=out_dtype, device=x.device, memory_format=output_format(x))
    if out.numel() == 0:
        return out
    if h == 0 or w == 0:
        raise ValueError(f"{_OP}: cannot upsample an empty top {tuple(top.shape)} to {(H, W)}")
    num_pixels = H * W
    # Program ids and pixel indices are int32 (offsets are int64); 16 x 16 is the smallest tile.
    if num_pixels + 128 > INT32_MAX or N * triton.cdiv(num_pixels, 16) * triton.cdiv(Cout, 16) > INT32_MAX:
        raise ValueError(f"{_OP}: shape {tuple(x.shape)} is too large for the Triton kernel")
    # Pixels are addressed by one stride when x's rows are packed back to back (always for out).
    x_pixels_flat = H == 1 or x.stride(2) == W * x.stride(3)
    w2d = weight.reshape(Cout, Cin)
    if Cin == 0:  # the K loop does not run; any valid pointer stands in for the empty operands
        x_arg, w_arg = out, out
    else:
        x_arg, w_arg = x, w2d
    args = (x_arg, w_arg, bias if bias is not None else out, top, out, Cin, Cout, H, W, h, w,
            nearest_scale(h, H), nearest_scale(w, W), *x.stride(), *w2d.stride(),
            bias.stride(0) if bias is not None else 0, *top.stride(), out.stride(0), out.stride(1), out.stride(3))
    kwargs = dict(HAS_BIAS=bias is not None, X_PIXELS_FLAT=x_pixels_flat,
                  DOT_IN_FP32=x.dtype in (torch.float32, torch.float64) or INTERPRET,
                  ACC=compute_dtype(x.dtype), ROUND_BF16=round_bf16(out_dtype),
                  OFFSET=tl.int64 if max(span(x, 1), span(w2d), span(top, 1), span(out, 1)) > INT32_MAX
                  else tl.int32)
    kernel, blocks = gemm_launch(_OP, _fpn_merge_kernel, x.dtype, _FPN_MERGE, _FPN_MERGE_FP64,
                                 _FPN_MERGE_INTERPRET_BLOCKS, block_m, block_n, block_k)
    kwargs.update(blocks)

    def grid(meta):
        return (N * triton.cdiv(num_pixels, meta["BLOCK_M"]) * triton.cdiv(Cout, meta["BLOCK_N"]),)

    with on_device(x):
        kernel[grid](*args, **kwargs)
    return out
