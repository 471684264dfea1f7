"""The CPU convs of conv_bn_relu beyond oneDNN: the Winograd F(2x2, 3x3) and F(4x4, 3x3) kernels against
F.conv2d in float64 (eval, and training with both gradients), the 1x1 eval conv as a GEMM, and when conv_bn_relu uses each."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastbb
from fastbb.nn.conv_bn_relu import ConvBNReLU2d
from fastbb.ops.conv_bn_relu import TABLE, TRAIN_CONV_TABLE, conv_bn_relu, cpu_conv
from fastbb.ops.conv_bn_relu.cpu_conv import (winograd_weight, winograd_weight_backward,
                                              winograd_weight_of_input_gradient, winograd_weight_reference)

from conftest import TOLERANCES, assert_error_within, record_choices


# The error bound of these convs against a float64 run: twice eager PyTorch's own float32 error, plus
# float32's relative tolerance of the result (errors are norms of the differences: a max over a few elements
# is too noisy).
_SLACK = TOLERANCES[torch.float32]["rtol"]


def _winograd(x, weight, shift, residual=None, relu=True, padding=(1, 1), dilation=(1, 1)):
    return torch.ops.fastbb_C.winograd_conv2d(x, winograd_weight(weight), shift, residual, relu, *padding, *dilation)


@pytest.mark.parametrize("n, c, k, h, w, padding, dilation", [
    (2, 3, 5, 7, 9, (1, 1), (1, 1)),        # odd sizes: the last tile row and column are half outside
    (1, 4, 6, 10, 13, (2, 2), (2, 2)),
    (2, 5, 3, 17, 11, (4, 4), (4, 4)),
    (1, 3, 2, 9, 9, (0, 0), (1, 1)),        # no padding: the output shrinks by 2
    (1, 2, 3, 12, 8, (3, 1), (2, 1)),       # padding and dilation differ between the dimensions
    (1, 2, 2, 5, 5, (0, 0), (2, 2)),        # a 1x1 output
    (3, 8, 8, 40, 40, (1, 1), (1, 1)),      # several chunks of tile rows, across images
    (1, 16, 24, 33, 70, (3, 3), (3, 3)),
])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_kernel_matches_conv2d(n, c, k, h, w, padding, dilation, residual, relu):
    x = torch.randn(n, c, h, w)
    weight, shift = torch.randn(k, c, 3, 3), torch.randn(k)
    exact = F.conv2d(x.double(), weight.double(), shift.double(), 1, padding, dilation)
    eager = F.conv2d(x, weight, shift, 1, padding, dilation)
    res = torch.randn(exact.shape) if residual else None
    if residual:
        exact, eager = exact + res.double(), eager + res
    if relu:
        exact, eager = exact.relu(), eager.relu()
    inputs = [t.clone() for t in (x, weight, shift)] + ([res.clone()] if residual else [])
    got = _winograd(x, weight, shift, res, relu, padding, dilation)
    assert got.shape == exact.shape and got.dtype == torch.float32 and got.is_contiguous()
    assert_error_within(got, eager, exact, 2.0, slack=_SLACK)
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4)
    for before, after in zip(inputs, (x, weight, shift, res)):
        assert torch.equal(before, after)  # inputs are left as they were


@pytest.mark.parametrize("shape", [(7, 5, 3, 3), (64, 33, 3, 3), (3, 300, 3, 3)])
def test_weight_transform_matches_reference(shape):
    weight = torch.randn(shape)
    torch.testing.assert_close(winograd_weight(weight), winograd_weight_reference(weight), rtol=0, atol=0)


@pytest.mark.parametrize("n, c, k, h, w, padding, dilation", [
    (2, 5, 7, 11, 13, (1, 1), (1, 1)), (1, 6, 4, 12, 9, (2, 2), (2, 2)), (2, 3, 5, 10, 10, (0, 0), (1, 1)),
    (1, 4, 6, 14, 11, (3, 1), (2, 1)), (1, 3, 3, 20, 20, (4, 4), (4, 4))])
def test_kernel_input_gradient_matches_conv2d(n, c, k, h, w, padding, dilation):
    """The conv of the output gradient that gives the input gradient of the conv from c to k channels, with
    its transform taken from that conv's."""
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, c, 3, 3)
    y = F.conv2d(x, weight.double(), None, 1, padding, dilation)
    grad_y = torch.randn(y.shape)
    exact, = torch.autograd.grad(y, x, grad_y.double())
    back_padding = [2 * d - p for p, d in zip(padding, dilation)]
    u = winograd_weight_of_input_gradient(weight)
    torch.testing.assert_close(u, winograd_weight_reference(weight.flip(2, 3).transpose(0, 1)), rtol=0, atol=0)
    got = torch.ops.fastbb_C.winograd_conv2d(grad_y, u, None, None, False, *back_padding, *dilation)
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n, c, k, h, w, padding, dilation", [
    (2, 5, 7, 11, 13, (1, 1), (1, 1)), (1, 6, 4, 12, 9, (2, 2), (2, 2)), (2, 3, 5, 10, 10, (0, 0), (1, 1)),
    (1, 4, 6, 14, 11, (3, 1), (2, 1)), (3, 8, 8, 40, 40, (1, 1), (1, 1)),
    (2, 64, 64, 96, 96, (1, 1), (1, 1))])  # the last: 20 chunks of tile rows
def test_kernel_weight_gradient_matches_conv2d(n, c, k, h, w, padding, dilation):
    """The weight gradient through the transform: winograd_weight_gradient, then winograd_weight_backward."""
    x = torch.randn(n, c, h, w)
    weight = torch.randn(k, c, 3, 3, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x.double(), weight, None, 1, padding, dilation)
    grad_y = torch.randn(y.shape)
    exact, = torch.autograd.grad(y, weight, grad_y.double())
    grad_u = torch.ops.fastbb_C.winograd_weight_gradient(x, grad_y, *padding, *dilation)
    got = winograd_weight_backward(grad_u)
    assert got.shape == weight.shape
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    # the same bits again: the sums' order depends on the thread count only
    assert torch.equal(torch.ops.fastbb_C.winograd_weight_gradient(x, grad_y, *padding, *dilation), grad_u)


def test_weight_backward_is_the_adjoint_of_the_transform():
    weight = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    grad_u = torch.randn(16, 3, 4, dtype=torch.float64)
    exact, = torch.autograd.grad(winograd_weight_reference(weight), weight, grad_u)
    torch.testing.assert_close(winograd_weight_backward(grad_u), exact)


def test_kernel_nan_propagates():
    x = torch.randn(1, 4, 8, 8)
    x[0, 1, 3, 3] = float("nan")
    weight, shift = torch.randn(5, 4, 3, 3), torch.randn(5)
    got, want = _winograd(x, weight, shift), F.conv2d(x, weight, shift, 1, 1).relu()
    # The NaN reaches every output that reads the pixel, and only those (as in the direct conv); the
    # Winograd patch of a tile reads 4x4 pixels, so tiles next to it may see NaN too: at least eager's.
    assert torch.isnan(want).any() and torch.isnan(got)[torch.isnan(want)].all()


def test_kernel_rejects_what_it_cannot_do():
    x, weight, shift = torch.randn(1, 4, 8, 8), torch.randn(5, 4, 3, 3), torch.randn(5)
    u = winograd_weight(weight)
    with pytest.raises(RuntimeError, match="x must be a contiguous NCHW float32"):
        torch.ops.fastbb_C.winograd_conv2d(x.double(), u, shift, None, True, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="u must be a contiguous"):
        torch.ops.fastbb_C.winograd_conv2d(x, u[:, :, :3], shift, None, True, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="shift must be"):
        torch.ops.fastbb_C.winograd_conv2d(x, u, shift[:4], None, True, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.fastbb_C.winograd_conv2d(x, u, shift, torch.randn(1, 5, 7, 8), True, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="output would be empty"):
        torch.ops.fastbb_C.winograd_conv2d(torch.randn(1, 4, 2, 2), u, shift, None, True, 0, 0, 1, 1)


# F(4x4, 3x3)'s float32 error against float64, as a multiple of eager PyTorch's (a direct conv's): about 30x
# (its transforms multiply by up to 8 and 1/24 and sum 6 terms twice); bound set over a seed sweep
# (tests/seed_sweep.py) above the largest ratio seen.
_F4_ERROR_FACTOR = 60.0

_F4_SHAPES = [
    (2, 3, 5, 7, 9, (1, 1)),      # odd sizes: the last tile row and column partly outside the output
    (1, 3, 2, 9, 9, (0, 0)),      # no padding: the output shrinks by 2
    (1, 2, 3, 12, 8, (2, 1)),     # padding differs between the dimensions
    (1, 2, 2, 3, 3, (0, 0)),      # a 1x1 output
    (3, 8, 8, 40, 40, (1, 1)),    # several images in a chunk
    (2, 64, 64, 96, 96, (1, 1)),  # several chunks of tile rows
]


@pytest.mark.parametrize("n, c, k, h, w, padding", _F4_SHAPES)
def test_f4_kernel_matches_conv2d(n, c, k, h, w, padding):
    """F(4x4, 3x3) (36-plane u): conv + shift + residual + ReLU within _F4_ERROR_FACTOR times eager's error."""
    x, weight, shift = torch.randn(n, c, h, w), torch.randn(k, c, 3, 3), torch.randn(k)
    exact = F.conv2d(x.double(), weight.double(), shift.double(), 1, padding)
    res = torch.randn(exact.shape)
    exact = (exact + res.double()).relu()
    eager = (F.conv2d(x, weight, shift, 1, padding) + res).relu()
    u = winograd_weight(weight, 4)
    assert u.shape == (36, k, c)
    got = torch.ops.fastbb_C.winograd_conv2d(x, u, shift, res, True, *padding, 1, 1)
    assert got.shape == exact.shape and got.is_contiguous()
    assert_error_within(got, eager, exact, _F4_ERROR_FACTOR, slack=_SLACK, name="out")


@pytest.mark.parametrize("n, c, k, h, w, padding", _F4_SHAPES)
def test_f4_backward_matches_conv2d(n, c, k, h, w, padding):
    """winograd_backward: the input gradient (grad_V = u^T grad_M mapped back onto the patches) and the weight's
    (through winograd_weight_backward) within _F4_ERROR_FACTOR times eager's error; the input gradient also
    through the conv of the output gradient (winograd_weight_of_input_gradient), and the weight gradient of
    winograd_weight_gradient equal to winograd_backward's; the same bits again."""
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(k, c, 3, 3, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, weight, None, 1, padding)
    grad_y = torch.randn(y.shape)
    exact = torch.autograd.grad(y, [x, weight], grad_y.double())
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    eager = torch.autograd.grad(F.conv2d(x32, w32, None, 1, padding), [x32, w32], grad_y)
    grad_x, grad_u = torch.ops.fastbb_C.winograd_backward(x32.detach(), grad_y, winograd_weight(w32.detach(), 4),
                                                          *padding)
    grad_w = winograd_weight_backward(grad_u)
    assert grad_x.shape == x.shape and grad_w.shape == weight.shape
    assert_error_within(grad_x, eager[0], exact[0], _F4_ERROR_FACTOR, slack=_SLACK, name="grad x")
    assert_error_within(grad_w, eager[1], exact[1], _F4_ERROR_FACTOR, slack=_SLACK, name="grad weight")
    back_padding = [2 - p for p in padding]
    if min(back_padding) >= 0:
        through_conv = torch.ops.fastbb_C.winograd_conv2d(grad_y, winograd_weight_of_input_gradient(w32.detach(), 4),
                                                          None, None, False, *back_padding, 1, 1)
        assert_error_within(through_conv, eager[0], exact[0], _F4_ERROR_FACTOR, slack=_SLACK, name="grad x by the conv")
    assert torch.equal(torch.ops.fastbb_C.winograd_weight_gradient(x32.detach(), grad_y, *padding, 1, 1, 4), grad_u)
    again = torch.ops.fastbb_C.winograd_backward(x32.detach(), grad_y, winograd_weight(w32.detach(), 4), *padding)
    assert torch.equal(again[0], grad_x) and torch.equal(again[1], grad_u)


def test_f4_weight_transforms_match_reference():
    """u within one float32 rounding of the float64 einsum (both round a float64 sum once; the sums' order
    differs); the backward transform is its adjoint."""
    weight = torch.randn(7, 5, 3, 3)
    want = winograd_weight_reference(weight, 4)
    torch.testing.assert_close(winograd_weight(weight, 4), want, rtol=2.5e-7, atol=1e-7 * float(want.abs().max()))
    flipped = winograd_weight_reference(weight.flip(2, 3).transpose(0, 1), 4)
    torch.testing.assert_close(winograd_weight_of_input_gradient(weight, 4), flipped, rtol=2.5e-7,
                               atol=1e-7 * float(flipped.abs().max()))
    weight64 = weight.double().requires_grad_()
    grad_u = torch.randn(36, 7, 5, dtype=torch.float64)
    exact, = torch.autograd.grad(winograd_weight_reference(weight64, 4), weight64, grad_u)
    torch.testing.assert_close(winograd_weight_backward(grad_u), exact)


def test_f4_kernels_reject_what_they_cannot_do():
    x, weight, grad_y = torch.randn(1, 4, 8, 8), torch.randn(5, 4, 3, 3), torch.randn(1, 5, 8, 8)
    u = winograd_weight(weight, 4)
    with pytest.raises(RuntimeError, match="tile must be 2 or 4"):
        winograd_weight(weight, 3)
    with pytest.raises(RuntimeError, match="dilation 1 only"):
        torch.ops.fastbb_C.winograd_conv2d(x, u, None, None, False, 2, 2, 2, 2)
    with pytest.raises(RuntimeError, match="dilation 1 only"):
        torch.ops.fastbb_C.winograd_weight_gradient(x, torch.randn(1, 5, 8, 8), 2, 2, 2, 2, 4)
    with pytest.raises(RuntimeError, match=r"u must be a contiguous \(36, K, C\)"):
        torch.ops.fastbb_C.winograd_backward(x, grad_y, winograd_weight(weight), 1, 1)
    with pytest.raises(RuntimeError, match="grad_y must be"):
        torch.ops.fastbb_C.winograd_backward(x, grad_y[..., :7], u, 1, 1)


@pytest.mark.parametrize("shape, padding, dilation, tile", [
    ((4, 256, 16, 16), 1, 1, 4),     # 64 4x4 tiles: F(4x4)
    ((2, 256, 16, 16), 1, 1, None),  # 32: oneDNN's conv
    ((1, 512, 32, 32), 1, 1, 4),
    ((1, 512, 28, 28), 1, 1, None),  # 49 tiles
    ((1, 128, 64, 64), 1, 1, None),  # under 256 channels
    ((1, 256, 48, 48), 2, 2, 2),     # dilated: F(2x2) from 2^25 multiplies per pass
    ((1, 256, 40, 40), 2, 2, None),
])
def test_training_winograd_tile_rule(shape, padding, dilation, tile):
    x, weight = torch.randn(shape), torch.randn(shape[1], shape[1], 3, 3)
    assert cpu_conv._train_tile(x, weight, (padding, padding), (dilation, dilation)) == tile
    assert cpu_conv.winograd_train_applies(x, weight, None, (1, 1), (padding, padding), (dilation, dilation),
                                           1) == (tile is not None)


def _bn(channels):
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class _Runs:
    """The calls of one backend of one of conv_bn_relu's tables, counted as the test goes."""

    def __init__(self, chosen, table, backend):
        self.chosen, self.table, self.backend = chosen, table, backend

    def __len__(self):
        return self.chosen[self.table.op].count(self.backend)


def _runs(monkeypatch, table, backend):
    return _Runs(record_choices(monkeypatch, table), table, backend)


def _expected(conv, bn, x, residual, relu):
    """(eager float32, float64) results of conv -> bn (-> + residual) (-> ReLU), and the residual used."""
    eager = bn(conv(x))
    exact = bn.double()(conv.double()(x.double()))
    conv.float(), bn.float()
    res = torch.randn(eager.shape) if residual else None
    if residual:
        eager, exact = eager + res, exact + res.double()
    if relu:
        eager, exact = eager.relu(), exact.relu()
    return eager, exact, res


@pytest.fixture
def winograd_calls(monkeypatch):
    """Counts the eval convs that run as Winograd convs."""
    return _runs(monkeypatch, TABLE, "cpp")


@pytest.mark.parametrize("dilation, padding", [(1, 1), (2, 2), (4, 4), (2, 0), (1, 3)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_bn_relu_eval_runs_winograd(winograd_calls, dilation, padding, residual, relu):
    """A 3x3 stride-1 eval conv with 128+ channels, NCHW float32, without autograd: the Winograd conv, with
    eager's result within twice eager's own error."""
    conv = nn.Conv2d(128, 136, 3, padding=padding, dilation=dilation, bias=True)
    bn = _bn(136)
    x = torch.randn(2, 128, 13, 18)
    with torch.no_grad():
        eager, exact, res = _expected(conv, bn, x, residual, relu)
        for _ in range(2):  # the second call reuses the transformed weight
            got = conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                               padding=padding, dilation=dilation, eps=bn.eps, relu=relu, residual=res)
            assert got.shape == eager.shape and got.stride() == eager.stride()
            assert_error_within(got, eager, exact, 2.0, slack=_SLACK)
    assert len(winograd_calls) == 2


def test_transformed_weight_is_cached_until_a_source_changes(monkeypatch):
    transforms = []
    transform = cpu_conv.winograd_weight
    monkeypatch.setattr(cpu_conv, "winograd_weight", lambda weight: transforms.append(1) or transform(weight))
    conv, bn = nn.Conv2d(128, 128, 3, padding=1, bias=False), _bn(128)
    fused = ConvBNReLU2d.from_modules(conv, bn, nn.ReLU()).eval()
    x = torch.randn(1, 128, 10, 10)

    def check(expected):
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(fused(x), bn(conv(x)).relu(), rtol=1e-4, atol=1e-4)
        assert len(transforms) == expected

    check(1)
    with torch.no_grad():
        conv.weight.mul_(-1)  # refolded, so transformed again: a stale transform would fail the comparison
    check(2)
    with torch.no_grad():
        bn.running_mean.add_(1)
    check(3)


def test_64_channels_run_winograd_on_large_images_only(winograd_calls):
    conv, bn = nn.Conv2d(64, 64, 3, padding=1, bias=False), _bn(64)
    fused = ConvBNReLU2d.from_modules(conv, bn, nn.ReLU()).eval()
    with torch.no_grad():
        for side, expected_calls in ((60, 0), (64, 1)):  # 900 tiles, then 1024
            x = torch.randn(1, 64, side, side)
            torch.testing.assert_close(fused(x), bn(conv(x)).relu(), rtol=1e-4, atol=1e-4)
            assert len(winograd_calls) == expected_calls


@pytest.mark.parametrize("case", ["32 channels", "stride 2", "5x5", "groups 2", "channels_last", "float64",
                                  "needs grad", "reference backend"])
def test_other_convs_do_not_run_winograd(winograd_calls, case):
    channels, kernel, stride, groups = (32 if case == "32 channels" else 128), (5 if case == "5x5" else 3), \
        (2 if case == "stride 2" else 1), (2 if case == "groups 2" else 1)
    conv = nn.Conv2d(channels, channels, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    bn = _bn(channels)
    x = torch.randn(1, channels, 12, 12)
    dtype = torch.float64 if case == "float64" else torch.float32
    conv, bn, x = conv.to(dtype), bn.to(dtype), x.to(dtype)
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fused = ConvBNReLU2d.from_modules(conv, bn, nn.ReLU()).eval()
    want = bn(conv(x)).relu()
    grad_mode = torch.enable_grad() if case == "needs grad" else torch.no_grad()
    backend = fastbb.use_backend("reference") if case == "reference backend" else contextlib.nullcontext()
    with grad_mode, backend:
        got = fused(x)
    torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    assert not winograd_calls


def test_residual_of_another_dtype_is_added_as_an_in_place_add():
    """A float64 residual on a float32 conv: the output keeps the conv's dtype, as torchvision's blocks'
    `out += identity` keeps it (whichever conv path runs)."""
    conv, bn = nn.Conv2d(128, 128, 3, padding=1, bias=False), _bn(128)
    bn.eval()
    x = torch.randn(1, 128, 12, 12)
    residual = torch.randn(1, 128, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        want = bn(conv(x))
        want += residual
        got = conv_bn_relu(x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, padding=1,
                           eps=bn.eps, residual=residual)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.relu(), **TOLERANCES[torch.float32])


def test_empty_batch():
    conv, bn = nn.Conv2d(64, 64, 3, padding=1, bias=False), _bn(64)
    with torch.no_grad():
        got = conv_bn_relu(torch.randn(0, 64, 8, 8), conv.weight, None, bn.weight, bn.bias, bn.running_mean,
                           bn.running_var, padding=1)
    assert got.shape == (0, 64, 8, 8)


@pytest.fixture
def gemm_calls(monkeypatch):
    """Counts the eval convs that run as GEMMs."""
    return _runs(monkeypatch, TABLE, "mkl")


@pytest.mark.parametrize("shape", [(1, 24, 5, 7), (2, 24, 32, 40)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_conv_runs_as_gemm(gemm_calls, shape, residual, relu, bias):
    conv, bn = nn.Conv2d(24, 40, 1, bias=bias), _bn(40)
    x = torch.randn(shape)
    with torch.no_grad():
        eager, exact, res = _expected(conv, bn, x, residual, relu)
        inputs = [x.clone()] + ([res.clone()] if residual else [])
        got = conv_bn_relu(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                           eps=bn.eps, relu=relu, residual=res)
    assert got.shape == eager.shape and got.is_contiguous()
    assert_error_within(got, eager, exact, 2.0, slack=_SLACK)
    for before, after in zip(inputs, (x, res)):
        assert torch.equal(before, after)
    assert len(gemm_calls) == 1


@pytest.mark.parametrize("case", ["stride 2", "padding 1", "channels_last", "groups 2", "batch 2 small images",
                                  "needs grad"])
def test_other_pointwise_convs_do_not_run_as_gemm(gemm_calls, case):
    conv = nn.Conv2d(24, 40, 1, stride=2 if case == "stride 2" else 1, padding=1 if case == "padding 1" else 0,
                     groups=2 if case == "groups 2" else 1, bias=False)
    bn = _bn(40)
    x = torch.randn(2 if case == "batch 2 small images" else 1, 24, 9, 11)
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fused = ConvBNReLU2d.from_modules(conv, bn, nn.ReLU()).eval()
    with torch.enable_grad() if case == "needs grad" else torch.no_grad():
        got, want = fused(x), bn(conv(x)).relu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.stride() == want.stride()
    assert not gemm_calls


def _train_modules(channels_in, channels_out, padding, dilation, bias):
    conv = nn.Conv2d(channels_in, channels_out, 3, padding=padding, dilation=dilation, bias=bias)
    return conv, _bn(channels_out).train()


@pytest.fixture
def winograd_train_calls(monkeypatch):
    """Counts the training convs that run as Winograd convs."""
    return _runs(monkeypatch, TRAIN_CONV_TABLE, "cpp")


@pytest.mark.parametrize("padding, dilation", [(1, 1), (2, 2), (0, 1), (3, 1)])  # (3, 1): ATen's input gradient
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_training_runs_winograd(winograd_train_calls, padding, dilation, bias, residual):
    """Training in float32 with a 3x3 stride-1 conv of 256+ channels over 512+ tiles: outputs, every gradient and
    the running statistics within twice eager's float32 error of the float64 run. Without the ReLU: over
    this many outputs a value within float32 rounding of 0 would flip a ReLU mask element in one run and
    not another, and its whole gradient with it (the fused ReLU backward is tested in test_conv_bn_relu)."""
    conv, bn = _train_modules(256, 264, padding, dilation, bias)
    x = torch.randn(1, 256, 48, 48)
    out_size = 48 + 2 * padding - 2 * dilation
    residual_input = torch.randn(1, 264, out_size, out_size) if residual else None
    grad_out = torch.randn(1, 264, out_size, out_size)
    results = {}
    for name, dtype in (("exact", torch.float64), ("eager", torch.float32), ("fastbb", torch.float32)):
        c, b = copy.deepcopy(conv).to(dtype), copy.deepcopy(bn).to(dtype)
        xi = x.to(dtype).requires_grad_()
        res = residual_input.to(dtype) if residual else None
        if name == "fastbb":
            out = conv_bn_relu(xi, c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var,
                               padding=padding, dilation=dilation, training=True, residual=res, relu=False)
        else:
            out = b(c(xi))
            out = out if res is None else out + res
        grads = torch.autograd.grad(out, [xi, c.weight, b.weight, b.bias] + ([c.bias] if bias else []),
                                    grad_out.to(dtype))
        results[name] = (out, *grads, b.running_mean, b.running_var)
    names = ["out", "grad x", "grad conv weight", "grad bn weight", "grad bn bias"] + (["grad conv bias"] if bias
                                                                                      else []) + ["mean", "var"]
    for name, got, eager, exact in zip(names, results["fastbb"], results["eager"], results["exact"]):
        assert_error_within(got, eager, exact, 2.0, slack=_SLACK, name=name)
    assert len(winograd_train_calls) == 1


def test_training_double_backward_through_winograd(winograd_train_calls):
    """create_graph: the backward is differentiable (a gradient penalty trains as in eager)."""
    conv, bn = _train_modules(256, 256, 1, 1, False)
    x = torch.randn(1, 256, 64, 64, requires_grad=True)
    penalties = []
    for fused in (False, True):
        c, b = copy.deepcopy(conv), copy.deepcopy(bn)
        out = conv_bn_relu(x, c.weight, None, b.weight, b.bias, padding=1, training=True) if fused \
            else b(c(x)).relu()
        grad_x, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(grad_x.square().sum(), c.weight)[0])
    assert float((penalties[1] - penalties[0]).norm()) <= 1e-4 * float(penalties[0].norm())
    assert len(winograd_train_calls) == 1


@pytest.mark.parametrize("kernel, backend", [(3, "cpp"), (1, "mkl")])
@pytest.mark.parametrize("residual", [False, True])
def test_frozen_bn_training_runs_the_training_convs(monkeypatch, kernel, backend, residual):
    """Training with frozen BN (a fine-tuned backbone's): the folded conv runs through the training-conv table
    (the Winograd conv for a large 3x3, the GEMM for a 1x1), then the residual add; output and gradients of x,
    the conv weight and the residual within twice eager's float32 error of the float64 run (no ReLU: see
    test_training_runs_winograd)."""
    calls = _runs(monkeypatch, TRAIN_CONV_TABLE, backend)
    channels = 256 if kernel == 3 else 24
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False)
    bn = _bn(channels).eval()
    x = torch.randn(1, channels, 48, 48)
    residual_input = torch.randn(1, channels, 48, 48) if residual else None
    grad_out = torch.randn(1, channels, 48, 48)
    results = {}
    for name, dtype in (("exact", torch.float64), ("eager", torch.float32), ("fastbb", torch.float32)):
        c, b = copy.deepcopy(conv).to(dtype), copy.deepcopy(bn).to(dtype)
        xi = x.to(dtype).requires_grad_()
        res = residual_input.to(dtype).requires_grad_() if residual else None
        if name == "fastbb":
            out = conv_bn_relu(xi, c.weight, None, b.weight, b.bias, b.running_mean, b.running_var,
                               padding=kernel // 2, training=False, residual=res, relu=False)
        else:
            out = b(c(xi))
            out = out if res is None else out + res
        grads = torch.autograd.grad(out, [xi, c.weight] + ([res] if residual else []), grad_out.to(dtype))
        results[name] = (out, *grads)
    for name, got, eager, exact in zip(["out", "grad x", "grad conv weight", "grad residual"], results["fastbb"],
                                       results["eager"], results["exact"]):
        assert_error_within(got, eager, exact, 2.0, slack=_SLACK, name=name)
    assert len(calls) == 1


@pytest.mark.parametrize("case", ["few positions", "128 channels", "float64", "reference backend"])
def test_other_training_convs_do_not_run_winograd(winograd_train_calls, case):
    channels = 128 if case == "128 channels" else 256
    conv, bn = _train_modules(channels, channels, 1, 1, False)
    # 49 4x4 tiles (under 64) for "few positions"; else 144 (128 channels: 529)
    size = {"few positions": (28, 28), "128 channels": (92, 92)}.get(case, (48, 48))
    x = torch.randn(1, channels, *size)
    dtype = torch.float64 if case == "float64" else torch.float32
    conv, bn, x = conv.to(dtype), bn.to(dtype), x.to(dtype)
    backend = fastbb.use_backend("reference") if case == "reference backend" else contextlib.nullcontext()
    with backend:
        got = conv_bn_relu(x, conv.weight, None, bn.weight, bn.bias, padding=1, training=True)
    torch.testing.assert_close(got, bn(conv(x)).relu(), **TOLERANCES[dtype])
    assert not winograd_train_calls


@pytest.mark.parametrize("shape, gemm", [((2, 24, 14, 14), True), ((2, 24, 13, 15), False), ((1, 24, 20, 20), True)])
@pytest.mark.parametrize("bias", [False, True])
def test_training_pointwise_conv_as_gemm(monkeypatch, shape, gemm, bias):
    """A training 1x1 stride-1 conv over 196+ pixels per image runs as a batched GEMM with autograd: output
    and every gradient within twice eager's float32 error of the float64 run."""
    calls = _runs(monkeypatch, TRAIN_CONV_TABLE, "mkl")
    conv, bn = nn.Conv2d(24, 40, 1, bias=bias), _bn(40).train()
    x = torch.randn(shape)
    grad_out = torch.randn(shape[0], 40, *shape[2:])
    results = {}
    for name, dtype in (("exact", torch.float64), ("eager", torch.float32), ("fastbb", torch.float32)):
        c, b = copy.deepcopy(conv).to(dtype), copy.deepcopy(bn).to(dtype)
        xi = x.to(dtype).requires_grad_()
        out = conv_bn_relu(xi, c.weight, c.bias, b.weight, b.bias, training=True, relu=False) \
            if name == "fastbb" else b(c(xi))
        params = [xi, c.weight, b.weight, b.bias] + ([c.bias] if bias else [])
        grads = torch.autograd.grad(out, params, grad_out.to(dtype))
        results[name] = (out, *grads)
    for got, eager, exact in zip(results["fastbb"], results["eager"], results["exact"]):
        assert_error_within(got, eager, exact, 2.0, slack=_SLACK)
    assert len(calls) == (1 if gemm else 0)


@pytest.mark.parametrize("residual_layout, fused", [(torch.channels_last, True), (torch.contiguous_format, False)])
@pytest.mark.parametrize("relu", [False, True])
def test_channels_last_residual_joins_the_onednn_conv(monkeypatch, residual_layout, fused, relu):
    """channels_last eval with a channels_last float32 residual: oneDNN's conv with the add (and ReLU) as
    post-ops, on the packed weight; another residual layout takes the conv, then the add and ReLU."""
    plain_calls = _runs(monkeypatch, TABLE, "reference")
    conv, bn = nn.Conv2d(24, 40, 3, padding=1, bias=False), _bn(40)
    x = torch.randn(2, 24, 9, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager, exact, res = _expected(conv, bn, x, True, relu)
        res = res.contiguous(memory_format=residual_layout)
        kept = res.clone()
        got = conv_bn_relu(x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, padding=1,
                           eps=bn.eps, relu=relu, residual=res)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(res, kept)
    assert_error_within(got, eager, exact, 2.0, slack=_SLACK)
    assert len(plain_calls) == (0 if fused else 1)
