"""fastbb ops: each is a torch.library custom op in the fastbb:: namespace (fastbb/ops/<op>.py)."""
from fastbb.ops.box_decode import decode_boxes, decode_boxes_reference
from fastbb.ops.conv_bn_relu import conv_bn_relu
from fastbb.ops.nms import (batched_nms, batched_nms_reference, nms, nms_reference, nms_sorted_padded,
                            nms_sorted_padded_reference)
from fastbb.ops.focal_loss import (sigmoid_focal_loss, sigmoid_focal_loss_labels, sigmoid_focal_loss_labels_reference,
                                   sigmoid_focal_loss_reference)
from fastbb.ops.fpn_merge import fpn_merge, fpn_merge_reference
from fastbb.ops.retinanet_postprocess import retinanet_postprocess, retinanet_postprocess_reference
from fastbb.ops.upsample_nearest_add import upsample_nearest_add, upsample_nearest_add_reference

__all__ = [
    "batched_nms", "batched_nms_reference", "conv_bn_relu", "decode_boxes", "decode_boxes_reference", "fpn_merge",
    "fpn_merge_reference", "nms", "nms_reference", "nms_sorted_padded", "nms_sorted_padded_reference",
    "retinanet_postprocess", "retinanet_postprocess_reference", "sigmoid_focal_loss", "sigmoid_focal_loss_labels",
    "sigmoid_focal_loss_labels_reference", "sigmoid_focal_loss_reference", "upsample_nearest_add",
    "upsample_nearest_add_reference",
]
