"""Mixed precision of the FPN and detection ops and modules: under torch.autocast each gives the dtype the
original gives under the same autocast (torchvision's FPN, ops and BoxCoder; mmdet's FPN and coder as
tests/test_fpn.py and tests/test_box_coder.py write them out from mmdet's source), with an error against a
float64 run within 2x the original's own, float32 parameter gradients within the same rule, and
torch.amp.GradScaler training steps. Outside autocast, mixed dtypes promote where add promotes and raise
where conv2d raises. CPU tests use bfloat16 autocast; the `cuda` tests float16 and bfloat16.
"""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import feature_pyramid_network as tv_fpn

import fastbb
from fastbb.nn import (BoxCoder, DeltaXYWHBBoxCoder, FeaturePyramidNetwork, FocalLoss, LastLevelMaxPool, LastLevelP6P7,
                       SigmoidFocalLoss)
from fastbb.ops import batched_nms, decode_boxes, fpn_merge, nms, sigmoid_focal_loss, upsample_nearest_add
from fastbb.ops import retinanet_postprocess
from fastbb.ops._common import autocast_runs_in_float32
from fastbb.ops.retinanet_postprocess import _check_inputs as _check_postprocess_inputs
from fastbb.ops.retinanet_postprocess import _postprocess_batched, _postprocess_reference

from conftest import TOLERANCES, assert_error_within, usable_backends
from test_box_coder import mmdet_onnx_delta2bbox
from test_fpn import _mmdet_forward
from test_retinanet_postprocess import _kwargs, assert_same_detections
from test_retinanet_postprocess import _problem as _retinanet_problem
from test_retinanet_postprocess import _torchvision as _torchvision_postprocess

IN_CHANNELS = [6, 10, 14]
SIZES = [(13, 21), (7, 11), (4, 6)]  # ResNet's odd sizes: ceil(L / 2)
FPN_BACKENDS = [b for b in usable_backends("cpu", "fpn_merge") if b in usable_backends("cpu", "upsample_nearest_add")]
CUDA_AUTOCAST_DTYPES = [torch.float16, torch.bfloat16]


def _autocast(device="cpu", dtype=torch.bfloat16):
    return torch.autocast(device, dtype=dtype)


def _features(device="cpu", batch=2):
    return OrderedDict((f"c{i + 3}", torch.randn(batch, c, *s, device=device))
                       for i, (c, s) in enumerate(zip(IN_CHANNELS, SIZES)))


def _run_module(model, inputs, autocast):
    """(outputs, parameter gradients) of model(inputs) with a fixed output gradient; the forward under the
    autocast given (None: none)."""
    with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
        outputs = model(inputs)
    outputs = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
    weights = [torch.linspace(-1, 1, o.numel(), device=o.device, dtype=torch.float64).view_as(o) for o in outputs]
    loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights))
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return outputs, list(grads)


def _assert_like_original(got, want, exact, factor=2.0, name=""):
    """Same dtypes as the original's, and an error against the float64 run within factor x the original's."""
    assert [g.dtype for g in got] == [w.dtype for w in want], name
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        assert g.shape == w.shape, (name, i)
        assert_error_within(g, w, e, factor, name=f"{name}[{i}]")


# ---- torch's autocast lists, as fastbb reads them ------------------------------------------------------

def test_float32_lists_are_read_from_torch():
    """autocast_runs_in_float32 says what eager PyTorch does under CPU autocast, for the ops whose lists
    decide fastbb's rules (the nearest upsample for the FPN merges, exp for the decode)."""
    x = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    with _autocast():
        upsampled = F.interpolate(x, size=(6, 8), mode="nearest")
        exp = torch.exp(x)
    assert (upsampled.dtype == torch.float32) == autocast_runs_in_float32("aten::upsample_nearest2d", "cpu")
    assert (exp.dtype == torch.float32) == autocast_runs_in_float32("aten::exp", "cpu")


# ---- the FPN ops --------------------------------------------------------------------------------------------

MIXED = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
         (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("backend", usable_backends("cpu", "upsample_nearest_add"))
@pytest.mark.parametrize("top_dtype, lateral_dtype", MIXED)
@pytest.mark.parametrize("autocast", [False, True])
def test_upsample_nearest_add_dtypes_as_eager(backend, top_dtype, lateral_dtype, autocast):
    """Bit for bit eager's `lateral + F.interpolate(top)`, in its dtype, with and without autocast; each
    input's gradient in its own dtype, as eager's."""
    top = torch.randn(2, 3, 4, 6).to(top_dtype).requires_grad_()
    lateral = torch.randn(2, 3, 7, 11).to(lateral_dtype).requires_grad_()
    context = _autocast() if autocast else torch.autocast("cpu", enabled=False)
    with context:
        want = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
        with fastbb.use_backend(backend):
            got = upsample_nearest_add(top, lateral)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    grad_out = torch.randn(want.shape).to(want.dtype)
    want_grads = torch.autograd.grad(want, (top, lateral), grad_out)
    with fastbb.use_backend(backend):
        got_grads = torch.autograd.grad(got, (top, lateral), grad_out)
    # The top's window sums: eager sums a 16-bit top's gradient in that dtype, fastbb in float32.
    exact_top = top.detach().double().requires_grad_()
    exact_out = lateral.detach().double() + F.interpolate(exact_top, size=lateral.shape[-2:], mode="nearest")
    exact_grads = [torch.autograd.grad(exact_out, exact_top, grad_out.double())[0], grad_out.double()]
    _assert_like_original(got_grads, want_grads, exact_grads, name="gradients")


def _merge_problem(dtype=torch.float32, top_dtype=torch.float32, device="cpu"):
    x = torch.randn(2, 9, 9, 13, device=device, dtype=dtype)
    weight = (torch.randn(11, 9, 1, 1, device=device) / 3).to(dtype)
    bias = torch.randn(11, device=device, dtype=dtype)
    top = torch.randn(2, 11, 5, 7, device=device).to(top_dtype)
    return x, weight, bias, top


def _eager_merge(x, weight, bias, top):
    return F.conv2d(x, weight, bias) + F.interpolate(top, size=x.shape[-2:], mode="nearest")


@pytest.mark.parametrize("backend", usable_backends("cpu", "fpn_merge"))
@pytest.mark.parametrize("top_dtype", [torch.bfloat16, torch.float32])
def test_fpn_merge_under_autocast_as_conv_plus_upsample(backend, top_dtype):
    """Float32 conv inputs and a bfloat16 (a conv's output) or float32 top: the dtype of eager's conv2d +
    interpolate + add under the same autocast, values within its error; float32 parameter gradients."""
    args = [t.requires_grad_() for t in _merge_problem(top_dtype=top_dtype)]
    with _autocast():
        want = _eager_merge(*args)
        with fastbb.use_backend(backend):
            got = fpn_merge(*args)
    exact_args = [t.detach().double().requires_grad_() for t in args]
    exact = _eager_merge(*exact_args)
    _assert_like_original([got], [want], [exact], name="forward")
    grad_out = torch.linspace(-1, 1, want.numel()).view_as(want)
    want_grads = torch.autograd.grad(want, args, grad_out.to(want.dtype))
    with fastbb.use_backend(backend):
        got_grads = torch.autograd.grad(got, args, grad_out.to(got.dtype))
    exact_grads = torch.autograd.grad(exact, exact_args, grad_out.double())
    _assert_like_original(got_grads, want_grads, exact_grads, name="gradients")


@pytest.mark.parametrize("backend", usable_backends("cpu", "fpn_merge"))
@pytest.mark.parametrize("dtype, top_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float64)])
def test_fpn_merge_promotes_top_outside_autocast(backend, dtype, top_dtype):
    """A top of another dtype than the conv's: add's promotion, as conv2d + interpolate + add."""
    args = _merge_problem(dtype, top_dtype)
    with fastbb.use_backend(backend):
        got = fpn_merge(*args)
    want = _eager_merge(*args)
    exact = _eager_merge(*(t.double() for t in args))
    assert got.dtype == want.dtype == torch.promote_types(dtype, top_dtype)
    assert_error_within(got, want, exact, name="forward")


def test_fpn_merge_conv_dtypes_must_agree_as_conv2d():
    """x, weight and bias of different dtypes raise outside autocast, as conv2d does (a RuntimeError), and
    are cast to the autocast dtype under autocast, as conv2d's are."""
    x, weight, bias, top = _merge_problem()
    with pytest.raises(RuntimeError):
        F.conv2d(x, weight.bfloat16(), bias)
    with pytest.raises(RuntimeError, match=r"^fastbb\.fpn_merge: lateral_weight must have x's dtype"):
        fpn_merge(x, weight.bfloat16(), bias, top)
    with pytest.raises(TypeError, match=r"^fastbb\.fpn_merge: lateral_bias must have x's dtype"):
        fpn_merge(x, weight, bias.double(), top)
    with _autocast():
        want = _eager_merge(x, weight.bfloat16(), bias, top)
        got = fpn_merge(x, weight.bfloat16(), bias, top)
    assert got.dtype == want.dtype


def test_ops_under_autocast_compile_and_export():
    """torch.compile(fullgraph=True) and torch.export of the FPN ops under autocast: the eager results, and
    the exported graph calls the fastbb ops."""
    x, weight, bias, top = _merge_problem(top_dtype=torch.bfloat16)
    lateral = torch.randn(2, 11, 9, 13)

    class Merges(nn.Module):
        def forward(self, x, weight, bias, top, lateral):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                merged = fpn_merge(x, weight, bias, top)
                return merged, upsample_nearest_add(merged, lateral)

    module = Merges()
    args = (x, weight, bias, top, lateral)
    want = module(*args)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(*args)
    exported = torch.export.export(module, args)
    called = {node.target for graph_module in exported.graph_module.modules()
              if isinstance(graph_module, torch.fx.GraphModule)
              for node in graph_module.graph.nodes if node.op == "call_function"}
    assert {torch.ops.fastbb.fpn_merge.default, torch.ops.fastbb.upsample_nearest_add.default} <= called
    for got in (compiled, exported.module()(*args)):
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w)


# ---- the FPN modules ----------------------------------------------------------------------------------------

def _torchvision_pair(extra, norm):
    kwargs = dict(in_channels_list=IN_CHANNELS, out_channels=8, norm_layer=nn.BatchNorm2d if norm else None)
    theirs_extra, ours_extra = {"pool": (tv_fpn.LastLevelMaxPool(), LastLevelMaxPool()),
                                "p6p7": (tv_fpn.LastLevelP6P7(14, 8), LastLevelP6P7(14, 8))}[extra]
    theirs = tv_fpn.FeaturePyramidNetwork(extra_blocks=theirs_extra, **kwargs)
    ours = FeaturePyramidNetwork(extra_blocks=ours_extra, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("backend", FPN_BACKENDS)
@pytest.mark.parametrize("mode, extra, norm", [("eval", "p6p7", False), ("train", "pool", True),
                                               ("train", "p6p7", False)])
def test_feature_pyramid_network_under_autocast(backend, mode, extra, norm):
    theirs, ours = _torchvision_pair(extra, norm)
    exact_model = tv_fpn.FeaturePyramidNetwork(IN_CHANNELS, 8, norm_layer=nn.BatchNorm2d if norm else None,
                                               extra_blocks={"pool": tv_fpn.LastLevelMaxPool(),
                                                             "p6p7": tv_fpn.LastLevelP6P7(14, 8)}[extra])
    exact_model.load_state_dict(theirs.state_dict())
    for model in (theirs, ours, exact_model):
        model.train(mode == "train")
    features = _features()
    want, want_grads = _run_module(theirs, features, _autocast())
    with fastbb.use_backend(backend):
        got, got_grads = _run_module(ours, features, _autocast())
    exact, exact_grads = _run_module(exact_model.double(), OrderedDict((k, v.double()) for k, v in features.items()),
                                     None)
    assert all(g.dtype == torch.float32 for g in got_grads)
    _assert_like_original(got, want, exact, name="outputs")
    _assert_like_original(got_grads, want_grads, exact_grads, name="parameter gradients")


MMDET_CONFIGS = {
    "retinanet": dict(start_level=1, add_extra_convs="on_input", num_outs=5),
    "gn_relu": dict(num_outs=4, norm_cfg=dict(type="GN", num_groups=4), act_cfg=dict(type="ReLU")),
    "on_lateral": dict(add_extra_convs="on_lateral", num_outs=4),
}


@pytest.mark.parametrize("backend", FPN_BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("config", list(MMDET_CONFIGS))
def test_mmdet_fpn_under_autocast(backend, mode, config):
    """fastbb.build's FPN against mmdet's forward (unfused, on the same modules) under the same autocast."""
    fpn = fastbb.build(dict(type="FPN", in_channels=IN_CHANNELS, out_channels=8, **MMDET_CONFIGS[config]))
    fpn.train(mode == "train")
    inputs = tuple(_features().values())

    class MmdetForward(nn.Module):
        def __init__(self, fpn):
            super().__init__()
            self.fpn = fpn

        def forward(self, inputs):
            return _mmdet_forward(self.fpn, inputs)

    want, want_grads = _run_module(MmdetForward(fpn), inputs, _autocast())
    with fastbb.use_backend(backend):
        got, got_grads = _run_module(fpn, inputs, _autocast())
    exact_fpn = fastbb.build(dict(type="FPN", in_channels=IN_CHANNELS, out_channels=8, **MMDET_CONFIGS[config]))
    exact_fpn.load_state_dict(fpn.state_dict())
    exact_fpn.train(mode == "train").double()
    exact, exact_grads = _run_module(MmdetForward(exact_fpn), tuple(t.double() for t in inputs), None)
    assert all(g.dtype == torch.float32 for g in got_grads)
    _assert_like_original(got, want, exact, name="outputs")
    _assert_like_original(got_grads, want_grads, exact_grads, name="parameter gradients")


def test_feature_pyramid_network_compiles_under_autocast():
    _, ours = _torchvision_pair("p6p7", False)
    features = _features()
    with _autocast():
        want = ours(features)
        got = torch.compile(ours, fullgraph=True, backend="aot_eager")(features)
    for g, w in zip(got.values(), want.values()):
        assert g.dtype == w.dtype == torch.bfloat16
        torch.testing.assert_close(g, w)


# ---- focal loss ----------------------------------------------------------------------------------------------

def _head(in_features=6, out_features=5, device="cpu"):
    """A linear classifier: under autocast its outputs are in the autocast dtype, as a detector head's."""
    return nn.Linear(in_features, out_features).to(device)


@pytest.mark.parametrize("backend", usable_backends("cpu", "sigmoid_focal_loss"))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("module", [False, True])
def test_sigmoid_focal_loss_under_autocast(backend, reduction, module):
    """Logits from a head under autocast, soft float32 targets: float32 as torchvision's loss is there,
    within its error (against float64 on the same logits: a reduced loss is one number, whose error
    through the head's rounding would be a random sum), and the head's float32 weight gradient within
    its error (against the float64 model)."""
    head = _head()
    features = torch.randn(40, 6)
    targets = torch.rand(40, 5)
    loss_fn = SigmoidFocalLoss(reduction=reduction) if module else (
        lambda x, t: sigmoid_focal_loss(x, t, reduction=reduction))

    def run(loss, model, dtype=None):
        with _autocast() if dtype is None else torch.autocast("cpu", enabled=False):
            logits = model(features if dtype is None else features.to(dtype))
            value = loss(logits, targets if dtype is None else targets.to(dtype))
        return value, torch.autograd.grad(value.double().sum() if reduction != "none" else
                                          (value.double() * torch.linspace(-1, 1, value.numel(), dtype=torch.float64)
                                           .view_as(value)).sum(), model.weight)[0], logits.detach()

    def torchvision_loss(x, t):
        return torchvision.ops.sigmoid_focal_loss(x, t, reduction=reduction)

    want, want_grad, logits = run(torchvision_loss, head)
    with fastbb.use_backend(backend):
        got, got_grad, _ = run(loss_fn, head)
    exact = torchvision_loss(logits.double(), targets.double())
    _, exact_grad, _ = run(torchvision_loss, _double_copy(head), torch.float64)
    assert got.dtype == want.dtype == torch.float32 and got_grad.dtype == torch.float32
    # A reduced loss is one float32 number whose rounding error is a random sum: over 200 seeds its error
    # reached 2.09x torchvision's and the weight gradient's 1.96x, so the bound is 2.5x.
    _assert_like_original([got, got_grad], [want, want_grad], [exact, exact_grad], factor=2.5,
                          name="loss, weight gradient")


def _double_copy(module):
    return copy.deepcopy(module).double()


@pytest.mark.parametrize("backend", usable_backends("cpu", "sigmoid_focal_loss"))
@pytest.mark.parametrize("target_kind", ["labels", "one_hot"])
def test_mmdet_focal_loss_under_autocast(backend, target_kind):
    """mmdet's FocalLoss ('mean', loss_weight) computes as torchvision's formula on one-hot targets, in
    float32 under autocast (binary_cross_entropy_with_logits' rule); errors measured as in
    test_sigmoid_focal_loss_under_autocast."""
    head = _head()
    features = torch.randn(40, 6)
    labels = torch.randint(0, 6, (40,))  # 5 = background
    one_hot = F.one_hot(labels, 6)[:, :5].float()
    loss_fn = FocalLoss(loss_weight=0.5)

    def run(loss, model, dtype=None):
        with _autocast() if dtype is None else torch.autocast("cpu", enabled=False):
            logits = model(features if dtype is None else features.to(dtype))
            value = loss(logits)
        return value, torch.autograd.grad(value, model.weight)[0], logits.detach()

    def torchvision_loss(logits):
        return 0.5 * torchvision.ops.sigmoid_focal_loss(logits, one_hot.to(logits.dtype), reduction="mean")

    want, want_grad, logits = run(torchvision_loss, head)
    with fastbb.use_backend(backend):
        got, got_grad, _ = run(lambda x: loss_fn(x, labels if target_kind == "labels" else one_hot), head)
    exact = torchvision_loss(logits.double())
    _, exact_grad, _ = run(torchvision_loss, _double_copy(head), torch.float64)
    assert got.dtype == want.dtype == torch.float32 and got_grad.dtype == torch.float32
    _assert_like_original([got, got_grad], [want, want_grad], [exact, exact_grad], name="loss, weight gradient")


# ---- NMS and decoding -----------------------------------------------------------------------------------

def _integer_boxes(n, dtype):
    """Boxes on a small integer grid: exact in bfloat16, and torchvision's batched_nms offsets (its
    coordinate trick) stay exact, so its result is the exact per-class NMS."""
    xy = torch.randint(0, 40, (n, 2))
    wh = torch.randint(1, 24, (n, 2))
    return torch.cat([xy, xy + wh], 1).to(dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("backend", usable_backends("cpu", "batched_nms"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nms_under_autocast_equals_torchvision(backend, dtype):
    boxes = _integer_boxes(200, dtype)
    scores = (torch.randperm(200) + 1).to(dtype)  # integers, exact in bfloat16: no ties, one order
    idxs = torch.randint(0, 3, (200,))
    with _autocast():
        want_nms = torchvision.ops.nms(boxes, scores, 0.5)
        want_batched = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
        with fastbb.use_backend(backend):
            got_nms = nms(boxes, scores, 0.5)
            got_batched = batched_nms(boxes, scores, idxs, 0.5)
    assert got_nms.dtype == got_batched.dtype == torch.int64
    assert torch.equal(got_nms, want_nms) and torch.equal(got_batched, want_batched)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("idxs_dtype", [torch.int64, torch.int32, torch.uint8, torch.float32])
@pytest.mark.parametrize("autocast", [False, True])
def test_batched_nms_empty_inputs_as_torchvision(dtype, idxs_dtype, autocast):
    boxes = torch.empty((0, 4), dtype=dtype)
    scores = torch.empty((0,), dtype=dtype)
    idxs = torch.empty((0,), dtype=idxs_dtype)
    with _autocast() if autocast else torch.autocast("cpu", enabled=False):
        want = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
        got = batched_nms(boxes, scores, idxs, 0.5)
    assert want.dtype == got.dtype == torch.int64 and got.shape == want.shape == (0,)
    assert got.device == boxes.device


def _anchors(n, device="cpu"):
    ctr = torch.rand(n, 2, device=device) * 200
    wh = torch.rand(n, 2, device=device) * 60 + 8
    return torch.cat([ctr - wh / 2, ctr + wh / 2], 1)


def _run_decode(decode, head, features, anchors, autocast, dtype=None):
    with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
        deltas = head(features if dtype is None else features.to(dtype)) * 0.3
        boxes = decode(deltas, anchors if dtype is None else anchors.to(dtype))
    weight = torch.linspace(-1, 1, boxes.numel(), dtype=torch.float64, device=boxes.device).view_as(boxes)
    return boxes, torch.autograd.grad((boxes.double() * weight).sum(), head.weight)[0]


@pytest.mark.parametrize("backend", usable_backends("cpu", "decode_boxes"))
@pytest.mark.parametrize("coder", ["torchvision", "mmdet"])
def test_box_coders_under_autocast(backend, coder):
    """Deltas from a head under autocast on float32 anchors: the boxes' dtype of torchvision's BoxCoder
    (mmdet's delta2bbox) under the same autocast, within its error, and the head's float32 gradient."""
    head = _head(6, 8)
    features = torch.randn(30, 6)
    anchors = _anchors(30)
    if coder == "torchvision":
        theirs = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single
        ours = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single
    else:
        config = dict(target_means=(0.0, 0.0, 0.0, 0.0), target_stds=(0.1, 0.1, 0.2, 0.2))

        def theirs(deltas, rois):
            return mmdet_onnx_delta2bbox(rois, deltas, config["target_means"], config["target_stds"], (180, 220),
                                         16 / 1000, True, False, 32)

        def ours(deltas, rois):
            return DeltaXYWHBBoxCoder(**config).decode(rois, deltas, max_shape=(180, 220))

    want, want_grad = _run_decode(theirs, head, features, anchors, _autocast())
    with fastbb.use_backend(backend):
        got, got_grad = _run_decode(ours, head, features, anchors, _autocast())
    exact, exact_grad = _run_decode(theirs, _double_copy(head), features, anchors, None, torch.float64)
    assert got_grad.dtype == torch.float32
    _assert_like_original([got, got_grad], [want, want_grad], [exact, exact_grad], name="boxes, weight gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_retinanet_postprocess_under_autocast(dtype):
    """Under CPU autocast the post-processing casts nothing (torchvision's decode keeps its dtype there):
    torchvision's dtypes, and for float32 head outputs its detections. (In bfloat16 torchvision's
    batched_nms offsets the boxes in bfloat16, which moves them by whole pixels: dtypes only.)"""
    problem = _retinanet_problem(2, (120, 30), 5, dtype)
    with _autocast():
        want = _torchvision_postprocess(*problem)
        got = retinanet_postprocess(*problem)
    without_autocast = retinanet_postprocess(*problem)
    for g, w, plain in zip(got, want, without_autocast):
        assert {k: v.dtype for k, v in g.items()} == {k: v.dtype for k, v in w.items()}
        assert all(torch.equal(g[k], plain[k]) for k in g)
    if dtype == torch.float32:
        assert_same_detections(got, want, dtype)


def test_retinanet_postprocess_takes_the_cuda_autocast_dtypes():
    """On CUDA the rule hands the op float32 regression and anchors (decode_boxes' rule: exp runs in float32
    there) with 16-bit logits; the batched path CUDA runs and the reference agree on such inputs, boxes in
    float32 and scores in the logits' dtype, as torchvision's are under CUDA autocast."""
    args = list(_check_postprocess_inputs(*_retinanet_problem(2, (120, 30), 5, torch.bfloat16), **_kwargs()))
    args[1], args[2] = args[1].float(), [a.float() for a in args[2]]
    got = _postprocess_batched(*args)
    want = _postprocess_reference(*args)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32, torch.bfloat16, torch.int64,
                                                                   torch.int64]

    def as_list(boxes, scores, labels, counts):
        return [{"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
                for i, n in enumerate(counts.tolist())]
    assert_same_detections(as_list(*got), as_list(*want), torch.bfloat16)


def test_decode_and_nms_compile_under_autocast():
    anchors = _anchors(50)
    deltas = (torch.randn(50, 4) * 0.3).bfloat16()
    scores = torch.rand(50).bfloat16()
    labels = torch.randint(0, 3, (50,))
    targets = torch.rand(50, 4)

    def detect(deltas, anchors, scores, labels, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            boxes = decode_boxes(anchors, deltas, max_shape=(200, 200))
            keep = batched_nms(boxes, scores, labels, 0.5)
            loss = sigmoid_focal_loss(deltas, targets, reduction="sum")
        return boxes[keep], keep, loss

    args = (deltas, anchors, scores, labels, targets)
    want = detect(*args)
    got = torch.compile(detect, fullgraph=True, backend="aot_eager")(*args)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w)


# ---- a training step with torch.amp.GradScaler -------------------------------------------------------------

def _training_step(fpn, head, loss_fn, features, targets, device, dtype):
    """One GradScaler step of an FPN + a classification conv + focal loss under autocast in dtype (None: in
    the models' dtype, no autocast and no scaling); returns the loss and the updated parameters. The scale
    starts low enough for float16 gradients not to overflow, so the step is taken (checked)."""
    params = list(fpn.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10, enabled=dtype is not None)
    with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        outputs = list(fpn(features).values())
        logits = torch.cat([head(o).flatten(2) for o in outputs], 2).transpose(1, 2)
        loss = loss_fn(logits, targets[:, :logits.shape[1]])
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert dtype is None or scaler.get_scale() == 2.0 ** 10, "the step was skipped: non-finite gradients"
    return loss.detach(), [p.detach() for p in params]


@pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16)] + [
    pytest.param("cuda", dtype, marks=pytest.mark.cuda) for dtype in CUDA_AUTOCAST_DTYPES])
def test_grad_scaler_training_step_as_torchvision(device, dtype):
    """A GradScaler step of fastbb's FPN + FocalLoss lands where torchvision's FPN + sigmoid_focal_loss
    does, within the autocast dtype's error of the step (the same step in float64)."""
    theirs, ours = (m.to(device) for m in _torchvision_pair("p6p7", False))
    exact_model = tv_fpn.FeaturePyramidNetwork(IN_CHANNELS, 8, extra_blocks=tv_fpn.LastLevelP6P7(14, 8))
    exact_model.load_state_dict(theirs.state_dict())
    head = nn.Conv2d(8, 3, 3, padding=1).to(device)
    features = _features(device, batch=1)
    targets = (torch.rand(1, 2000, 3, device=device) > 0.9).float()

    def torchvision_loss(logits, t):
        return torchvision.ops.sigmoid_focal_loss(logits, t, reduction="sum") / max(1.0, float(t.sum()))

    def fastbb_loss(logits, t):
        return FocalLoss(reduction="sum")(logits, t) / max(1.0, float(t.sum()))

    want_loss, want = _training_step(theirs, copy.deepcopy(head), torchvision_loss, features, targets, device, dtype)
    got_loss, got = _training_step(ours, copy.deepcopy(head), fastbb_loss, features, targets, device, dtype)
    exact_loss, exact = _training_step(exact_model.double().to(device), copy.deepcopy(head).double(), torchvision_loss,
                                       OrderedDict((k, v.double()) for k, v in features.items()),
                                       targets.double(), device, None)
    assert got_loss.dtype == want_loss.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in got)
    # One number: its error is a random sum of the roundings before it, so it is checked within the
    # autocast dtype's tolerance; the parameters, many numbers, by the error rule.
    torch.testing.assert_close(got_loss, want_loss, **TOLERANCES[dtype])
    torch.testing.assert_close(got_loss.double(), exact_loss, **TOLERANCES[dtype])
    assert_error_within(torch.cat([p.flatten() for p in got]), torch.cat([p.flatten() for p in want]),
                        torch.cat([p.flatten() for p in exact]), name="parameters after the step")


# ---- CUDA: float16 and bfloat16 autocast ------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_float32_lists_are_read_from_torch():
    x = torch.randn(1, 2, 3, 4, device="cuda", dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        upsampled = F.interpolate(x, size=(6, 8), mode="nearest")
        exp = torch.exp(x)
    assert (upsampled.dtype == torch.float32) == autocast_runs_in_float32("aten::upsample_nearest2d", "cuda")
    assert (exp.dtype == torch.float32) == autocast_runs_in_float32("aten::exp", "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_AUTOCAST_DTYPES)
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cuda_fpn_ops_under_autocast(dtype, backend):
    args = [t.requires_grad_() for t in _merge_problem(device="cuda")]
    lateral = torch.randn(2, 11, 9, 13, device="cuda", dtype=dtype)
    with torch.autocast("cuda", dtype=dtype):
        top = F.conv2d(args[3], torch.ones(11, 11, 1, 1, device="cuda") / 11)  # a conv's output: dtype
        want = _eager_merge(args[0], args[1], args[2], top)
        want_add = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
        with fastbb.use_backend(backend):
            got = fpn_merge(args[0], args[1], args[2], top)
            got_add = upsample_nearest_add(top, lateral)
    assert got_add.dtype == want_add.dtype and torch.equal(got_add, want_add)
    exact = _eager_merge(*(t.detach().double() for t in args[:3]), top.detach().double())
    _assert_like_original([got], [want], [exact], name="fpn_merge")
    grads = torch.autograd.grad(got.float().sum(), args[:3])
    assert all(g.dtype == torch.float32 for g in grads)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_AUTOCAST_DTYPES)
def test_cuda_feature_pyramid_network_under_autocast(dtype):
    theirs, ours = (m.cuda() for m in _torchvision_pair("p6p7", False))
    exact_model = tv_fpn.FeaturePyramidNetwork(IN_CHANNELS, 8, extra_blocks=tv_fpn.LastLevelP6P7(14, 8))
    exact_model.load_state_dict(theirs.state_dict())
    features = _features("cuda")
    want, want_grads = _run_module(theirs, features, torch.autocast("cuda", dtype=dtype))
    got, got_grads = _run_module(ours, features, torch.autocast("cuda", dtype=dtype))
    exact, exact_grads = _run_module(exact_model.double().cuda(),
                                     OrderedDict((k, v.double()) for k, v in features.items()), None)
    _assert_like_original(got, want, exact, name="outputs")
    _assert_like_original(got_grads, want_grads, exact_grads, name="parameter gradients")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_AUTOCAST_DTYPES)
def test_cuda_detection_ops_under_autocast(dtype):
    boxes = _integer_boxes(200, dtype).cuda()
    scores = (torch.randperm(200) + 1).to(dtype).cuda()
    idxs = torch.randint(0, 3, (200,), device="cuda")
    head = _head(6, 8, "cuda")
    features = torch.randn(30, 6, device="cuda")
    anchors = _anchors(30, "cuda")
    logits, targets = torch.randn(40, 5, device="cuda", dtype=dtype), torch.rand(40, 5, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        assert torch.equal(nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))
        assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
        want_loss = torchvision.ops.sigmoid_focal_loss(logits, targets, reduction="sum")
        got_loss = sigmoid_focal_loss(logits, targets, reduction="sum")
    exact_loss = torchvision.ops.sigmoid_focal_loss(logits.double(), targets.double(), reduction="sum")
    _assert_like_original([got_loss], [want_loss], [exact_loss], name="focal loss")
    coder = (10.0, 10.0, 5.0, 5.0)
    want, want_grad = _run_decode(TorchvisionBoxCoder(coder).decode_single, head, features, anchors,
                                  torch.autocast("cuda", dtype=dtype))
    got, got_grad = _run_decode(BoxCoder(coder).decode_single, head, features, anchors,
                                torch.autocast("cuda", dtype=dtype))
    exact, exact_grad = _run_decode(TorchvisionBoxCoder(coder).decode_single, _double_copy(head), features, anchors,
                                    None, torch.float64)
    _assert_like_original([got, got_grad], [want, want_grad], [exact, exact_grad], name="boxes, weight gradient")
