"""RetinaNet post-processing on the default R50-FPN shapes: fastbb.ops.retinanet_postprocess vs torchvision.

Inputs: 800x1333 images padded to 800x1344; P3..P7 at 100x168, 50x84, 25x42, 13x21, 7x11 locations x 9
anchors = 201,600 anchors (torchvision's AnchorGenerator with RetinaNet's sizes and ratios), 91 classes.
Logits are drawn from a normal distribution with mean -4.8 and std 1, so about 3.2% of them score above
score_thresh = 0.05 (logit -2.94), as a trained head does; regression deltas ~ N(0, 0.5^2).
Batch 2 on CPU; batch 2 and 8 on CUDA. torchvision: RetinaNet.postprocess_detections on the same inputs
split per level (its loop over images and levels).
"""
import types

import torch
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from fastbb.benchmarks.runner import backend_providers
from fastbb.ops.retinanet_postprocess import retinanet_postprocess

IMAGE_SIZE, PADDED_SIZE = (800, 1333), (800, 1344)
GRIDS = ((100, 168), (50, 84), (25, 42), (13, 21), (7, 11))
NUM_CLASSES, LOGIT_MEAN, LOGIT_STD = 91, -4.8, 1.0


def _anchors(batch, device):
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))
    generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    images = ImageList(torch.zeros(batch, 3, *PADDED_SIZE, device=device), [IMAGE_SIZE] * batch)
    features = [torch.zeros(batch, 1, h, w, device=device) for h, w in GRIDS]
    return generator(images, features)


def _inputs(batch, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    levels = [h * w * 9 for h, w in GRIDS]
    num_anchors = sum(levels)
    cls_logits = torch.randn(batch, num_anchors, NUM_CLASSES, generator=gen, device=device) * LOGIT_STD + LOGIT_MEAN
    bbox_regression = torch.randn(batch, num_anchors, 4, generator=gen, device=device) * 0.5
    return cls_logits, bbox_regression, _anchors(batch, device), levels, [IMAGE_SIZE] * batch


def _torchvision_call(cls_logits, bbox_regression, anchors, levels, image_sizes):
    model = types.SimpleNamespace(score_thresh=0.05, nms_thresh=0.5, detections_per_img=300, topk_candidates=1000,
                                  box_coder=BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)))
    head_outputs = {"cls_logits": list(cls_logits.split(levels, 1)),
                    "bbox_regression": list(bbox_regression.split(levels, 1))}
    split_anchors = [list(a.split(levels)) for a in anchors]
    return lambda: RetinaNet.postprocess_detections(model, head_outputs, split_anchors, image_sizes)


def cases(device):
    result = []
    for batch in ((2,) if device == "cpu" else (2, 8)):
        args = _inputs(batch, device)
        providers = {"torchvision": _torchvision_call(*args),
                     "fastbb": lambda a=args: retinanet_postprocess(*a)}
        if device == "cuda":
            stacked = (args[0], args[1], torch.stack(args[2]), args[3], torch.tensor(args[4], device=device))
            providers["fastbb padded"] = lambda a=stacked: retinanet_postprocess(*a, padded=True)
        providers.update(backend_providers("retinanet_postprocess", device, providers["fastbb"]))
        result.append({"name": f"retinanet_postprocess {batch}x{sum(args[3])} anchors {NUM_CLASSES} classes",
                       "providers": providers, "baseline": "torchvision", "representative": True})
    return result
