"""Non-maximum suppression: nms, batched_nms (torchvision semantics) and nms_sorted_padded (fixed shapes).

Semantics (torchvision.ops.nms, checked against its CPU kernel):
- boxes (N, 4) are x1y1x2y2. Boxes are ranked by a stable descending sort of the scores (ties: lower
  index first; NaN scores rank first, as torch.sort(descending=True, stable=True) puts them).
- In rank order, a box is kept unless its IoU with an already kept box is > iou_threshold (a box exactly
  at the threshold is kept). The result holds the kept indices (int64) in rank order.
- IoU, in float32 for float16/bfloat16 boxes and in the box dtype otherwise, with torchvision's
  operation order: area = (x2 - x1) * (y2 - y1); w = max(0, min(x2a, x2b) - max(x1a, x1b)), h alike;
  inter = w * h; iou = inter / (area_a + area_b - inter), compared with the threshold in float64. float32
  results therefore match torchvision bit for bit.
- Degenerate boxes: a box without x2 > x1 and y2 > y1 (zero-area, inverted, or with a NaN coordinate)
  has no positive intersection with anything, so its IoU is 0 or NaN: it is never suppressed and never
  suppresses (it is kept), exactly as in torchvision. NaN scores rank first and are otherwise ordinary.

batched_nms runs NMS independently per value of idxs with the exact per-class IoU (no coordinate-offset
trick, which changes rounding and breaks with negative coordinates); the result is in rank order.

nms_sorted_padded(boxes (B, M, 4), labels (B, M), valid_counts (B,), iou_threshold) -> keep (B, M) bool
is the fixed-shape form for batched post-processing: rows are already in rank order per image, NMS acts
only between equal labels, rows >= valid_counts[b] are padding (never kept, never suppress). It does not
synchronise the host and can be captured in a CUDA graph on the cuda and triton backends.

Backends (NMS_TABLE, BATCHED_NMS_TABLE, NMS_SORTED_PADDED_TABLE): cpu "cpp" (greedy pass with a
spatial grid: only kept boxes a candidate can overlap are tested); cuda "cuda" (64x64-tile IoU bitmask +
greedy reduction of the mask on the device) and "triton" (the bitmask and its greedy reduction in Triton;
the compiled CUDA reduction instead when it is built); "reference" everywhere.
"""
import math

import torch

from fastbb._tracing import fx_leaf
from fastbb import _backend
from fastbb.ops._common import (FLOAT_DTYPES, ValueRuntimeError, autocast_cast, check_float, check_same_device,
                                check_tensor, compute_dtype, kernel_lib, register_autocast_rule)

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Compiled kernels. nms: kept indices in rank order (idxs, when given, separates classes).
# nms_iou_mask: int64 (B, M, ceil(M / 64)); bit j of word w of row i is set when box i suppresses box
# w * 64 + j: j > i, equal labels (when given), both rows < valid_counts, IoU > threshold. Only the words on
# or above the diagonal (w >= i // 64) are specified; the others hold nothing of use (the GPU kernels
# leave them unwritten), and no reduction reads them.
# nms_reduce_mask: the greedy scan of that mask -> keep (B, M) bool.
kernel_lib.define("nms(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold) -> Tensor")
kernel_lib.define("nms_sorted_padded(Tensor boxes, Tensor labels, Tensor valid_counts, float iou_threshold) -> Tensor")
kernel_lib.define("nms_iou_mask(Tensor boxes, Tensor? labels, Tensor valid_counts, float iou_threshold) -> Tensor")
kernel_lib.define("nms_reduce_mask(Tensor mask, Tensor valid_counts) -> Tensor")


@torch.library.register_fake("fastbb_C::nms", lib=kernel_lib)
def _(boxes, scores, idxs, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@torch.library.register_fake("fastbb_C::nms_sorted_padded", lib=kernel_lib)
def _(boxes, labels, valid_counts, iou_threshold):
    return boxes.new_empty(boxes.shape[:2], dtype=torch.bool)


@torch.library.register_fake("fastbb_C::nms_iou_mask", lib=kernel_lib)
def _(boxes, labels, valid_counts, iou_threshold):
    return boxes.new_empty((boxes.shape[0], boxes.shape[1], (boxes.shape[1] + 63) // 64), dtype=torch.int64)


@torch.library.register_fake("fastbb_C::nms_reduce_mask", lib=kernel_lib)
def _(mask, valid_counts):
    return mask.new_empty(mask.shape[:2], dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, the ground truth)
# ---------------------------------------------------------------------------------------------------

def _iou_above(a, b, iou_threshold):
    """(P, Q) bool: IoU(a[p], b[q]) > iou_threshold, computed as torchvision computes it."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = w * h
    iou = inter / (area_a[:, None] + area_b[None, :] - inter)
    return iou.double() > iou_threshold  # float64 comparison, as torchvision's C++ compares


def _greedy_keep(ranked_boxes, iou_threshold, block=512):
    """Greedy NMS of boxes already in rank order (compute dtype) -> keep (N,) bool.

    Works block by block so memory stays O(N * block): a block is first cleared against every box kept
    before it, then resolved greedily within itself.
    """
    n = ranked_boxes.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=ranked_boxes.device)
    for start in range(0, n, block):
        stop = min(n, start + block)
        chunk = ranked_boxes[start:stop]
        alive = torch.ones(stop - start, dtype=torch.bool, device=ranked_boxes.device)
        kept_before = ranked_boxes[:start][keep[:start]]
        if kept_before.shape[0]:
            alive &= ~_iou_above(kept_before, chunk, iou_threshold).any(0)
        suppresses = _iou_above(chunk, chunk, iou_threshold).triu(1)
        for i in range(stop - start):
            if alive[i]:
                alive &= ~suppresses[i]
        keep[start:stop] = alive
    return keep


def _greedy_keep_per_label(ranked_boxes, ranked_labels, iou_threshold):
    keep = torch.zeros(ranked_boxes.shape[0], dtype=torch.bool, device=ranked_boxes.device)
    for label in torch.unique(ranked_labels):
        members = torch.nonzero(ranked_labels == label).squeeze(1)  # still in rank order
        keep[members] = _greedy_keep(ranked_boxes[members], iou_threshold)
    return keep


def _rank(scores):
    return torch.sort(scores, descending=True, stable=True).indices


def _nms_greedy(boxes, scores, idxs, iou_threshold):
    """The reference implementation of nms (idxs None) and batched_nms, on checked inputs."""
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    order = _rank(scores)
    ranked_boxes = boxes[order].to(compute_dtype(boxes.dtype))
    if idxs is None:
        return order[_greedy_keep(ranked_boxes, iou_threshold)]
    return order[_greedy_keep_per_label(ranked_boxes, idxs[order], iou_threshold)]


def _nms_sorted_padded_greedy(boxes, labels, valid_counts, iou_threshold):
    """The reference implementation of nms_sorted_padded, on checked inputs."""
    batch, rows = labels.shape
    keep = torch.zeros((batch, rows), dtype=torch.bool, device=boxes.device)
    for image in range(batch):
        n = int(valid_counts[image].clamp(0, rows))
        ranked_boxes = boxes[image, :n].to(compute_dtype(boxes.dtype))
        keep[image, :n] = _greedy_keep_per_label(ranked_boxes, labels[image, :n], iou_threshold)
    return keep


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`nms` in plain PyTorch (the ground truth): same arguments, checks and result."""
    iou_threshold = _check_nms_inputs("fastbb.nms_reference", boxes, scores, None, iou_threshold)
    return _nms_greedy(boxes, scores, None, iou_threshold)


def batched_nms_reference(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                          iou_threshold: float) -> torch.Tensor:
    """:func:`batched_nms` in plain PyTorch (the ground truth): same arguments, checks and result."""
    iou_threshold = _check_nms_inputs("fastbb.batched_nms_reference", boxes, scores, idxs, iou_threshold)
    return _nms_greedy(boxes, scores, _class_indices(idxs), iou_threshold)


def nms_sorted_padded_reference(boxes: torch.Tensor, labels: torch.Tensor, valid_counts: torch.Tensor,
                                iou_threshold: float) -> torch.Tensor:
    """:func:`nms_sorted_padded` in plain PyTorch (the ground truth): same arguments, checks and result."""
    iou_threshold = _check_padded_inputs("fastbb.nms_sorted_padded_reference", boxes, labels, valid_counts,
                                         iou_threshold)
    return _nms_sorted_padded_greedy(boxes, labels, valid_counts, iou_threshold)


def _iou_mask_reference(boxes, labels, valid_counts, iou_threshold):
    """The suppression bitmask of nms_iou_mask in plain PyTorch (for tests and as documentation); words
    below the diagonal, unspecified in the kernels' masks, are zero here."""
    batch, rows = boxes.shape[:2]
    words = (rows + 63) // 64
    b = boxes.to(compute_dtype(boxes.dtype))
    index = torch.arange(rows, device=boxes.device)
    bits = torch.zeros((batch, rows, words * 64), dtype=torch.bool, device=boxes.device)
    for image in range(batch):
        suppress = _iou_above(b[image], b[image], iou_threshold) & (index[None, :] > index[:, None])
        valid = index < valid_counts[image]
        suppress &= valid[:, None] & valid[None, :]
        if labels is not None:
            suppress &= labels[image][:, None] == labels[image][None, :]
        bits[image, :, :rows] = suppress
    shifts = torch.arange(64, device=boxes.device, dtype=torch.int64)
    return (bits.view(batch, rows, words, 64).long() << shifts).sum(-1)


def _upper_words(rows, words, device=None):
    """(M, W) bool: the words on or above the diagonal of a suppression bitmask (the specified ones)."""
    return torch.arange(words, device=device)[None, :] >= torch.arange(rows, device=device)[:, None] // 64


def _reduce_mask_reference(mask, valid_counts):
    """Greedy scan of a suppression bitmask in plain Python (the ground truth of nms_reduce_mask): row i,
    when kept, ORs only its words from i // 64 on into the removed bits."""
    batch, rows, words = mask.shape
    keep = torch.zeros((batch, rows), dtype=torch.bool)
    counts = valid_counts.clamp(0, rows).tolist()
    for image, rows_of_image in enumerate(mask.tolist()):
        removed = [0] * words
        for i in range(counts[image]):
            word, bit = divmod(i, 64)
            if (removed[word] >> bit) & 1:
                continue
            keep[image, i] = True
            removed[word:] = [r | m for r, m in zip(removed[word:], rows_of_image[i][word:])]
    return keep.to(mask.device)


# ---------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------

def _compiled_reduce_usable(mask):
    """Whether the Triton path reduces `mask` with the compiled CUDA kernel (built and a CUDA tensor)."""
    return mask.is_cuda and _backend.has_kernel("fastbb_C::nms_reduce_mask", "CUDA")


def _padded_triton(boxes, labels, valid_counts, iou_threshold):
    """Bitmask and greedy scan on the device, neither waiting for the host: the Triton reduction unless
    the compiled CUDA one is built (CPU tensors, under the interpreter: always the Triton one)."""
    from fastbb.kernels import nms as nms_kernels

    mask = nms_kernels.iou_mask(boxes, labels, valid_counts, iou_threshold)
    if _compiled_reduce_usable(mask):
        return torch.ops.fastbb_C.nms_reduce_mask(mask, valid_counts)
    return nms_kernels.reduce_mask(mask, valid_counts)


def _nms_triton(boxes, scores, idxs, iou_threshold):
    """Sort, lay the boxes out as one padded image (grouped by class), bitmask, reduce, back to ranks."""
    n = boxes.shape[0]
    if n == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    ranked = _rank(scores)
    order, labels = ranked, None
    if idxs is not None:
        # Grouping by class keeps the rank order within a class and lets whole tiles of two different
        # classes be skipped; the greedy result per class does not depend on how classes interleave.
        order = ranked[torch.sort(idxs[ranked], stable=True).indices]
        labels = idxs[order][None]
    counts = torch.full((1,), n, dtype=torch.int64, device=boxes.device)
    keep_in_order = _padded_triton(boxes[order][None], labels, counts, iou_threshold)[0]
    if idxs is None:
        return order[keep_in_order]
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep[order] = keep_in_order
    return ranked[keep[ranked]]


def _nms_compiled(boxes, scores, idxs, iou_threshold):
    return torch.ops.fastbb_C.nms(boxes, scores, idxs, iou_threshold)


def _padded_compiled(boxes, labels, valid_counts, iou_threshold):
    return torch.ops.fastbb_C.nms_sorted_padded(boxes, labels, valid_counts, iou_threshold)


def _nms_implementations():
    """nms and batched_nms share their implementations (idxs None for nms): each takes (boxes, scores,
    idxs, iou_threshold) and returns the kept indices in rank order."""
    return [
        _backend.Implementation("cuda", _nms_compiled, devices=("cuda",), kernel="fastbb_C::nms",
                                what="sort, 64x64-tile IoU bitmask and its greedy reduction in CUDA, on the "
                                     "device; one host synchronisation for the result's size"),
        _backend.Implementation("triton", _nms_triton, devices=("cuda",),
                                what="sort, the IoU bitmask and its greedy reduction in Triton (the reduction "
                                     "by the compiled CUDA kernel when it is built)"),
        _backend.Implementation("cpp", _nms_compiled, devices=("cpu",), kernel="fastbb_C::nms",
                                what="one greedy C++ pass with a spatial grid: only the kept boxes a candidate "
                                     "can overlap are tested"),
        _backend.Implementation("reference", _nms_greedy,
                                what="plain PyTorch: stable sort, then greedy suppression block by block"),
    ]


_AUTOCAST = ("boxes and scores cast to float32 (float64 stays float64), as torchvision's autocast kernel for nms "
             "casts them: IoU in float32; the int64 / bool result as without autocast")
NMS_TABLE = _backend.OpTable("nms", _nms_implementations(), autocast=_AUTOCAST)
BATCHED_NMS_TABLE = _backend.OpTable("batched_nms", _nms_implementations(), autocast=_AUTOCAST)

# Each takes (boxes, labels, valid_counts, iou_threshold) and returns keep (B, M) bool.
NMS_SORTED_PADDED_TABLE = _backend.OpTable("nms_sorted_padded", [
    _backend.Implementation("cuda", _padded_compiled, devices=("cuda",),
                            kernel="fastbb_C::nms_sorted_padded",
                            what="64x64-tile IoU bitmask per image in CUDA, then its greedy reduction on the "
                                 "device; no host synchronisation"),
    _backend.Implementation("triton", _padded_triton, devices=("cuda",),
                            what="the IoU bitmask and its greedy reduction in Triton (the reduction by the "
                                 "compiled CUDA kernel when it is built); no host synchronisation"),
    _backend.Implementation("cpp", _padded_compiled, devices=("cpu",), kernel="fastbb_C::nms_sorted_padded",
                            what="nms's greedy C++ pass with a spatial grid, per image (OpenMP over images)"),
    _backend.Implementation("reference", _nms_sorted_padded_greedy,
                            what="plain PyTorch: greedy suppression per image and label"),
], autocast=_AUTOCAST)


@torch.library.custom_op("fastbb::nms", mutates_args=())
def _nms_op(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    return NMS_TABLE(boxes.device.type, boxes, scores, None, iou_threshold)


@_nms_op.register_fake
def _(boxes, scores, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@torch.library.custom_op("fastbb::batched_nms", mutates_args=())
def _batched_nms_op(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                    iou_threshold: float) -> torch.Tensor:
    return BATCHED_NMS_TABLE(boxes.device.type, boxes, scores, idxs, iou_threshold)


@_batched_nms_op.register_fake
def _(boxes, scores, idxs, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@torch.library.custom_op("fastbb::nms_sorted_padded", mutates_args=())
def _nms_sorted_padded_op(boxes: torch.Tensor, labels: torch.Tensor, valid_counts: torch.Tensor,
                          iou_threshold: float) -> torch.Tensor:
    return NMS_SORTED_PADDED_TABLE(boxes.device.type, boxes, labels, valid_counts, iou_threshold)


@_nms_sorted_padded_op.register_fake
def _(boxes, labels, valid_counts, iou_threshold):
    return boxes.new_empty(labels.shape, dtype=torch.bool)


def _boxes_and_scores_to_float32(device_type, args):
    """The autocast rule of the three ops: their floating inputs (boxes, and scores) to float32."""
    return tuple(autocast_cast(a, device_type, torch.float32) for a in args)


register_autocast_rule("nms", _boxes_and_scores_to_float32)
register_autocast_rule("batched_nms", _boxes_and_scores_to_float32)
register_autocast_rule("nms_sorted_padded", _boxes_and_scores_to_float32)


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------

def _check_nms_inputs(op, boxes, scores, idxs, iou_threshold):
    check_tensor(op, "boxes", boxes, ndim=2, last_dim=4, dtypes=FLOAT_DTYPES)
    check_tensor(op, "scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueRuntimeError(f"{op}: scores must have shape (N,) with N = boxes.shape[0] = {boxes.shape[0]}, "
                                f"got {tuple(scores.shape)}")
    tensors = {"boxes": boxes, "scores": scores}
    if idxs is not None:
        check_tensor(op, "idxs", idxs, ndim=1, dtypes=_INT_DTYPES + (torch.bool,) + FLOAT_DTYPES)
        if idxs.shape[0] != boxes.shape[0]:
            raise ValueRuntimeError(f"{op}: idxs must have shape (N,) with N = boxes.shape[0] = "
                                    f"{boxes.shape[0]}, got {tuple(idxs.shape)}")
        tensors["idxs"] = idxs
    check_same_device(op, **tensors)
    return _any_threshold(op, iou_threshold)


def _any_threshold(op, iou_threshold):
    """nms / batched_nms take any float threshold, as torchvision's do (IoU > threshold suppresses). An IoU
    is at most 1 (or NaN for empty boxes), so every threshold above 1, +inf and NaN suppress nothing, exactly
    as 1 does: those become 1. Negative thresholds (suppress every overlap, even of disjoint boxes) stay as
    they are: nms and batched_nms run their reference for them (the kernels take [0, 1])."""
    iou_threshold = check_float(op, "iou_threshold", iou_threshold, allow_nonfinite=True)
    return 1.0 if math.isnan(iou_threshold) or iou_threshold > 1.0 else iou_threshold


def _class_indices(idxs):
    """batched_nms's categories as int64: integer and bool idxs as they are; floating idxs, which torchvision
    also takes (each value one category), by the rank of their value."""
    if idxs.is_floating_point():
        return torch.unique(idxs, return_inverse=True)[1]
    return idxs.to(torch.int64)


def _check_padded_inputs(op, boxes, labels, valid_counts, iou_threshold):
    check_tensor(op, "boxes", boxes, ndim=3, last_dim=4, dtypes=FLOAT_DTYPES)
    check_tensor(op, "labels", labels, ndim=2, dtypes=_INT_DTYPES)
    check_tensor(op, "valid_counts", valid_counts, ndim=1, dtypes=_INT_DTYPES)
    if tuple(labels.shape) != tuple(boxes.shape[:2]):
        raise ValueRuntimeError(f"{op}: labels must have shape (B, M) = {tuple(boxes.shape[:2])}, "
                                f"got {tuple(labels.shape)}")
    if valid_counts.shape[0] != boxes.shape[0]:
        raise ValueRuntimeError(f"{op}: valid_counts must have shape (B,) = ({boxes.shape[0]},), "
                                f"got {tuple(valid_counts.shape)}")
    check_same_device(op, boxes=boxes, labels=labels, valid_counts=valid_counts)
    return check_float(op, "iou_threshold", iou_threshold, 0.0, 1.0)


def _nms_scripted(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """nms under TorchScript: the custom op, without the Python input checks TorchScript cannot compile."""
    return torch.ops.fastbb.nms(boxes, scores, iou_threshold)


@fx_leaf("fastbb.ops.nms", scripted=_nms_scripted)
def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """
    Performs non-maximum suppression (NMS) on the boxes according to their intersection-over-union (IoU),
    as torchvision.ops.nms.

    NMS iteratively removes lower scoring boxes which have an IoU greater than ``iou_threshold`` with
    another (higher scoring) box. Boxes of equal score rank by lower index first, on every backend and
    device (see the module docstring for NaN scores and degenerate boxes).

    Args:
        boxes (Tensor[N, 4]): boxes to perform NMS on, in ``(x1, y1, x2, y2)`` format; float16, bfloat16,
            float32 or float64.
        scores (Tensor[N]): scores for each one of the boxes, floating point.
        iou_threshold (float): discards all overlapping boxes with IoU > iou_threshold (any float, as
            torchvision's: above 1, or NaN, suppresses nothing; below 0, every overlap, even of disjoint boxes).

    Returns:
        Tensor: int64 tensor with the indices of the elements that have been kept by NMS, sorted in
        decreasing order of scores.
    """
    iou_threshold = _check_nms_inputs("fastbb.nms", boxes, scores, None, iou_threshold)
    if iou_threshold < 0.0:  # every kernel takes [0, 1]; the reference compares as torchvision does
        return _nms_greedy(boxes, scores, None, iou_threshold)
    return torch.ops.fastbb.nms(boxes, scores, iou_threshold)


def _batched_nms_scripted(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                          iou_threshold: float) -> torch.Tensor:
    """batched_nms under TorchScript: the custom op, without the Python input checks."""
    return torch.ops.fastbb.batched_nms(boxes, scores, idxs.to(torch.int64), iou_threshold)


@fx_leaf("fastbb.ops.batched_nms", scripted=_batched_nms_scripted)
def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """
    Performs non-maximum suppression in a batched fashion, as torchvision.ops.batched_nms.

    Each index value corresponds to a category, and NMS will not be applied between elements of
    different categories. The IoU is the exact per-category one (no coordinate-offset trick, which
    changes rounding and breaks with negative coordinates).

    Args:
        boxes (Tensor[N, 4]): boxes where NMS will be performed, in ``(x1, y1, x2, y2)`` format; float16,
            bfloat16, float32 or float64.
        scores (Tensor[N]): scores for each one of the boxes, floating point.
        idxs (Tensor[N]): indices of the categories for each one of the boxes: integer (any values), bool or
            floating (each value one category), as torchvision takes them.
        iou_threshold (float): discards all overlapping boxes with IoU > iou_threshold (any float, as
            torchvision's: above 1, or NaN, suppresses nothing; below 0, every overlap).

    Returns:
        Tensor: int64 tensor with the indices of the elements that have been kept by NMS, sorted in
        decreasing order of scores (equal scores: lower index first). Boxes with no elements, of any
        dtype, give an empty int64 tensor on their device without further checks, as torchvision's.
    """
    if isinstance(boxes, torch.Tensor) and boxes.numel() == 0:
        # As torchvision's batched_nms: no boxes, no checks of the rest, an empty int64 result.
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    iou_threshold = _check_nms_inputs("fastbb.batched_nms", boxes, scores, idxs, iou_threshold)
    if iou_threshold < 0.0:  # every kernel takes [0, 1]; the reference compares as torchvision does
        return _nms_greedy(boxes, scores, _class_indices(idxs), iou_threshold)
    return torch.ops.fastbb.batched_nms(boxes, scores, _class_indices(idxs), iou_threshold)


@fx_leaf("fastbb.ops.nms_sorted_padded")
def nms_sorted_padded(boxes: torch.Tensor, labels: torch.Tensor, valid_counts: torch.Tensor,
                      iou_threshold: float) -> torch.Tensor:
    """
    Performs per-image, per-label NMS of boxes already sorted by decreasing score, with fixed shapes.

    Rows ``>= valid_counts[b]`` of image b are padding: never kept and never suppressing. No host
    synchronisation on CUDA (the op can be captured in a CUDA graph).

    Args:
        boxes (Tensor[B, M, 4]): per image, boxes in ``(x1, y1, x2, y2)`` format in rank order; float16,
            bfloat16, float32 or float64.
        labels (Tensor[B, M]): integer labels; NMS acts only between boxes of equal label.
        valid_counts (Tensor[B]): integer number of real rows of each image.
        iou_threshold (float): discards all overlapping boxes with IoU > iou_threshold; in [0, 1].

    Returns:
        Tensor: bool tensor (B, M), True for the rows kept.
    """
    iou_threshold = _check_padded_inputs("fastbb.nms_sorted_padded", boxes, labels, valid_counts, iou_threshold)
    return torch.ops.fastbb.nms_sorted_padded(boxes, labels.to(torch.int64), valid_counts.to(torch.int64),
                                              iou_threshold)
