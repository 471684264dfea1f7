"""The pure-PyTorch reference of every op, in one place: the ground truth each backend is tested against,
written for clarity (each lives in its op's home, fastbb/ops/<op>.py). Forcing the "reference" backend
(`fastbb.use_backend("reference")`) runs these through the ops."""
from fastbb.ops.box_decode import decode_boxes_reference
from fastbb.ops.focal_loss import sigmoid_focal_loss_labels_reference, sigmoid_focal_loss_reference
from fastbb.ops.fpn_merge import fpn_merge_reference
from fastbb.ops.nms import batched_nms_reference, nms_reference, nms_sorted_padded_reference
from fastbb.ops.retinanet_loss import match_anchors_reference, retinanet_loss_reference
from fastbb.ops.retinanet_postprocess import retinanet_postprocess_reference
from fastbb.ops.upsample_nearest_add import upsample_nearest_add_reference

__all__ = ["batched_nms_reference", "decode_boxes_reference", "fpn_merge_reference", "match_anchors_reference",
           "nms_reference", "nms_sorted_padded_reference", "retinanet_loss_reference", "retinanet_postprocess_reference",
           "sigmoid_focal_loss_labels_reference", "sigmoid_focal_loss_reference", "upsample_nearest_add_reference"]
