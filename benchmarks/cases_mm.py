"""OpenMMLab's own configs, unchanged, built by their registries with ``import fastbb.mm`` ("fastbb.mm") and
without it (the package's own classes), same weights, same inputs, same process. Needs the real packages
(requirements-mm.txt); without them the family has no cases.

- mmdet ``retinanet_r50_fpn_1x_coco``: ``predict`` of 1 image at 512x512, and ``loss`` + backward of 2 images
  at 512x512 with 5-20 boxes each. The frozen BN statistics are drawn at random; the head is as the registry
  builds it (PyTorch's default init, init_weights not called), which scores most candidates above score_thr,
  so every level fills its nms_pre=1000 and NMS sees 5000 boxes, as a trained model on a busy image.
- mmpretrain's ResNet-50 ImageClassifier (the seed config): a training step (loss + backward) of 8 images at
  224x224.
The unpatched models run on mmcv-lite with the torchvision-backed mmcv._ext of openmmlab_baseline.py (so their
NMS is torchvision's); fastbb's RetinaHead calls fastbb's batched NMS itself. CPU only: the GPU rows of the
families underneath (conv_bn_relu, fpn, focal_loss, nms, retinanet_postprocess) are in their own files.
"""
import copy
import importlib.util
import os

import torch

from fastbb.benchmarks.openmmlab_baseline import install_torchvision_ext

SIZE = 512
CLASSIFIER = dict(
    type="ImageClassifier",
    backbone=dict(type="ResNet", depth=50, num_stages=4, out_indices=(3,), style="pytorch"),
    neck=dict(type="GlobalAveragePooling"),
    head=dict(type="LinearClsHead", num_classes=1000, in_channels=2048,
              loss=dict(type="CrossEntropyLoss", loss_weight=1.0), topk=(1, 5)))


def _build_both(scope, registry, cfg):
    """(the package's own model, fastbb.mm's) built from cfg, with the same weights."""
    import fastbb.mm
    from mmengine.registry import DefaultScope
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(scope):
        ours = registry.build(copy.deepcopy(cfg))
        fastbb.mm.unregister()
        try:
            theirs = registry.build(copy.deepcopy(cfg))
        finally:
            fastbb.mm.register()
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _detection_samples(batch, seed=0):
    """DetDataSamples of batch images at SIZE x SIZE with 5-20 boxes of random size and class each."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(batch):
        sample = DetDataSample()
        sample.set_metainfo(dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE),
                                 batch_input_shape=(SIZE, SIZE), scale_factor=(1.0, 1.0)))
        n = int(torch.randint(5, 21, (), generator=g))
        corner = torch.rand(n, 2, generator=g) * SIZE * 0.8
        gt = InstanceData()
        gt.bboxes = torch.cat([corner, corner + 16 + torch.rand(n, 2, generator=g) * (SIZE * 0.2 - 16)], dim=1)
        gt.labels = torch.randint(0, 80, (n,), generator=g)
        sample.gt_instances = gt
        samples.append(sample)
    return samples


def _predict(model, inputs, samples):
    model.eval()

    def run():
        with torch.no_grad():
            return model.predict(inputs, samples)
    return run


def _loss_backward(model, inputs, samples):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        losses = model.loss(inputs, samples)
        total = sum(sum(v) if isinstance(v, list) else v for k, v in losses.items() if k.startswith("loss"))
        return torch.autograd.grad(total, params)
    return run


def _retinanet_cases():
    import mmdet
    from mmdet.registry import MODELS
    from mmengine.config import Config
    path = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "retinanet", "retinanet_r50_fpn_1x_coco.py")
    theirs, ours = _build_both("mmdet", MODELS, Config.fromfile(path).model)
    g = torch.Generator().manual_seed(0)
    one, two = torch.randn(1, 3, SIZE, SIZE, generator=g), torch.randn(2, 3, SIZE, SIZE, generator=g)
    return [
        {"name": f"mmdet RetinaNet R50-FPN predict 1x{SIZE}x{SIZE}", "baseline": "mmdet", "representative": True,
         "providers": {"mmdet": _predict(theirs, one, _detection_samples(1)),
                       "fastbb.mm": _predict(ours, one, _detection_samples(1))}},
        {"name": f"mmdet RetinaNet R50-FPN loss + backward 2x{SIZE}x{SIZE} 5-20 boxes", "baseline": "mmdet",
         "providers": {"mmdet": _loss_backward(theirs, two, _detection_samples(2)),
                       "fastbb.mm": _loss_backward(ours, two, _detection_samples(2))}},
    ]


def _classifier_cases():
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample
    theirs, ours = _build_both("mmpretrain", MODELS, CLASSIFIER)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 3, 224, 224, generator=g)
    samples = [DataSample().set_gt_label(int(label)) for label in torch.randint(0, 1000, (8,), generator=g)]
    return [{"name": "mmpretrain ResNet-50 classifier train step 8x224x224", "baseline": "mmpretrain",
             "providers": {"mmpretrain": _loss_backward(theirs, inputs, samples),
                           "fastbb.mm": _loss_backward(ours, inputs, samples)}}]


def cases(device):
    if device != "cpu":
        return []
    install_torchvision_ext()
    result = []
    if importlib.util.find_spec("mmdet") is not None:
        result += _retinanet_cases()
    if importlib.util.find_spec("mmpretrain") is not None:
        result += _classifier_cases()
    return result
