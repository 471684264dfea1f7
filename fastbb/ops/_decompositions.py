"""Decompositions of fastbb's custom ops into standard aten ops (their plain-PyTorch references), for the ONNX
exporter.

``torch.onnx.export(..., dynamo=True)`` captures a model with torch.export, then decomposes every op that has
no ONNX translation with the decompositions in ``torch._decomp.decomposition_table``: with these registered
there, an FPN's fused merges become ``Conv`` + ``Resize`` + ``Add`` in the ONNX model, which onnxruntime runs,
and the user passes nothing. (conv_bn_relu needs none: under torch.export it runs its plain-PyTorch path.)

torch.compile and torch.export keep the custom ops (their default decompositions are a fixed list of aten
ops). FakeTensor propagation with symbolic shapes prefers a registered decomposition over the op's fake
function, so each decomposition returns the layout the fake function gives.

Registered: fpn_merge, upsample_nearest_add, decode_boxes, and retinanet_postprocess_padded (torchvision's
per-image, per-level post-processing in ops ONNX has: TopK, NonZero, and torchvision::nms, which ONNX's
NonMaxSuppression runs; the detections are then padded to the op's fixed shapes). The other NMS ops, the losses
and the training-only ops have none.
"""
import torch
import torch.nn.functional as F
import torchvision
from torch._decomp import register_decomposition

from fastbb.ops._common import memory_format
from fastbb.ops.box_decode import TABLE as DECODE_BOXES_TABLE
from fastbb.ops.box_decode import decode_boxes
from fastbb.ops.fpn_merge import TABLE as FPN_MERGE_TABLE
from fastbb.ops.retinanet_postprocess import _padded_outputs


@register_decomposition(torch.ops.fastbb.fpn_merge.default)
def _fpn_merge(x, weight, bias, top):
    return FPN_MERGE_TABLE.reference.run(x, weight, bias, top).contiguous(memory_format=memory_format(x))


@register_decomposition(torch.ops.fastbb.upsample_nearest_add.default)
def _upsample_nearest_add(top, lateral):
    # upsample_nearest_add_reference's computation without its input checks (the op's arguments passed them,
    # and comparing symbolic sizes would add guards)
    out = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
    return out.contiguous(memory_format=memory_format(lateral))


@register_decomposition(torch.ops.fastbb.decode_boxes.default)
def _decode_boxes(anchors, deltas, image_sizes, style, weights, means, stds, dwh_min, dwh_max, dxy_max, image_size):
    boxes = DECODE_BOXES_TABLE.reference.run(anchors, deltas, image_sizes, style, weights, means, stds, dwh_min,
                                             dwh_max, dxy_max, image_size)
    return boxes.contiguous()


@register_decomposition(torch.ops.fastbb.retinanet_postprocess_padded.default)
def _retinanet_postprocess_padded(cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes,
                                  score_thresh, nms_thresh, detections_per_img, topk_candidates, box_coder_weights):
    # torchvision's postprocess_detections: per image and level the top candidates above the threshold (the top
    # min(topk_candidates, n) scores of all, then those above it: the same set), decoded and clipped; per image,
    # NMS per label (torchvision's coordinate offsets, written so that an empty set needs no branch).
    num_classes = cls_logits.shape[-1]
    padded = ([], [], [], [])
    for image in range(cls_logits.shape[0]):
        found_boxes, found_scores, found_labels = [], [], []
        start = 0
        for count in num_anchors_per_level:
            scores = torch.sigmoid(cls_logits[image, start:start + count]).flatten()
            scores, flat_index = scores.topk(min(topk_candidates, scores.shape[0]))
            above = scores > score_thresh
            scores, flat_index = scores[above], flat_index[above]
            rows = torch.div(flat_index, num_classes, rounding_mode="floor") + start
            found_boxes.append(decode_boxes(anchors[image][rows][None], bbox_regression[image][rows][None],
                                            style="torchvision", weights=box_coder_weights,
                                            max_shape=image_sizes[image:image + 1])[0])
            found_scores.append(scores)
            found_labels.append(flat_index % num_classes)
            start += count
        boxes, scores, labels = torch.cat(found_boxes), torch.cat(found_scores), torch.cat(found_labels)
        largest = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
        offset_boxes = boxes + (labels.to(boxes) * (largest + 1))[:, None]
        keep = torchvision.ops.nms(offset_boxes, scores, nms_thresh)[:detections_per_img]
        for out, found, pad in zip(padded, (boxes[keep], scores[keep], labels[keep]),
                                   (boxes.new_zeros(detections_per_img, 4), scores.new_zeros(detections_per_img),
                                    labels.new_zeros(detections_per_img))):
            out.append(torch.cat([found, pad])[:detections_per_img])
        padded[3].append(keep.new_ones(keep.shape).sum())
    return tuple(torch.stack(parts) for parts in padded)


def _retinanet_postprocess_padded_meta(cls_logits, bbox_regression, anchors, num_anchors_per_level, image_sizes,
                                       score_thresh, nms_thresh, detections_per_img, topk_candidates,
                                       box_coder_weights):
    return _padded_outputs(bbox_regression, cls_logits, cls_logits.shape[0], detections_per_img)


# FakeTensor propagation with symbolic shapes (torch.compile(dynamic=True), AOT dispatch) prefers a registered
# decomposition unless the op has a Python meta. This decomposition makes unbacked sizes (nonzero, nms) that the
# op's fixed-shape outputs do not bind, so the op's fake function stands in as its meta: only the exporter's
# decomposition pass runs the decomposition.
torch._decomp.meta_table[torch.ops.fastbb.retinanet_postprocess_padded.default] = _retinanet_postprocess_padded_meta
