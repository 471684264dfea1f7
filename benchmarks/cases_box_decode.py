"""Box decoding on the RetinaNet default: 201,600 anchors x 2 images (CONTRACT.md), decoded and clipped.

Providers: fastbb.ops.decode_boxes (best backend, and each usable one), torchvision's
BoxCoder.decode_single + clip_boxes_to_image, and torch.compile of that same eager code.
"""
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import clip_boxes_to_image

from fastbb.benchmarks.runner import backend_providers
from fastbb.ops.box_decode import decode_boxes

NUM_ANCHORS, NUM_IMAGES, IMAGE_SIZE = 201_600, 2, (800, 1333)


def _inputs(device):
    gen = torch.Generator().manual_seed(0)
    ctr = torch.rand(NUM_ANCHORS, 2, generator=gen) * torch.tensor([1344.0, 800.0])
    size = torch.rand(NUM_ANCHORS, 2, generator=gen) * 500 + 16
    anchors = torch.cat((ctr - size / 2, ctr + size / 2), -1).to(device)
    deltas = (torch.randn(NUM_IMAGES, NUM_ANCHORS, 4, generator=gen) * 0.5).to(device)
    return anchors, deltas


def _torchvision_decode(coder, anchors, deltas):
    boxes = coder.decode_single(deltas.reshape(-1, 4), anchors.repeat(deltas.shape[0], 1))
    return clip_boxes_to_image(boxes, IMAGE_SIZE).reshape(deltas.shape)


def cases(device):
    anchors, deltas = _inputs(device)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    compiled = torch.compile(_torchvision_decode, dynamic=False)

    providers = {
        "torchvision": lambda: _torchvision_decode(coder, anchors, deltas),
        "torch.compile": lambda: compiled(coder, anchors, deltas),
        "fastbb": lambda: decode_boxes(anchors, deltas, max_shape=IMAGE_SIZE),
    }
    providers.update(backend_providers("decode_boxes", device, providers["fastbb"]))
    return [{"name": f"decode_boxes {NUM_IMAGES}x{NUM_ANCHORS} anchors", "providers": providers,
             "baseline": "torchvision", "representative": True}]
