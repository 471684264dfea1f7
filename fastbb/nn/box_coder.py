"""Box coders with torchvision's and mmdet's APIs; decoding runs on the fused fastbb.ops.decode_boxes."""
import math

import torch
from torch import Tensor

from fastbb._registry import register
from fastbb.ops.box_decode import decode_boxes


@register("BoxCoder")
class BoxCoder:
    """torchvision.models.detection._utils.BoxCoder: (dx, dy, dw, dh) / weights, dw and dh clamped
    from above at bbox_xform_clip. A plain class, as torchvision's is."""

    def __init__(self, weights: tuple[float, float, float, float],
                 bbox_xform_clip: float = math.log(1000.0 / 16)) -> None:
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> list[Tensor]:
        boxes_per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes, dim=0), torch.cat(proposals, dim=0))
        return targets.split(boxes_per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """Deltas that move each of `proposals` (N, 4) onto the matching `reference_boxes` (N, 4)."""
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
        """rel_codes (sum N_i, 4K) for the boxes of every image: decoded boxes (sum N_i, K, 4)."""
        if not isinstance(boxes, (list, tuple)):
            raise TypeError(f"BoxCoder.decode: boxes must be a list or tuple of tensors, got {type(boxes).__name__}")
        if not isinstance(rel_codes, torch.Tensor):
            raise TypeError(f"BoxCoder.decode: rel_codes must be a torch.Tensor, got {type(rel_codes).__name__}")
        num_boxes = sum(b.size(0) for b in boxes)
        concat_boxes = torch.cat(boxes, dim=0)
        if num_boxes > 0:
            rel_codes = rel_codes.reshape(num_boxes, -1)
        pred_boxes = self.decode_single(rel_codes, concat_boxes)
        if num_boxes > 0:
            pred_boxes = pred_boxes.reshape(num_boxes, -1, 4)
        return pred_boxes

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """rel_codes (N, 4K) relative to boxes (N, 4): decoded boxes (N, 4K)."""
        return decode_boxes(boxes, rel_codes, style="torchvision", weights=tuple(self.weights),
                            dwh_max=self.bbox_xform_clip)


@register("DeltaXYWHBBoxCoder")
class DeltaXYWHBBoxCoder:
    """mmdet 3.x DeltaXYWHBBoxCoder: deltas normalised by target_means / target_stds, dw and dh clamped at
    |log(wh_ratio_clip)|, optional centre-shift clamp (YOLOF) and clipping to the image."""

    # Size of the last dimension of an encoded box (mmdet's BaseBBoxCoder attribute).
    encode_size = 4

    def __init__(self, target_means=(0., 0., 0., 0.), target_stds=(1., 1., 1., 1.), clip_border=True,
                 add_ctr_clamp=False, ctr_clamp=32, use_box_type=False):
        if use_box_type:
            raise ValueError("DeltaXYWHBBoxCoder: use_box_type=True (HorizontalBoxes outputs) is not supported; "
                             "decode returns plain (..., 4) tensors")
        self.means = target_means
        self.stds = target_stds
        self.clip_border = clip_border
        self.add_ctr_clamp = add_ctr_clamp
        self.ctr_clamp = ctr_clamp
        self.use_box_type = use_box_type

    def encode(self, bboxes: Tensor, gt_bboxes: Tensor) -> Tensor:
        """Deltas (float32) that move `bboxes` (N, ..., 4) onto `gt_bboxes` of the same shape."""
        if bboxes.size(0) != gt_bboxes.size(0) or bboxes.size(-1) != 4 or gt_bboxes.size(-1) != 4:
            raise ValueError(f"DeltaXYWHBBoxCoder.encode: bboxes and gt_bboxes must be (N, ..., 4) with one N, "
                             f"got {tuple(bboxes.shape)} and {tuple(gt_bboxes.shape)}")
        if bboxes.shape != gt_bboxes.shape:
            raise ValueError(f"DeltaXYWHBBoxCoder.encode: bboxes and gt_bboxes must have one shape, "
                             f"got {tuple(bboxes.shape)} and {tuple(gt_bboxes.shape)}")
        src = bboxes.float()
        dst = gt_bboxes.float()
        src_ctr = (src[..., :2] + src[..., 2:]) * 0.5
        src_size = src[..., 2:] - src[..., :2]
        dst_ctr = (dst[..., :2] + dst[..., 2:]) * 0.5
        dst_size = dst[..., 2:] - dst[..., :2]
        deltas = torch.cat(((dst_ctr - src_ctr) / src_size, torch.log(dst_size / src_size)), dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, bboxes: Tensor, pred_bboxes: Tensor, max_shape=None, wh_ratio_clip=16 / 1000) -> Tensor:
        """Boxes from `pred_bboxes` (N, 4K) or (B, N, 4K) relative to `bboxes` (N, 4) or (B, N, 4).

        max_shape: (h, w) or (h, w, c), or one such shape per image for batched inputs; used when
        clip_border is set.
        """
        if pred_bboxes.size(0) != bboxes.size(0) or (pred_bboxes.ndim == 3 and pred_bboxes.size(1) != bboxes.size(1)):
            raise ValueError(f"DeltaXYWHBBoxCoder.decode: pred_bboxes {tuple(pred_bboxes.shape)} do not match "
                             f"bboxes {tuple(bboxes.shape)}")
        max_ratio = abs(math.log(wh_ratio_clip))
        return decode_boxes(
            bboxes, pred_bboxes, style="mmdet", means=tuple(self.means), stds=tuple(self.stds),
            dwh_min=None if self.add_ctr_clamp else -max_ratio, dwh_max=max_ratio,
            dxy_max=self.ctr_clamp if self.add_ctr_clamp else None,
            max_shape=max_shape if self.clip_border else None)
