"""mmdet's own retinanet_r50_fpn_1x_coco config, built by mmdet's registry with fastbb.mm imported, against the
same config built with mmdet's own classes (the real mmdet 3.3 package; see tests/mm_support.py)."""
import copy
import os

import pytest
import torch

from conftest import assert_error_within, randomize_bn
from mm_support import require

mmdet_models = require("mmdet")

import fastbb.mm  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

SIZE = 128  # P3-P7: 16x16 down to 1x1


def seed_config():
    import mmdet
    path = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "retinanet", "retinanet_r50_fpn_1x_coco.py")
    cfg = Config.fromfile(path).model
    # mmengine loads this checkpoint in init_weights(), which the tests do not call (nothing is downloaded)
    assert cfg.backbone.init_cfg == dict(type="Pretrained", checkpoint="torchvision://resnet50")
    return cfg


def build(cfg, fused):
    """The model mmdet's registry builds, with fastbb's classes (fused) or with mmdet's own."""
    with DefaultScope.overwrite_default_scope("mmdet"):
        if fused:
            return MODELS.build(copy.deepcopy(cfg))
        fastbb.mm.unregister()
        try:
            return MODELS.build(copy.deepcopy(cfg))
        finally:
            fastbb.mm.register()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = seed_config()
    fused = build(cfg, fused=True)
    original = build(cfg, fused=False)
    # the weights as the registry builds them (init_weights, which would load the checkpoint, is not called),
    # with random frozen BN statistics; the head's default init scores many candidates above score_thr
    randomize_bn(original.backbone)
    fused.load_state_dict(original.state_dict())
    exact = copy.deepcopy(original).double()
    return fused, original, exact


def samples(num_images, seed, scale_factor=(1.0, 1.0)):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_images):
        sample = DetDataSample()
        sample.set_metainfo(dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE),
                                 batch_input_shape=(SIZE, SIZE), scale_factor=scale_factor))
        gt = InstanceData()
        corner = torch.rand(4, 2, generator=generator) * SIZE * 0.6
        gt.bboxes = torch.cat([corner, corner + 8 + torch.rand(4, 2, generator=generator) * SIZE * 0.4], dim=1)
        gt.labels = torch.randint(0, 80, (4,), generator=generator)
        sample.gt_instances = gt
        out.append(sample)
    return out


def test_every_replaced_module_is_fastbbs(models):
    fused, original, _ = models
    assert type(fused.backbone) is fastbb.models.MMResNet
    assert type(fused.neck) is fastbb.nn.FPN
    assert type(fused.bbox_head) is fastbb.mm.retina_head.RetinaHead
    assert type(fused.bbox_head.loss_cls) is fastbb.nn.FocalLoss
    assert type(fused.bbox_head.bbox_coder) is fastbb.nn.DeltaXYWHBBoxCoder
    assert type(original.backbone).__module__ == "mmdet.models.backbones.resnet"
    assert type(original.neck).__module__ == "mmdet.models.necks.fpn"
    assert type(original.bbox_head).__module__ == "mmdet.models.dense_heads.retina_head"
    assert type(original.bbox_head.loss_cls).__module__ == "mmdet.models.losses.focal_loss"
    # same keys both ways (load_state_dict above was strict)
    assert list(fused.state_dict()) == list(original.state_dict())
    assert "bbox_head.cls_convs.0.conv.weight" in fused.state_dict()


def test_unregister_restores_mmdets_classes():
    from mmdet.models.backbones.resnet import ResNet
    from mmdet.models.dense_heads.retina_head import RetinaHead
    replaced = fastbb.mm.replaced()["mmdet"]
    assert replaced["ResNet"] is ResNet and replaced["RetinaHead"] is RetinaHead
    fastbb.mm.unregister()
    try:
        assert MODELS.get("ResNet") is ResNet and MODELS.get("RetinaHead") is RetinaHead
        assert fastbb.mm.replaced() == {}
    finally:
        assert "RetinaHead" in fastbb.mm.register()["mmdet"]
    assert MODELS.get("RetinaHead") is fastbb.mm.retina_head.RetinaHead
    fastbb.mm.register()  # a second call changes nothing
    assert fastbb.mm.replaced()["mmdet"]["RetinaHead"] is RetinaHead


def test_head_init_weights_is_mmdets():
    cfg = seed_config().bbox_head
    heads = []
    for fused in (True, False):
        torch.manual_seed(3)
        head = build(cfg, fused)
        head.init_weights()
        heads.append(head)
    for (key, ours), theirs in zip(heads[0].state_dict().items(), heads[1].state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=key)
    # the prior bias: sigmoid(bias) = 0.01
    torch.testing.assert_close(heads[0].retina_cls.bias.sigmoid(), torch.full_like(heads[0].retina_cls.bias, 0.01))


@pytest.mark.parametrize("scale_factor", [(1.0, 1.0), (0.5, 0.25)])
def test_predict_equals_mmdets(models, scale_factor):
    fused, original, exact = models
    images = torch.randn(2, 3, SIZE, SIZE)
    results = {}
    for name, model, x in (("fused", fused, images), ("original", original, images), ("exact", exact, images.double())):
        model.eval()
        with torch.no_grad():
            results[name] = model.predict(x, samples(2, seed=1, scale_factor=scale_factor))
    for got, original_result, exact_result in zip(results["fused"], results["original"], results["exact"]):
        got, original_result, exact_result = (r.pred_instances for r in (got, original_result, exact_result))
        assert len(got) == len(original_result) == len(exact_result) == 100
        # Scores within rounding of each other may come in either order, and the last kept may be either of
        # two such: so each exact detection scored clearly above the last kept one is paired with the
        # detection of the same label and nearest box, which must be a different one for each.
        inside = exact_result.scores > exact_result.scores[-1] + 1e-4
        pairs = {}
        for name, result in (("fused", got), ("original", original_result)):
            pairs[name] = torch.stack([
                ((result.bboxes.double() - box).abs().amax(dim=1) + (result.labels != label) * 1e9).argmin()
                for box, label in zip(exact_result.bboxes[inside], exact_result.labels[inside])])
            assert len(set(pairs[name].tolist())) == int(inside.sum()) >= 90
            torch.testing.assert_close(result.labels[pairs[name]], exact_result.labels[inside], rtol=0, atol=0)
        for key in ("scores", "bboxes"):
            assert_error_within(got[key][pairs["fused"]], original_result[key][pairs["original"]],
                                exact_result[key][inside], name=key)


def test_loss_and_gradients_equal_mmdets(models):
    fused, original, exact = models
    images = torch.randn(2, 3, SIZE, SIZE)
    losses, grads = {}, {}
    runs = (("fused", fused, torch.float32), ("original", original, torch.float32), ("exact", exact, torch.float64),
            ("fused64", copy.deepcopy(fused).double(), torch.float64))
    for name, model, dtype in runs:
        model.train()
        model.zero_grad()
        loss = model.loss(images.to(dtype), samples(2, seed=2))
        total = sum(sum(value) for value in loss.values())
        total.backward()
        losses[name] = {key: torch.stack(value) for key, value in loss.items()}
        grads[name] = {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
    assert sorted(losses["fused"]) == ["loss_bbox", "loss_cls"]
    for key in losses["fused"]:
        # slack: a reduced loss's own fp32 error can be near zero by chance (fastbb's focal loss sums in fixed
        # chunks, in another order than torch.sum), so the bound also allows 1e-6 of its size
        assert_error_within(losses["fused"][key], losses["original"][key], losses["exact"][key], slack=1e-6,
                            name=key)
    assert list(grads["fused"]) == list(grads["original"]) == list(grads["fused64"])
    # frozen_stages=1: the stem and layer1 get no gradient in either
    assert not any(key.startswith(("backbone.conv1", "backbone.layer1.")) for key in grads["fused"])
    # the logic, exactly: in float64 no pre-activation lands within rounding of zero
    for key in grads["fused"]:
        torch.testing.assert_close(grads["fused64"][key], grads["exact"][key], rtol=1e-7, atol=1e-9, msg=key)
    # retina_cls and retina_reg, whose outputs go straight into the losses, and the losses themselves compare
    # as every fused op does. Every other layer's output goes through a ReLU on its way to the losses: in
    # float32, where a pre-activation is within rounding of zero, fastbb's (BNs folded into convs, convs
    # on one canvas) and mmdet's can fall on different sides of it, which moves that position's gradient
    # whole. How many positions do is chance, so those gradients are compared as one vector, with 5e-4 of
    # its size as slack (FASTBB_TEST_SEED 0-3 used at most 1.4% of this bound; 5, 7 and 8, where a check per
    # tensor failed, pass).
    last = ("bbox_head.retina_cls.weight", "bbox_head.retina_cls.bias", "bbox_head.retina_reg.weight",
            "bbox_head.retina_reg.bias")
    for key in last:
        # slack: one part in 10^6 of the gradient's norm, as tests/test_retinanet.py allows the fused convs
        assert_error_within(grads["fused"][key], grads["original"][key], grads["exact"][key], slack=1e-6,
                            name=key)
    before_relus = [key for key in grads["fused"] if key not in last]

    def joined(name):
        return torch.cat([grads[name][key].flatten().double() for key in before_relus])
    assert_error_within(joined("fused"), joined("original"), joined("exact"), slack=5e-4, name="before ReLUs")


def test_test_step_runs_on_a_batch(models):
    fused, _, _ = models
    fused.eval()
    generator = torch.Generator().manual_seed(4)
    data = dict(inputs=[torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
                        for _ in range(2)],
                data_samples=samples(2, seed=4))
    outputs = fused.test_step(data)
    assert len(outputs) == 2
    for output in outputs:
        assert output.pred_instances.bboxes.shape == (100, 4)


def test_non_plain_nms_config_runs_mmdets_post_processing(models):
    fused, original, _ = models
    images = torch.randn(1, 3, SIZE, SIZE)
    got, expected = [], []
    for model, out in ((fused, got), (original, expected)):
        model.eval()
        saved = copy.deepcopy(model.bbox_head.test_cfg)
        model.bbox_head.test_cfg.nms = dict(type="nms", iou_threshold=0.5, class_agnostic=True)
        try:
            with torch.no_grad():
                out.append(model.predict(images, samples(1, seed=5))[0].pred_instances)
        finally:
            model.bbox_head.test_cfg = saved
    torch.testing.assert_close(got[0].labels, expected[0].labels, rtol=0, atol=0)
    torch.testing.assert_close(got[0].bboxes, expected[0].bboxes, rtol=1e-4, atol=1e-3)


def test_head_with_group_norm_runs_mmdets_forward():
    cfg = seed_config().bbox_head
    cfg.norm_cfg = dict(type="GN", num_groups=32, requires_grad=True)
    torch.manual_seed(6)
    fused = build(cfg, fused=True)
    original = build(cfg, fused=False)
    original.load_state_dict(fused.state_dict())
    features = [torch.randn(1, 256, s, s) for s in (16, 8, 4, 2, 1)]
    with torch.no_grad():
        for ours, theirs in zip(fused(features), original(features)):
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_imports_in_an_unchanged_config_build_fused(tmp_path):
    import mmdet
    base = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "retinanet", "retinanet_r50_fpn_1x_coco.py")
    path = tmp_path / "retinanet_fastbb.py"
    path.write_text(f"_base_ = [{base!r}]\n"
                    "custom_imports = dict(imports=['fastbb.mm'], allow_failed_imports=False)\n")
    cfg = Config.fromfile(str(path))
    assert cfg.custom_imports.imports == ["fastbb.mm"]
    with DefaultScope.overwrite_default_scope("mmdet"):
        model = MODELS.build(cfg.model)
    assert type(model.backbone) is fastbb.models.MMResNet
    assert type(model.bbox_head) is fastbb.mm.retina_head.RetinaHead
