"""The nearest source index of PyTorch's legacy `F.interpolate(mode="nearest")`, shared by the Triton
kernels of upsample_nearest_add and fpn_merge. Per axis:
    scale = float32(src) / float32(dst),  src_index(d) = min(floor(float32(d) * scale), src - 1)
with the product a float32 multiply, so the kernels pick the same pixels bit for bit, odd ratios included.
The scale is passed as its float32 bit pattern, so the GPU and the interpreter multiply by the same float32.
"""
import functools
import struct

import torch
import triton
import triton.language as tl


@triton.jit
def float32_from_bits(bits):
    """The float32 whose bit pattern is the int32 `bits` (how the scales arrive)."""
    return tl.full([1], bits, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def nearest_source(dst_index, scale, src_size):
    """PyTorch's nearest source index of destination indices: min(floor(float32(d) * scale), src - 1)."""
    src = tl.floor(dst_index.to(tl.float32) * scale).to(tl.int32)
    return tl.minimum(src, src_size - 1)


@functools.lru_cache(maxsize=256)
def nearest_scale(src_size, dst_size):
    """Bit pattern of the float32 quotient float32(src) / float32(dst), which the kernels receive."""
    scale = torch.tensor(src_size, dtype=torch.float32) / torch.tensor(dst_size, dtype=torch.float32)
    return struct.unpack("<i", struct.pack("<f", float(scale)))[0]
