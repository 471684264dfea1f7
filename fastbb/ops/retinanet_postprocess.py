"""retinanet_postprocess: torchvision RetinaNet's postprocess_detections for a whole batch at once.

Semantics (torchvision.models.detection.RetinaNet.postprocess_detections, per image and per level):
sigmoid of the logits, flattened anchor-major / class-minor; keep the scores > score_thresh (compared in
the logits' dtype, as torch compares); the top min(topk_candidates, n) of them; anchor = index // K,
label = index % K; decode those anchors with the BoxCoder weights (dw, dh <= log(1000/16)) and clip to the
image. Then, per image over all levels, NMS per label with nms_thresh, and the first detections_per_img.

Ties: torchvision's topk and its per-class batched_nms order equal scores arbitrarily. fastbb defines the
order: score descending, ties by lower (level, flattened index) first; every backend follows it, so they
agree exactly with each other and with torchvision up to the order of equal scores.

Backends of the padded op fastbb::retinanet_postprocess_padded (TABLE):
- cpu "cpp": per image and level (OpenMP), one pass over the logits that rejects a logit below
  logit(score_thresh) minus a guard band without computing its sigmoid, a partial sort for the top-k,
  decode + clip of the selected boxes, then NMS per label.
- cuda "cuda" and "triton": the batched path below, a PyTorch composition of fastbb ops (decode_boxes,
  nms_sorted_padded) with fixed shapes and no host synchronisation (CUDA-graph capturable). The inner ops
  dispatch on their own tables: "cuda" is this path when their CUDA kernels are built; "triton" is the
  same path, whose inner ops then run Triton when it is forced. Its top-k is segmented over every
  (image, level) at once: one topk over fixed-length chunks of every level, one over each level's
  chunk winners; no loop over levels or images.
- "reference": the per-image, per-level loops of retinanet_postprocess_reference.
"""
import functools
import math
from collections.abc import Sequence

import torch

from fastbb._tracing import fx_leaf
from fastbb import _backend
from fastbb.ops._common import (FLOAT_DTYPES, check_float, check_same_device, check_tensor, kernel_lib,
                                register_autocast_rule)
from fastbb.ops.box_decode import decode_autocast_args, decode_boxes, decode_boxes_reference
from fastbb.ops.nms import batched_nms_reference, nms_sorted_padded

_OP = "fastbb.retinanet_postprocess"  # how error messages name the op

# Padded result: boxes (N, D, 4), scores (N, D), labels (N, D) int64, counts (N,) int64; rows >= counts[n]
# are zero. image_sizes: (N, 2) int64 (h, w) on the CPU.
kernel_lib.define(
    "retinanet_postprocess(Tensor cls_logits, Tensor bbox_regression, Tensor[] anchors, "
    "int[] num_anchors_per_level, Tensor image_sizes, float score_thresh, float nms_thresh, "
    "int detections_per_img, int topk_candidates, float[] box_coder_weights) -> (Tensor, Tensor, Tensor, Tensor)")


def _padded_outputs(like_boxes, like_scores, num_images, detections_per_img):
    boxes = like_boxes.new_zeros((num_images, detections_per_img, 4))
    scores = like_scores.new_zeros((num_images, detections_per_img))
    labels = like_scores.new_zeros((num_images, detections_per_img), dtype=torch.int64)
    counts = like_scores.new_zeros((num_images,), dtype=torch.int64)
    return boxes, scores, labels, counts


@torch.library.register_fake("fastbb_C::retinanet_postprocess", lib=kernel_lib)
def _(cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes, score_thresh, nms_thresh,
      detections_per_img, topk_candidates, box_coder_weights):
    return _padded_outputs(bbox_regression, cls_logits, cls_logits.shape[0], detections_per_img)


# ---------------------------------------------------------------------------------------------------
# Reference (plain PyTorch, the ground truth)
# ---------------------------------------------------------------------------------------------------

def _reference_per_image(cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes,
                         score_thresh, nms_thresh, detections_per_img, topk_candidates, box_coder_weights):
    num_classes = cls_logits.shape[-1]
    detections = []
    for image, (height, width) in enumerate(image_sizes):
        image_boxes, image_scores, image_labels = [], [], []
        start = 0
        for count in num_anchors_per_level:
            level = slice(start, start + count)
            start += count
            scores = torch.sigmoid(cls_logits[image, level]).flatten()
            flat_index = torch.nonzero(scores > score_thresh).squeeze(1)
            scores = scores[flat_index]
            # fastbb's order: score descending, ties by lower flattened index.
            top = torch.sort(scores, descending=True, stable=True).indices[:topk_candidates]
            scores, flat_index = scores[top], flat_index[top]
            anchor_index = torch.div(flat_index, num_classes, rounding_mode="floor")
            boxes = decode_boxes_reference(
                anchors[image][level][anchor_index], bbox_regression[image, level][anchor_index],
                style="torchvision", weights=box_coder_weights, max_shape=(height, width))
            image_boxes.append(boxes)
            image_scores.append(scores)
            image_labels.append(flat_index % num_classes)
        boxes, scores, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
        keep = batched_nms_reference(boxes, scores, labels, nms_thresh)[:detections_per_img]
        detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return detections


def _pad(detections, like_boxes, like_scores, detections_per_img):
    boxes, scores, labels, counts = _padded_outputs(like_boxes, like_scores, len(detections), detections_per_img)
    for image, found in enumerate(detections):
        n = found["scores"].shape[0]
        boxes[image, :n] = found["boxes"]
        scores[image, :n] = found["scores"]
        labels[image, :n] = found["labels"]
        counts[image] = n
    return boxes, scores, labels, counts


# ---------------------------------------------------------------------------------------------------
# Batched path: fixed shapes, no host synchronisation, any device
# ---------------------------------------------------------------------------------------------------

_INDEX_BITS = 32  # the low bits of a selection key hold the (reversed) flattened index
# Longest row of the first top-k stage. A level's flattened (anchor, class) scores are cut into rows of
# at most this many elements, so one topk call serves every level of every image.
_MAX_CHUNK = 1 << 18


@functools.lru_cache(maxsize=16)
def _level_layout(level_sizes, topk_candidates, device, max_chunk):
    """The two-stage top-k's layout for levels of (flattened) sizes level_sizes, shared by all images.

    Stage 1 cuts every level into rows of `chunk` elements (the last one of a level padded):
    chunk_start / chunk_length (chunks,) give each row's first flattened index in the image and its
    number of real elements. Stage 2 gathers the chunk_k winners of each row into one padded row per
    level: level_source (L, width) indexes the stage-1 winners (chunks * chunk_k,), level_pad marks the
    padding. Built on the host once per layout and cached: a CUDA graph that replays the op then
    copies nothing from the host (warm it up once before capture, as CUDA graphs require anyway).
    """
    chunk = min(max_chunk, max(level_sizes))
    chunk_k = min(topk_candidates, chunk)
    chunk_start, chunk_length, first_chunk, level_chunks = [], [], [], []
    level_start = 0
    for size in level_sizes:
        first_chunk.append(len(chunk_start))
        for offset in range(0, size, chunk):
            chunk_start.append(level_start + offset)
            chunk_length.append(min(chunk, size - offset))
        level_chunks.append(len(chunk_start) - first_chunk[-1])
        level_start += size
    width = max(level_chunks) * chunk_k
    slot = torch.arange(width)
    level_pad = slot[None, :] >= (torch.tensor(level_chunks) * chunk_k)[:, None]
    level_source = torch.where(level_pad, 0, torch.tensor(first_chunk)[:, None] * chunk_k + slot[None, :])
    return (chunk, chunk_k, torch.tensor(chunk_start, device=device), torch.tensor(chunk_length, device=device),
            level_source.to(device), level_pad.to(device))


def _select_candidates(cls_logits, num_anchors_per_level, score_thresh, topk_candidates):
    """Per image and level, the top min(topk_candidates, n) scores > score_thresh, in one pass for all.

    Two batched topk stages over the layout of _level_layout (no loop over levels or images). Returns
    (scores, flat_index, valid), each (N, L * k): valid marks real candidates; the rest is padding.
    For 16/32-bit logits the selection is exact: one int64 key per element, (score bits << 32) |
    (2**32 - 1 - flattened index), unique and ordered as score descending, then lower index first.
    float64 scores have no room for an index in the key: topk of the values (equal scores at a cut are
    then chosen as torch.topk chooses).
    """
    num_images, num_anchors, num_classes = cls_logits.shape
    level_sizes = [count * num_classes for count in num_anchors_per_level]
    chunk, chunk_k, chunk_start, chunk_length, level_source, level_pad = _level_layout(
        tuple(level_sizes), topk_candidates, cls_logits.device, _MAX_CHUNK)
    offset = torch.arange(chunk, device=cls_logits.device)
    chunk_pad = offset >= chunk_length[:, None]  # (chunks, chunk)
    chunk_source = torch.where(chunk_pad, 0, chunk_start[:, None] + offset).flatten()
    # Keys hold the flattened index in 32 bits; beyond that (never at real shapes) topk of the values.
    exact_keys = cls_logits.dtype != torch.float64 and num_anchors * num_classes < 2 ** _INDEX_BITS

    scores = torch.sigmoid(cls_logits.reshape(num_images, -1).index_select(1, chunk_source))
    keep = (scores > score_thresh) & ~chunk_pad.flatten()
    if exact_keys:
        # sigmoid >= 0, so the float bits are ordered as the scores. Built in place: one int64 buffer.
        values = scores.float().view(torch.int32).to(torch.int64)
        values <<= _INDEX_BITS
        values |= (1 << _INDEX_BITS) - 1 - chunk_source
        values.masked_fill_(~keep, -1)
    else:
        values = torch.where(keep, scores, -1.0)
    del scores, keep
    values, positions = values.view(num_images, -1, chunk).topk(chunk_k, dim=2)  # (N, chunks, chunk_k)
    flat_index = chunk_source.view(-1, chunk).expand(num_images, -1, -1).gather(2, positions)

    k = min(topk_candidates, level_source.shape[1])
    level_values = values.flatten(1)[:, level_source].masked_fill_(level_pad, -1)  # (N, L, width)
    level_values, positions = level_values.topk(k, dim=2)  # (N, L, k)
    winner = level_source.expand(num_images, -1, -1).gather(2, positions)  # into the stage-1 winners
    flat_index = flat_index.flatten(1).gather(1, winner.flatten(1))
    level_values = level_values.flatten(1)
    valid = level_values >= 0
    if exact_keys:
        score_bits = (level_values >> _INDEX_BITS).to(torch.int32)
        scores = score_bits.view(torch.float32).to(cls_logits.dtype)
    else:
        scores = level_values
    return scores.masked_fill(~valid, 0), flat_index, valid


def _postprocess_batched(cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes, score_thresh,
                         nms_thresh, detections_per_img, topk_candidates, box_coder_weights):
    """The whole batch with batched tensor ops; returns the padded result. anchors: list of N (A, 4)."""
    num_images, num_anchors, num_classes = cls_logits.shape
    outputs = _padded_outputs(bbox_regression, cls_logits, num_images, detections_per_img)
    if num_images == 0 or num_anchors == 0 or num_classes == 0:
        return outputs
    scores, flat_index, valid = _select_candidates(cls_logits, num_anchors_per_level, score_thresh,
                                                   topk_candidates)

    # Rank the candidates of each image: score descending, ties by lower flattened index; padding last.
    by_index = flat_index.argsort(dim=1, stable=True)
    ranked_scores = torch.where(valid, scores, -1.0).gather(1, by_index)
    order = by_index.gather(1, ranked_scores.argsort(dim=1, descending=True, stable=True))
    scores, flat_index = scores.gather(1, order), flat_index.gather(1, order)
    valid_counts = valid.sum(1)

    anchor_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index % num_classes
    gather_rows = anchor_index[..., None].expand(-1, -1, 4)
    stacked_anchors = torch.stack(anchors) if len(anchors) > 1 else anchors[0][None]
    boxes = decode_boxes(stacked_anchors.gather(1, gather_rows), bbox_regression.gather(1, gather_rows),
                         style="torchvision", weights=box_coder_weights, max_shape=image_sizes)
    keep = nms_sorted_padded(boxes, labels, valid_counts, nms_thresh)

    # The first detections_per_img kept rows of each image go to the front; the rest to a spare column.
    position = keep.cumsum(1) - 1
    written = keep & (position < detections_per_img)
    target = torch.where(written, position, detections_per_img)
    out_boxes, out_scores, out_labels, _ = _padded_outputs(bbox_regression, cls_logits, num_images,
                                                           detections_per_img + 1)
    out_boxes.scatter_(1, target[..., None].expand(-1, -1, 4), boxes)
    out_scores.scatter_(1, target, scores)
    out_labels.scatter_(1, target, labels)
    d = detections_per_img
    return out_boxes[:, :d].contiguous(), out_scores[:, :d].contiguous(), out_labels[:, :d].contiguous(), \
        written.sum(1)


# ---------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------

def _postprocess_compiled(*args):
    return torch.ops.fastbb_C.retinanet_postprocess(*args)


def _postprocess_reference(cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes, score_thresh,
                           nms_thresh, detections_per_img, topk_candidates, box_coder_weights):
    detections = _reference_per_image(cls_logits, bbox_regression, anchors, num_anchors_per_level,
                                      image_sizes.tolist(), score_thresh, nms_thresh, detections_per_img,
                                      topk_candidates, box_coder_weights)
    return _pad(detections, bbox_regression, cls_logits, detections_per_img)


# Every implementation takes the padded op's arguments and returns its padded result.
TABLE = _backend.OpTable("retinanet_postprocess", [
    _backend.Implementation("cuda", _postprocess_batched, devices=("cuda",),
                            kernel=("fastbb_C::decode_boxes", "fastbb_C::nms_sorted_padded"),
                            what="the batched path: a PyTorch composition (segmented topk, gathers) of fastbb's "
                                 "decode_boxes and nms_sorted_padded, which run their CUDA kernels; no host "
                                 "synchronisation"),
    _backend.Implementation("triton", _postprocess_batched, devices=("cuda",),
                            what="the same batched composition; with triton forced its decode_boxes and "
                                 "nms_sorted_padded run their Triton kernels"),
    _backend.Implementation("cpp", _postprocess_compiled, devices=("cpu",), kernel="fastbb_C::retinanet_postprocess",
                            what="one C++ pass per image and level (OpenMP): logits below the threshold skip "
                                 "their sigmoid, partial sort for the top-k, decode, NMS per label"),
    _backend.Implementation("reference", _postprocess_reference,
                            what="plain PyTorch, torchvision's loops over images and levels"),
], autocast="as torchvision's postprocess_detections under autocast: scores in the logits' dtype, boxes decoded by "
            "decode_boxes' rule (float32 on CUDA), IoU in float32 as torchvision's autocast kernel for nms")


@torch.library.custom_op("fastbb::retinanet_postprocess_padded", mutates_args=())
def _retinanet_postprocess_padded_op(
        cls_logits: torch.Tensor, bbox_regression: torch.Tensor, anchors: list[torch.Tensor],
        num_anchors_per_level: list[int], image_sizes: torch.Tensor, score_thresh: float, nms_thresh: float,
        detections_per_img: int, topk_candidates: int, box_coder_weights: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return TABLE(cls_logits.device.type, cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes,
                 score_thresh, nms_thresh, detections_per_img, topk_candidates, box_coder_weights)


@_retinanet_postprocess_padded_op.register_fake
def _(cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes, score_thresh, nms_thresh,
      detections_per_img, topk_candidates, box_coder_weights):
    return _padded_outputs(bbox_regression, cls_logits, cls_logits.shape[0], detections_per_img)


def _autocast_args(device_type, args):
    cls_logits, bbox_regression, anchors, *rest = args
    _, bbox_regression = decode_autocast_args(device_type, None, bbox_regression)
    anchors = [decode_autocast_args(device_type, a, None)[0] for a in anchors]
    return (cls_logits, bbox_regression, anchors, *rest)


register_autocast_rule("retinanet_postprocess_padded", _autocast_args)


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------

def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{_OP}: {name} must be an integer >= 1, got {value!r}")
    return value


def _check_inputs(cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes, score_thresh,
                  nms_thresh, detections_per_img, topk_candidates, box_coder_weights):
    """Validated, normalised arguments of the padded op (anchors: a list of (A, 4) in the boxes' dtype,
    image_sizes: an (N, 2) int64 tensor on the device, or on the CPU for CPU tensors)."""
    check_tensor(_OP, "cls_logits", cls_logits, ndim=3, dtypes=FLOAT_DTYPES)
    num_images, num_anchors, _ = cls_logits.shape
    check_tensor(_OP, "bbox_regression", bbox_regression, dtypes=FLOAT_DTYPES)
    if tuple(bbox_regression.shape) != (num_images, num_anchors, 4):
        raise ValueError(f"{_OP}: bbox_regression must be (N, A, 4) = ({num_images}, {num_anchors}, 4), "
                         f"got shape {tuple(bbox_regression.shape)}")
    if bbox_regression.dtype != cls_logits.dtype:
        raise TypeError(f"{_OP}: bbox_regression must have cls_logits' dtype {cls_logits.dtype}, "
                        f"got {bbox_regression.dtype}")
    device = cls_logits.device

    if isinstance(anchors, torch.Tensor):
        anchors = list(anchors.unbind(0)) if anchors.dim() == 3 else [anchors]
    if not isinstance(anchors, Sequence) or len(anchors) != num_images:
        got = len(anchors) if isinstance(anchors, Sequence) else type(anchors).__name__
        raise ValueError(f"{_OP}: anchors must be a list of N = {num_images} tensors (A, 4), got {got}")
    for i, a in enumerate(anchors):
        check_tensor(_OP, f"anchors[{i}]", a, dtypes=FLOAT_DTYPES)
        if tuple(a.shape) != (num_anchors, 4):
            raise ValueError(f"{_OP}: anchors[{i}] must be (A, 4) = ({num_anchors}, 4), got shape {tuple(a.shape)}")
    check_same_device(_OP, cls_logits=cls_logits, bbox_regression=bbox_regression,
                      **{f"anchors[{i}]": a for i, a in enumerate(anchors)})
    anchors = [a.to(bbox_regression.dtype) for a in anchors]  # as torchvision's decode does

    if isinstance(num_anchors_per_level, torch.Tensor):
        num_anchors_per_level = num_anchors_per_level.tolist()
    if (not isinstance(num_anchors_per_level, Sequence) or len(num_anchors_per_level) == 0
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in num_anchors_per_level)):
        raise ValueError(f"{_OP}: num_anchors_per_level must be a non-empty list of integers >= 0, "
                         f"got {num_anchors_per_level!r}")
    if sum(num_anchors_per_level) != num_anchors:
        raise ValueError(f"{_OP}: num_anchors_per_level must sum to A = {num_anchors}, got "
                         f"{list(num_anchors_per_level)} (sum {sum(num_anchors_per_level)})")

    if isinstance(image_sizes, torch.Tensor):
        if tuple(image_sizes.shape) != (num_images, 2) or image_sizes.is_complex() or image_sizes.dtype == torch.bool:
            raise ValueError(f"{_OP}: image_sizes must be N = {num_images} (h, w) pairs, got a "
                             f"{image_sizes.dtype} tensor of shape {tuple(image_sizes.shape)}")
        check_same_device(_OP, cls_logits=cls_logits, image_sizes=image_sizes)
        image_sizes = image_sizes.to(torch.int64)
    else:
        if not isinstance(image_sizes, Sequence) or len(image_sizes) != num_images:
            got = len(image_sizes) if isinstance(image_sizes, Sequence) else type(image_sizes).__name__
            raise ValueError(f"{_OP}: image_sizes must be a list of N = {num_images} (h, w) pairs, got {got}")
        for size in image_sizes:
            if (not isinstance(size, Sequence) or len(size) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in size)):
                raise ValueError(f"{_OP}: image_sizes must hold (h, w) pairs of integers >= 0, got {size!r}")
        image_sizes = torch.tensor([list(s) for s in image_sizes], dtype=torch.int64,
                                   device=device).reshape(num_images, 2)

    score_thresh = check_float(_OP, "score_thresh", score_thresh, 0.0, 1.0)
    nms_thresh = check_float(_OP, "nms_thresh", nms_thresh, 0.0, 1.0)
    detections_per_img = _check_count("detections_per_img", detections_per_img)
    topk_candidates = _check_count("topk_candidates", topk_candidates)
    if isinstance(box_coder_weights, torch.Tensor):
        box_coder_weights = box_coder_weights.tolist()
    if (not isinstance(box_coder_weights, Sequence) or len(box_coder_weights) != 4
            or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w == 0
                   for w in box_coder_weights)):
        raise ValueError(f"{_OP}: box_coder_weights must be 4 finite nonzero numbers, got {box_coder_weights!r}")
    return (cls_logits, bbox_regression, anchors, [int(c) for c in num_anchors_per_level], image_sizes,
            score_thresh, nms_thresh, detections_per_img, topk_candidates, [float(w) for w in box_coder_weights])


def _as_list(boxes, scores, labels, counts):
    return [{"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
            for i, n in enumerate(counts.tolist())]


@fx_leaf("fastbb.ops.retinanet_postprocess")
def retinanet_postprocess(
        cls_logits: torch.Tensor, bbox_regression: torch.Tensor, anchors: Sequence[torch.Tensor] | torch.Tensor,
        num_anchors_per_level: Sequence[int] | torch.Tensor,
        image_sizes: Sequence[tuple[int, int]] | torch.Tensor, score_thresh: float = 0.05, nms_thresh: float = 0.5,
        detections_per_img: int = 300, topk_candidates: int = 1000,
        box_coder_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), padded: bool = False,
) -> list[dict[str, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    torchvision RetinaNet's ``postprocess_detections`` for the whole batch at once: per image and level,
    the top ``topk_candidates`` sigmoid scores above ``score_thresh``, their boxes decoded and clipped to
    the image; per image, NMS per label and the first ``detections_per_img`` detections. Equal scores
    rank by lower (level, flattened index) first, on every backend.

    Args:
        cls_logits (Tensor[N, A, K]): classification logits as RetinaNetHead returns them (levels
            concatenated); float16, bfloat16, float32 or float64.
        bbox_regression (Tensor[N, A, 4]): box regression of the same images, in cls_logits' dtype.
        anchors (list[Tensor[A, 4]] or Tensor[N, A, 4]): the anchors of each image.
        num_anchors_per_level (list[int]): H * W * anchors of each level, summing to A.
        image_sizes (list[tuple[int, int]] or Tensor[N, 2]): (h, w) of each image; an integer tensor on
            the device spares a copy from the host on CUDA.
        score_thresh (float): scores must be > score_thresh; in [0, 1].
        nms_thresh (float): IoU threshold of the NMS per label; in [0, 1].
        detections_per_img (int): most detections kept per image.
        topk_candidates (int): most candidates per image and level before NMS.
        box_coder_weights (sequence of 4 floats): torchvision BoxCoder's weights.
        padded (bool): return the fixed-shape tuple instead of the list.

    Returns:
        list[dict[str, Tensor]]: torchvision's N dicts {"boxes" (D_i, 4), "scores" (D_i), "labels" (D_i)
        int64}; with ``padded=True`` the tuple (boxes (N, D, 4), scores (N, D), labels (N, D) int64,
        counts (N,) int64) with D = detections_per_img and zeros in the rows >= counts[n]. On CUDA the
        padded form never synchronises the host; the list form synchronises once, to split by counts.
    """
    args = _check_inputs(cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes, score_thresh,
                         nms_thresh, detections_per_img, topk_candidates, box_coder_weights)
    result = torch.ops.fastbb.retinanet_postprocess_padded(*args)
    return result if padded else _as_list(*result)


def retinanet_postprocess_reference(
        cls_logits: torch.Tensor, bbox_regression: torch.Tensor, anchors: Sequence[torch.Tensor] | torch.Tensor,
        num_anchors_per_level: Sequence[int] | torch.Tensor,
        image_sizes: Sequence[tuple[int, int]] | torch.Tensor, score_thresh: float = 0.05, nms_thresh: float = 0.5,
        detections_per_img: int = 300, topk_candidates: int = 1000,
        box_coder_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), padded: bool = False,
) -> list[dict[str, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`retinanet_postprocess` in plain PyTorch, one image and one level at a time (the ground
    truth): same arguments, checks and results."""
    args = list(_check_inputs(cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes,
                              score_thresh, nms_thresh, detections_per_img, topk_candidates, box_coder_weights))
    args[4] = args[4].tolist()
    detections = _reference_per_image(*args)
    if padded:
        return _pad(detections, bbox_regression, cls_logits, detections_per_img)
    return detections
