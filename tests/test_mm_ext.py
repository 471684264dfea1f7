"""fastbb.mm._ext, the mmcv._ext that fastbb provides where mmcv's compiled ops are missing (mmcv-lite).

Its functions are compared with plain-PyTorch references of mmcv's kernels written here (nms also with
torchvision's nms), directly and through mmcv's own Python API (mmcv.ops.nms / batched_nms /
sigmoid_focal_loss). The test process holds the tests' stand-in mmcv._ext (tests/mm_support.py), so mmcv's
API is pointed at the provider by replacing the ext_module of mmcv's op modules; a fresh process checks the
real installation path: `import fastbb.mm` installs the provider, warns once, and mmdet and mmcv's ops work.
"""
import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torchvision

import fastbb
from conftest import TOLERANCES, devices, usable_backends

if not any(importlib.util.find_spec(package) for package in ("mmdet", "mmseg", "mmpretrain")):
    pytest.skip("fastbb.mm needs one of mmdet, mmseg and mmpretrain", allow_module_level=True)
from fastbb.mm import _ext  # noqa: E402

FLT_MIN = torch.finfo(torch.float32).tiny  # mmcv's kernels clamp p and 1 - p to it before the log
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- references of mmcv's kernels ------------------------------------------------------------------------

def mmcv_nms_reference(boxes, scores, iou_threshold, offset=0):
    """mmcv's nms kernel, in float32 arithmetic as it computes (float64 for float64 boxes, which mmcv's kernel
    does not take): boxes by decreasing score (equal scores: lower index first), each kept unless its IoU with
    a kept box is > iou_threshold, a C++ float (rounded to float32); widths and heights are x2 - x1 + offset."""
    real = np.float64 if boxes.dtype == torch.float64 else np.float32
    b = boxes.double().numpy().astype(real)
    order = sorted(range(len(b)), key=lambda i: -float(scores[i]))  # sorted() is stable
    one, zero, threshold = real(offset), real(0), real(np.float32(iou_threshold))
    area = [(x2 - x1 + one) * (y2 - y1 + one) for x1, y1, x2, y2 in b]
    kept = []
    with np.errstate(invalid="ignore"):  # 0 / 0 (two empty boxes) is NaN, never > the threshold, as in C++
        for i in order:
            x1, y1, x2, y2 = b[i]
            suppressed = False
            for j in kept:
                w = max(zero, min(x2, b[j][2]) - max(x1, b[j][0]) + one)
                h = max(zero, min(y2, b[j][3]) - max(y1, b[j][1]) + one)
                inter = w * h
                if inter / (area[j] + area[i] - inter) > threshold:
                    suppressed = True
                    break
            if not suppressed:
                kept.append(i)
    return torch.tensor(kept, dtype=torch.int64)


def mmcv_batched_nms_reference(boxes, scores, idxs, iou_threshold, class_agnostic=False):
    """NMS within each class (across all with class_agnostic), the kept indices by decreasing score."""
    if class_agnostic:
        return mmcv_nms_reference(boxes, scores, iou_threshold)
    kept = []
    for c in torch.unique(idxs).tolist():
        members = torch.nonzero(idxs == c).squeeze(1)
        kept.append(members[mmcv_nms_reference(boxes[members], scores[members], iou_threshold)])
    kept = torch.cat(kept)
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


def mmcv_focal_reference(input, target, weight, gamma, alpha, dtype=torch.float64):
    """(loss, d(sum loss)/d input) per element of mmcv's sigmoid focal loss kernels, computed in `dtype` with
    their formulas: p = 1 / (1 + exp(-x)); positive (target == c): -alpha (1 - p)^gamma log(max(p, FLT_MIN)),
    negative: -(1 - alpha) p^gamma log(max(1 - p, FLT_MIN)); the row scaled by weight[target]. A background row
    (target C) is scaled by 1: mmcv's kernels read weight[C], past the end of the weight, there."""
    x = input.to(dtype)
    positive = target[:, None] == torch.arange(x.shape[1])
    p = 1 / (1 + torch.exp(-x))
    log_p = torch.log(torch.clamp(p, min=FLT_MIN))
    log_q = torch.log(torch.clamp(1 - p, min=FLT_MIN))
    loss = torch.where(positive, -alpha * (1 - p) ** gamma * log_p, -(1 - alpha) * p ** gamma * log_q)
    grad = torch.where(positive, -alpha * (1 - p) ** gamma * ((1 - p) - gamma * p * log_p),
                       -(1 - alpha) * p ** gamma * (gamma * (1 - p) * log_q - p))
    if weight is not None and weight.numel():
        row = torch.cat([weight.to(dtype), torch.ones(1, dtype=dtype)])[target][:, None]
        loss, grad = loss * row, grad * row
    return loss, grad


def random_boxes(n, generator, dtype=torch.float64, integer=False, size=100.0):
    if integer:  # integer corners: IoUs exactly at a threshold and equal areas happen
        xy = torch.randint(0, 20, (n, 2), generator=generator)
        wh = torch.randint(0, 8, (n, 2), generator=generator)
    else:
        xy = torch.rand((n, 2), generator=generator, dtype=torch.float64) * size
        wh = torch.rand((n, 2), generator=generator, dtype=torch.float64) * size / 4
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def random_focal_inputs(n, c, generator, dtype=torch.float32, scale=3.0):
    """Logits, targets over every class and background C, and a positive (C,) weight."""
    x = (torch.randn((n, c), generator=generator, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, c + 1, (n,), generator=generator)
    weight = torch.rand(c, generator=generator, dtype=torch.float64).to(dtype) + 0.5
    return x, target, weight


def provider_loss_and_grad(x, target, weight, gamma, alpha):
    loss = torch.full_like(x, float("nan"))  # every element must be written
    grad = torch.full_like(x, float("nan"))
    w = x.new_empty(0) if weight is None else weight
    assert _ext.sigmoid_focal_loss_forward(x, target, w, loss, gamma=gamma, alpha=alpha) is None
    assert _ext.sigmoid_focal_loss_backward(x, target, w, grad, gamma=gamma, alpha=alpha) is None
    return loss, grad


def assert_close(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected.to(dtype), **TOLERANCES[dtype])


# ---- nms -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n", [0, 1, 7, 300])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9])
def test_nms_matches_torchvision_and_mmcv_reference(device, n, threshold):
    g = torch.Generator().manual_seed(n * 10 + int(threshold * 10))
    boxes = random_boxes(n, g, torch.float32)
    scores = torch.rand(n, generator=g)
    keep = _ext.nms(boxes.to(device), scores.to(device), iou_threshold=threshold, offset=0)
    assert keep.dtype == torch.int64 and keep.device.type == device
    assert torch.equal(keep.cpu(), torchvision.ops.nms(boxes, scores, threshold))
    # offset 1: torchvision's IoU of the boxes grown by one at their far corner, and mmcv's formula
    keep = _ext.nms(boxes.to(device), scores.to(device), iou_threshold=threshold, offset=1).cpu()
    grown = torch.cat([boxes[:, :2], boxes[:, 2:] + 1], dim=1)
    assert torch.equal(keep, torchvision.ops.nms(grown, scores, threshold))
    assert torch.equal(keep, mmcv_nms_reference(boxes, scores, threshold, offset=1))


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_nms_integer_boxes_with_tied_scores_and_ious(offset, dtype):
    # Integer corners give IoUs exactly at the threshold (kept: suppression needs IoU > threshold), zero-area
    # boxes (area 1 with offset 1), and scores from four values give ties (lower index first).
    g = torch.Generator().manual_seed(3 + offset)
    boxes = random_boxes(200, g, dtype, integer=True)
    scores = (torch.randint(0, 4, (200,), generator=g) / 4).to(dtype)
    for threshold in (0.0, 0.25, 0.5):
        keep = _ext.nms(boxes, scores, threshold, offset)
        assert torch.equal(keep, mmcv_nms_reference(boxes, scores, threshold, offset)), threshold


def test_nms_threshold_is_a_float32_as_in_mmcv():
    # IoU 3 / 10: in float32 exactly float32(0.3), which is above the double 0.3. mmcv compares with the
    # threshold as a C++ float and keeps the box; torchvision compares with the double and drops it.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 3.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert _ext.nms(boxes, scores, 0.3).tolist() == [0, 1]
    assert torchvision.ops.nms(boxes, scores, 0.3).tolist() == [0]
    assert _ext.nms(boxes, scores, 0.29).tolist() == [0]


# Zero-area boxes make 0 / 0 IoUs, which the Triton interpreter's numpy reports (the kernels compare NaN as not
# above the threshold, as C++ does).
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("backend", usable_backends("cpu", "nms"))
def test_nms_on_every_backend(backend):
    g = torch.Generator().manual_seed(4)
    boxes = random_boxes(120, g, torch.float32, integer=True)
    scores = (torch.randint(0, 4, (120,), generator=g) / 4).float()
    for offset in (0, 1):
        with fastbb.use_backend(backend):
            keep = _ext.nms(boxes, scores, 0.3, offset)
        assert torch.equal(keep, mmcv_nms_reference(boxes, scores, 0.3, offset)), offset


def test_nms_empty_and_non_contiguous():
    empty = _ext.nms(torch.empty((0, 4)), torch.empty((0,)), 0.5, 1)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    g = torch.Generator().manual_seed(5)
    boxes = random_boxes(50, g, torch.float32)
    scores = torch.rand(50, generator=g)
    wide = torch.cat([boxes, boxes], dim=1)[:, ::2]  # a non-contiguous (50, 4) view of other values
    assert torch.equal(_ext.nms(wide, scores[::1], 0.5), torchvision.ops.nms(wide.contiguous(), scores, 0.5))


def test_nms_bad_inputs_raise_clear_errors():
    boxes, scores = torch.rand(3, 4), torch.rand(3)
    with pytest.raises(ValueError, match=r"mmcv\._ext\.nms: boxes must have last dimension 4"):
        _ext.nms(torch.rand(3, 5), scores, 0.5)
    with pytest.raises(ValueError, match=r"mmcv\._ext\.nms: boxes must be \(N, 4\)"):
        _ext.nms(torch.rand(3), scores, 0.5)
    with pytest.raises(ValueError, match=r"mmcv\._ext\.nms: scores must have shape \(N,\)"):
        _ext.nms(boxes, torch.rand(4), 0.5)
    with pytest.raises(ValueError, match=r"mmcv\._ext\.nms: offset must be 0 or 1, got 2"):
        _ext.nms(boxes, scores, 0.5, offset=2)
    with pytest.raises(TypeError, match=r"mmcv\._ext\.nms: boxes must have dtype"):
        _ext.nms(boxes.long(), scores, 0.5)
    with pytest.raises(TypeError, match=r"mmcv\._ext\.nms: iou_threshold must be a float"):
        _ext.nms(boxes, scores, "0.5")
    with pytest.raises(RuntimeError):  # what mmcv's compiled checks raise, also caught as such
        _ext.nms(boxes, torch.rand(4), 0.5)


# ---- sigmoid focal loss ----------------------------------------------------------------------------------

# (gamma, alpha): mmcv's default, gamma 0 and 1, a fractional gamma, alpha at 0 and 1, and alpha outside
# [0, 1] (mmcv's formula takes it as it is; fastbb's own losses read alpha < 0 as "off").
PARAMS = ((2.0, 0.25), (0.0, 0.5), (1.0, 0.75), (1.5, 0.0), (2.0, 1.0), (2.0, -0.5), (0.5, 1.5))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("gamma,alpha", PARAMS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(0, 4), (1, 1), (37, 5), (64, 80)])
def test_focal_loss_matches_mmcv_reference(device, gamma, alpha, weighted, shape):
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    x, target, weight = random_focal_inputs(*shape, g)
    weight = weight if weighted else None
    loss, grad = provider_loss_and_grad(x.to(device), target.to(device),
                                        None if weight is None else weight.to(device), gamma, alpha)
    ref_loss, ref_grad = mmcv_focal_reference(x, target, weight, gamma, alpha)
    assert_close(loss.cpu(), ref_loss, torch.float32)
    assert_close(grad.cpu(), ref_grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_focal_loss_dtypes(dtype):
    g = torch.Generator().manual_seed(11)
    x, target, weight = random_focal_inputs(50, 7, g, dtype)
    for w in (None, weight):
        loss, grad = provider_loss_and_grad(x, target, w, 2.0, 0.25)
        ref_loss, ref_grad = mmcv_focal_reference(x, target, w, 2.0, 0.25)
        assert_close(loss, ref_loss, dtype)
        assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", usable_backends("cpu", "sigmoid_focal_loss"))
def test_focal_loss_on_every_backend(backend):
    # The provider's weight is an expanded (N, C) view, and alpha < 0 a materialised one; each backend reads both.
    g = torch.Generator().manual_seed(13)
    x, target, weight = random_focal_inputs(9, 4, g)
    for w in (None, weight):
        for gamma, alpha in ((2.0, 0.25), (1.5, -0.5)):
            with fastbb.use_backend(backend):
                loss, grad = provider_loss_and_grad(x, target, w, gamma, alpha)
            ref_loss, ref_grad = mmcv_focal_reference(x, target, w, gamma, alpha)
            assert_close(loss, ref_loss, torch.float32)
            assert_close(grad, ref_grad, torch.float32)


def test_focal_loss_other_integer_targets_and_non_contiguous_tensors():
    g = torch.Generator().manual_seed(12)
    x, target, weight = random_focal_inputs(40, 6, g)
    wide = torch.cat([x, x], dim=1)[:, ::2]  # non-contiguous logits
    out = torch.empty(6, 40).t()  # a non-contiguous output, written in place
    _ext.sigmoid_focal_loss_forward(wide, target.to(torch.int32), weight[::1], out, gamma=2.0, alpha=0.25)
    assert_close(out, mmcv_focal_reference(wide, target, weight, 2.0, 0.25)[0], torch.float32)


def test_focal_loss_background_rows_with_a_weight_are_scaled_by_one():
    x = torch.tensor([[0.3, -1.2, 2.0], [0.3, -1.2, 2.0]])
    target = torch.tensor([3, 1])  # a background row, a class-1 row
    weight = torch.tensor([5.0, 7.0, 11.0])
    weighted, _ = provider_loss_and_grad(x, target, weight, 2.0, 0.25)
    plain, _ = provider_loss_and_grad(x, target, None, 2.0, 0.25)
    torch.testing.assert_close(weighted[0], plain[0])
    torch.testing.assert_close(weighted[1], 7.0 * plain[1])


def test_focal_loss_large_logits_are_exact_where_mmcvs_float32_saturates():
    # The documented difference: fastbb takes -log p and -log(1 - p) as softplus of the logit; mmcv rounds
    # 1 - p to 0 in float32 above a logit of about 16.6 (p below FLT_MIN under -87.34) and takes -log(FLT_MIN).
    x = torch.tensor([[20.0, -100.0, 9.0]])
    target = torch.tensor([1])  # elements 0 and 2 negative, 1 positive
    loss, grad = provider_loss_and_grad(x, target, None, 2.0, 0.25)
    exact = torch.tensor([[0.75 * (20.0 + torch.log1p(torch.exp(torch.tensor(-20.0)))).item(), 0.25 * 100.0,
                           0.75 * torch.sigmoid(torch.tensor(9.0, dtype=torch.float64)).item() ** 2
                           * torch.nn.functional.softplus(torch.tensor(9.0, dtype=torch.float64)).item()]])
    torch.testing.assert_close(loss, exact)
    mmcv_float32, mmcv_grad = mmcv_focal_reference(x, target, None, 2.0, 0.25, dtype=torch.float32)
    torch.testing.assert_close(mmcv_float32[0, :2], torch.tensor([0.75, 0.25]) * -torch.log(torch.tensor(FLT_MIN)))
    torch.testing.assert_close(grad, mmcv_grad)  # the gradients agree, saturated or not
    torch.testing.assert_close(grad, torch.tensor([[0.75, -0.25, grad[0, 2].item()]]))


@pytest.mark.parametrize("function", ["sigmoid_focal_loss_forward", "sigmoid_focal_loss_backward"])
def test_focal_loss_bad_inputs_raise_clear_errors(function):
    fn = getattr(_ext, function)
    out_name = "output" if function.endswith("forward") else "grad_input"
    op = rf"mmcv\._ext\.{function}: "
    x, target, none = torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.empty(0)
    out = torch.empty(4, 3)
    cases = [
        ((x[0], target, none, out[0]), ValueError, "input must be 2-D"),
        ((x, target.float(), none, out), TypeError, "target must be an integer tensor"),
        ((x, target[:3], none, out), ValueError, r"target must have shape \(N,\) with N = input.shape\[0\] = 4"),
        ((x, torch.tensor([0, 1, 4, 2]), none, out), ValueError, r"target must be in \[0, 3\].*got 4"),
        ((x, torch.tensor([0, -1, 2, 2]), none, out), ValueError, r"target must be in \[0, 3\].*got -1"),
        ((x, target, torch.ones(4), out), ValueError, r"weight must be empty \(no weight\) or have shape \(C,\)"),
        ((x, target, torch.ones(3, dtype=torch.int64), out), TypeError, "weight must be a floating-point"),
        ((x, target, none, out.double()), ValueError, f"{out_name} must have input's shape"),
        ((x, target, none, out[:2]), ValueError, f"{out_name} must have input's shape"),
        ((x.long(), target, none, out.long()), TypeError, "input must have dtype"),
        ((x, target, None, out), TypeError, "weight must be a torch.Tensor"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=op + message):
            fn(*args, gamma=2.0, alpha=0.25)
    with pytest.raises(ValueError, match=op + "gamma must be >= 0"):
        fn(x, target, none, out, gamma=-1.0, alpha=0.25)
    with pytest.raises(ValueError, match=op + "alpha must be finite"):
        fn(x, target, none, out, gamma=2.0, alpha=float("nan"))


# ---- mmcv's Python API on the provider (in this process) ---------------------------------------------------

@pytest.fixture
def mmcv_ops(monkeypatch):
    """mmcv.ops with its nms and focal loss modules calling the provider (this process holds the stand-in)."""
    pytest.importorskip("mmcv")
    import mmcv.ops
    for module in ("mmcv.ops.nms", "mmcv.ops.focal_loss"):
        monkeypatch.setattr(sys.modules[module], "ext_module", _ext)
    return mmcv.ops


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mmcv_sigmoid_focal_loss_on_the_provider(mmcv_ops, reduction, weighted):
    g = torch.Generator().manual_seed(21)
    x, target, weight = random_focal_inputs(30, 6, g)
    weight = weight if weighted else None
    logits = x.clone().requires_grad_()
    loss = mmcv_ops.sigmoid_focal_loss(logits, target, 2.0, 0.25, weight, reduction)
    grad_out = torch.rand(loss.shape, generator=g)
    loss.backward(grad_out)
    ref = x.double().requires_grad_()
    ref_loss = (mmcv_focal_reference(ref, target, weight, 2.0, 0.25)[0])
    ref_loss = {"none": ref_loss, "sum": ref_loss.sum(), "mean": ref_loss.sum() / x.shape[0]}[reduction]
    ref_loss.backward(grad_out.double())
    assert_close(loss.detach(), ref_loss.detach(), torch.float32)
    assert_close(logits.grad, ref.grad, torch.float32)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mmcv_sigmoid_focal_loss_gradcheck(mmcv_ops, reduction):
    g = torch.Generator().manual_seed(22)
    x, target, weight = random_focal_inputs(6, 4, g, torch.float64, scale=2.0)
    for w in (None, weight):
        assert torch.autograd.gradcheck(
            lambda logits: mmcv_ops.sigmoid_focal_loss(logits, target, 1.5, 0.25, w, reduction),
            (x.clone().requires_grad_(),))


def test_mmcv_nms_and_batched_nms_on_the_provider(mmcv_ops):
    g = torch.Generator().manual_seed(23)
    boxes = random_boxes(400, g, torch.float32)
    scores = torch.rand(400, generator=g)  # distinct: mmcv's split path re-sorts without a stable sort
    idxs = torch.randint(0, 5, (400,), generator=g)
    for offset in (0, 1):
        dets, keep = mmcv_ops.nms(boxes, scores, 0.5, offset=offset)
        assert torch.equal(keep, mmcv_nms_reference(boxes, scores, 0.5, offset))
        assert torch.equal(dets, torch.cat([boxes[keep], scores[keep, None]], dim=1))
    dets, keep = mmcv_ops.nms(boxes.numpy(), scores.numpy(), 0.5)  # mmcv takes numpy arrays too
    assert np.array_equal(keep, mmcv_nms_reference(boxes, scores, 0.5).numpy())
    expected = mmcv_batched_nms_reference(boxes, scores, idxs, 0.5)
    for cfg in (dict(type="nms", iou_threshold=0.5), dict(type="nms", iou_threshold=0.5, split_thr=100)):
        dets, keep = mmcv_ops.batched_nms(boxes, scores, idxs, cfg, class_agnostic=False)
        assert torch.equal(keep, expected), cfg
        assert torch.equal(dets, torch.cat([boxes[keep], scores[keep, None]], dim=1))
    dets, keep = mmcv_ops.batched_nms(boxes, scores, idxs, dict(type="nms", iou_threshold=0.5), class_agnostic=True)
    assert torch.equal(keep, mmcv_nms_reference(boxes, scores, 0.5))
    # (mmcv's own class offsets take the max of the boxes, which fails on none: only class-agnostic NMS
    # reaches the provider with no boxes)
    dets, keep = mmcv_ops.batched_nms(boxes[:0], scores[:0], idxs[:0], dict(type="nms", iou_threshold=0.5),
                                      class_agnostic=True)
    assert dets.shape == (0, 5) and keep.shape == (0,)


# ---- the module as mmcv._ext -----------------------------------------------------------------------------

def test_unprovided_ops_raise_naming_the_op():
    assert hasattr(_ext, "roi_align_forward") and hasattr(_ext, "softmax_focal_loss_forward")
    with pytest.raises(NotImplementedError, match=r"mmcv\._ext\.roi_align_forward: .*needs mmcv's compiled ops, "
                                                  r"a full mmcv build"):
        _ext.roi_align_forward(torch.rand(1, 1, 4, 4))
    for name in ("__path__", "__wrapped__", "_private", "NotAnOp"):  # probed by importlib, inspect, ...
        assert not hasattr(_ext, name), name
    assert "n/a" in _ext.get_compiler_version() and "n/a" in _ext.get_compiling_cuda_version()


def needs_mmcv_lite():
    """mmcv, skipping where it is not installed or is a full build (its own mmcv._ext: nothing to stand in for)."""
    mmcv = pytest.importorskip("mmcv")
    ext = sys.modules.get("mmcv._ext")
    if ext is None or ext.__spec__ is not None:  # conftest's stand-in, made only for mmcv-lite, has no spec
        pytest.skip("a full mmcv with its own compiled ops is installed")
    return mmcv


def test_install_if_missing(monkeypatch):
    mmcv = needs_mmcv_lite()
    stand_in = sys.modules["mmcv._ext"]  # conftest's: already there, so nothing is installed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.install_if_missing() is False
    assert sys.modules["mmcv._ext"] is stand_in
    # Without one (mmcv-lite has no mmcv._ext to import): installed, with one warning, once.
    monkeypatch.delitem(sys.modules, "mmcv._ext")
    monkeypatch.setattr(mmcv, "_ext", stand_in, raising=False)  # restored (or removed) after the test
    with pytest.warns(UserWarning, match="fastbb provides nms / batched_nms / sigmoid_focal_loss for mmcv-lite; "
                                         "other mmcv ops need a full mmcv") as record:
        assert _ext.install_if_missing() is True
        assert _ext.install_if_missing() is False
    assert len([w for w in record if "fastbb provides nms" in str(w.message)]) == 1
    assert sys.modules["mmcv._ext"] is _ext and mmcv._ext is _ext


# ---- a fresh process: `import fastbb.mm` installs the provider ---------------------------------------------

_FRESH_PROCESS = r"""
import sys, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastbb.mm
    from fastbb.mm import _ext
    assert _ext.install_if_missing() is False  # already installed: no second notice
notices = [str(w.message) for w in caught if "fastbb provides nms" in str(w.message)]
assert sys.modules["mmcv._ext"] is _ext, sys.modules.get("mmcv._ext")
import mmdet.models, mmcv.ops
torch.manual_seed(0)
xy = torch.rand(300, 2) * 100
boxes = torch.cat([xy, xy + torch.rand(300, 2) * 25], dim=1)
scores, idxs = torch.rand(300), torch.randint(0, 4, (300,))
logits, target, weight = torch.randn(40, 5) * 3, torch.randint(0, 6, (40,)), torch.rand(5) + 0.5
out = dict(boxes=boxes, scores=scores, idxs=idxs, logits=logits, target=target, weight=weight, notices=notices)
out["nms"] = [mmcv.ops.nms(boxes, scores, 0.5, offset=o)[1] for o in (0, 1)]
cfg = dict(type="nms", iou_threshold=0.5)
out["batched_nms"] = mmcv.ops.batched_nms(boxes, scores, idxs, nms_cfg=cfg, class_agnostic=False)[1]
out["batched_nms_split"] = mmcv.ops.batched_nms(boxes, scores, idxs, dict(cfg, split_thr=50))[1]
out["batched_nms_agnostic"] = mmcv.ops.batched_nms(boxes, scores, idxs, cfg, class_agnostic=True)[1]
for reduction in ("none", "mean", "sum"):
    for w in (None, weight):
        x = logits.clone().requires_grad_()
        loss = mmcv.ops.sigmoid_focal_loss(x, target, 2.0, 0.25, w, reduction)
        loss.sum().backward()
        out[f"focal_{reduction}_{w is not None}"] = (loss.detach(), x.grad)
try:
    mmcv.ops.roi_align(torch.rand(1, 2, 8, 8), torch.tensor([[0.0, 1, 1, 5, 5]]), (2, 2))
except NotImplementedError as error:
    out["roi_align"] = str(error)
torch.save(out, sys.argv[1])
"""


def test_import_fastbb_mm_installs_the_provider_in_a_fresh_process(tmp_path):
    needs_mmcv_lite()
    pytest.importorskip("mmdet")
    result_file = tmp_path / "results.pt"
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(result_file)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = torch.load(result_file)
    assert len(out["notices"]) == 1, out["notices"]
    assert "\n" not in out["notices"][0]
    boxes, scores, idxs = out["boxes"], out["scores"], out["idxs"]
    for offset in (0, 1):
        assert torch.equal(out["nms"][offset], mmcv_nms_reference(boxes, scores, 0.5, offset))
    expected = mmcv_batched_nms_reference(boxes, scores, idxs, 0.5)
    assert torch.equal(out["batched_nms"], expected) and torch.equal(out["batched_nms_split"], expected)
    assert torch.equal(out["batched_nms_agnostic"], mmcv_nms_reference(boxes, scores, 0.5))
    for reduction in ("none", "mean", "sum"):
        for weighted in (False, True):
            x = out["logits"].double().requires_grad_()
            ref = mmcv_focal_reference(x, out["target"], out["weight"] if weighted else None, 2.0, 0.25)[0]
            ref = {"none": ref, "sum": ref.sum(), "mean": ref.sum() / x.shape[0]}[reduction]
            ref.sum().backward()
            loss, grad = out[f"focal_{reduction}_{weighted}"]
            assert_close(loss, ref.detach(), torch.float32)
            assert_close(grad, x.grad, torch.float32)
    assert "mmcv._ext.roi_align_forward" in out["roi_align"] and "full mmcv" in out["roi_align"]
