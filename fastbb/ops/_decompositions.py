"""Decompositions of fastbb's custom ops into standard aten ops (their plain-PyTorch references), for the ONNX
exporter.

``torch.onnx.export(..., dynamo=True)`` captures a model with torch.export, then decomposes every op that has
no ONNX translation with the decompositions in ``torch._decomp.decomposition_table``: with these registered
there, an FPN's fused merges become ``Conv`` + ``Resize`` + ``Add`` in the ONNX model, which onnxruntime runs,
and the user passes nothing. (conv_bn_relu needs none: under torch.export it runs its plain-PyTorch path.)

torch.compile and torch.export keep the custom ops (their default decompositions are a fixed list of aten
ops). FakeTensor propagation with symbolic shapes prefers a registered decomposition over the op's fake
function, so each decomposition returns the layout the fake function gives.

Registered: fpn_merge, upsample_nearest_add, decode_boxes. The NMS ops (data-dependent output sizes), the
losses and the training-only ops have none.
"""
import torch
import torch.nn.functional as F
from torch._decomp import register_decomposition

from fastbb.ops._common import memory_format
from fastbb.ops.box_decode import TABLE as DECODE_BOXES_TABLE
from fastbb.ops.fpn_merge import TABLE as FPN_MERGE_TABLE


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
