"""The whole RetinaNet R50-FPN: fastbb.models.detection vs torchvision's model, eager and (CPU inference) under
torch.compile.

Models as torchvision builds them with a pretrained backbone (FrozenBatchNorm2d, trainable_backbone_layers=3,
91 classes), with random weights (the frozen BN statistics drawn at random); fastbb's loads torchvision's
state_dict. "512x512" is min_size = max_size = 512.
- CPU, float32: inference of 1 image at 512x512 and of 2 images at 800x1333; a training step (forward +
  losses + backward) of 2 images at 512x512 with 5-20 boxes each.
- CUDA: under bfloat16 autocast, channels_last: a training step of 16 images at 512x512 and inference of 1
  image at 800x1333.
A randomly initialised head scores almost no candidate above score_thresh, as torchvision's untrained model
does; the post-processing is timed on trained-like scores in cases_retinanet_postprocess.py.
"""
import torch
import torchvision
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from fastbb.models.detection import retinanet_resnet50_fpn



def _models(device, min_size, max_size):
    """(torchvision's RetinaNet, fastbb's with the same weights), built as torchvision's builder builds them
    with pretrained backbone weights."""
    torch.manual_seed(0)
    backbone = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    backbone = _resnet_fpn_extractor(backbone, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    theirs = RetinaNet(backbone, 91, min_size=min_size, max_size=max_size).to(device)
    ours = retinanet_resnet50_fpn(weights=theirs.state_dict(), weights_backbone=None, num_classes=91,
                                  min_size=min_size, max_size=max_size).to(device)
    return theirs, ours


def _images(batch, height, width, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, height, width, generator=g).to(device) for _ in range(batch)]


def _targets(images, seed=0):
    """5-20 boxes of random size and class per image."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for image in images:
        n = int(torch.randint(5, 21, (), generator=g))
        h, w = image.shape[-2:]
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = 16 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.2 - 16, h * 0.2 - 16]).clamp(min=1)
        boxes = torch.cat([xy, xy + wh], 1).to(image.device)
        labels = torch.randint(1, 91, (n,), generator=g).to(image.device)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def _inference(model, images, autocast_dtype=None):
    model.eval()
    device = images[0].device.type

    def run():
        with torch.no_grad(), torch.autocast(device, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            return model(images)
    return run


def _train_step(model, images, targets, autocast_dtype=None):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    device = images[0].device.type

    def run():
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            losses = model(images, targets)
        return torch.autograd.grad(sum(losses.values()), params)
    return run


def _compiled(model):
    """torch.compile of torchvision's model in eval mode (its post-processing graph-breaks where shapes depend
    on the scores)."""
    model.eval()
    return torch.compile(model, dynamic=False)


def _case(name, providers):
    return {"name": name, "providers": providers, "baseline": "torchvision"}


def cases(device):
    result = []
    if device == "cpu":
        for batch, (h, w), (min_size, max_size) in ((1, (512, 512), (512, 512)), (2, (800, 1333), (800, 1333))):
            theirs, ours = _models(device, min_size, max_size)
            images = _images(batch, h, w, device)
            case = _case(f"RetinaNet R50-FPN inference {batch}x{h}x{w}", {
                "torchvision": _inference(theirs, images), "torch.compile": _inference(_compiled(theirs), images),
                "fastbb": _inference(ours, images)})
            case["compile_estimate_s"] = 60  # 35 s at 1x512x512 on a 2-core CPU
            result.append(case)
        theirs, ours = _models(device, 512, 512)
        images = _images(2, 512, 512, device)
        targets = _targets(images)
        result.append(_case("RetinaNet R50-FPN train step 2x512x512 5-20 boxes", {
            "torchvision": _train_step(theirs, images, targets), "fastbb": _train_step(ours, images, targets)}))
        return result
    bf16 = torch.bfloat16
    theirs, ours = (m.to(memory_format=torch.channels_last) for m in _models(device, 512, 512))
    images = [i.contiguous(memory_format=torch.channels_last) for i in _images(16, 512, 512, device)]
    targets = _targets(images)
    result.append(_case("RetinaNet R50-FPN train step 16x512x512 bf16 autocast NHWC", {
        "torchvision": _train_step(theirs, images, targets, bf16),
        "fastbb": _train_step(ours, images, targets, bf16)}))
    theirs, ours = (m.to(memory_format=torch.channels_last) for m in _models(device, 800, 1333))
    images = _images(1, 800, 1333, device)
    result.append(_case("RetinaNet R50-FPN inference 1x800x1333 bf16 autocast NHWC", {
        "torchvision": _inference(theirs, images, bf16), "fastbb": _inference(ours, images, bf16)}))
    return result
