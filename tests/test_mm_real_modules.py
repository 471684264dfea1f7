"""fastbb's mmdet drop-ins (FPN, FocalLoss, DeltaXYWHBBoxCoder) against the real mmdet 3.3 classes, built from the
same configs through mmdet's registry (fastbb's with fastbb.mm imported, mmdet's after fastbb.mm.unregister())."""
import copy
import warnings

import pytest
import torch

from conftest import assert_error_within
from mm_support import require

require("mmdet")

import fastbb  # noqa: E402
import fastbb.mm  # noqa: E402
from mmdet.registry import MODELS, TASK_UTILS  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402


def build_both(registry, cfg):
    """(fastbb's, mmdet's) built from cfg by mmdet's registry."""
    with DefaultScope.overwrite_default_scope("mmdet"):
        ours = registry.build(copy.deepcopy(cfg))
        fastbb.mm.unregister()
        try:
            theirs = registry.build(copy.deepcopy(cfg))
        finally:
            fastbb.mm.register()
    return ours, theirs


FPN_CONFIGS = {
    "retinanet": dict(start_level=1, add_extra_convs="on_input", num_outs=5),
    "plain": dict(num_outs=4),
    "maxpool_levels": dict(num_outs=6),
    "on_output_relu": dict(add_extra_convs="on_output", relu_before_extra_convs=True, num_outs=6),
    "end_level": dict(start_level=1, end_level=2, num_outs=2),
    "bn_relu": dict(num_outs=5, add_extra_convs=True, norm_cfg=dict(type="BN"), act_cfg=dict(type="ReLU")),
    "gn_no_norm_on_lateral": dict(num_outs=4, norm_cfg=dict(type="GN", num_groups=4), no_norm_on_lateral=True),
    "upsample_scale_factor": dict(num_outs=4, upsample_cfg=dict(scale_factor=2, mode="nearest")),
}


@pytest.mark.parametrize("name", list(FPN_CONFIGS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fpn_equals_mmdets(name, train):
    cfg = dict(type="FPN", in_channels=[8, 16, 32, 64], out_channels=8, **FPN_CONFIGS[name])
    ours, theirs = build_both(MODELS, cfg)
    assert type(ours) is fastbb.nn.FPN and type(theirs).__module__ == "mmdet.models.necks.fpn"
    theirs.init_weights()
    for p in theirs.parameters():  # mmdet's init leaves zero biases; random ones test their place
        if p.dim() == 1:
            p.data.normal_()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    exact = copy.deepcopy(theirs).double()
    inputs = [torch.randn(2, c, s, s, requires_grad=True) for c, s in zip([8, 16, 32, 64], [32, 16, 8, 4])]
    results = {}
    for key, model, dtype in (("ours", ours, torch.float32), ("theirs", theirs, torch.float32),
                              ("exact", exact, torch.float64)):
        model.train(train)
        xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
        outs = model(xs)
        sum((out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum() for out in outs).backward()
        results[key] = (outs, [x.grad for x in xs], [p.grad for p in model.parameters()],
                        [b for n, b in model.named_buffers() if "running" in n])
    for group, name_of in enumerate(("output", "input grad", "param grad", "running stat")):
        for got, want, exact_value in zip(*(results[k][group] for k in ("ours", "theirs", "exact"))):
            assert (got is None) == (want is None)  # a conv no output reads gets no gradient in either
            if got is None:
                continue
            assert got.dtype == want.dtype and got.shape == want.shape
            assert_error_within(got, want, exact_value, slack=1e-6, name=name_of)


def test_fpn_options_fastbb_cannot_fuse_build_mmdets():
    cfg = dict(type="FPN", in_channels=[4, 8], out_channels=4, num_outs=2, act_cfg=dict(type="PReLU"))
    with pytest.warns(UserWarning, match=r"act_cfg type 'PReLU' .*built mmdet.models.necks.fpn.FPN instead"):
        built = fastbb.build(cfg)
    assert type(built).__module__ == "mmdet.models.necks.fpn"
    ours, theirs = build_both(MODELS, cfg)
    assert type(ours) is type(theirs)


def test_fpn_option_fastbb_cannot_fuse_raises_without_mmdet(without_openmmlab):
    with pytest.raises(ValueError, match="act_cfg type 'PReLU'"):
        fastbb.build(dict(type="FPN", in_channels=[4, 8], out_channels=4, num_outs=2, act_cfg=dict(type="PReLU")))


def test_fpn_bad_config_raises_mmdets_exception_type():
    for bad in (dict(num_outs=1), dict(num_outs=3, add_extra_convs="on_top"), dict(num_outs=3, end_level=0)):
        cfg = dict(type="FPN", in_channels=[4, 8], out_channels=4, **bad)
        with DefaultScope.overwrite_default_scope("mmdet"):
            with pytest.raises(AssertionError) as ours:
                MODELS.build(copy.deepcopy(cfg))
            fastbb.mm.unregister()
            try:
                with pytest.raises(AssertionError):
                    MODELS.build(copy.deepcopy(cfg))
            finally:
                fastbb.mm.register()
        assert "fastbb.nn.FPN" in str(ours.value)


FOCAL_CASES = {
    "labels": dict(),
    "labels_weight_avg_factor": dict(weight="anchor", avg_factor=37.0),
    "labels_sum": dict(reduction_override="sum"),
    "labels_none_element_weight": dict(weight="element", reduction_override="none"),
    "dense_targets": dict(dense=True, weight="anchor"),
}


@pytest.mark.parametrize("case", list(FOCAL_CASES))
@pytest.mark.parametrize("gamma, alpha, loss_weight", [(2.0, 0.25, 1.0), (1.5, 0.6, 0.5)])
def test_focal_loss_equals_mmdets(case, gamma, alpha, loss_weight):
    spec = dict(FOCAL_CASES[case])
    cfg = dict(type="FocalLoss", use_sigmoid=True, gamma=gamma, alpha=alpha, loss_weight=loss_weight)
    ours, theirs = build_both(MODELS, cfg)
    assert type(ours) is fastbb.nn.FocalLoss and type(theirs).__module__ == "mmdet.models.losses.focal_loss"
    n, c = 300, 7
    logits = torch.randn(n, c) * 3
    target = torch.rand(n, c) if spec.pop("dense", False) else torch.randint(0, c + 1, (n,))
    weight = {"anchor": torch.rand(n), "element": torch.rand(n, c), None: None}[spec.pop("weight", None)]
    results = {}
    for key, module, dtype in (("ours", ours, torch.float32), ("theirs", theirs, torch.float32),
                               ("exact", theirs, torch.float64)):
        x = logits.to(dtype, copy=True).requires_grad_()
        t = target.to(dtype) if target.is_floating_point() else target
        w = None if weight is None else weight.to(dtype)
        loss = module(x, t, w, **spec)
        (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=dtype).view_as(loss)).sum().backward()
        results[key] = (loss.detach(), x.grad)
    for got, want, exact_value in zip(results["ours"], results["theirs"], results["exact"]):
        assert got.shape == want.shape
        # slack: fastbb sums in fixed chunks, in another order than torch.sum; a reduced loss's own fp32 error can
        # be near zero by chance, so the bound also allows 1e-6 of its size (a 100-seed sweep used at most 0.3)
        assert_error_within(got, want, exact_value, slack=1e-6, name=case)


def test_focal_loss_activated_builds_mmdets():
    cfg = dict(type="FocalLoss", activated=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = build_both(MODELS, cfg)
    assert type(ours) is type(theirs)
    probabilities, labels = torch.rand(20, 3), torch.randint(0, 4, (20,))
    torch.testing.assert_close(ours(probabilities, labels), theirs(probabilities, labels), rtol=0, atol=0)


def test_focal_loss_use_sigmoid_false_raises_mmdets_type():
    with pytest.raises(AssertionError, match="use_sigmoid"):
        fastbb.nn.FocalLoss(use_sigmoid=False)


CODER_CASES = {
    "default": (dict(), dict(max_shape=(50, 60))),
    "retinanet_stds": (dict(target_means=(0.1, -0.1, 0.0, 0.05), target_stds=(0.1, 0.1, 0.2, 0.2)),
                       dict(max_shape=(50, 60))),
    "no_clip": (dict(clip_border=False), dict(max_shape=(50, 60))),
    "no_max_shape": (dict(), dict()),
    "ctr_clamp": (dict(add_ctr_clamp=True, ctr_clamp=4), dict(max_shape=(50, 60))),
    "wh_ratio_clip": (dict(), dict(max_shape=(50, 60), wh_ratio_clip=0.1)),
}


@pytest.mark.parametrize("case", list(CODER_CASES))
def test_delta_xywh_coder_equals_mmdets(case):
    coder_args, decode_args = CODER_CASES[case]
    ours, theirs = build_both(TASK_UTILS, dict(type="DeltaXYWHBBoxCoder", **coder_args))
    assert type(ours) is fastbb.nn.DeltaXYWHBBoxCoder
    assert type(theirs).__module__ == "mmdet.models.task_modules.coders.delta_xywh_bbox_coder"
    corner = torch.rand(200, 2) * 50
    boxes = torch.cat([corner, corner + 1 + torch.rand(200, 2) * 20], dim=1)
    gt_corner = torch.rand(200, 2) * 50
    gt = torch.cat([gt_corner, gt_corner + 1 + torch.rand(200, 2) * 20], dim=1)
    deltas = torch.randn(200, 4) * 2
    results = {}
    for key, coder, dtype in (("ours", ours, torch.float32), ("theirs", theirs, torch.float32),
                              ("exact", theirs, torch.float64)):
        results[key] = (coder.encode(boxes.to(dtype), gt.to(dtype)),
                        coder.decode(boxes.to(dtype), deltas.to(dtype), **decode_args))
    for got, want, exact_value in zip(results["ours"], results["theirs"], results["exact"]):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_error_within(got, want, exact_value, name=case)


def test_delta_xywh_coder_box_type_builds_mmdets():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = build_both(TASK_UTILS, dict(type="DeltaXYWHBBoxCoder", use_box_type=True))
    assert type(ours) is type(theirs)
