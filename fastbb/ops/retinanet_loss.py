"""RetinaNet's training loss for the whole batch at once: anchor matching, the focal classification loss and
the box regression loss, as torchvision's ``RetinaNet.compute_loss`` computes them image by image.

- `match_anchors(anchors, gt_boxes, gt_counts, ...)`: torchvision's ``Matcher`` on ``box_iou(gt, anchors)``
  for every image of a padded batch, as one op. The IoU is computed with torchvision's operations in its
  order, so the values, the thresholds and the ties (the first gt of the maximum, as ``torch.max`` over the
  gt dimension picks it) agree bit for bit. The compiled kernels (C++ on the CPU, Triton on the GPU) never
  hold the (G, A) IoU matrix: a first pass finds each gt's best IoU over the anchors, a second one each
  anchor's best gt, its thresholds and whether it is the best anchor of some gt (the low-quality rule, which
  restores the anchor's own best gt).
- `retinanet_loss(...)`: the two losses of ``RetinaNet.compute_loss`` from padded targets. No Python loop
  over images and nothing that waits for the device (no ``.item()``, no boolean indexing, no
  data-dependent shapes): foreground anchors are selected by masks and per-image weights, so a training step
  can be captured in a CUDA graph or compiled whole.
- `pad_targets(targets)`: torchvision's list of ``{"boxes", "labels"}`` dicts as the padded tensors.
"""
import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastbb import _backend
from fastbb._tracing import fx_leaf
from fastbb.ops._common import (FLOAT_DTYPES, TypeRuntimeError, ValueAssertionError, ValueRuntimeError,
                                check_float, check_same_device, check_tensor, compute_dtype, keep_arguments, kernel_lib,
                                register_autocast_rule)
from fastbb.ops.box_decode import decode_boxes
from fastbb.ops.focal_loss import sigmoid_focal_loss_labels

_MATCH_OP = "fastbb.match_anchors"  # how error messages name the functions
_LOSS_OP = "fastbb.retinanet_loss"
_PAD_OP = "fastbb.pad_targets"

BELOW_LOW_THRESHOLD = -1  # torchvision's Matcher codes
BETWEEN_THRESHOLDS = -2
BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# torchvision's _box_loss: smooth_l1 with beta 1 and the IoU losses with eps 1e-7 (RetinaNet passes no cnf).
_SMOOTH_L1_BETA = 1.0
_IOU_LOSS_EPS = 1e-7

# The compiled kernel takes anchors (1 or N, A, 4) and gt_boxes (N, G, 4), both contiguous float32 or both
# float64, and gt_counts (N,) int64 (clamped to [0, G] by the kernel); it returns matched indices (N, A) int64.
kernel_lib.define("match_anchors(Tensor anchors, Tensor gt_boxes, Tensor gt_counts, float high_threshold, "
                  "float low_threshold, bool allow_low_quality_matches) -> Tensor")


@torch.library.register_fake("fastbb_C::match_anchors", lib=kernel_lib)
def _(anchors, gt_boxes, gt_counts, high_threshold, low_threshold, allow_low_quality_matches):
    return gt_boxes.new_empty((gt_boxes.shape[0], anchors.shape[1]), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------
# Matching

def _upcast_area_dtype(t):
    """The dtype torchvision's box ops compute areas and overlaps in: 16-bit floats widen to float32."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _padded_iou(anchors, gt_boxes):
    """IoU (N, G, A) of every gt (padding included) with every anchor, with torchvision's box_iou operations in
    its order (areas from widened boxes; the overlap's width and height widened after the subtraction), so
    that each value equals box_iou's bit for bit."""
    gt_wide, anchors_wide = _upcast_area_dtype(gt_boxes), _upcast_area_dtype(anchors)
    gt_area = (gt_wide[..., 2] - gt_wide[..., 0]) * (gt_wide[..., 3] - gt_wide[..., 1])  # (N, G)
    anchor_area = (anchors_wide[..., 2] - anchors_wide[..., 0]) * (anchors_wide[..., 3] - anchors_wide[..., 1])
    top_left = torch.max(gt_boxes[:, :, None, :2], anchors[:, None, :, :2])  # (N, G, A, 2)
    bottom_right = torch.min(gt_boxes[:, :, None, 2:], anchors[:, None, :, 2:])
    wh = _upcast_area_dtype(bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = gt_area[:, :, None] + anchor_area[:, None, :] - inter
    return inter / union


def _match_padded(anchors, gt_boxes, gt_counts, high_threshold, low_threshold, allow_low_quality_matches):
    """Matcher on the padded (N, G, A) IoU: padding rows are -inf for the per-anchor maximum (never chosen
    over a real IoU, NaN included) and take no part in the low-quality rule."""
    num_images, num_gt = gt_boxes.shape[:2]
    num_anchors = anchors.shape[1]
    if num_gt == 0 or num_anchors == 0:
        return torch.full((num_images, num_anchors), BELOW_LOW_THRESHOLD, dtype=torch.int64,
                          device=gt_boxes.device)
    iou = _padded_iou(anchors, gt_boxes)
    valid = torch.arange(num_gt, device=gt_boxes.device) < gt_counts[:, None]  # (N, G)
    best_iou, best_gt = torch.where(valid[:, :, None], iou, -math.inf).max(dim=1)  # (N, A): first of ties
    matches = torch.where(best_iou < low_threshold, BELOW_LOW_THRESHOLD,
                          torch.where(best_iou < high_threshold, BETWEEN_THRESHOLDS, best_gt))
    if allow_low_quality_matches:
        # Anchors that are the best of some gt (ties included) get back their own best gt, whatever its IoU.
        best_of_gt = iou.max(dim=2, keepdim=True).values  # (N, G, 1)
        is_best_of_some_gt = ((iou == best_of_gt) & valid[:, :, None]).any(dim=1)
        matches = torch.where(is_best_of_some_gt, best_gt, matches)
    # An image without boxes: every anchor is background (RetinaNet.compute_loss's rule; Matcher would raise).
    return torch.where(gt_counts[:, None] > 0, matches, BELOW_LOW_THRESHOLD)


def _compiled_match(*args):
    return torch.ops.fastbb_C.match_anchors(*args)


def _compiled_applies(anchors, gt_boxes, *_):
    return gt_boxes.dtype in (torch.float32, torch.float64)


def _triton_match(*args):
    from fastbb.kernels import match_anchors
    return match_anchors.match_anchors(*args)


MATCH_TABLE = _backend.OpTable("match_anchors", [
    _backend.Implementation("triton", _triton_match, devices=("cuda",), applies=_compiled_applies,
                            what="two Triton launches over blocks of anchors (per-gt best IoU per block, then "
                                 "per-anchor best gt), no IoU matrix kept"),
    _backend.Implementation("cpp", _compiled_match, devices=("cpu",), kernel="fastbb_C::match_anchors",
                            applies=_compiled_applies,
                            what="two C++ passes per image (per-gt best IoU, then per-anchor best gt), no IoU "
                                 "matrix kept (OpenMP)"),
    _backend.Implementation("reference", _match_padded, what="plain PyTorch on the padded (N, G, A) IoU"),
], autocast="nothing cast: IoU in the boxes' dtype, 16-bit boxes widened as torchvision's box_iou widens them")


@torch.library.custom_op("fastbb::match_anchors", mutates_args=())
def _match_anchors_op(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_counts: torch.Tensor,
                      high_threshold: float, low_threshold: float,
                      allow_low_quality_matches: bool) -> torch.Tensor:
    return MATCH_TABLE(gt_boxes.device.type, anchors, gt_boxes, gt_counts, high_threshold, low_threshold,
                       allow_low_quality_matches)


@_match_anchors_op.register_fake
def _(anchors, gt_boxes, gt_counts, high_threshold, low_threshold, allow_low_quality_matches):
    return gt_boxes.new_empty((gt_boxes.shape[0], anchors.shape[1]), dtype=torch.int64)


register_autocast_rule("match_anchors", keep_arguments)


def _check_boxes(op, name, t, ndims):
    check_tensor(op, name, t, last_dim=4)
    if t.dim() not in ndims:
        shapes = " or ".join({2: "(A, 4)", 3: "(N, A, 4)" if name == "anchors" else "(N, G, 4)"}[d] for d in ndims)
        raise ValueRuntimeError(f"{op}: {name} must be {shapes}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeRuntimeError(f"{op}: {name} must be floating point, got dtype {t.dtype}")


def _check_thresholds(op, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches):
    high = check_float(op, "fg_iou_thresh", fg_iou_thresh, allow_nonfinite=True)
    low = check_float(op, "bg_iou_thresh", bg_iou_thresh, allow_nonfinite=True)
    if math.isnan(high) or math.isnan(low):
        raise ValueRuntimeError(f"{op}: fg_iou_thresh and bg_iou_thresh must not be NaN")
    if low > high:
        # torchvision's Matcher asserts this.
        raise ValueAssertionError(f"{op}: bg_iou_thresh ({low}) must be <= fg_iou_thresh ({high})")
    if not isinstance(allow_low_quality_matches, bool):
        raise TypeRuntimeError(f"{op}: allow_low_quality_matches must be a bool, "
                               f"got {type(allow_low_quality_matches).__name__}")
    return high, low


def _check_match_inputs(op, anchors, gt_boxes, gt_counts):
    """Checks; returns (anchors (1 or N, A, 4), gt_boxes (N, G, 4)) in one dtype, and gt_counts int64."""
    _check_boxes(op, "anchors", anchors, (2, 3))
    _check_boxes(op, "gt_boxes", gt_boxes, (3,))
    check_tensor(op, "gt_counts", gt_counts)
    if gt_counts.dtype not in _INTEGER_DTYPES:
        raise TypeRuntimeError(f"{op}: gt_counts must be an integer tensor, got dtype {gt_counts.dtype}")
    num_images = gt_boxes.shape[0]
    if tuple(gt_counts.shape) != (num_images,):
        raise ValueRuntimeError(f"{op}: gt_counts must be (N,) = ({num_images},) (the boxes per image of gt_boxes), "
                                f"got shape {tuple(gt_counts.shape)}")
    if anchors.dim() == 3 and anchors.shape[0] != num_images:
        raise ValueRuntimeError(f"{op}: per-image anchors must be (N, A, 4) with N = {num_images} (that of "
                                f"gt_boxes), got shape {tuple(anchors.shape)}")
    check_same_device(op, anchors=anchors, gt_boxes=gt_boxes, gt_counts=gt_counts)
    # torchvision's box_iou promotes the two sets to one dtype before comparing corners; widening is exact,
    # so converting first gives the same IoU. Two 16-bit sets stay 16-bit: their overlaps are rounded there.
    dtype = torch.promote_types(anchors.dtype, gt_boxes.dtype)
    anchors = anchors.to(dtype)
    gt_boxes = gt_boxes.to(dtype)
    if anchors.dim() == 2:
        anchors = anchors[None]
    return anchors.contiguous(), gt_boxes.contiguous(), gt_counts.to(torch.int64).contiguous()


def _match(op, anchors, gt_boxes, gt_counts, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches):
    high, low = _check_thresholds(op, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches)
    anchors, gt_boxes, gt_counts = _check_match_inputs(op, anchors, gt_boxes, gt_counts)
    return _match_anchors_op(anchors, gt_boxes, gt_counts, high, low, allow_low_quality_matches)


@fx_leaf("fastbb.ops.match_anchors")
def match_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_counts: torch.Tensor,
                  fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                  allow_low_quality_matches: bool = True) -> torch.Tensor:
    """
    Matches anchors to ground-truth boxes for a whole batch, as RetinaNet does per image with torchvision's
    ``Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches)`` on ``box_iou(gt_boxes, anchors)``;
    the IoU values, thresholds and ties agree bit for bit.

    Rows of ``gt_boxes`` at or past an image's count are padding: never matched and no part of the
    low-quality rule. Counts are not checked against the device's values (that would wait for it): a count
    above G means G, one below 0 means no boxes.

    Args:
        anchors (Tensor): ``(A, 4)`` shared by every image or ``(N, A, 4)`` per image, ``(x1, y1, x2, y2)``.
        gt_boxes (Tensor[N, G, 4]): ground-truth boxes ``(x1, y1, x2, y2)``, padded to G per image.
        gt_counts (Tensor[N]): integer number of real boxes of each image (its first rows).
        fg_iou_thresh (float): IoU at or above which an anchor is matched. Default: ``0.5``.
        bg_iou_thresh (float): IoU below which an anchor is background; in between it is ignored.
            Default: ``0.4``.
        allow_low_quality_matches (bool): whether each gt's best anchors (ties included) keep their best gt
            whatever its IoU. Default: ``True``.

    Returns:
        Tensor[N, A]: int64, the index of each anchor's matched gt, ``-1`` below ``bg_iou_thresh`` (and for
        every anchor of an image with no boxes), ``-2`` between the thresholds.
    """
    return _match(_MATCH_OP, anchors, gt_boxes, gt_counts, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches)


def match_anchors_reference(anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_counts: torch.Tensor,
                            fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                            allow_low_quality_matches: bool = True) -> torch.Tensor:
    """:func:`match_anchors` in plain PyTorch (the ground truth): same arguments, checks and results."""
    with _backend.use_backend("reference"):
        return match_anchors(anchors, gt_boxes, gt_counts, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches)


# ---------------------------------------------------------------------------------------------------------
# Losses

def _encode(gt, anchors, weights):
    """BoxCoder.encode_single's regression targets of gt relative to anchors (..., 4), in its operation order."""
    wx, wy, ww, wh = weights
    anchor_w = anchors[..., 2] - anchors[..., 0]
    anchor_h = anchors[..., 3] - anchors[..., 1]
    anchor_cx = anchors[..., 0] + 0.5 * anchor_w
    anchor_cy = anchors[..., 1] + 0.5 * anchor_h
    gt_w = gt[..., 2] - gt[..., 0]
    gt_h = gt[..., 3] - gt[..., 1]
    gt_cx = gt[..., 0] + 0.5 * gt_w
    gt_cy = gt[..., 1] + 0.5 * gt_h
    return torch.stack((wx * (gt_cx - anchor_cx) / anchor_w, wy * (gt_cy - anchor_cy) / anchor_h,
                        ww * torch.log(gt_w / anchor_w), wh * torch.log(gt_h / anchor_h)), dim=-1)


def _iou_losses(pred, gt, kind, eps):
    """1 - GIoU, or the DIoU / CIoU loss, of box pairs (..., 4), as torchvision.ops' losses compute them."""
    px1, py1, px2, py2 = pred.unbind(-1)
    gx1, gy1, gx2, gy2 = gt.unbind(-1)
    ix1, iy1 = torch.max(px1, gx1), torch.max(py1, gy1)
    ix2, iy2 = torch.min(px2, gx2), torch.min(py2, gy2)
    overlaps = (iy2 > iy1) & (ix2 > ix1)
    inter = torch.where(overlaps, (ix2 - ix1) * (iy2 - iy1), 0.0)
    union = (px2 - px1) * (py2 - py1) + (gx2 - gx1) * (gy2 - gy1) - inter
    iou = inter / (union + eps)
    # The smallest box enclosing both.
    cx1, cy1 = torch.min(px1, gx1), torch.min(py1, gy1)
    cx2, cy2 = torch.max(px2, gx2), torch.max(py2, gy2)
    if kind == "giou":
        enclosing = (cx2 - cx1) * (cy2 - cy1)
        return 1 - (iou - (enclosing - union) / (enclosing + eps))
    diagonal_sq = ((cx2 - cx1) ** 2) + ((cy2 - cy1) ** 2) + eps
    centre_dist_sq = (((px2 + px1) / 2 - (gx1 + gx2) / 2) ** 2) + (((py2 + py1) / 2 - (gy1 + gy2) / 2) ** 2)
    loss = 1 - iou + centre_dist_sq / diagonal_sq
    if kind == "diou":
        return loss
    aspect = (4 / (torch.pi ** 2)) * torch.pow(torch.atan((gx2 - gx1) / (gy2 - gy1))
                                               - torch.atan((px2 - px1) / (py2 - py1)), 2)
    with torch.no_grad():  # torchvision's CIoU treats the trade-off weight as a constant
        trade_off = aspect / (1 - iou + aspect + eps)
    return loss + trade_off * aspect


def _box_loss_per_anchor(kind, bbox_regression, anchors, target_boxes, weights, bbox_xform_clip):
    """The box loss of every anchor (N, A) against its target box (N, A, 4), by torchvision's _box_loss rules;
    anchors (A, 4) or (N, A, 4)."""
    if kind in ("l1", "smooth_l1"):
        targets = _encode(target_boxes, anchors, weights)
        if kind == "l1":
            per_coordinate = (bbox_regression - targets).abs()
        else:
            per_coordinate = F.smooth_l1_loss(bbox_regression, targets, reduction="none",
                                              beta=_SMOOTH_L1_BETA)
        return per_coordinate.sum(-1)
    predicted = decode_boxes(anchors, bbox_regression, weights=weights, dwh_max=bbox_xform_clip)
    return _iou_losses(predicted, target_boxes.to(predicted.dtype), kind, _IOU_LOSS_EPS)


def _check_loss_inputs(cls_logits, bbox_regression, anchors, gt_boxes, gt_labels, gt_counts, box_loss,
                       box_coder_weights, bbox_xform_clip, focal_alpha, focal_gamma):
    check_tensor(_LOSS_OP, "cls_logits", cls_logits, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(_LOSS_OP, "bbox_regression", bbox_regression, ndim=3, last_dim=4, dtypes=FLOAT_DTYPES)
    num_images, num_anchors = cls_logits.shape[:2]
    if tuple(bbox_regression.shape[:2]) != (num_images, num_anchors):
        raise ValueRuntimeError(f"{_LOSS_OP}: bbox_regression must be (N, A, 4) = ({num_images}, {num_anchors}, 4) "
                                f"as cls_logits (N, A, K), got shape {tuple(bbox_regression.shape)}")
    _check_boxes(_LOSS_OP, "anchors", anchors, (2, 3))
    if anchors.shape[-2] != num_anchors:
        raise ValueRuntimeError(f"{_LOSS_OP}: anchors must have A = {num_anchors} rows (those of cls_logits), "
                                f"got shape {tuple(anchors.shape)}")
    _check_boxes(_LOSS_OP, "gt_boxes", gt_boxes, (3,))
    if gt_boxes.shape[0] != num_images:
        raise ValueRuntimeError(f"{_LOSS_OP}: gt_boxes must be (N, G, 4) with N = {num_images} images, "
                                f"got shape {tuple(gt_boxes.shape)}")
    check_tensor(_LOSS_OP, "gt_labels", gt_labels)
    if gt_labels.dtype not in _INTEGER_DTYPES:
        raise TypeRuntimeError(f"{_LOSS_OP}: gt_labels must be an integer tensor, got dtype {gt_labels.dtype}")
    if tuple(gt_labels.shape) != tuple(gt_boxes.shape[:2]):
        raise ValueRuntimeError(f"{_LOSS_OP}: gt_labels must be (N, G) = {tuple(gt_boxes.shape[:2])} as gt_boxes, "
                                f"got shape {tuple(gt_labels.shape)}")
    check_same_device(_LOSS_OP, cls_logits=cls_logits, bbox_regression=bbox_regression, anchors=anchors,
                      gt_boxes=gt_boxes, gt_labels=gt_labels)
    if box_loss not in BOX_LOSSES:
        # torchvision's _box_loss asserts the loss type.
        raise ValueAssertionError(f"{_LOSS_OP}: box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
    if isinstance(box_coder_weights, torch.Tensor):
        box_coder_weights = box_coder_weights.tolist()
    if not isinstance(box_coder_weights, Sequence) or len(box_coder_weights) != 4:
        raise ValueRuntimeError(f"{_LOSS_OP}: box_coder_weights must be 4 numbers, got {box_coder_weights!r}")
    weights = tuple(check_float(_LOSS_OP, "box_coder_weights", w) for w in box_coder_weights)
    clip = check_float(_LOSS_OP, "bbox_xform_clip", bbox_xform_clip, allow_nonfinite=True)
    alpha = check_float(_LOSS_OP, "focal_alpha", focal_alpha)
    gamma = check_float(_LOSS_OP, "focal_gamma", focal_gamma)
    if gamma < 0:
        raise ValueRuntimeError(f"{_LOSS_OP}: focal_gamma must be >= 0, got {gamma}")
    return weights, clip, alpha, gamma


@fx_leaf("fastbb.ops.retinanet_loss")
def retinanet_loss(cls_logits: torch.Tensor, bbox_regression: torch.Tensor, anchors: torch.Tensor,
                   gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_counts: torch.Tensor, *,
                   fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4, allow_low_quality_matches: bool = True,
                   box_loss: str = "l1", box_coder_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                   bbox_xform_clip: float = math.log(1000.0 / 16), focal_alpha: float = 0.25,
                   focal_gamma: float = 2.0) -> dict[str, torch.Tensor]:
    """
    RetinaNet's training losses for a whole batch, as torchvision's ``RetinaNet.compute_loss(targets,
    head_outputs, anchors)`` gives them, without a loop over images and without waiting for the device (no
    data-dependent shapes): a training step that calls it can be captured in a CUDA graph.

    Anchors are matched as :func:`match_anchors`. Classification: per image, the sigmoid focal loss summed
    over the anchors not between the thresholds (one-hot targets of the matched gt's label for foreground
    anchors, all zero for background), divided by max(1, the image's foreground anchors); then the mean over
    images. Box regression: per image, the ``box_loss`` of the foreground anchors summed and divided by
    max(1, their number), then summed over images and divided by max(1, N). ``"l1"`` and ``"smooth_l1"``
    (beta 1) compare bbox_regression with the matched boxes encoded as ``BoxCoder(box_coder_weights)``
    encodes them; ``"giou"``, ``"diou"`` and ``"ciou"`` (eps 1e-7) compare the decoded predictions with the
    matched boxes. torchvision's RetinaNet uses ``"l1"``, its v2 model ``"giou"``.

    Labels of real boxes are not checked against the number of classes (that would wait for the device):
    :func:`pad_targets` checks them.

    Args:
        cls_logits (Tensor[N, A, K]): the classification head's logits.
        bbox_regression (Tensor[N, A, 4]): the regression head's box deltas.
        anchors (Tensor): ``(A, 4)`` shared by every image, or ``(N, A, 4)``.
        gt_boxes (Tensor[N, G, 4]): ground-truth boxes, padded (:func:`pad_targets`).
        gt_labels (Tensor[N, G]): their integer class labels in [0, K).
        gt_counts (Tensor[N]): the number of real boxes of each image.
        fg_iou_thresh (float): the matcher's foreground IoU threshold. Default: ``0.5``.
        bg_iou_thresh (float): the matcher's background IoU threshold. Default: ``0.4``.
        allow_low_quality_matches (bool): the matcher's low-quality rule. Default: ``True``.
        box_loss (str): ``"l1"``, ``"smooth_l1"``, ``"giou"``, ``"diou"`` or ``"ciou"``. Default: ``"l1"``.
        box_coder_weights (sequence of 4 floats): the box coder's ``(wx, wy, ww, wh)``.
        bbox_xform_clip (float): the decode's upper clamp of dw, dh (IoU losses).
        focal_alpha (float): the focal loss's alpha (negative: no weighting). Default: ``0.25``.
        focal_gamma (float): the focal loss's gamma, >= 0. Default: ``2.0``.

    Returns:
        dict[str, Tensor]: ``{"classification": Tensor, "bbox_regression": Tensor}``, 0-d tensors,
        differentiable in cls_logits and bbox_regression. Both are computed in float32 (float64 for float64
        inputs); the classification loss has cls_logits' dtype (float32 under ``torch.autocast``), as
        torchvision's, the box loss float32 (float64 when an input is).
    """
    weights, clip, alpha, gamma = _check_loss_inputs(cls_logits, bbox_regression, anchors, gt_boxes, gt_labels,
                                                     gt_counts, box_loss, box_coder_weights, bbox_xform_clip,
                                                     focal_alpha, focal_gamma)
    matched = _match(_LOSS_OP, anchors, gt_boxes, gt_counts, fg_iou_thresh, bg_iou_thresh,
                     allow_low_quality_matches)
    num_images, num_anchors, num_classes = cls_logits.shape
    foreground = matched >= 0
    num_foreground = foreground.sum(dim=1)  # (N,)
    per_image_norm = num_foreground.clamp(min=1)
    gt_index = matched.clamp(min=0)  # background anchors read gt 0 (or padding): masked out below

    # Classification: one focal-loss call for the batch; weighting each anchor by 1 / (max(1, nfg) * N) gives
    # the per-image normalisation and the mean over images in the one sum.
    anchor_labels = torch.where(foreground, gt_labels.to(torch.int64).gather(1, gt_index),
                                torch.where(matched == BETWEEN_THRESHOLDS, BETWEEN_THRESHOLDS, num_classes))
    loss_dtype = compute_dtype(cls_logits.dtype)
    # Materialised (N, A): the focal op flattens (N, A, K) to rows, which an expanded weight could only reach
    # through an (N, A, K) copy.
    anchor_weight = (1.0 / (per_image_norm.to(loss_dtype) * num_images))[:, None].expand(num_images, num_anchors)
    anchor_weight = anchor_weight.contiguous()
    classification = sigmoid_focal_loss_labels(cls_logits, anchor_labels, gamma, alpha, weight=anchor_weight,
                                               reduction="sum", ignore_index=BETWEEN_THRESHOLDS)

    # Box regression, in float32 as torchvision's losses are under autocast (float64 when any input is).
    box_dtype = torch.promote_types(compute_dtype(bbox_regression.dtype),
                                    torch.promote_types(compute_dtype(anchors.dtype), compute_dtype(gt_boxes.dtype)))
    deltas = bbox_regression.to(box_dtype)
    box_anchors = anchors.to(box_dtype)  # (A, 4) or (N, A, 4): broadcast, not copied, by encode and decode
    anchors_per_image = box_anchors.expand(num_images, num_anchors, 4)
    matched_boxes = gt_boxes.to(box_dtype).gather(1, gt_index[..., None].expand(num_images, num_anchors, 4))
    # Anchors not in the foreground are compared with themselves: a finite stand-in, so that masking them out
    # multiplies no inf or NaN into the sum or the gradient.
    target_boxes = torch.where(foreground[..., None], matched_boxes, anchors_per_image)
    device_type = cls_logits.device.type
    no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                   else contextlib.nullcontext())
    with no_autocast:
        per_anchor = _box_loss_per_anchor(box_loss, deltas, box_anchors, target_boxes, weights, clip)
        per_image = torch.where(foreground, per_anchor, 0.0).sum(dim=1) / per_image_norm.to(box_dtype)
        regression = per_image.sum() / max(1, num_images)
    return {"classification": classification, "bbox_regression": regression}


def retinanet_loss_reference(cls_logits: torch.Tensor, bbox_regression: torch.Tensor, anchors: torch.Tensor,
                             gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_counts: torch.Tensor, *,
                             fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                             allow_low_quality_matches: bool = True, box_loss: str = "l1",
                             box_coder_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                             bbox_xform_clip: float = math.log(1000.0 / 16), focal_alpha: float = 0.25,
                             focal_gamma: float = 2.0) -> dict[str, torch.Tensor]:
    """:func:`retinanet_loss` with every op it runs on its plain-PyTorch reference: same arguments and results."""
    with _backend.use_backend("reference"):
        return retinanet_loss(cls_logits, bbox_regression, anchors, gt_boxes, gt_labels, gt_counts,
                              fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh,
                              allow_low_quality_matches=allow_low_quality_matches, box_loss=box_loss,
                              box_coder_weights=box_coder_weights, bbox_xform_clip=bbox_xform_clip,
                              focal_alpha=focal_alpha, focal_gamma=focal_gamma)


def pad_targets(targets: Sequence[dict[str, torch.Tensor]],
                num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    torchvision's detection targets, a list of ``{"boxes": Tensor[G_i, 4], "labels": Tensor[G_i]}`` per image,
    as the padded tensors :func:`retinanet_loss` takes. Padding boxes are zeros and padding labels -1. This
    reads the boxes per image (their counts size the result), so unlike the loss it is not graph-capturable.

    Args:
        targets (sequence of dict): per image, ``"boxes"`` (floating, ``(G_i, 4)``) and ``"labels"``
            (integer, ``(G_i,)``); other keys are ignored.
        num_classes (int, optional): when given, every label must be in [0, num_classes).

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``gt_boxes (N, G, 4)`` in the boxes' promoted dtype, ``gt_labels (N, G)``
        int64 and ``gt_counts (N,)`` int64, G the most boxes of an image, on the boxes' device.
    """
    if isinstance(targets, (dict, torch.Tensor)) or not isinstance(targets, Sequence):
        raise TypeError(f"{_PAD_OP}: targets must be a list of dicts with 'boxes' and 'labels', "
                        f"got {type(targets).__name__}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"{_PAD_OP}: num_classes must be a positive int or None, got {num_classes!r}")
    boxes, labels = [], []
    for i, target in enumerate(targets):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise TypeError(f"{_PAD_OP}: targets[{i}] must be a dict with 'boxes' and 'labels'")
        b, lab = target["boxes"], target["labels"]
        if not isinstance(b, torch.Tensor) or not b.is_floating_point() or b.dim() != 2 or b.shape[-1] != 4:
            raise ValueError(f"{_PAD_OP}: targets[{i}]['boxes'] must be a floating tensor of shape (G, 4), got "
                             f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
        if not isinstance(lab, torch.Tensor) or lab.dtype not in _INTEGER_DTYPES or tuple(lab.shape) != (b.shape[0],):
            raise ValueError(f"{_PAD_OP}: targets[{i}]['labels'] must be an integer tensor of shape ({b.shape[0]},)")
        if lab.device != b.device or (boxes and b.device != boxes[0].device):
            raise ValueError(f"{_PAD_OP}: targets[{i}]: all boxes and labels must be on one device")
        if num_classes is not None and lab.numel() > 0:
            low, high = int(lab.min()), int(lab.max())
            if low < 0 or high >= num_classes:
                raise ValueError(f"{_PAD_OP}: targets[{i}]['labels'] must be in [0, {num_classes}), "
                                 f"got {low if low < 0 else high}")
        boxes.append(b)
        labels.append(lab)
    if not boxes:
        return torch.zeros(0, 0, 4), torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    dtype = boxes[0].dtype
    for b in boxes[1:]:
        dtype = torch.promote_types(dtype, b.dtype)
    device = boxes[0].device
    num_gt = max(b.shape[0] for b in boxes)
    gt_boxes = torch.zeros(len(boxes), num_gt, 4, dtype=dtype, device=device)
    gt_labels = torch.full((len(boxes), num_gt), -1, dtype=torch.int64, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        gt_boxes[i, :b.shape[0]] = b
        gt_labels[i, :b.shape[0]] = lab
    gt_counts = torch.tensor([b.shape[0] for b in boxes], dtype=torch.int64, device=device)
    return gt_boxes, gt_labels, gt_counts
