"""RetinaNet's training loss alone (anchors, matching, classification and box losses): fastbb.ops.retinanet_loss
vs torchvision's anchor_generator(images, features) + RetinaNet.compute_loss(targets, head_outputs, anchors).

Batch 8 of 512x512 images, 50 boxes per image, 91 classes: P3..P7 at 64, 32, 16, 8, 4 locations a side x 9
anchors = 49,104 anchors per image. Boxes have sides uniform in [16, 256) pixels, labels uniform in [1, 91);
logits ~ N(-4.6, 2^2) (about the prior), deltas ~ N(0, 0.3^2).

Providers:
- torchvision: the anchors generated (as the model does on every call), then compute_loss (its loop over
  images: box_iou, Matcher, focal loss, encode and L1 / GIoU).
- torchvision, cached anchors: compute_loss alone, on anchors made once.
- fastbb: pad_targets (from the same list of target dicts) and retinanet_loss on anchors made once (the
  model caches them: they depend only on the image and feature sizes).
- fastbb + anchors: the same with torchvision's anchor generation in each call, as the torchvision row.
- fastbb[cpp]: the fastbb row with the C++ matcher forced (the default on CPU).
A fourth case times the matching alone: match_anchors vs torchvision's box_iou + Matcher per image. It is the
family's representative case (the quick run): torchvision's full loss takes 5-12 s a call on a 2-core CPU, so
the loss rows take minutes (`python -m fastbb --family retinanet_loss`).
"""
import types

import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection.image_list import ImageList

from torchvision.ops import boxes as box_ops

from fastbb.benchmarks.runner import backend_providers
from fastbb.ops.retinanet_loss import match_anchors, pad_targets, retinanet_loss

BATCH, IMAGE, BOXES_PER_IMAGE, NUM_CLASSES = 8, 512, 50, 91
GRIDS = (64, 32, 16, 8, 4)


def _inputs(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_anchors = sum(g * g for g in GRIDS) * 9
    cls_logits = (torch.randn(BATCH, num_anchors, NUM_CLASSES, generator=gen) * 2 - 4.6).to(device)
    bbox_regression = (torch.randn(BATCH, num_anchors, 4, generator=gen) * 0.3).to(device)
    targets = []
    for _ in range(BATCH):
        wh = torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * 240 + 16
        x1y1 = torch.rand(BOXES_PER_IMAGE, 2, generator=gen) * (IMAGE - wh)
        labels = torch.randint(1, NUM_CLASSES, (BOXES_PER_IMAGE,), generator=gen)
        targets.append({"boxes": torch.cat((x1y1, x1y1 + wh), 1).to(device), "labels": labels.to(device)})
    images = ImageList(torch.zeros(BATCH, 3, IMAGE, IMAGE, device=device), [(IMAGE, IMAGE)] * BATCH)
    features = [torch.zeros(BATCH, 1, g, g, device=device) for g in GRIDS]
    return cls_logits, bbox_regression, targets, images, features


def _torchvision_model(box_loss):
    head = tv_retinanet.RetinaNetHead(4, 9, NUM_CLASSES)
    head.regression_head._loss_type = box_loss
    return types.SimpleNamespace(proposal_matcher=det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True),
                                 head=head, anchor_generator=tv_retinanet._default_anchorgen())


def _providers(device, box_loss, backward):
    cls_logits, bbox_regression, targets, images, features = _inputs(device)
    cls_logits.requires_grad_(backward)
    bbox_regression.requires_grad_(backward)
    model = _torchvision_model(box_loss)
    cached_anchors = model.anchor_generator(images, features)

    def finish(losses):
        if backward:
            return torch.autograd.grad(losses["classification"] + losses["bbox_regression"],
                                       (cls_logits, bbox_regression))
        return losses

    head_outputs = {"cls_logits": cls_logits, "bbox_regression": bbox_regression}

    def torchvision_loss(anchors=None):
        anchors = model.anchor_generator(images, features) if anchors is None else anchors
        return finish(tv_retinanet.RetinaNet.compute_loss(model, targets, head_outputs, anchors))

    def fastbb_loss(anchors=None):
        anchors = model.anchor_generator(images, features)[0] if anchors is None else anchors
        gt_boxes, gt_labels, gt_counts = pad_targets(targets)
        return finish(retinanet_loss(cls_logits, bbox_regression, anchors, gt_boxes, gt_labels, gt_counts,
                                     box_loss=box_loss))

    providers = {
        "torchvision": torchvision_loss,
        "torchvision, cached anchors": lambda: torchvision_loss(cached_anchors),
        "fastbb": lambda: fastbb_loss(cached_anchors[0]),
        "fastbb + anchors": fastbb_loss,
    }
    providers.update(backend_providers("match_anchors", device, providers["fastbb"]))
    return providers


def _match_providers(device):
    _, _, targets, images, features = _inputs(device)
    model = _torchvision_model("l1")
    anchors = model.anchor_generator(images, features)
    gt_boxes, _, gt_counts = pad_targets(targets)

    def torchvision_match():
        return [model.proposal_matcher(box_ops.box_iou(t["boxes"], a)) for t, a in zip(targets, anchors)]

    def fastbb_match():
        return match_anchors(anchors[0], gt_boxes, gt_counts)

    providers = {"torchvision": torchvision_match, "fastbb": fastbb_match}
    providers.update(backend_providers("match_anchors", device, fastbb_match))
    return providers


def cases(device):
    shape = f"batch {BATCH} {IMAGE}x{IMAGE} {BOXES_PER_IMAGE} boxes {NUM_CLASSES} classes"
    note = ("no torch.compile row: torchvision's compute_loss loops over images with data-dependent shapes "
            "(boolean indexing), which graph-breaks")
    return [
        {"name": f"retinanet_loss l1 fwd {shape}", "providers": _providers(device, "l1", False),
         "baseline": "torchvision", "note": note},
        {"name": f"retinanet_loss l1 fwd+bwd {shape}", "providers": _providers(device, "l1", True),
         "baseline": "torchvision", "note": note},
        {"name": f"retinanet_loss giou fwd+bwd {shape}", "providers": _providers(device, "giou", True),
         "baseline": "torchvision", "note": note},
        {"name": f"retinanet_loss matching alone {shape}", "providers": _match_providers(device),
         "baseline": "torchvision", "representative": True},
    ]
