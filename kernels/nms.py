"""Triton kernel of the NMS suppression bitmask (the stage fastbb_C::nms_iou_mask computes in C++/CUDA).

One program per (64-column tile, 64-row tile, image): bit j of word `col_tile` of row i is set when box
i suppresses box col_tile * 64 + j (j > i, both rows valid, equal labels, IoU > threshold). Tiles below
the diagonal and rows past the valid count are written as zeros. The IoU follows torchvision's operation
order in float32 (float64 for float64 boxes) with a correctly rounded division and no fused
multiply-add, so the bits equal the C++ kernel's.
"""
import struct

import torch
import triton
import triton.language as tl

TILE = 64


@triton.jit
def _iou_mask_kernel(boxes_ptr, labels_ptr, counts_ptr, mask_ptr, rows, words, threshold_bits,
                     HAS_LABELS: tl.constexpr, DOUBLE: tl.constexpr):
    col_tile = tl.program_id(0)
    row_tile = tl.program_id(1)
    image = tl.program_id(2)
    lanes = tl.arange(0, 64)
    row_index = row_tile * 64 + lanes
    col_index = col_tile * 64 + lanes
    count = tl.load(counts_ptr + image)
    out_ptrs = mask_ptr + (image * rows + row_index).to(tl.int64) * words + col_tile
    in_rows = row_index < rows

    if (col_tile < row_tile) | (row_tile * 64 >= count):
        tl.store(out_ptrs, tl.zeros([64], dtype=tl.int64), mask=in_rows)
    else:
        compute = tl.float64 if DOUBLE else tl.float32
        if DOUBLE:
            threshold = tl.full([1], threshold_bits, tl.int64).to(tl.float64, bitcast=True)
        else:
            threshold = tl.full([1], threshold_bits, tl.int32).to(tl.float32, bitcast=True)
        row_valid = row_index < count
        col_valid = col_index < count
        row_base = boxes_ptr + (image * rows + row_index).to(tl.int64) * 4
        col_base = boxes_ptr + (image * rows + col_index).to(tl.int64) * 4
        rx1 = tl.load(row_base + 0, mask=row_valid, other=0).to(compute)
        ry1 = tl.load(row_base + 1, mask=row_valid, other=0).to(compute)
        rx2 = tl.load(row_base + 2, mask=row_valid, other=0).to(compute)
        ry2 = tl.load(row_base + 3, mask=row_valid, other=0).to(compute)
        cx1 = tl.load(col_base + 0, mask=col_valid, other=0).to(compute)
        cy1 = tl.load(col_base + 1, mask=col_valid, other=0).to(compute)
        cx2 = tl.load(col_base + 2, mask=col_valid, other=0).to(compute)
        cy2 = tl.load(col_base + 3, mask=col_valid, other=0).to(compute)
        row_area = (rx2 - rx1) * (ry2 - ry1)
        col_area = (cx2 - cx1) * (cy2 - cy1)
        w = tl.minimum(rx2[:, None], cx2[None, :]) - tl.maximum(rx1[:, None], cx1[None, :])
        h = tl.minimum(ry2[:, None], cy2[None, :]) - tl.maximum(ry1[:, None], cy1[None, :])
        w = tl.where(w > 0, w, 0)
        h = tl.where(h > 0, h, 0)
        inter = w * h
        union = row_area[:, None] + col_area[None, :] - inter
        if DOUBLE:
            iou = inter / union
        else:
            iou = tl.math.div_rn(inter, union)  # float32 `/` is not correctly rounded on the GPU
        suppress = (iou > threshold[:, None]) & (col_index[None, :] > row_index[:, None])
        suppress = suppress & row_valid[:, None] & col_valid[None, :]
        if HAS_LABELS:
            row_label = tl.load(labels_ptr + image * rows + row_index, mask=row_valid, other=0)
            col_label = tl.load(labels_ptr + image * rows + col_index, mask=col_valid, other=0)
            suppress = suppress & (row_label[:, None] == col_label[None, :])
        # Distinct powers of two: their sum is their OR (bit 63 wraps to the sign bit, as intended).
        bits = tl.where(suppress, 1, 0).to(tl.int64) << lanes.to(tl.int64)[None, :]
        tl.store(out_ptrs, tl.sum(bits, axis=1), mask=in_rows)


def _threshold_bits(iou_threshold, double):
    """Bits of the threshold in the compute dtype: the largest float32 not above it for float32, so
    that a float32 IoU compares with it exactly as with the float64 threshold."""
    if double:
        return struct.unpack("<q", struct.pack("<d", iou_threshold))[0]
    t = torch.tensor(iou_threshold, dtype=torch.float64)
    t32 = t.to(torch.float32)
    if t32.double() > t:
        t32 = torch.nextafter(t32, torch.tensor(-float("inf")))
    return struct.unpack("<i", struct.pack("<f", t32.item()))[0]


def iou_mask(boxes, labels, valid_counts, iou_threshold):
    """Suppression bitmask int64 (B, M, ceil(M / 64)) of boxes (B, M, 4) in rank order per image.

    labels: (B, M) int64 or None (all equal); valid_counts: (B,) integer, rows at or past it are padding.
    """
    batch, rows = boxes.shape[:2]
    words = triton.cdiv(rows, TILE)
    mask = torch.empty((batch, rows, words), dtype=torch.int64, device=boxes.device)
    if mask.numel() == 0:
        return mask
    double = boxes.dtype == torch.float64
    counts = valid_counts.to(torch.int64).clamp(0, rows).contiguous()
    boxes = boxes.contiguous()
    labels_arg = labels.to(torch.int64).contiguous() if labels is not None else counts
    launch = {} if boxes.device.type == "cpu" else {"enable_fp_fusion": False}
    _iou_mask_kernel[(words, words, batch)](
        boxes, labels_arg, counts, mask, rows, words, _threshold_bits(float(iou_threshold), double),
        HAS_LABELS=labels is not None, DOUBLE=double, **launch)
    return mask
