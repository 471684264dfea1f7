"""Triton implicit-GEMM convolution with a per-channel epilogue: `conv2d_epilogue` computes
relu?(conv2d(x, weight) * scale + shift (+ residual)) and stores once. fastbb's eval conv_bn_relu on CUDA
runs it with the BatchNorm folded into the weight and shift (fastbb/ops/conv_bn_relu/cuda_conv.py).
"""
import torch
import triton
import triton.language as tl

from fastbb.kernels._common import (INT32_MAX, INTERPRET, TunedKernel, compute_dtype, gemm_launch, on_device,
                                     output_value, round_bf16, span)

_OP = "fastbb.conv2d_epilogue"


@triton.jit
def _conv2d_epilogue_kernel(x_ptr, weight_ptr, scale_ptr, shift_ptr, residual_ptr, out_ptr,
                            GEMM_M, Cout, GEMM_K, Cin, H, W, OH, OW, taps, KW,
                            stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                            x_sn, x_sc, x_sh, x_sw, scale_s, shift_s, res_sn, res_sc, res_sh, res_sw,
                            out_sc, out_sp,
                            HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                            ACC: tl.constexpr, OFFSET: tl.constexpr, ROUND_BF16: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # GEMM rows are output pixels (n, oh, ow), columns output channels, and K runs over (kh, kw, ci) with
    # ci fastest, the order of the packed weight: one flat loop (which the compiler can pipeline) whose
    # step picks a filter tap and a block of input channels, so the pixel gather is one vector per row.
    # Output-channel blocks vary fastest across programs: those sharing a tile of x run together.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(Cout, BLOCK_N)
    n_block = pid % n_blocks
    m_block = pid // n_blocks

    pixel = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    out_ch = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    pixel_ok = pixel < GEMM_M
    out_ch_ok = out_ch < Cout
    ow = pixel % OW
    rest = pixel // OW
    oh = rest % OH
    image = (rest // OH).to(tl.int64)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = x_ptr + image * x_sn
    k_lane = tl.arange(0, BLOCK_K)
    cin_blocks = tl.cdiv(Cin, BLOCK_K)
    num_steps = taps * cin_blocks

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for step in range(0, num_steps):
        tap = step // cin_blocks
        ci = (step - tap * cin_blocks) * BLOCK_K + k_lane
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dilation_h
        iw = iw0 + kw * dilation_w
        row_ok = pixel_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ci_ok = ci < Cin
        row_off = ih.to(OFFSET) * x_sh + iw.to(OFFSET) * x_sw
        a = tl.load(x_rows[:, None] + (row_off[:, None] + (ci.to(OFFSET) * x_sc)[None, :]),
                    mask=row_ok[:, None] & ci_ok[None, :], other=0)
        k = tap * Cin + ci
        b = tl.load(weight_ptr + (k.to(OFFSET)[:, None] * Cout + out_ch.to(OFFSET)[None, :]),
                    mask=ci_ok[:, None] & out_ch_ok[None, :], other=0)
        # out_dtype=ACC: Triton 3.6 requires the accumulator's dtype to equal out_dtype (float32 by default),
        # which a float64 accumulator does not
        if DOT_IN_FP32:
            # full-precision products: float32 inputs (no TF32), and 16-bit inputs under the
            # interpreter, whose own 16-bit arithmetic is unreliable (16-bit products are exact in fp32)
            acc = tl.dot(a.to(ACC), b.to(ACC), acc, input_precision="ieee", out_dtype=ACC)
        else:
            acc = tl.dot(a, b, acc, out_dtype=ACC)

    scale = tl.load(scale_ptr + out_ch * scale_s, mask=out_ch_ok, other=0).to(ACC)
    shift = tl.load(shift_ptr + out_ch * shift_s, mask=out_ch_ok, other=0).to(ACC)
    acc = acc * scale[None, :] + shift[None, :]
    out_mask = pixel_ok[:, None] & out_ch_ok[None, :]
    if HAS_RESIDUAL:
        res_rows = residual_ptr + image * res_sn + (oh.to(OFFSET) * res_sh + ow.to(OFFSET) * res_sw)
        residual = tl.load(res_rows[:, None] + (out_ch.to(OFFSET) * res_sc)[None, :], mask=out_mask, other=0)
        acc += residual.to(ACC)
    if RELU:
        acc = tl.where(acc < 0, 0, acc)  # NaN stays NaN, as in torch.relu
    out_off = (pixel.to(OFFSET) * out_sp)[:, None] + (out_ch.to(OFFSET) * out_sc)[None, :]
    tl.store(out_ptr + out_off, output_value(acc, ROUND_BF16).to(out_ptr.dtype.element_ty), mask=out_mask)


# Configs for H100/H200-class GPUs: 16-bit dots run on the tensor cores, float32 ones at full precision
# on the FMA units, where the smaller tiles keep their accumulator without spilling. The autotuner keys
# on the GEMM sizes and (implicitly) on the dtypes. The pinned config (FASTBB_TRITON_AUTOTUNE=0)
# compiles without spills for every dtype on sm_90 and with at most 12 bytes (float32) on sm_80, under
# Triton 3.6 and 3.8 (tests/triton_compile.py prints the table).
_CONV_PINNED = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4)
_CONV_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    _CONV_PINNED,
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
# float64 accumulators take twice the registers and its tiles twice the shared memory: 128 x 128 tiles
# spill hundreds of bytes, and 128 x 128 x 64 at 3 stages needs 256 KiB of shared memory, over Hopper's
# 227 KiB and A100's 163 KiB. These need at most 96 KiB and compile on sm_80 and sm_90 with at most a
# few bytes of spills.
_CONV_FP64_PINNED = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)
_CONV_FP64_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    _CONV_FP64_PINNED,
]
_CONV = TunedKernel(_conv2d_epilogue_kernel, _CONV_CONFIGS, _CONV_PINNED, key=["GEMM_M", "Cout", "GEMM_K"])
_CONV_FP64 = TunedKernel(_conv2d_epilogue_kernel, _CONV_FP64_CONFIGS, _CONV_FP64_PINNED,
                         key=["GEMM_M", "Cout", "GEMM_K"])
# One small config under the interpreter (>= 16 per side, as tl.dot needs), so that small test shapes
# still cover several blocks on every axis and every edge mask.
_CONV_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}


def _pair(value, name):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{_OP}: {name} must be an int or a pair of ints, got {value!r}")
    return pair


def conv2d_epilogue(x, weight, scale, shift, residual, relu, stride=1, padding=0, dilation=1, *,
                    block_m=None, block_n=None, block_k=None):
    """out = relu?(F.conv2d(x, weight, None, stride, padding, dilation) * scale[co] + shift[co] (+ residual))
    as one implicit-GEMM kernel (groups=1).

    x (N, Cin, H, W) any strides (channels_last is the fast one), weight (Cout, Cin, KH, KW) any layout
    (repacked here to (KH*KW*Cin, Cout)), scale and shift (Cout,) float32, residual None or
    (N, Cout, OH, OW) any strides; stride/padding/dilation ints or pairs. Accumulates in float32 (float64
    for float64); float32 products are full precision, not TF32. Returns (N, Cout, OH, OW) channels_last
    in x's dtype. block_m/n/k (all three, each a power of two >= 16) fix the tile instead of the
    autotuned (GPU) or default (interpreter) one.
    """
    N, Cin, H, W = x.shape
    Cout, weight_cin, KH, KW = weight.shape
    if weight_cin != Cin:
        raise ValueError(f"{_OP}: weight {tuple(weight.shape)} does not match {Cin} input channels")
    stride_h, stride_w = _pair(stride, "stride")
    pad_h, pad_w = _pair(padding, "padding")
    dilation_h, dilation_w = _pair(dilation, "dilation")
    OH = (H + 2 * pad_h - dilation_h * (KH - 1) - 1) // stride_h + 1
    OW = (W + 2 * pad_w - dilation_w * (KW - 1) - 1) // stride_w + 1
    if OH < 0 or OW < 0 or min(stride_h, stride_w, dilation_h, dilation_w) < 1 or min(pad_h, pad_w) < 0:
        raise ValueError(f"{_OP}: invalid geometry for input {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)} (stride {stride}, padding {padding}, dilation {dilation})")
    out = torch.empty((N, Cout, OH, OW), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if residual is not None and tuple(residual.shape) != tuple(out.shape):
        raise ValueError(f"{_OP}: residual must have shape {tuple(out.shape)}, got {tuple(residual.shape)}")
    if out.numel() == 0:
        return out
    gemm_m = N * OH * OW
    gemm_k = KH * KW * Cin
    # Program ids and pixel indices are int32; 16 x 16 is the smallest tile.
    if gemm_m + 128 > INT32_MAX or triton.cdiv(gemm_m, 16) * triton.cdiv(Cout, 16) > INT32_MAX:
        raise ValueError(f"{_OP}: shape {tuple(x.shape)} is too large for the Triton kernel")
    packed = weight.to(x.dtype).permute(2, 3, 1, 0).reshape(gemm_k, Cout).contiguous()
    x_arg = x if x.numel() > 0 else out  # Cin == 0: the K loop does not run; any valid pointer will do
    w_arg = packed if packed.numel() > 0 else out
    res_arg = residual if residual is not None else out
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    # Each image's offset is int64; the offsets inside an image (and the output's and the packed
    # weight's) are int32 unless one could pass 2**31, masked lanes of a tile (up to 256 wide) included.
    _, x_sc, x_sh, x_sw = (abs(s) for s in x.stride())
    reach = [(H + 2 * pad_h + dilation_h * KH) * x_sh + (W + 2 * pad_w + dilation_w * KW) * x_sw + (Cin + 256) * x_sc,
             (gemm_k + 256) * Cout + 256, (gemm_m + 256) * Cout + 256]
    if residual is not None:
        reach.append(span(residual, 1) + 256 * abs(residual.stride(1)))
    offset = tl.int64 if max(reach) > INT32_MAX else tl.int32
    args = (x_arg, w_arg, scale, shift, res_arg, out, gemm_m, Cout, gemm_k, Cin, H, W, OH, OW, KH * KW, KW,
            stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, *x.stride(), scale.stride(0),
            shift.stride(0), *res_strides, out.stride(1), out.stride(3))
    kwargs = dict(HAS_RESIDUAL=residual is not None, RELU=bool(relu),
                  DOT_IN_FP32=x.dtype in (torch.float32, torch.float64) or INTERPRET,
                  ACC=compute_dtype(x.dtype), OFFSET=offset, ROUND_BF16=round_bf16(x.dtype))
    kernel, blocks = gemm_launch(_OP, _conv2d_epilogue_kernel, x.dtype, _CONV, _CONV_FP64, _CONV_INTERPRET_BLOCKS,
                                 block_m, block_n, block_k)
    kwargs.update(blocks)

    def grid(meta):
        return (triton.cdiv(gemm_m, meta["BLOCK_M"]) * triton.cdiv(Cout, meta["BLOCK_N"]),)

    with on_device(x):
        kernel[grid](*args, **kwargs)
    return out
