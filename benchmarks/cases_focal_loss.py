"""Sigmoid focal loss, forward + backward with reduction 'sum', on 50,000 anchors x 80 classes.

Dense case: fastbb.ops.sigmoid_focal_loss vs torchvision.ops.sigmoid_focal_loss and torch.compile of it,
on one-hot targets. Labels case: fastbb.ops.sigmoid_focal_loss_labels on the labels vs torchvision on
their one-hot targets.
"""
import torch
import torchvision

from fastbb.benchmarks.runner import backend_providers
from fastbb.ops.focal_loss import sigmoid_focal_loss, sigmoid_focal_loss_labels

NUM_ANCHORS, NUM_CLASSES = 50_000, 80


def _inputs(device):
    gen = torch.Generator().manual_seed(0)
    # RetinaNet-like: most anchors background (label NUM_CLASSES), logits around the prior -log(99).
    logits = (torch.randn(NUM_ANCHORS, NUM_CLASSES, generator=gen) * 2 - 4.6).to(device)
    labels = torch.randint(0, NUM_CLASSES, (NUM_ANCHORS,), generator=gen)
    labels = torch.where(torch.rand(NUM_ANCHORS, generator=gen) < 0.9, torch.full_like(labels, NUM_CLASSES),
                         labels).to(device)
    one_hot = torch.nn.functional.one_hot(labels, NUM_CLASSES + 1)[:, :NUM_CLASSES].float()
    return logits.requires_grad_(), labels, one_hot


def _forward_backward(loss_fn, logits, *args, **kwargs):
    def run():
        loss = loss_fn(logits, *args, **kwargs)
        return torch.autograd.grad(loss, logits)
    return run


def cases(device):
    logits, labels, one_hot = _inputs(device)
    compiled = torch.compile(torchvision.ops.sigmoid_focal_loss, dynamic=False)

    dense = {
        "torchvision": _forward_backward(torchvision.ops.sigmoid_focal_loss, logits, one_hot, reduction="sum"),
        "torch.compile": _forward_backward(compiled, logits, one_hot, reduction="sum"),
        "fastbb": _forward_backward(sigmoid_focal_loss, logits, one_hot, reduction="sum"),
    }
    dense.update(backend_providers("sigmoid_focal_loss", device, dense["fastbb"]))
    labelled = {
        "torchvision": _forward_backward(torchvision.ops.sigmoid_focal_loss, logits, one_hot, reduction="sum"),
        "fastbb": _forward_backward(sigmoid_focal_loss_labels, logits, labels, reduction="sum"),
    }
    labelled.update(backend_providers("sigmoid_focal_loss", device, labelled["fastbb"]))
    name = f"{NUM_ANCHORS}x{NUM_CLASSES} fwd+bwd sum"
    return [{"name": f"focal_loss dense {name}", "providers": dense, "baseline": "torchvision",
             "representative": True},
            {"name": f"focal_loss labels {name}", "providers": labelled, "baseline": "torchvision"}]
