"""Triton kernel of fastbb.ops.decode_boxes: one lane per box, computed in float32 (float64 for float64).

Same math and operation order as csrc/box_decode/box_decode.h; launched without fused multiply-add so
products round as PyTorch's do.
"""
import torch
import triton
import triton.language as tl

from fastbb.kernels._common import check_grid, compute_dtype, on_device

_BLOCK = 256
_CLIP_NONE, _CLIP_ONE, _CLIP_PER_IMAGE = 0, 1, 2


@triton.jit
def _decode_boxes_kernel(anchors_ptr, deltas_ptr, sizes_ptr, out_ptr, num_boxes, boxes_per_row, num_anchors,
                         boxes_per_image, w0: tl.float64, w1: tl.float64, w2: tl.float64, w3: tl.float64,
                         m0: tl.float64, m1: tl.float64, m2: tl.float64, m3: tl.float64, s0: tl.float64,
                         s1: tl.float64, s2: tl.float64, s3: tl.float64, dwh_min: tl.float64,
                         dwh_max: tl.float64, dxy_max: tl.float64, clip_h: tl.float64, clip_w: tl.float64,
                         MMDET: tl.constexpr, CLIP: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    # Scalars arrive as float64 so that float64 inputs see the exact values; float32 rounds them once.
    box = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = box < num_boxes
    anchor = (box // boxes_per_row) % num_anchors
    ax1 = tl.load(anchors_ptr + 4 * anchor, mask=valid, other=0).to(COMPUTE)
    ay1 = tl.load(anchors_ptr + 4 * anchor + 1, mask=valid, other=0).to(COMPUTE)
    ax2 = tl.load(anchors_ptr + 4 * anchor + 2, mask=valid, other=0).to(COMPUTE)
    ay2 = tl.load(anchors_ptr + 4 * anchor + 3, mask=valid, other=0).to(COMPUTE)
    d0 = tl.load(deltas_ptr + 4 * box, mask=valid, other=0).to(COMPUTE)
    d1 = tl.load(deltas_ptr + 4 * box + 1, mask=valid, other=0).to(COMPUTE)
    d2 = tl.load(deltas_ptr + 4 * box + 2, mask=valid, other=0).to(COMPUTE)
    d3 = tl.load(deltas_ptr + 4 * box + 3, mask=valid, other=0).to(COMPUTE)

    w = ax2 - ax1
    h = ay2 - ay1
    if MMDET:
        cx = (ax1 + ax2) * 0.5
        cy = (ay1 + ay2) * 0.5
        dx = d0 * tl.cast(s0, COMPUTE) + tl.cast(m0, COMPUTE)
        dy = d1 * tl.cast(s1, COMPUTE) + tl.cast(m1, COMPUTE)
        dw = d2 * tl.cast(s2, COMPUTE) + tl.cast(m2, COMPUTE)
        dh = d3 * tl.cast(s3, COMPUTE) + tl.cast(m3, COMPUTE)
    else:
        cx = ax1 + 0.5 * w
        cy = ay1 + 0.5 * h
        if COMPUTE == tl.float64:
            dx = d0 / tl.cast(w0, COMPUTE)
            dy = d1 / tl.cast(w1, COMPUTE)
            dw = d2 / tl.cast(w2, COMPUTE)
            dh = d3 / tl.cast(w3, COMPUTE)
        else:  # the default float32 division is approximate; torch's is correctly rounded
            dx = tl.math.div_rn(d0, tl.cast(w0, COMPUTE))
            dy = tl.math.div_rn(d1, tl.cast(w1, COMPUTE))
            dw = tl.math.div_rn(d2, tl.cast(w2, COMPUTE))
            dh = tl.math.div_rn(d3, tl.cast(w3, COMPUTE))

    # Clamps written as selects so NaN passes through, as torch.clamp does.
    shift_x = dx * w
    shift_y = dy * h
    lim = tl.cast(dxy_max, COMPUTE)
    shift_x = tl.where(shift_x > lim, lim, shift_x)
    shift_x = tl.where(shift_x < -lim, -lim, shift_x)
    shift_y = tl.where(shift_y > lim, lim, shift_y)
    shift_y = tl.where(shift_y < -lim, -lim, shift_y)
    lo = tl.cast(dwh_min, COMPUTE)
    hi = tl.cast(dwh_max, COMPUTE)
    dw = tl.where(dw < lo, lo, dw)
    dw = tl.where(dw > hi, hi, dw)
    dh = tl.where(dh < lo, lo, dh)
    dh = tl.where(dh > hi, hi, dh)

    pred_cx = shift_x + cx
    pred_cy = shift_y + cy
    half_w = 0.5 * (tl.exp(dw) * w)
    half_h = 0.5 * (tl.exp(dh) * h)
    x1 = pred_cx - half_w
    y1 = pred_cy - half_h
    x2 = pred_cx + half_w
    y2 = pred_cy + half_h

    if CLIP != 0:
        if CLIP == 2:
            image = box // boxes_per_image
            limit_h = tl.load(sizes_ptr + 2 * image, mask=valid, other=0).to(COMPUTE)
            limit_w = tl.load(sizes_ptr + 2 * image + 1, mask=valid, other=0).to(COMPUTE)
        else:
            limit_h = tl.cast(clip_h, COMPUTE)
            limit_w = tl.cast(clip_w, COMPUTE)
        x1 = tl.where(x1 < 0, 0.0, x1)
        x1 = tl.where(x1 > limit_w, limit_w, x1)
        y1 = tl.where(y1 < 0, 0.0, y1)
        y1 = tl.where(y1 > limit_h, limit_h, y1)
        x2 = tl.where(x2 < 0, 0.0, x2)
        x2 = tl.where(x2 > limit_w, limit_w, x2)
        y2 = tl.where(y2 < 0, 0.0, y2)
        y2 = tl.where(y2 > limit_h, limit_h, y2)

    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + 4 * box, x1.to(out_ty), mask=valid)
    tl.store(out_ptr + 4 * box + 1, y1.to(out_ty), mask=valid)
    tl.store(out_ptr + 4 * box + 2, x2.to(out_ty), mask=valid)
    tl.store(out_ptr + 4 * box + 3, y2.to(out_ty), mask=valid)


def decode_boxes(anchors, deltas, image_sizes, style, weights, means, stds, dwh_min, dwh_max, dxy_max,
                 image_size):
    """Launcher with the arguments of fastbb_C::decode_boxes: anchors (A, 4), deltas (R, A, 4K)."""
    anchors = anchors.contiguous()
    deltas = deltas.contiguous()
    out = torch.empty_like(deltas)
    num_boxes = deltas.numel() // 4
    if num_boxes == 0:
        return out
    if image_sizes is not None:
        clip, sizes = _CLIP_PER_IMAGE, image_sizes.contiguous()
        boxes_per_image = num_boxes // sizes.shape[0]
    else:
        clip, sizes, boxes_per_image = (_CLIP_ONE if image_size else _CLIP_NONE), deltas, num_boxes
    clip_h, clip_w = image_size if image_size else (0.0, 0.0)
    compute = compute_dtype(deltas.dtype)
    grid = check_grid("fastbb.decode_boxes", (triton.cdiv(num_boxes, _BLOCK),), deltas.shape)
    with on_device(deltas):
        _decode_boxes_kernel[grid](
            anchors, deltas, sizes, out, num_boxes, deltas.shape[-1] // 4, anchors.shape[0], boxes_per_image,
            *weights, *means, *stds, dwh_min, dwh_max, dxy_max, clip_h, clip_w,
            MMDET=style == 1, CLIP=clip, COMPUTE=compute, BLOCK=_BLOCK, enable_fp_fusion=False)
    return out
