"""fastbb.ops sigmoid focal loss: every usable backend against the reference, the reference against
torchvision.ops.sigmoid_focal_loss (dense targets, and the one-hot targets of labels)."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import fastbb
from fastbb.ops.focal_loss import (sigmoid_focal_loss, sigmoid_focal_loss_labels,
                                   sigmoid_focal_loss_labels_reference, sigmoid_focal_loss_reference)
from fastbb.nn.focal_loss import FocalLoss, SigmoidFocalLoss
from conftest import TOLERANCES, usable_backends

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "mean", "sum")
# (alpha, gamma): the default, alpha off, non-integer gamma, the edges alpha 0 / 1 and gamma 0 / 1.
PARAMS = ((0.25, 2.0), (-1.0, 2.0), (0.4, 1.5), (0.0, 0.0), (1.0, 1.0), (0.25, 0.5))
SHAPES = ((0, 5), (1, 1), (7, 3), (33, 80), (2, 50, 7), (3, 0))


def backends(device="cpu"):
    return usable_backends(device, "sigmoid_focal_loss")


def random_logits(shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def random_labels(shape, num_classes, ignore_index=-100):
    """Labels over every kind: classes, background C and -1, ignored."""
    labels = torch.randint(-1, num_classes + 1, shape)
    return torch.where(torch.rand(shape) < 0.1, torch.full_like(labels, ignore_index), labels)


def one_hot(labels, num_classes):
    positive = (labels >= 0) & (labels < num_classes)
    return F.one_hot(labels.clamp(0, max(num_classes - 1, 0)), max(num_classes, 1))[..., :num_classes] \
        * positive[..., None]


def loss_and_grad(fn, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    grad_out = torch.rand_like(loss)  # a non-uniform incoming gradient for 'none'
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    return loss.detach(), grad, grad_out


def assert_close(actual, expected, dtype, scale=1.0, backend=None):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    tol = TOLERANCES[dtype]
    if backend == "triton" and dtype == torch.float64 and fastbb._backend.triton_interpreter_on():
        tol = TOLERANCES[torch.float32]  # the interpreter rounds float scalar arguments (alpha) to float32
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True)


# ---- the reference against torchvision -----------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,gamma", PARAMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_reference_matches_torchvision(shape, alpha, gamma, reduction, dtype):
    logits = random_logits(shape, dtype)
    soft = torch.rand(shape, dtype=dtype)
    hard = (torch.rand(shape) < 0.3).to(dtype)
    for targets in (soft, hard):
        x = logits.clone().requires_grad_()
        y = logits.clone().requires_grad_()
        ours = sigmoid_focal_loss_reference(x, targets, alpha, gamma, reduction)
        theirs = torchvision.ops.sigmoid_focal_loss(y, targets, alpha, gamma, reduction)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        if logits.numel() and reduction != "none":
            ours.backward()
            theirs.backward()
            torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("shape", ((9, 4), (2, 30, 80), (1, 1), (0, 3)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_labels_reference_matches_torchvision_one_hot(shape, reduction):
    num_classes = shape[-1]
    logits = random_logits(shape)
    labels = random_labels(shape[:-1], num_classes, ignore_index=-100)
    labels = torch.where(labels == -100, torch.full_like(labels, num_classes), labels)  # no ignored rows
    ours = sigmoid_focal_loss_labels_reference(logits, labels, reduction=reduction)
    theirs = torchvision.ops.sigmoid_focal_loss(logits, one_hot(labels, num_classes).float(), reduction=reduction)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_labels_reference_weight_ignore_and_avg_factor():
    """mmdet semantics: per-anchor / per-class / full weights multiply the loss, ignored rows drop out,
    'mean' with avg_factor is the sum divided by it."""
    logits = random_logits((40, 6))
    labels = random_labels((40,), 6, ignore_index=255)
    keep = (labels != 255).float()[:, None]
    targets = one_hot(torch.where(labels == 255, torch.zeros_like(labels), labels), 6).float()
    elementwise = torchvision.ops.sigmoid_focal_loss(logits, targets, 0.3, 1.5) * keep
    for weight, full in ((torch.rand(40), None), (torch.rand(40, 1), None), (torch.rand(6), None),
                         (torch.rand(40, 6), None)):
        full = weight[:, None] if weight.shape == (40,) else weight.expand(40, 6)
        ours = sigmoid_focal_loss_labels_reference(logits, labels, 1.5, 0.3, weight, "sum", ignore_index=255)
        torch.testing.assert_close(ours, (elementwise * full).sum())
        ours = sigmoid_focal_loss_labels_reference(logits, labels, 1.5, 0.3, weight, "mean", avg_factor=7.5,
                                                   ignore_index=255)
        torch.testing.assert_close(ours, (elementwise * full).sum() / 7.5)


# ---- every backend against the reference ---------------------------------------------------------------

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + ((600, 13),))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dense_backends_match_reference(backend, dtype, shape, reduction):
    logits = random_logits(shape, dtype)
    targets = torch.rand(shape, dtype=torch.float64).to(dtype)
    targets = torch.where(torch.rand(shape) < 0.5, targets.round(), targets)  # hard and soft mixed
    for alpha, gamma in PARAMS[:3]:
        with fastbb.use_backend(backend):
            loss, grad, grad_out = loss_and_grad(sigmoid_focal_loss, logits, targets, alpha, gamma, reduction)
        x = logits.detach().clone().requires_grad_()
        expected = sigmoid_focal_loss_reference(x, targets, alpha, gamma, reduction)
        (expected_grad,) = torch.autograd.grad(expected, x, grad_out) if logits.numel() else (torch.zeros_like(x),)
        scale = max(1.0, float(expected.detach().double().abs().max())) if expected.numel() else 1.0
        assert_close(loss, expected.detach(), dtype, scale, backend)
        if logits.numel():
            assert_close(grad, expected_grad, dtype, backend=backend)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ((300, 80), (2, 70, 9), (1, 1), (0, 4), (4, 0), (7, 1)))
@pytest.mark.parametrize("weight_kind", (None, "anchor", "anchor1", "class", "full"))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_labels_backends_match_reference(backend, dtype, shape, weight_kind, reduction):
    num_classes = shape[-1]
    logits = random_logits(shape, dtype)
    ignore_index = -100 if torch.rand(()) < 0.5 else num_classes  # background rows ignored instead
    labels = random_labels(shape[:-1], num_classes, ignore_index)
    weight = {None: None, "anchor": lambda: torch.rand(shape[:-1]), "anchor1": lambda: torch.rand(*shape[:-1], 1),
              "class": lambda: torch.rand(num_classes), "full": lambda: torch.rand(shape)}[weight_kind]
    weight = weight() if weight is not None else None
    avg_factor = 3.5 if reduction == "mean" and torch.rand(()) < 0.5 else None
    kwargs = dict(gamma=2.0, alpha=0.25, weight=weight, reduction=reduction, avg_factor=avg_factor,
                  ignore_index=ignore_index)
    with fastbb.use_backend(backend):
        loss, grad, grad_out = loss_and_grad(sigmoid_focal_loss_labels, logits, labels, **kwargs)
    x = logits.detach().clone().requires_grad_()
    expected = sigmoid_focal_loss_labels_reference(x, labels, **kwargs)
    scale = max(1.0, float(expected.detach().double().abs().max())) if expected.numel() else 1.0
    assert_close(loss, expected.detach(), dtype, scale, backend)
    if logits.numel():
        (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
        assert_close(grad, expected_grad, dtype, backend=backend)


@pytest.mark.parametrize("backend", backends())
def test_non_contiguous_inputs(backend):
    logits = random_logits((80, 60)).t()
    targets = (torch.rand(80, 60) < 0.2).float().t()
    labels = torch.randint(-1, 81, (120,))[::2]
    with fastbb.use_backend(backend):
        dense = sigmoid_focal_loss(logits, targets, reduction="none")
        from_labels = sigmoid_focal_loss_labels(logits, labels, reduction="none")
    torch.testing.assert_close(dense, sigmoid_focal_loss_reference(logits, targets))
    torch.testing.assert_close(from_labels, sigmoid_focal_loss_labels_reference(logits, labels, reduction="none"))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_extreme_logits_are_finite_and_exact(backend, dtype):
    """Logits of +-1e4 (and moderately large ones): no NaN or inf; agrees with float64 math."""
    logits = torch.tensor([1e4, -1e4, 80.0, -80.0, 20.0, -20.0, 0.0, 1e-3] * 2, dtype=dtype)
    targets = torch.tensor([1.0] * 8 + [0.0] * 8, dtype=dtype)
    for gamma in (0.0, 0.5, 1.0, 2.0):
        with fastbb.use_backend(backend):
            loss, grad, grad_out = loss_and_grad(sigmoid_focal_loss, logits, targets, 0.25, gamma, "none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        x = logits.double().requires_grad_()
        expected = sigmoid_focal_loss_reference(x, targets.double(), 0.25, gamma)
        (expected_grad,) = torch.autograd.grad(expected, x, grad_out.double())
        # Autograd of m^gamma at m = 0 with gamma < 1 is inf * 0 = NaN; the loss ~ exp(-(1 + gamma) |x|)
        # there, whose derivative is 0.
        expected_grad = expected_grad.nan_to_num(nan=0.0)
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=tol["rtol"], atol=tol["atol"])
        torch.testing.assert_close(grad.double(), expected_grad, rtol=tol["rtol"], atol=tol["atol"])


# Logits where the modulating term m (the probability of the wrong answer) is a nonzero subnormal: float32
# |x| in about (87, 104), float64 |x| in about (708, 745); and logits far past both.
SUBNORMAL_M_LOGITS = {torch.float32: (87.5, 90.0, 95.0, 99.0, 103.5),
                      torch.float64: (87.5, 95.0, 103.5, 710.0, 725.0, 744.0)}


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("alpha", (0.25, -1.0))
def test_gamma_zero_gradient_where_the_modulating_term_is_subnormal(backend, dtype, alpha):
    """gamma = 0: the gradient equals torchvision's autograd gradient (PyTorch's pow backward is 0 for
    exponent 0), with no NaN where m^(gamma - 1) = 1 / m overflows."""
    magnitudes = SUBNORMAL_M_LOGITS[dtype] + (1e3,)
    logits = torch.tensor([sign * v for v in magnitudes for sign in (1.0, -1.0)] * 2, dtype=dtype)
    targets = torch.tensor([1.0] * (2 * len(magnitudes)) + [0.0] * (2 * len(magnitudes)), dtype=dtype)
    with fastbb.use_backend(backend):
        loss, grad, grad_out = loss_and_grad(sigmoid_focal_loss, logits, targets, alpha, 0.0, "none")
    x = logits.clone().requires_grad_()
    expected = torchvision.ops.sigmoid_focal_loss(x, targets, alpha, 0.0, "none")
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
    assert torch.isfinite(expected_grad).all()
    assert torch.isfinite(grad).all(), logits[~torch.isfinite(grad)]
    assert_close(loss, expected.detach(), dtype, backend=backend)
    assert_close(grad, expected_grad, dtype, backend=backend)


@pytest.mark.parametrize("backend", backends())
def test_reduction_is_deterministic(backend):
    logits = random_logits((20000, 13))
    labels = torch.randint(0, 14, (20000,))
    with fastbb.use_backend(backend):
        first = sigmoid_focal_loss_labels(logits, labels, reduction="sum")
        second = sigmoid_focal_loss_labels(logits, labels, reduction="sum")
    assert torch.equal(first, second)


def test_targets_gradient():
    """Soft targets that need a gradient get it (through the PyTorch formula)."""
    logits = random_logits((6, 5), torch.float64)
    targets = torch.rand(6, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: sigmoid_focal_loss(logits, t, reduction="sum"), (targets,))


# ---- autograd, custom-op registration, compile -----------------------------------------------------------

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck],
                         ids=["gradcheck", "gradgradcheck"])
def test_gradcheck(backend, reduction, check):
    """First and second derivatives (a double backward differentiates the gradient, as torchvision's)."""
    logits = random_logits((5, 4), torch.float64).requires_grad_()
    targets = torch.rand(5, 4, dtype=torch.float64)
    labels = torch.randint(-1, 5, (5,))
    weight = torch.rand(5, dtype=torch.float64)
    with fastbb.use_backend(backend):
        for gamma in (2.0, 1.5, 0.0):
            check(lambda x: sigmoid_focal_loss(x, targets, 0.25, gamma, reduction), (logits,))
            check(lambda x: sigmoid_focal_loss_labels(x, labels, gamma, 0.25, weight, reduction), (logits,))


@pytest.mark.parametrize("backend", backends())
def test_retained_graph_gradients_stay_correct(backend):
    """backward of a summed loss hands out the saved gradient itself (no scaling pass); a second backward
    through the retained graph must still give the right gradient after the first one was changed."""
    logits = random_logits((30, 7), torch.float64).requires_grad_()
    targets = torch.rand(30, 7, dtype=torch.float64)
    want = torch.autograd.grad(torchvision.ops.sigmoid_focal_loss(logits, targets, reduction="sum"), logits)[0]
    with fastbb.use_backend(backend):
        loss = sigmoid_focal_loss(logits, targets, reduction="sum")
        first = torch.autograd.grad(loss, logits, retain_graph=True)[0]
        torch.testing.assert_close(first, want)
        first.zero_()  # the caller owns what it was given
        second = torch.autograd.grad(loss, logits, retain_graph=True)[0]
        third = torch.autograd.grad(loss, logits, torch.tensor(3.0, dtype=torch.float64))[0]
    torch.testing.assert_close(second, want)
    torch.testing.assert_close(third, 3 * want)


def test_gradient_penalty_matches_torchvision():
    """The gradient of a loss built from the gradient (a gradient penalty) equals torchvision's."""
    logits = random_logits((7, 3), torch.float64)
    targets = (torch.rand(7, 3) < 0.3).double()
    results = []
    for fn in (sigmoid_focal_loss, torchvision.ops.sigmoid_focal_loss):
        x = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad(fn(x, targets, reduction="sum"), x, create_graph=True)
        results.append(torch.autograd.grad(grad.pow(2).sum(), x)[0])
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("backend", backends())
def test_opcheck(backend):
    logits = random_logits((6, 5)).requires_grad_()
    targets = torch.rand(6, 5)
    labels = torch.randint(-1, 6, (6,))
    weight = torch.rand(6, 5)
    cases = [
        (logits, targets, None, None, 0.25, 2.0, -100, True, 1.0 / 30, True),
        (logits, targets, None, None, -1.0, 1.5, -100, False, 1.0, True),
        (logits, None, labels, weight, 0.25, 2.0, 5, True, 0.5, True),
        (logits.detach(), None, labels, None, 0.25, 2.0, -100, False, 1.0, False),
    ]
    with fastbb.use_backend(backend):
        for args in cases:
            torch.library.opcheck(torch.ops.fastbb.sigmoid_focal_loss.default, args)


def test_compile_fullgraph():
    def train_step(logits, targets, labels, weight):
        dense = sigmoid_focal_loss(logits, targets, reduction="sum")
        from_labels = sigmoid_focal_loss_labels(logits, labels, weight=weight, avg_factor=4.0)
        return dense + from_labels

    logits = random_logits((50, 7))
    targets = (torch.rand(50, 7) < 0.2).float()
    labels = torch.randint(-1, 8, (50,))
    weight = torch.rand(50)
    x = logits.clone().requires_grad_()
    compiled = torch.compile(train_step, fullgraph=True)
    out = compiled(x, targets, labels, weight)
    out.backward()
    y = logits.clone().requires_grad_()
    expected = train_step(y, targets, labels, weight)
    expected.backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, y.grad)


def test_no_grad_forward_saves_nothing():
    logits = random_logits((10, 3)).requires_grad_()
    with torch.no_grad():
        loss = sigmoid_focal_loss(logits, torch.rand(10, 3), reduction="sum")
    assert not loss.requires_grad


# ---- bad input -------------------------------------------------------------------------------------------

def test_bad_inputs():
    logits = random_logits((4, 3))
    targets = torch.rand(4, 3)
    labels = torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="targets must have the shape"):
        sigmoid_focal_loss(logits, targets[:3])
    with pytest.raises(TypeError, match="inputs must have dtype"):
        sigmoid_focal_loss(logits.long(), targets)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sigmoid_focal_loss(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sigmoid_focal_loss(logits, targets, gamma=-1)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        sigmoid_focal_loss_labels(logits, labels.float())
    with pytest.raises(ValueError, match="labels must have shape"):
        sigmoid_focal_loss_labels(logits, labels[:2])
    with pytest.raises(ValueError, match="weight must be per anchor"):
        sigmoid_focal_loss_labels(logits, labels, weight=torch.rand(5))
    with pytest.raises(ValueError, match="reduction must be one of"):
        sigmoid_focal_loss_labels(logits, labels, reduction="batchmean")
    with pytest.raises(ValueError, match="avg_factor must be > 0"):
        sigmoid_focal_loss_labels(logits, labels, avg_factor=0)
    with pytest.raises(ValueError, match="avg_factor must be > 0"):
        sigmoid_focal_loss_labels(logits, labels, avg_factor=torch.tensor(-2.0))
    with pytest.raises(ValueError, match="avg_factor can not be used with reduction 'sum'"):
        sigmoid_focal_loss_labels(logits, labels, reduction="sum", avg_factor=2.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sigmoid_focal_loss_labels(logits, labels, gamma=-0.5)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        sigmoid_focal_loss_labels(logits, labels, ignore_index=1.5)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("bad_label", (-2, 4, 100))
def test_labels_out_of_range_raise(backend, bad_label):
    logits = random_logits((4, 3))
    labels = torch.tensor([0, 1, bad_label, 3])
    with fastbb.use_backend(backend), pytest.raises((ValueError, RuntimeError), match="labels must be in"):
        sigmoid_focal_loss_labels(logits, labels)
    with fastbb.use_backend(backend):  # the same value as ignore_index is fine
        sigmoid_focal_loss_labels(logits, labels, ignore_index=bad_label)


# ---- modules ---------------------------------------------------------------------------------------------

def test_sigmoid_focal_loss_module_matches_torchvision():
    logits = random_logits((30, 9))
    targets = torch.rand(30, 9)
    module = SigmoidFocalLoss(alpha=0.3, gamma=1.5, reduction="mean")
    torch.testing.assert_close(module(logits, targets),
                               torchvision.ops.sigmoid_focal_loss(logits, targets, 0.3, 1.5, "mean"))


@pytest.mark.parametrize("target_form", ("labels", "one_hot"))
@pytest.mark.parametrize("weight_form", (None, "anchor", "full"))
@pytest.mark.parametrize("reduction_override", (None, "sum", "none"))
def test_focal_loss_module_mmdet_semantics(target_form, weight_form, reduction_override):
    """mmdet FocalLoss: loss_weight * (torchvision's elementwise loss on one-hot targets) * weight, reduced;
    'mean' with avg_factor is the sum / avg_factor."""
    num_anchors, num_classes = 50, 6
    logits = random_logits((num_anchors, num_classes))
    labels = torch.randint(0, num_classes + 1, (num_anchors,))  # num_classes: background
    targets = one_hot(labels, num_classes).float()
    weight = {None: None, "anchor": torch.rand(num_anchors), "full": torch.rand(num_anchors, num_classes)}[weight_form]
    module = fastbb.build(dict(type="FocalLoss", gamma=2.0, alpha=0.25, loss_weight=2.5))
    avg_factor = 11.0 if reduction_override is None else None
    x = logits.clone().requires_grad_()
    loss = module(x, labels if target_form == "labels" else targets, weight, avg_factor=avg_factor,
                  reduction_override=reduction_override)
    y = logits.clone().requires_grad_()
    expected = torchvision.ops.sigmoid_focal_loss(y, targets)
    if weight is not None:
        expected = expected * (weight[:, None] if weight.dim() == 1 else weight)
    expected = {None: expected.sum() / 11.0, "sum": expected.sum(), "none": expected}[reduction_override] * 2.5
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_focal_loss_module_bad_arguments():
    with pytest.raises(ValueError, match="use_sigmoid"):
        FocalLoss(use_sigmoid=False)
    with pytest.raises(ValueError, match="reduction_override"):
        FocalLoss()(random_logits((3, 2)), torch.tensor([0, 1, 2]), reduction_override="avg")


# ---- CUDA --------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_backends_match_reference(dtype, reduction):
    logits = random_logits((2, 3000, 80), dtype).cuda()
    targets = (torch.rand(2, 3000, 80, device="cuda") < 0.05).to(dtype)
    labels = random_labels((2, 3000), 80).cuda()
    weight = torch.rand(2, 3000, device="cuda")
    for backend in backends("cuda"):
        with fastbb.use_backend(backend):
            loss, grad, grad_out = loss_and_grad(sigmoid_focal_loss, logits, targets, 0.25, 2.0, reduction)
            loss_l, grad_l, grad_out_l = loss_and_grad(sigmoid_focal_loss_labels, logits, labels, 1.5, 0.25,
                                                       weight, reduction)
            again = sigmoid_focal_loss_labels(logits, labels, 1.5, 0.25, weight, reduction)
        assert torch.equal(loss_l, again)
        x = logits.detach().clone().requires_grad_()
        expected = sigmoid_focal_loss_reference(x, targets, 0.25, 2.0, reduction)
        (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
        scale = max(1.0, float(expected.detach().double().abs().max()))
        assert_close(loss, expected.detach(), dtype, scale, backend)
        assert_close(grad, expected_grad, dtype, backend=backend)
        y = logits.detach().clone().requires_grad_()
        expected = sigmoid_focal_loss_labels_reference(y, labels, 1.5, 0.25, weight, reduction)
        (expected_grad,) = torch.autograd.grad(expected, y, grad_out_l)
        scale = max(1.0, float(expected.detach().double().abs().max()))
        assert_close(loss_l, expected.detach(), dtype, scale, backend)
        assert_close(grad_l, expected_grad, dtype, backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_cuda_gamma_zero_gradient_where_the_modulating_term_is_subnormal(dtype):
    """The CPU test's logits on the GPU backends, padded to 32 so that the Triton kernel's integer arguments
    are divisible by 16 as in test_cuda_backends_match_reference (no further compile)."""
    magnitudes = SUBNORMAL_M_LOGITS[dtype] + (1e3,)
    values = [sign * v for v in magnitudes for sign in (1.0, -1.0)]
    values = (values + [0.5] * 16)[:16]
    logits = torch.tensor(values * 2, dtype=dtype, device="cuda")
    targets = torch.tensor([1.0] * 16 + [0.0] * 16, dtype=dtype, device="cuda")
    x = logits.clone().requires_grad_()
    expected = torchvision.ops.sigmoid_focal_loss(x, targets, 0.25, 0.0, "none")
    for backend in backends("cuda"):
        with fastbb.use_backend(backend):
            loss, grad, grad_out = loss_and_grad(sigmoid_focal_loss, logits, targets, 0.25, 0.0, "none")
        (expected_grad,) = torch.autograd.grad(expected, x, grad_out, retain_graph=True)
        assert torch.isfinite(grad).all(), backend
        assert_close(loss, expected.detach(), dtype, backend=backend)
        assert_close(grad, expected_grad, dtype, backend=backend)


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 1024, 1024)], ids=["small", "16 MiB"])
def test_empty_like_huge_pages_is_empty_like(shape):
    """The backward's gradient buffer: t's shape, dtype and device, contiguous (channels_last t included),
    writable over its whole length; a fake tensor gives the same under torch.compile's tracing."""
    t = torch.randn(*shape).to(memory_format=torch.channels_last) if len(shape) == 4 else torch.randn(*shape)
    out = torch.ops.fastbb_C.empty_like_huge_pages(t)
    assert out.shape == t.shape and out.dtype == t.dtype and out.is_contiguous()
    out.copy_(t)
    assert torch.equal(out, t)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.fastbb_C.empty_like_huge_pages(mode.from_tensor(t))
    assert fake.shape == t.shape and fake.is_contiguous()
