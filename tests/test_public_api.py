"""The public API: every function and class typed and documented (Args / Returns), named and ordered as the
torchvision / mmdet original it replaces, and its errors named `fastbb.<name>:`."""
import inspect
import math
import re

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.ops import feature_pyramid_network as tv_fpn

import fastbb
from fastbb.models import resnet as fb_resnet

PUBLIC = ([fastbb.backends, fastbb.use_backend, fastbb.build, fastbb.register, fastbb.registered, fastbb.convert]
          + [getattr(fastbb.ops, name) for name in fastbb.ops.__all__]
          + [getattr(fastbb.nn, name) for name in fastbb.nn.__all__]
          + [getattr(fastbb.models, name) for name in fastbb.models.__all__]
          + [fb_resnet.conv3x3, fb_resnet.conv1x1, fastbb.models.mm_resnet.MMBasicBlock,
             fastbb.models.mm_resnet.MMBottleneck])


def _name(obj):
    return getattr(obj, "__qualname__", repr(obj))


def _documented_callables():
    """(name, function, is_constructor) for every public function, constructor and public method."""
    for obj in PUBLIC:
        if not inspect.isclass(obj):
            yield _name(obj), inspect.unwrap(obj), False
            continue
        if "__init__" in vars(obj) or any("__init__" in vars(base) for base in obj.__mro__[1:-1]
                                          if base.__module__.startswith("fastbb")):
            yield _name(obj), obj, True
        for attr, value in vars(obj).items():
            if attr.startswith("_") or attr in ("extra_repr",):
                continue
            if isinstance(value, classmethod):
                value = value.__func__
            if inspect.isfunction(value):
                yield f"{_name(obj)}.{attr}", value, False


DOCUMENTED = list(_documented_callables())


@pytest.mark.parametrize("name, fn, is_constructor", DOCUMENTED, ids=[d[0] for d in DOCUMENTED])
def test_typed_and_documented(name, fn, is_constructor):
    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
    unannotated = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    assert not unannotated, f"{name}: parameters without annotations: {unannotated}"
    doc = fn.__doc__ or ""  # its own, not one inherited from nn.Module
    assert doc, f"{name} has no docstring"
    if params and not all(p.kind is p.VAR_KEYWORD and p.name == "kwargs" and is_constructor for p in params):
        assert "Args:" in doc, f"{name}: the docstring has no Args section"
    if not is_constructor:
        assert signature.return_annotation is not inspect.Signature.empty, f"{name} has no return annotation"
        if signature.return_annotation is not None and signature.return_annotation != "None":
            assert "Returns:" in doc, f"{name}: the docstring has no Returns section"


def _parameters(fn):
    """What a caller sees of a signature: each parameter's name, kind and default (not its annotation)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


TORCHVISION = [
    (fastbb.ops.nms, torchvision.ops.nms),
    (fastbb.ops.batched_nms, torchvision.ops.batched_nms),
    (fastbb.ops.sigmoid_focal_loss, torchvision.ops.sigmoid_focal_loss),
    (fastbb.nn.FrozenBatchNorm2d, torchvision.ops.FrozenBatchNorm2d),
    (fastbb.nn.FrozenBatchNorm2d.forward, torchvision.ops.FrozenBatchNorm2d.forward),
    (fastbb.nn.FeaturePyramidNetwork, torchvision.ops.FeaturePyramidNetwork),
    (fastbb.nn.FeaturePyramidNetwork.forward, torchvision.ops.FeaturePyramidNetwork.forward),
    (fastbb.nn.FeaturePyramidNetwork.get_result_from_inner_blocks,
     torchvision.ops.FeaturePyramidNetwork.get_result_from_inner_blocks),
    (fastbb.nn.FeaturePyramidNetwork.get_result_from_layer_blocks,
     torchvision.ops.FeaturePyramidNetwork.get_result_from_layer_blocks),
    (fastbb.nn.ExtraFPNBlock, tv_fpn.ExtraFPNBlock),
    (fastbb.nn.ExtraFPNBlock.forward, tv_fpn.ExtraFPNBlock.forward),
    (fastbb.nn.LastLevelMaxPool, tv_fpn.LastLevelMaxPool),
    (fastbb.nn.LastLevelMaxPool.forward, tv_fpn.LastLevelMaxPool.forward),
    (fastbb.nn.LastLevelP6P7, tv_fpn.LastLevelP6P7),
    (fastbb.nn.LastLevelP6P7.forward, tv_fpn.LastLevelP6P7.forward),
    (fastbb.nn.BoxCoder, tv_det_utils.BoxCoder),
    *[(getattr(fastbb.nn.BoxCoder, m), getattr(tv_det_utils.BoxCoder, m))
      for m in ("encode", "encode_single", "decode", "decode_single")],
    (fastbb.models.ResNet, tv_resnet.ResNet),
    (fastbb.models.ResNet.forward, tv_resnet.ResNet.forward),
    (fastbb.models.BasicBlock, tv_resnet.BasicBlock),
    (fastbb.models.BasicBlock.forward, tv_resnet.BasicBlock.forward),
    (fastbb.models.Bottleneck, tv_resnet.Bottleneck),
    (fastbb.models.Bottleneck.forward, tv_resnet.Bottleneck.forward),
    *[(getattr(fastbb.models, b), getattr(tv_resnet, b))
      for b in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")],
    (fb_resnet.conv3x3, tv_resnet.conv3x3),
    (fb_resnet.conv1x1, tv_resnet.conv1x1),
]


@pytest.mark.parametrize("ours, theirs", TORCHVISION, ids=[_name(t) for _, t in TORCHVISION])
def test_signature_is_torchvisions(ours, theirs):
    assert _parameters(ours) == _parameters(theirs)


# mmdet 3.3's signatures (mmdet is not installed here), as (name, default); REQUIRED for none.
REQUIRED = inspect.Parameter.empty
MMDET = {
    "FPN": (fastbb.nn.FPN, [
        ("in_channels", REQUIRED), ("out_channels", REQUIRED), ("num_outs", REQUIRED), ("start_level", 0),
        ("end_level", -1), ("add_extra_convs", False), ("relu_before_extra_convs", False),
        ("no_norm_on_lateral", False), ("conv_cfg", None), ("norm_cfg", None), ("act_cfg", None),
        ("upsample_cfg", dict(mode="nearest")),
        ("init_cfg", dict(type="Xavier", layer="Conv2d", distribution="uniform"))]),
    "FPN.forward": (fastbb.nn.FPN.forward, [("self", REQUIRED), ("inputs", REQUIRED)]),
    "FocalLoss": (fastbb.nn.FocalLoss, [
        ("use_sigmoid", True), ("gamma", 2.0), ("alpha", 0.25), ("reduction", "mean"), ("loss_weight", 1.0),
        ("activated", False)]),
    "FocalLoss.forward": (fastbb.nn.FocalLoss.forward, [
        ("self", REQUIRED), ("pred", REQUIRED), ("target", REQUIRED), ("weight", None), ("avg_factor", None),
        ("reduction_override", None)]),
    "DeltaXYWHBBoxCoder": (fastbb.nn.DeltaXYWHBBoxCoder, [
        ("target_means", (0., 0., 0., 0.)), ("target_stds", (1., 1., 1., 1.)), ("clip_border", True),
        ("add_ctr_clamp", False), ("ctr_clamp", 32), ("kwargs", REQUIRED)]),
    "DeltaXYWHBBoxCoder.encode": (fastbb.nn.DeltaXYWHBBoxCoder.encode, [
        ("self", REQUIRED), ("bboxes", REQUIRED), ("gt_bboxes", REQUIRED)]),
    "DeltaXYWHBBoxCoder.decode": (fastbb.nn.DeltaXYWHBBoxCoder.decode, [
        ("self", REQUIRED), ("bboxes", REQUIRED), ("pred_bboxes", REQUIRED), ("max_shape", None),
        ("wh_ratio_clip", 16 / 1000)]),
    "ResNet": (fastbb.models.MMResNet, [
        ("depth", REQUIRED), ("in_channels", 3), ("stem_channels", None), ("base_channels", 64),
        ("num_stages", 4), ("strides", (1, 2, 2, 2)), ("dilations", (1, 1, 1, 1)), ("out_indices", (0, 1, 2, 3)),
        ("style", "pytorch"), ("deep_stem", False), ("avg_down", False), ("frozen_stages", -1),
        ("conv_cfg", None), ("norm_cfg", dict(type="BN", requires_grad=True)), ("norm_eval", True),
        ("dcn", None), ("stage_with_dcn", (False, False, False, False)), ("plugins", None), ("with_cp", False),
        ("zero_init_residual", True), ("pretrained", None), ("init_cfg", None)]),
    "ResNetV1c": (fastbb.models.ResNetV1c, [("kwargs", REQUIRED)]),
    "ResNetV1d": (fastbb.models.ResNetV1d, [("kwargs", REQUIRED)]),
    **{f"{block}": (getattr(fastbb.models.mm_resnet, f"MM{block}"), [
        ("inplanes", REQUIRED), ("planes", REQUIRED), ("stride", 1), ("dilation", 1), ("downsample", None),
        ("style", "pytorch"), ("with_cp", False), ("conv_cfg", None), ("norm_cfg", dict(type="BN")),
        ("dcn", None), ("plugins", None), ("init_cfg", None)]) for block in ("BasicBlock", "Bottleneck")},
}
# Where fastbb's signature knowingly differs from mmdet's: {name: (mmdet's parameters replaced, fastbb's)}.
MMDET_DIFFERENCES = {
    # init_cfg is accepted and not read (the convs start as mmdet's Xavier init_cfg makes them); the default
    # stays None rather than a config nothing reads.
    "FPN": ([("init_cfg", dict(type="Xavier", layer="Conv2d", distribution="uniform"))], [("init_cfg", None)]),
    # mmdet's coders pass **kwargs to BaseBBoxCoder, which takes use_box_type and ignores the rest; fastbb
    # takes use_box_type alone, so that a misspelt config key raises (tests/test_registry.py).
    "DeltaXYWHBBoxCoder": ([("kwargs", REQUIRED)], [("use_box_type", False)]),
}


@pytest.mark.parametrize("name", list(MMDET))
def test_signature_is_mmdets(name):
    ours, expected = MMDET[name]
    if name in MMDET_DIFFERENCES:
        theirs, replacement = MMDET_DIFFERENCES[name]
        start = expected.index(theirs[0])
        assert expected[start:start + len(theirs)] == theirs
        expected = expected[:start] + replacement + expected[start + len(theirs):]
    got = [(p.name, p.default) for p in inspect.signature(ours).parameters.values()]
    assert got == expected


def test_feature_pyramid_network_block_accessors_are_torchvisions():
    ours = fastbb.nn.FeaturePyramidNetwork([4, 8], 6)
    theirs = torchvision.ops.FeaturePyramidNetwork([4, 8], 6)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 8, 5, 5)
    for idx in (1, -1, 2, -3):
        torch.testing.assert_close(ours.get_result_from_inner_blocks(x, idx),
                                   theirs.get_result_from_inner_blocks(x, idx), rtol=0, atol=0)
    y = torch.randn(1, 6, 5, 5)
    for idx in (0, -2, 5):
        torch.testing.assert_close(ours.get_result_from_layer_blocks(y, idx),
                                   theirs.get_result_from_layer_blocks(y, idx), rtol=0, atol=0)


def test_focal_loss_refuses_probabilities(without_openmmlab):
    with pytest.raises(ValueError, match="activated=True"):
        fastbb.nn.FocalLoss(activated=True)


# One representative bad call per source file: (file, the name its errors give, error type, call).
_LOGITS = torch.randn(4, 3)
_LABELS = torch.tensor([0, 1, 2, 3])
BAD_CALLS = [
    ("_backend.py", "fastbb.use_backend", ValueError, lambda: fastbb.use_backend("gpu").__enter__()),
    ("_registry.py", "fastbb.build", TypeError, lambda: fastbb.build("FPN")),
    ("convert.py", "fastbb.convert", TypeError, lambda: fastbb.convert("resnet50")),
    ("ops/nms.py", "fastbb.nms", ValueError, lambda: fastbb.ops.nms(torch.zeros(2, 3), torch.zeros(2), 0.5)),
    ("ops/box_decode.py", "fastbb.decode_boxes", ValueError,
     lambda: fastbb.ops.decode_boxes(torch.zeros(2, 4), torch.zeros(2, 4), style="yolo")),
    ("ops/focal_loss.py", "fastbb.sigmoid_focal_loss", ValueError,
     lambda: fastbb.ops.sigmoid_focal_loss(_LOGITS, torch.rand(4, 3), reduction="avg")),
    ("ops/focal_loss.py", "fastbb.sigmoid_focal_loss_labels", TypeError,
     lambda: fastbb.ops.sigmoid_focal_loss_labels(_LOGITS, _LABELS.float())),
    ("ops/focal_loss.py", "fastbb.sigmoid_focal_loss_labels", (ValueError, RuntimeError),
     lambda: fastbb.ops.sigmoid_focal_loss_labels(_LOGITS, torch.tensor([0, 1, 7, 3]))),
    ("ops/retinanet_loss.py", "fastbb.match_anchors", RuntimeError,
     lambda: fastbb.ops.match_anchors(torch.zeros(5, 4), torch.zeros(2, 3, 4), torch.tensor([1]))),
    ("ops/retinanet_loss.py", "fastbb.retinanet_loss", TypeError,
     lambda: fastbb.ops.retinanet_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.zeros(2, 4),
                                       torch.zeros(1, 1, 4), torch.zeros(1, 1), torch.ones(1, dtype=torch.int64))),
    ("ops/retinanet_loss.py", "fastbb.pad_targets", ValueError,
     lambda: fastbb.ops.pad_targets([{"boxes": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.int64)}])),
    ("ops/fpn_merge.py", "fastbb.fpn_merge", ValueError,
     lambda: fastbb.ops.fpn_merge(torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 1, 1), None, torch.zeros(1, 3, 8, 8))),
    ("ops/upsample_nearest_add.py", "fastbb.upsample_nearest_add", ValueError,
     lambda: fastbb.ops.upsample_nearest_add(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 4, 4))),
    ("ops/retinanet_postprocess.py", "fastbb.retinanet_postprocess", ValueError,
     lambda: fastbb.ops.retinanet_postprocess(torch.zeros(1, 4, 2), torch.zeros(1, 4, 4), [torch.zeros(4, 4)], [3],
                                              [(8, 8)])),
    ("ops/conv_bn_relu", "fastbb.conv_bn_relu", ValueError,
     lambda: fastbb.ops.conv_bn_relu(torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 1, 1), training=False)),
    ("nn/box_coder.py", "fastbb.nn.BoxCoder.decode", TypeError,
     lambda: fastbb.nn.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(torch.zeros(1, 4), torch.zeros(1, 4))),
    ("nn/box_coder.py", "fastbb.nn.DeltaXYWHBBoxCoder", ValueError,
     lambda: fastbb.nn.DeltaXYWHBBoxCoder(use_box_type=True)),
    ("nn/conv_bn_relu.py", "fastbb.nn.ConvBNReLU2d", TypeError,
     lambda: fastbb.nn.ConvBNReLU2d.from_modules(nn.Linear(2, 2), nn.BatchNorm2d(2))),
    ("nn/focal_loss.py", "fastbb.nn.FocalLoss", ValueError,
     lambda: fastbb.nn.FocalLoss()(_LOGITS, _LABELS, reduction_override="avg")),
    ("nn/focal_loss.py", "fastbb.nn.FocalLoss", TypeError, lambda: fastbb.nn.FocalLoss()(_LOGITS, _LABELS.float())),
    ("nn/focal_loss.py", "fastbb.nn.FocalLoss", ValueError,
     lambda: fastbb.nn.FocalLoss()(_LOGITS, torch.rand(4, 3), torch.rand(5))),
    ("nn/fpn.py", "fastbb.nn.FeaturePyramidNetwork", ValueError, lambda: fastbb.nn.FeaturePyramidNetwork([0], 4)),
    ("nn/fpn.py", "fastbb.nn.FPN", ValueError, lambda: fastbb.nn.FPN([4, 8], 4, 2, add_extra_convs="on_top")),
    ("models/resnet.py", "fastbb.models.resnet18", TypeError, lambda: fastbb.models.resnet18(weights=3)),
    ("models/resnet.py", "fastbb.models.ResNet", ValueError,
     lambda: fastbb.models.ResNet(fastbb.models.BasicBlock, [1, 1, 1, 1], replace_stride_with_dilation=[True])),
    ("models/resnet.py", "fastbb.models.BasicBlock", ValueError, lambda: fastbb.models.BasicBlock(4, 4, groups=2)),
    ("models/mm_resnet.py", "fastbb.models.MMResNet", ValueError, lambda: fastbb.models.MMResNet(50, style="tf")),
    ("models/mm_resnet.py", "fastbb.models.ResNetV1d", TypeError,
     lambda: fastbb.models.ResNetV1d(depth=18, norm_cfg="BN")),
]


@pytest.mark.parametrize("source, name, error, call", BAD_CALLS, ids=[f"{b[0]}:{b[1]}" for b in BAD_CALLS])
def test_errors_start_with_the_name_called(source, name, error, call, without_openmmlab):
    with pytest.raises(error, match=rf"^{re.escape(name)}: "):
        call()


def test_builders_accept_progress():
    assert isinstance(fastbb.models.resnet18(progress=False, num_classes=3), fastbb.models.ResNet)
    assert math.isclose(fastbb.nn.BoxCoder((1.0, 1.0, 1.0, 1.0)).bbox_xform_clip, math.log(1000.0 / 16))


def test_every_torchvision_counterpart_is_compared():
    """Every public fastbb class or function named as one of torchvision's has its signature compared above."""
    compared = {ours for ours, _ in TORCHVISION}
    places = (torchvision.ops, tv_fpn, tv_resnet, tv_det_utils, torchvision.models)
    for obj in PUBLIC:
        name = getattr(obj, "__name__", "")
        if any(hasattr(place, name) for place in places):
            assert obj in compared, f"{_name(obj)} has a torchvision counterpart whose signature is not compared"


# Bad inputs to the ops that replace torchvision's, and the argument fastbb's message names. torchvision's
# ops check their inputs in C++ (RuntimeError); fastbb raises the type torchvision raises, here, for each.
_BOXES, _SCORES = torch.rand(3, 4) + torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.rand(3)
TORCHVISION_BAD_CALLS = {
    "nms boxes (3, 5)": ("nms", (torch.zeros(3, 5), _SCORES, 0.5), "boxes"),
    "nms boxes 1-D": ("nms", (torch.zeros(12), _SCORES, 0.5), "boxes"),
    "nms integer boxes": ("nms", (_BOXES.long(), _SCORES, 0.5), "boxes"),
    "nms scores 2-D": ("nms", (_BOXES, _SCORES[:, None], 0.5), "scores"),
    "nms scores of another length": ("nms", (_BOXES, torch.rand(4), 0.5), "scores"),
    "nms iou_threshold a str": ("nms", (_BOXES, _SCORES, "0.5"), "iou_threshold"),
    "batched_nms boxes (3, 5)": ("batched_nms", (torch.zeros(3, 5), _SCORES, torch.zeros(3, dtype=torch.int64), 0.5),
                                 "boxes"),
    "batched_nms integer boxes": ("batched_nms", (_BOXES.long(), _SCORES, torch.zeros(3, dtype=torch.int64), 0.5),
                                  "boxes"),
    "batched_nms idxs of another length": ("batched_nms", (_BOXES, _SCORES, torch.zeros(4, dtype=torch.int64), 0.5),
                                           "idxs"),
}


@pytest.mark.parametrize("case", list(TORCHVISION_BAD_CALLS))
def test_op_errors_have_torchvisions_type(case):
    op, args, argument = TORCHVISION_BAD_CALLS[case]
    with pytest.raises(Exception) as theirs:
        getattr(torchvision.ops, op)(*args)
    assert type(theirs.value) in (RuntimeError, TypeError), theirs.value  # what this test is about
    with pytest.raises(type(theirs.value), match=rf"^fastbb\.{op}: {argument} ") as ours:
        getattr(fastbb.ops, op)(*args)
    assert isinstance(ours.value, (ValueError, TypeError))  # and still what it was before


def test_box_coder_errors_have_torchvisions_type():
    """torchvision's BoxCoder.decode asserts (torch._assert) that boxes is a list and rel_codes a tensor."""
    for args in ((torch.zeros(2, 4), torch.zeros(2, 4)), ([torch.zeros(2, 4)], [torch.zeros(2, 4)])):
        with pytest.raises(AssertionError):
            tv_det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(*args)
        argument = "boxes" if isinstance(args[1], torch.Tensor) else "rel_codes"
        with pytest.raises(AssertionError, match=rf"^fastbb\.nn\.BoxCoder\.decode: {argument} ") as ours:
            fastbb.nn.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(*args)
        assert isinstance(ours.value, TypeError)


# mmdet's configuration and argument checks are asserts (mmdet is not installed here: the cases follow its
# source, see CONTRACT.md): fastbb raises an AssertionError that is also the ValueError (or TypeError) it
# raised before, naming the argument.
_ROIS, _DELTAS = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2), torch.zeros(2, 4)
MMDET_BAD_CALLS = {
    "FPN num_outs below the inputs": (lambda: fastbb.nn.FPN([4, 8, 16], 4, 2), ValueError, "num_outs"),
    "FPN end_level out of range": (lambda: fastbb.nn.FPN([4, 8, 16], 4, 3, end_level=3), ValueError, "end_level"),
    "FPN num_outs with end_level": (lambda: fastbb.nn.FPN([4, 8, 16], 4, 3, end_level=1), ValueError,
                                    "with end_level 1, num_outs"),
    "FPN add_extra_convs unknown": (lambda: fastbb.nn.FPN([4, 8], 4, 3, add_extra_convs="on_top"), ValueError,
                                    "add_extra_convs"),
    "FPN add_extra_convs not a bool or str": (lambda: fastbb.nn.FPN([4, 8], 4, 3, add_extra_convs=1), TypeError,
                                              "add_extra_convs"),
    "FPN inputs count": (lambda: fastbb.nn.FPN([4, 8], 4, 2)((torch.zeros(1, 4, 4, 4),)), ValueError,
                         "expected 2 inputs"),
    "ResNet num_stages": (lambda: fastbb.models.MMResNet(50, num_stages=5, strides=(1,) * 5, dilations=(1,) * 5),
                          ValueError, "num_stages"),
    "ResNet strides": (lambda: fastbb.models.MMResNet(50, strides=(1, 2, 2)), ValueError, "strides"),
    "ResNet out_indices": (lambda: fastbb.models.MMResNet(50, out_indices=(4,)), ValueError, "out_indices"),
    "ResNet style": (lambda: fastbb.models.MMResNet(50, style="tf"), ValueError, "style"),
    "coder per-image max_shape vs batch": (
        lambda: fastbb.nn.DeltaXYWHBBoxCoder().decode(_ROIS[None], _DELTAS[None], max_shape=[(8, 8), (8, 8)]),
        ValueError, "max_shape"),
    "coder decode shapes": (lambda: fastbb.nn.DeltaXYWHBBoxCoder().decode(_ROIS, torch.zeros(3, 4)), ValueError,
                            "pred_bboxes"),
    "coder encode shapes": (lambda: fastbb.nn.DeltaXYWHBBoxCoder().encode(_ROIS, torch.zeros(3, 4)), ValueError,
                            "bboxes and gt_bboxes"),
    "FocalLoss reduction_override": (
        lambda: fastbb.nn.FocalLoss()(torch.zeros(2, 3), torch.tensor([0, 3]), reduction_override="avg"), ValueError,
        "reduction_override"),
}


@pytest.mark.parametrize("case", list(MMDET_BAD_CALLS))
def test_config_errors_are_assertion_errors_as_mmdets(case):
    call, previous_type, argument = MMDET_BAD_CALLS[case]
    with pytest.raises(AssertionError, match=re.escape(argument)) as error:
        call()
    assert isinstance(error.value, previous_type)
    assert str(error.value).startswith("fastbb.")
