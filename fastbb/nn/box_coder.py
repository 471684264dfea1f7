"""Box coders with torchvision's and mmdet's APIs; decoding runs on the fused fastbb.ops.decode_boxes."""
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastbb._fallback import FallsBackToOriginal, NotFusedError
from fastbb._registry import register
from fastbb._tracing import fx_leaf, not_scriptable, traced
from fastbb.ops._common import TypeAssertionError, ValueAssertionError
from fastbb.ops.box_decode import decode_boxes


@register("BoxCoder")
@not_scriptable
class BoxCoder:
    """
    torchvision.models.detection._utils.BoxCoder, decoding with the fused :func:`fastbb.ops.decode_boxes`.
    This class encodes and decodes a set of bounding boxes into the representation used for training the
    regressors: (dx, dy, dw, dh) scaled by ``weights``, dw and dh clamped from above at
    ``bbox_xform_clip`` when decoding. A plain class, as torchvision's is.

    Args:
        weights (Tuple[float, float, float, float]): the weights (wx, wy, ww, wh) of the deltas.
        bbox_xform_clip (float): the upper clamp of dw and dh when decoding. Default: log(1000 / 16).
    """

    def __init__(self, weights: tuple[float, float, float, float],
                 bbox_xform_clip: float = math.log(1000.0 / 16)) -> None:
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> list[Tensor]:
        """
        Encodes the proposals of every image with respect to its reference boxes.

        Args:
            reference_boxes (List[Tensor[N_i, 4]]): the reference (ground-truth) boxes of each image.
            proposals (List[Tensor[N_i, 4]]): the boxes to be encoded, one tensor per image.

        Returns:
            List[Tensor[N_i, 4]]: the deltas of each image (a tuple, as torchvision returns it).
        """
        boxes_per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes, dim=0), torch.cat(proposals, dim=0))
        return targets.split(boxes_per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """
        Encodes a set of proposals with respect to some reference boxes.

        Args:
            reference_boxes (Tensor[N, 4]): reference boxes.
            proposals (Tensor[N, 4]): boxes to be encoded.

        Returns:
            Tensor[N, 4]: the deltas that move each proposal onto its reference box.
        """
        wx, wy, ww, wh = (torch.as_tensor(w, dtype=reference_boxes.dtype, device=reference_boxes.device)
                          for w in self.weights)
        ex_w = proposals[:, 2:3] - proposals[:, 0:1]
        ex_h = proposals[:, 3:4] - proposals[:, 1:2]
        ex_x = proposals[:, 0:1] + 0.5 * ex_w
        ex_y = proposals[:, 1:2] + 0.5 * ex_h
        gt_w = reference_boxes[:, 2:3] - reference_boxes[:, 0:1]
        gt_h = reference_boxes[:, 3:4] - reference_boxes[:, 1:2]
        gt_x = reference_boxes[:, 0:1] + 0.5 * gt_w
        gt_y = reference_boxes[:, 1:2] + 0.5 * gt_h
        return torch.cat((wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                          ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=1)

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        """
        Decodes the deltas of the boxes of every image at once.

        Args:
            rel_codes (Tensor[sum N_i, 4K]): encoded boxes, K per reference box.
            boxes (List[Tensor[N_i, 4]]): the reference boxes of each image.

        Returns:
            Tensor[sum N_i, K, 4]: the decoded boxes.
        """
        if not isinstance(boxes, (list, tuple)):
            raise TypeAssertionError(f"fastbb.nn.BoxCoder.decode: boxes must be a list or tuple of tensors, "
                                     f"got {type(boxes).__name__}")
        if not isinstance(rel_codes, torch.Tensor):
            raise TypeAssertionError(f"fastbb.nn.BoxCoder.decode: rel_codes must be a torch.Tensor, "
                                     f"got {type(rel_codes).__name__}")
        num_boxes = sum(b.size(0) for b in boxes)
        concat_boxes = torch.cat(boxes, dim=0)
        if num_boxes > 0:
            rel_codes = rel_codes.reshape(num_boxes, -1)
        pred_boxes = self.decode_single(rel_codes, concat_boxes)
        if num_boxes > 0:
            pred_boxes = pred_boxes.reshape(num_boxes, -1, 4)
        return pred_boxes

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """
        From a set of original boxes and encoded relative box offsets, gets the decoded boxes.

        Args:
            rel_codes (Tensor[N, 4K]): encoded boxes.
            boxes (Tensor[N, 4]): reference boxes.

        Returns:
            Tensor[N, 4K]: the decoded boxes ``(x1, y1, x2, y2)``, in rel_codes' dtype (float32 under CUDA
            autocast, as torchvision's).
        """
        return decode_boxes(boxes, rel_codes, style="torchvision", weights=tuple(self.weights),
                            dwh_max=self.bbox_xform_clip)


@fx_leaf("fastbb.nn.box_coder._promote_deltas")
def _promote_deltas(bboxes: Tensor, pred_bboxes: Tensor) -> Tensor:
    """pred_bboxes in add's promotion of both dtypes: mmdet's delta2bbox computes with both tensors, so its
    boxes have that dtype (float32 for bfloat16 deltas on float32 anchors), while decode_boxes gives the
    deltas' dtype. (A leaf under torch.fx, where the dtypes are unknown until the graph runs.)"""
    if bboxes.is_floating_point() and pred_bboxes.is_floating_point():
        return pred_bboxes.to(torch.promote_types(bboxes.dtype, pred_bboxes.dtype))
    return pred_bboxes


@register("DeltaXYWHBBoxCoder", scopes=("mmdet",))
@not_scriptable
class DeltaXYWHBBoxCoder(metaclass=FallsBackToOriginal,
                         original="mmdet.models.task_modules.coders.delta_xywh_bbox_coder.DeltaXYWHBBoxCoder"):
    """
    mmdet 3.x ``DeltaXYWHBBoxCoder``, decoding with the fused :func:`fastbb.ops.decode_boxes`: deltas
    (dx, dy, dw, dh) normalised by ``target_means`` / ``target_stds``, dw and dh clamped at
    |log(wh_ratio_clip)|, an optional centre-shift clamp (YOLOF) and clipping to the image.

    Args:
        target_means (Sequence[float]): Denormalizing means of target for delta coordinates.
            Default: (0., 0., 0., 0.).
        target_stds (Sequence[float]): Denormalizing standard deviation of target for delta coordinates.
            Default: (1., 1., 1., 1.).
        clip_border (bool): Whether to clip the objects outside the border of the image. Default: True.
        add_ctr_clamp (bool): Whether to clamp the centre shift of the decoded boxes at ``ctr_clamp``
            pixels (only used by YOLOF). Default: False.
        ctr_clamp (int): the maximum pixel shift of the centre. Default: 32.
        use_box_type (bool): must be False: decode returns plain tensors, not mmdet's HorizontalBoxes.
            Default: False. (mmdet's coders take it, and ignore any other keyword, through ``**kwargs``;
            fastbb takes no other keyword, so that a misspelt config key raises.)
    """

    # Size of the last dimension of an encoded box (mmdet's BaseBBoxCoder attribute).
    encode_size = 4

    def __init__(self, target_means: Sequence[float] = (0., 0., 0., 0.),
                 target_stds: Sequence[float] = (1., 1., 1., 1.), clip_border: bool = True,
                 add_ctr_clamp: bool = False, ctr_clamp: int = 32, use_box_type: bool = False) -> None:
        if use_box_type:
            raise NotFusedError("fastbb.nn.DeltaXYWHBBoxCoder: use_box_type=True (HorizontalBoxes outputs) is not "
                             "supported; decode returns plain (..., 4) tensors")
        self.means = target_means
        self.stds = target_stds
        self.clip_border = clip_border
        self.add_ctr_clamp = add_ctr_clamp
        self.ctr_clamp = ctr_clamp
        self.use_box_type = use_box_type

    def encode(self, bboxes: Tensor, gt_bboxes: Tensor) -> Tensor:
        """
        Gets the box regression transformation deltas that transform ``bboxes`` into ``gt_bboxes``.

        Args:
            bboxes (Tensor[N, ..., 4]): Source boxes, e.g. object proposals.
            gt_bboxes (Tensor[N, ..., 4]): Target of the transformation, e.g. ground-truth boxes, of bboxes'
                shape.

        Returns:
            Tensor[N, ..., 4]: Box transformation deltas, in float32.
        """
        if bboxes.size(0) != gt_bboxes.size(0) or bboxes.size(-1) != 4 or gt_bboxes.size(-1) != 4:
            raise ValueAssertionError(f"fastbb.nn.DeltaXYWHBBoxCoder.encode: bboxes and gt_bboxes must be "
                                      f"(N, ..., 4) with one N, got {tuple(bboxes.shape)} and "
                                      f"{tuple(gt_bboxes.shape)}")
        if bboxes.shape != gt_bboxes.shape:
            raise ValueError(f"fastbb.nn.DeltaXYWHBBoxCoder.encode: bboxes and gt_bboxes must have one shape, "
                             f"got {tuple(bboxes.shape)} and {tuple(gt_bboxes.shape)}")
        src = bboxes.float()
        dst = gt_bboxes.float()
        src_ctr = (src[..., :2] + src[..., 2:]) * 0.5
        src_size = src[..., 2:] - src[..., :2]
        dst_ctr = (dst[..., :2] + dst[..., 2:]) * 0.5
        dst_size = dst[..., 2:] - dst[..., :2]
        deltas = torch.cat(((dst_ctr - src_ctr) / src_size, torch.log(dst_size / src_size)), dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, bboxes: Tensor, pred_bboxes: Tensor,
               max_shape: Sequence[int] | Tensor | Sequence[Sequence[int]] | None = None,
               wh_ratio_clip: float = 16 / 1000) -> Tensor:
        """
        Applies the transformation ``pred_bboxes`` to ``bboxes``.

        Args:
            bboxes (Tensor[N, 4] or Tensor[B, N, 4]): Basic boxes.
            pred_bboxes (Tensor[N, 4K] or Tensor[B, N, 4K]): Encoded offsets with respect to each box.
            max_shape (Sequence[int] or Tensor or Sequence[Sequence[int]], optional): Maximum bounds for
                boxes, (H, W) or (H, W, C); one per image for batched inputs. Used when clip_border is set.
            wh_ratio_clip (float): The allowed ratio between width and height. Default: 16 / 1000.

        Returns:
            Tensor: Decoded boxes, of pred_bboxes' shape, in the dtype of add's promotion of bboxes' and
            pred_bboxes' dtypes, as mmdet's (under ``torch.autocast`` on CUDA, float32, as mmdet's too).
        """
        # Under torch.fx symbolic tracing the shapes are unknown: decode_boxes checks them when the graph runs.
        if not traced(bboxes, pred_bboxes) and (pred_bboxes.size(0) != bboxes.size(0) or (
                pred_bboxes.ndim == 3 and pred_bboxes.size(1) != bboxes.size(1))):
            raise ValueAssertionError(f"fastbb.nn.DeltaXYWHBBoxCoder.decode: pred_bboxes "
                                      f"{tuple(pred_bboxes.shape)} do not match bboxes {tuple(bboxes.shape)}")
        pred_bboxes = _promote_deltas(bboxes, pred_bboxes)
        max_ratio = abs(math.log(wh_ratio_clip))
        return decode_boxes(
            bboxes, pred_bboxes, style="mmdet", means=tuple(self.means), stds=tuple(self.stds),
            dwh_min=None if self.add_ctr_clamp else -max_ratio, dwh_max=max_ratio,
            dxy_max=self.ctr_clamp if self.add_ctr_clamp else None,
            max_shape=max_shape if self.clip_border else None)
