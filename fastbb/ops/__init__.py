"""fastbb ops: each is a torch.library custom op in the fastbb:: namespace, whose home is
fastbb/ops/<op>.py (schema, reference, fake, autograd, backend table). Their pure-PyTorch references are
gathered in fastbb.ops.reference."""
from fastbb.ops import reference
from fastbb.ops.box_decode import decode_boxes
from fastbb.ops.conv_bn_relu import conv_bn_relu
from fastbb.ops.focal_loss import sigmoid_focal_loss, sigmoid_focal_loss_labels
from fastbb.ops.fpn_merge import fpn_merge
from fastbb.ops.nms import batched_nms, nms, nms_sorted_padded
from fastbb.ops.retinanet_loss import match_anchors, pad_targets, retinanet_loss
from fastbb.ops.retinanet_postprocess import retinanet_postprocess
from fastbb.ops.upsample_nearest_add import upsample_nearest_add

__all__ = ["batched_nms", "conv_bn_relu", "decode_boxes", "fpn_merge", "match_anchors", "nms", "nms_sorted_padded",
           "pad_targets", "retinanet_loss", "retinanet_postprocess", "sigmoid_focal_loss", "sigmoid_focal_loss_labels",
           "upsample_nearest_add"]
from fastbb.ops import _decompositions  # noqa: E402,F401  (the custom ops' decompositions, for the ONNX exporter)
