"""Triton kernels of NMS: the suppression bitmask (the stage fastbb_C::nms_iou_mask computes in C++/CUDA)
and its greedy scan (fastbb_C::nms_reduce_mask), so the Triton path never waits for the host.

Mask: one program per 64 x 64 tile on or above the diagonal (flattened with the image index on grid
x): bit j of word `col_tile` of row i is set when box i suppresses box col_tile * 64 + j (j > i, both
rows valid, equal labels, IoU > threshold). Tiles of padding rows or padding columns are written as
zeros. Words below the diagonal (word w of row i with w < i // 64) are never written and never read:
their contents are unspecified. The IoU follows torchvision's operation order in float32 (float64 for
float64 boxes) with a correctly rounded division and no fused multiply-add, so the bits equal the C++
kernel's.

Reduce: one program per image, word by word: the word's 64 rows are resolved in order from the diagonal
word (a row is kept unless an earlier kept row or an earlier word removed it), then the rows kept there
OR their later words into the image's removed-bits row in global scratch.
"""
import struct

import torch
import triton
import triton.language as tl

from fastbb.kernels._common import INTERPRET, check_grid, on_device

TILE = 64
# Later words ORed per step of the reduce: one 64 x 64 int64 tile on the GPU; under the interpreter
# (where tl.reduce with a custom combine runs element by element in Python) a narrow one.
_REDUCE_BLOCK_WORDS = 8 if INTERPRET else 64


@triton.jit
def _upper_tile(tile, words, tiles):
    """(row_tile, col_tile) of the tile-th tile (int64, row by row) on or above the diagonal of a
    words x words grid of tiles, which holds tiles = words * (words + 1) / 2 of them."""
    # Counted from the last tile backwards, the last r + 1 tile rows hold (r + 1)(r + 2) / 2 tiles; the
    # tile row is the inverse of that triangular number: a float64 estimate, corrected by one either way.
    back = tiles - 1 - tile
    r = ((tl.sqrt((8 * back + 1).to(tl.float64)) - 1.0) * 0.5).to(tl.int64)
    r = tl.where((r + 1) * (r + 2) // 2 <= back, r + 1, r)
    r = tl.where(r * (r + 1) // 2 > back, r - 1, r)
    return words - 1 - r, words - 1 - (back - r * (r + 1) // 2)


@triton.jit
def _iou_mask_kernel(boxes_ptr, labels_ptr, counts_ptr, mask_ptr, rows, words, tiles_per_image, threshold_bits,
                     HAS_LABELS: tl.constexpr, DOUBLE: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    image = program // tiles_per_image
    row_tile, col_tile = _upper_tile(program - image * tiles_per_image, words, tiles_per_image)
    lanes = tl.arange(0, 64)
    row_index = row_tile * 64 + lanes
    col_index = col_tile * 64 + lanes
    count = tl.load(counts_ptr + image)
    out_ptrs = mask_ptr + (image * rows + row_index) * words + col_tile
    in_rows = row_index < rows

    if (row_tile * 64 >= count) | (col_tile * 64 >= count):
        tl.store(out_ptrs, tl.zeros([64], dtype=tl.int64), mask=in_rows)
    else:
        compute = tl.float64 if DOUBLE else tl.float32
        if DOUBLE:
            threshold = tl.full([1], threshold_bits, tl.int64).to(tl.float64, bitcast=True)
        else:
            threshold = tl.full([1], threshold_bits, tl.int32).to(tl.float32, bitcast=True)
        row_valid = row_index < count
        col_valid = col_index < count
        row_base = boxes_ptr + (image * rows + row_index) * 4
        col_base = boxes_ptr + (image * rows + col_index) * 4
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


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _reduce_mask_kernel(mask_ptr, counts_ptr, removed_ptr, keep_ptr, rows, words, BLOCK_WORDS: tl.constexpr):
    image = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, 64)
    word_lanes = tl.arange(0, BLOCK_WORDS)
    count = tl.load(counts_ptr + image)
    used_words = (count + 63) // 64
    image_mask = mask_ptr + image * rows * words
    removed_row = removed_ptr + image * words
    keep_row = keep_ptr + image * rows
    one = tl.full([], 1, tl.int64)
    for w in range(0, used_words):
        base = w * 64  # int64: the loop bound used_words is
        rows_here = tl.minimum(count - base, 64)
        # The scratch row is written by other threads of this program: read it from L2 (.cg), after the
        # barrier that ends the previous word.
        gone = tl.load(removed_row + w, cache_modifier=".cg")
        kept = tl.full([], 0, tl.int64)
        # Unrolled, so the 64 loads of the diagonal word do not wait on the scan.
        for j in tl.static_range(64):
            suppressed_by_j = tl.load(image_mask + (base + j) * words + w, mask=j < rows_here, other=0)
            alive = (((gone >> j) & 1) == 0) & (j < rows_here)
            kept = tl.where(alive, kept | (one << j), kept)
            gone = tl.where(alive, gone | suppressed_by_j, gone)
        kept_lanes = ((kept >> lanes.to(tl.int64)) & 1) != 0
        tl.store(keep_row + base + lanes, kept_lanes.to(tl.uint8), mask=lanes < rows_here)
        row_ptrs = image_mask + (base + lanes) * words
        for first in range(w + 1, used_words, BLOCK_WORDS):
            cols = first + word_lanes
            in_use = cols < used_words
            # Only the kept rows' words are read: every other row's load is masked off.
            later = tl.load(row_ptrs[:, None] + cols[None, :], mask=kept_lanes[:, None] & in_use[None, :], other=0)
            removed = tl.load(removed_row + cols, mask=in_use, other=0, cache_modifier=".cg")
            tl.store(removed_row + cols, removed | tl.reduce(later, 0, _bit_or), mask=in_use)
        tl.debug_barrier()


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


def upper_tiles(words):
    """Number of 64 x 64 tiles on or above the diagonal of the mask of ceil(M / 64) = words words."""
    return words * (words + 1) // 2


def iou_mask(boxes, labels, valid_counts, iou_threshold):
    """Suppression bitmask int64 (B, M, ceil(M / 64)) of boxes (B, M, 4) in rank order per image; only the
    words on or above the diagonal are written (see the module docstring).

    labels: (B, M) int64 or None (all equal); valid_counts: (B,) integer, rows at or past it are padding.
    """
    batch, rows = boxes.shape[:2]
    words = triton.cdiv(rows, TILE)
    mask = torch.empty((batch, rows, words), dtype=torch.int64, device=boxes.device)
    if mask.numel() == 0:
        return mask
    tiles_per_image = upper_tiles(words)
    grid = check_grid("fastbb.nms_iou_mask", (tiles_per_image * batch,), boxes.shape)
    double = boxes.dtype == torch.float64
    counts = valid_counts.to(torch.int64).clamp(0, rows).contiguous()
    boxes = boxes.contiguous()
    labels_arg = labels.to(torch.int64).contiguous() if labels is not None else counts
    # A 64 x 64 tile of IoUs is 32 values per thread with 4 warps: 220-255 registers in float32 and
    # kilobytes of spills in float64 (tests/triton_compile.py); 8 warps halve that.
    launch = {"num_warps": 8} if boxes.device.type == "cpu" else {"enable_fp_fusion": False, "num_warps": 8}
    with on_device(boxes):
        _iou_mask_kernel[grid](
            boxes, labels_arg, counts, mask, rows, words, tiles_per_image,
            _threshold_bits(float(iou_threshold), double), HAS_LABELS=labels is not None, DOUBLE=double, **launch)
    return mask


def reduce_mask(mask, valid_counts, *, block_words=None):
    """keep (B, M) bool: the greedy scan of a suppression bitmask (B, M, ceil(M / 64)) over the first
    valid_counts[b] rows of each image. Reads only the words on or above the diagonal; no host
    synchronisation. block_words (a power of two) overrides how many later words one step ORs.
    """
    batch, rows, words = mask.shape
    if words != triton.cdiv(rows, TILE):
        raise ValueError(f"fastbb.nms_reduce_mask: mask must have shape (B, M, ceil(M / 64)), got {tuple(mask.shape)}")
    keep = torch.zeros((batch, rows), dtype=torch.bool, device=mask.device)
    if keep.numel() == 0:
        return keep
    block_words = block_words or _REDUCE_BLOCK_WORDS
    if block_words & (block_words - 1):
        raise ValueError(f"fastbb.nms_reduce_mask: block_words must be a power of two, got {block_words}")
    grid = check_grid("fastbb.nms_reduce_mask", (batch,), mask.shape)
    mask = mask.contiguous()
    counts = valid_counts.to(torch.int64).clamp(0, rows).contiguous()
    removed = torch.zeros((batch, words), dtype=torch.int64, device=mask.device)
    with on_device(mask):
        _reduce_mask_kernel[grid](mask, counts, removed, keep.view(torch.uint8), rows, words,
                                  BLOCK_WORDS=block_words)
    return keep
