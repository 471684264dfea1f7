"""Triton kernels of fastbb.ops.match_anchors: torchvision's Matcher on box_iou(gt, anchors) for every image of
a padded batch, without the (G, A) IoU matrix, with the rules of the C++ kernel
(csrc/retinanet_loss/match_anchors_cpu.cpp). Two launches over (blocks of anchors, images):
  1. (low-quality rule only) each gt's best IoU within each block of anchors; torch.amax over the blocks
     (NaN wins, as in torch.max) gives its best over the image;
  2. each anchor's best gt (torch.max's rule: a strictly greater IoU replaces the best, the first NaN is
     final, so ties keep the first gt), its thresholds, and whether its IoU equals some gt's best.
The IoU of a (gt, anchor) pair is computed in each launch rather than stored, with box_iou's operations in
its order: launched without fused multiply-adds, and float32 division correctly rounded (Triton's default is
approximate), so that each value, and with it every threshold and tie, equals torchvision's bit for bit.
"""
import math

import torch
import triton
import triton.language as tl

from fastbb.kernels._common import check_grid, compute_dtype, on_device

_BLOCK = 256
_OP = "fastbb.match_anchors"


@triton.jit
def _anchor_block(anchors_ptr, image, anchors_per_set, anchor_set_stride, BLOCK: tl.constexpr):
    """The block's anchor indices, their mask, corners and areas ((x2 - x1) * (y2 - y1), as box_area)."""
    anchor = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = anchor < anchors_per_set
    base = anchors_ptr + image * anchor_set_stride + 4 * anchor
    x1 = tl.load(base, mask=valid, other=0)
    y1 = tl.load(base + 1, mask=valid, other=0)
    x2 = tl.load(base + 2, mask=valid, other=0)
    y2 = tl.load(base + 3, mask=valid, other=0)
    return anchor, valid, x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


@triton.jit
def _iou(gt_ptr, x1, y1, x2, y2, area, DIV_RN: tl.constexpr):
    """IoU of the gt box at gt_ptr with the anchors: box_iou's operations (torch.maximum / minimum keep NaN,
    clamp(min=0) keeps NaN)."""
    gx1 = tl.load(gt_ptr)
    gy1 = tl.load(gt_ptr + 1)
    gx2 = tl.load(gt_ptr + 2)
    gy2 = tl.load(gt_ptr + 3)
    gt_area = (gx2 - gx1) * (gy2 - gy1)
    w = (tl.minimum(x2, gx2, propagate_nan=tl.PropagateNan.ALL)
         - tl.maximum(x1, gx1, propagate_nan=tl.PropagateNan.ALL))
    h = (tl.minimum(y2, gy2, propagate_nan=tl.PropagateNan.ALL)
         - tl.maximum(y1, gy1, propagate_nan=tl.PropagateNan.ALL))
    w = tl.where(w < 0, 0.0, w).to(x1.dtype)
    h = tl.where(h < 0, 0.0, h).to(x1.dtype)
    inter = w * h
    union = gt_area + area - inter
    if DIV_RN:
        return tl.math.div_rn(inter, union)
    return inter / union


@triton.jit
def _gt_best_kernel(anchors_ptr, gt_ptr, counts_ptr, block_best_ptr, anchors_per_set, anchor_set_stride, num_gt,
                    num_blocks, DIV_RN: tl.constexpr, BLOCK: tl.constexpr):
    # block_best (N, G, blocks): each gt's maximum IoU over this block's anchors, NaN if one is NaN.
    image = tl.program_id(1).to(tl.int64)
    anchor, valid, x1, y1, x2, y2, area = _anchor_block(anchors_ptr, image, anchors_per_set, anchor_set_stride,
                                                        BLOCK)
    count = tl.minimum(tl.maximum(tl.load(counts_ptr + image), 0), num_gt)
    for g in range(0, count):
        iou = _iou(gt_ptr + (image * num_gt + g) * 4, x1, y1, x2, y2, area, DIV_RN)
        is_nan = (iou != iou) & valid
        best = tl.max(tl.where(valid & (iou == iou), iou, -float("inf")), axis=0)
        best = tl.where(tl.max(is_nan.to(tl.int32), axis=0) > 0, float("nan"), best)
        tl.store(block_best_ptr + (image * num_gt + g) * num_blocks + tl.program_id(0), best)


@triton.jit
def _match_kernel(anchors_ptr, gt_ptr, counts_ptr, gt_best_ptr, out_ptr, anchors_per_set, anchor_set_stride, num_gt,
                  HIGH: tl.constexpr, LOW: tl.constexpr, LOW_QUALITY: tl.constexpr, DIV_RN: tl.constexpr,
                  BLOCK: tl.constexpr):
    image = tl.program_id(1).to(tl.int64)
    anchor, valid, x1, y1, x2, y2, area = _anchor_block(anchors_ptr, image, anchors_per_set, anchor_set_stride,
                                                        BLOCK)
    count = tl.minimum(tl.maximum(tl.load(counts_ptr + image), 0), num_gt)
    best = tl.full((BLOCK,), -float("inf"), x1.dtype)
    best_gt = tl.zeros((BLOCK,), tl.int64)
    marked = tl.zeros((BLOCK,), tl.int1)
    for g in range(0, count):
        iou = _iou(gt_ptr + (image * num_gt + g) * 4, x1, y1, x2, y2, area, DIV_RN)
        take = (best == best) & ~(iou <= best)
        best = tl.where(take, iou, best)
        best_gt = tl.where(take, g, best_gt)
        if LOW_QUALITY:
            marked = marked | (iou == tl.load(gt_best_ptr + image * num_gt + g))
    # Thresholds in the boxes' dtype, as torch compares a float32 tensor with a Python float. They are
    # constexprs, made constants of that dtype from the Python floats: float64 ones exact (the interpreter
    # rounds float64 scalar arguments to float32, which moves an IoU of exactly 0.4 across 0.4).
    low = tl.full((BLOCK,), LOW, x1.dtype)
    high = tl.full((BLOCK,), HIGH, x1.dtype)
    matches = tl.where(best < low, -1, tl.where(best < high, -2, best_gt))
    if LOW_QUALITY:
        matches = tl.where(marked, best_gt, matches)
    matches = tl.where(count > 0, matches, -1)
    tl.store(out_ptr + image * anchors_per_set + anchor, matches, mask=valid)


def match_anchors(anchors, gt_boxes, gt_counts, high_threshold, low_threshold, allow_low_quality_matches):
    """Launcher with the arguments of fastbb_C::match_anchors: anchors (1 or N, A, 4) and gt_boxes (N, G, 4)
    contiguous, both float32 or both float64; gt_counts (N,) int64 (clamped to [0, G] in the kernels)."""
    num_images, num_gt = gt_boxes.shape[:2]
    anchors_per_set = anchors.shape[1]
    out = torch.empty((num_images, anchors_per_set), dtype=torch.int64, device=gt_boxes.device)
    if num_images == 0 or anchors_per_set == 0:
        return out
    if num_gt == 0:
        return out.fill_(-1)
    anchors, gt_boxes, gt_counts = anchors.contiguous(), gt_boxes.contiguous(), gt_counts.contiguous()
    anchor_set_stride = 0 if anchors.shape[0] == 1 else anchors_per_set * 4
    num_blocks = triton.cdiv(anchors_per_set, _BLOCK)
    grid = check_grid(_OP, (num_blocks, num_images), gt_boxes.shape)
    div_rn = compute_dtype(gt_boxes.dtype) == tl.float32
    with on_device(gt_boxes):
        gt_best = gt_boxes  # not read without the low-quality rule
        if allow_low_quality_matches:
            block_best = torch.full((num_images, num_gt, num_blocks), -math.inf, dtype=gt_boxes.dtype,
                                    device=gt_boxes.device)
            _gt_best_kernel[grid](anchors, gt_boxes, gt_counts, block_best, anchors_per_set, anchor_set_stride, num_gt,
                                  num_blocks, DIV_RN=div_rn, BLOCK=_BLOCK, enable_fp_fusion=False)
            gt_best = block_best.amax(dim=2)
        _match_kernel[grid](anchors, gt_boxes, gt_counts, gt_best, out, anchors_per_set, anchor_set_stride, num_gt,
                            HIGH=float(high_threshold), LOW=float(low_threshold),
                            LOW_QUALITY=allow_low_quality_matches, DIV_RN=div_rn, BLOCK=_BLOCK,
                            enable_fp_fusion=False)
    return out
