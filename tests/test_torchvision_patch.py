"""fastbb.patch_torchvision(): unmodified torchvision code builds fastbb's models; unpatch restores torchvision."""
import pytest
import torch
import torchvision
from torchvision.models import detection as tv_detection

import fastbb
from fastbb.models import detection


@pytest.fixture
def patched():
    originals = (torchvision.models.resnet50, tv_detection.retinanet_resnet50_fpn, tv_detection.RetinaNet,
                 torchvision.models.get_model_builder("retinanet_resnet50_fpn"))
    replaced = fastbb.patch_torchvision()
    yield replaced
    fastbb.unpatch_torchvision()
    assert (torchvision.models.resnet50, tv_detection.retinanet_resnet50_fpn, tv_detection.RetinaNet,
            torchvision.models.get_model_builder("retinanet_resnet50_fpn")) == originals


def test_builders_classes_and_registry_give_fastbb_models(patched):
    assert "torchvision.models.resnet.resnet50" in patched
    assert fastbb.patch_torchvision() == patched  # again: nothing more
    small = dict(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64)
    for model in (tv_detection.retinanet_resnet50_fpn(**small),
                  torchvision.models.get_model("retinanet_resnet50_fpn", **small),
                  torchvision.models.get_model("retinanet_resnet50_fpn_v2", **small)):
        assert isinstance(model, detection.RetinaNet)
        assert isinstance(model.backbone.body.layer1[0], fastbb.models.Bottleneck)
    assert torchvision.models.get_model_weights("retinanet_resnet50_fpn") \
        is tv_detection.RetinaNet_ResNet50_FPN_Weights
    assert torchvision.models.get_model_weights("resnet50") is torchvision.models.ResNet50_Weights
    assert isinstance(torchvision.models.resnet50(), fastbb.models.ResNet)
    assert isinstance(torchvision.models.get_model("resnet18", num_classes=10), fastbb.models.ResNet)
    wide = torchvision.models.wide_resnet50_2()
    assert isinstance(wide, fastbb.models.ResNet) and isinstance(wide.layer1[0], fastbb.models.Bottleneck)
    faster = tv_detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert isinstance(faster.backbone.body.layer1[0], fastbb.models.Bottleneck)
    assert isinstance(faster.backbone.fpn, fastbb.nn.FeaturePyramidNetwork)


def test_unpatched_builds_torchvision_s_again(patched):
    fastbb.unpatch_torchvision()
    model = tv_detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    assert type(model) is tv_detection.RetinaNet and not isinstance(model, detection.RetinaNet)
    assert type(torchvision.models.resnet50()) is torchvision.models.ResNet


def _reference_style_training(steps=2):
    """A loop written against torchvision's detection API, as its reference scripts train: the model from
    get_model, SGD over its trainable parameters, the sum of the loss dict."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("retinanet_resnet50_fpn", weights=None, weights_backbone=None,
                                         num_classes=4, min_size=48, max_size=48)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = [torch.rand(3, 48, 40), torch.rand(3, 35, 48)]
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 25.0, 30.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 20.0, 15.0], [25.0, 10.0, 45.0, 30.0]]),
                "labels": torch.tensor([2, 3])}]
    losses = []
    for _ in range(steps):
        loss_dict = model(images, targets)
        loss = sum(loss for loss in loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return model, losses


def test_torchvision_style_training_loop_runs_unchanged(patched):
    """The patched loop's losses equal the unpatched torchvision loop's: the first step's within float32
    rounding; the second's within 1e-3, the first SGD step amplifying the rounding differences of the
    fused kernels through training-mode BN over a 2-image batch (in float64 the two agree to 1e-12)."""
    model, losses = _reference_style_training()
    assert isinstance(model, detection.RetinaNet)
    fastbb.unpatch_torchvision()
    original, original_losses = _reference_style_training()
    assert type(original) is tv_detection.RetinaNet
    torch.testing.assert_close(losses[0], original_losses[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses[1], original_losses[1], rtol=1e-3, atol=0)
