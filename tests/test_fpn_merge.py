"""fastbb.ops.fpn_merge against `F.conv2d(x, w, b) + F.interpolate(top, size=..., mode="nearest")`."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastbb
from fastbb.ops.fpn_merge import fpn_merge, fpn_merge_reference

from conftest import TOLERANCES, check_forced_backends, usable_backends

BACKENDS = usable_backends("cpu", "fpn_merge")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _problem(dtype, n=2, c_in=19, c_out=21, size=(9, 13), top_size=(5, 7), bias=True, channels_last=False):
    """Channel counts and sizes that are no multiple of any block size; an odd lateral size."""
    x = torch.randn(n, c_in, *size, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 1, 1, dtype=torch.float64) / c_in ** 0.5
    b = torch.randn(c_out, dtype=torch.float64) if bias else None
    top = torch.randn(n, c_out, *top_size, dtype=torch.float64)
    if channels_last:
        x, top = x.to(memory_format=torch.channels_last), top.to(memory_format=torch.channels_last)
    return [t.to(dtype) if t is not None else None for t in (x, weight, b, top)]


def _float64_result(x, weight, bias, top):
    return fpn_merge_reference(x.double(), weight.double(), None if bias is None else bias.double(), top.double())


def _tolerance(dtype, want):
    """The error bound of a GEMM in dtype (accumulated in float32 at least) against the float64 result."""
    scale = float(want.abs().max()) if want.numel() else 1.0
    tol = TOLERANCES[dtype]
    return dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward(backend, dtype, bias, channels_last):
    args = _problem(dtype, bias=bias, channels_last=channels_last)
    with fastbb.use_backend(backend):
        got = fpn_merge(*args)
    want = _float64_result(*args)
    assert got.dtype == dtype and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(got.double(), want, **_tolerance(dtype, want))


@pytest.mark.parametrize("n, size, gemm", [(1, (9, 13), True), (2, (32, 40), True), (2, (9, 13), False)])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_lateral_conv_as_gemm(monkeypatch, n, size, gemm, bias):
    """On the CPU in float32 (NCHW, one image or 1024+ pixels each) the lateral 1x1 conv is a GEMM per image."""
    fpn_merge_module = importlib.import_module("fastbb.ops.fpn_merge")  # the module, not the op
    calls, run = [], fpn_merge_module.pointwise_conv_gemm
    monkeypatch.setattr(fpn_merge_module, "pointwise_conv_gemm", lambda *a: calls.append(1) or run(*a))
    args = _problem(torch.float32, n=n, size=size, top_size=(size[0] // 2 + 1, size[1] // 2 + 1), bias=bias)
    with torch.no_grad():
        got = fpn_merge(*args)
    want = _float64_result(*args)
    torch.testing.assert_close(got.double(), want, **_tolerance(torch.float32, want))
    assert len(calls) == (1 if gemm else 0)


def test_reference_is_conv_plus_upsample():
    x, weight, bias, top = _problem(torch.float64)
    conv = torch.nn.Conv2d(x.shape[1], weight.shape[0], 1).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    want = conv(x) + F.interpolate(top, size=x.shape[-2:], mode="nearest")
    assert torch.equal(fpn_merge_reference(x, weight, bias, top), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [((8, 12), (4, 6)), ((13, 25), (7, 13)), ((44, 3), (26, 3)), ((5, 5), (1, 1))],
                         ids=str)
def test_sizes(backend, sizes):
    args = _problem(torch.float32, c_in=6, c_out=5, size=sizes[0], top_size=sizes[1])
    with fastbb.use_backend(backend):
        got = fpn_merge(*args)
    want = _float64_result(*args)
    torch.testing.assert_close(got.double(), want, **_tolerance(torch.float32, want))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward(backend, dtype):
    args = [t.requires_grad_() for t in _problem(dtype)]
    grad_out = torch.randn(2, 21, 9, 13, dtype=torch.float64)
    with fastbb.use_backend(backend):
        grads = torch.autograd.grad(fpn_merge(*args), args, grad_out.to(dtype))
    args64 = [t.detach().double().requires_grad_() for t in args]
    want = torch.autograd.grad(fpn_merge_reference(*args64), args64, grad_out)
    for name, got, expected in zip(("x", "weight", "bias", "top"), grads, want):
        assert got.dtype == dtype and got.shape == expected.shape, name
        torch.testing.assert_close(got.double(), expected, **_tolerance(dtype, expected), msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(backend, bias):
    args = _problem(torch.float64, n=1, c_in=3, c_out=2, size=(5, 7), top_size=(3, 4), bias=bias)
    args = [t.requires_grad_() if t is not None else None for t in args]
    with fastbb.use_backend(backend):
        torch.autograd.gradcheck(fpn_merge, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    args = [t.requires_grad_() for t in _problem(torch.float32, c_in=5, c_out=4, size=(6, 7), top_size=(3, 4))]
    with fastbb.use_backend(backend):
        torch.library.opcheck(torch.ops.fastbb.fpn_merge, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    n, c_in, c_out = 0, 4, 3
    x = torch.randn(n, c_in, 6, 7, requires_grad=True)
    weight = torch.randn(c_out, c_in, 1, 1, requires_grad=True)
    bias = torch.randn(c_out, requires_grad=True)
    top = torch.randn(n, c_out, 3, 4, requires_grad=True)
    with fastbb.use_backend(backend):
        out = fpn_merge(x, weight, bias, top)
        out.sum().backward()
    want = fpn_merge_reference(x.detach(), weight.detach(), bias.detach(), top.detach())
    assert out.shape == (n, c_out, 6, 7)
    torch.testing.assert_close(out.detach(), want)
    assert x.grad.shape == x.shape and top.grad.shape == top.shape


def test_forced_backend_runs_its_implementation(monkeypatch):
    args = _problem(torch.float32)
    check_forced_backends(monkeypatch, "fpn_merge", lambda: fpn_merge(*args))


def test_inputs_unmodified():
    args = _problem(torch.float32)
    before = [t.clone() for t in args]
    for backend in BACKENDS:
        with fastbb.use_backend(backend):
            fpn_merge(*args)
    assert all(torch.equal(b, a) for b, a in zip(before, args))


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(x=a["x"][0]), "x must be 4-D"),
    (lambda a: a.update(x=a["x"][:, :0], lateral_weight=a["lateral_weight"][:, :0]), "at least one channel"),
    (lambda a: a.update(lateral_weight=a["lateral_weight"][:0], lateral_bias=None, top=a["top"][:, :0]),
     "at least one channel"),
    (lambda a: a.update(lateral_weight=a["lateral_weight"][:, :, :1, :1].expand(-1, -1, 3, 3)), "1x1 conv weight"),
    (lambda a: a.update(lateral_weight=a["lateral_weight"][:, :4]), "1x1 conv weight"),
    (lambda a: a.update(lateral_bias=a["lateral_bias"][:3]), "lateral_bias must be"),
    (lambda a: a.update(top=a["top"][:, :3]), "batch and channels"),
    (lambda a: a.update(top=torch.randn(2, 5, 10, 4)), "must not be larger"),
    (lambda a: a.update(lateral_weight=a["lateral_weight"].double()), "lateral_weight must have x's dtype"),
    (lambda a: a.update(top=a["top"].to(torch.int32)), "top must have dtype"),
    (lambda a: a.update(x=a["x"].to(torch.int32)), "x must have dtype"),
    (lambda a: a.update(top=a["top"].to("meta")), "one device"),
])
def test_bad_input(change, message):
    x, weight, bias, top = _problem(torch.float32, c_in=6, c_out=5, size=(8, 9), top_size=(4, 5))
    args = dict(x=x, lateral_weight=weight, lateral_bias=bias, top=top)
    change(args)
    with pytest.raises((TypeError, ValueError), match=rf"^fastbb\.fpn_merge: .*{message}"):
        fpn_merge(**args)


# ---- CUDA: the Triton GEMM kernel on the GPU ------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_triton_kernel_every_dtype_and_layout(dtype, channels_last):
    """The kernel with one fixed tile (the autotuner would compile each of its configs per dtype and
    layout), odd channel counts and sizes, against the float64 result."""
    from fastbb.kernels import fpn_merge as fpn_merge_kernels
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, weight, bias, top = (t.cuda() for t in _problem(dtype, size=(13, 25), top_size=(7, 13),
                                                        channels_last=channels_last))
    got = fpn_merge_kernels.fpn_merge(x, weight, bias, top, block_m=64, block_n=32, block_k=16)
    want = _float64_result(x, weight, bias, top)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(got.double(), want, **_tolerance(dtype, want))


@pytest.mark.cuda
def test_cuda_op_forward_and_backward(monkeypatch):
    """The op as users run it on the GPU (autotuned kernel, then the conv's and the top's gradients),
    float32 without TF32, against float64."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the conv gradients in full float32
    args = [t.cuda().requires_grad_() for t in _problem(torch.float32, size=(13, 25), top_size=(7, 13))]
    grad_out = torch.randn(2, 21, 13, 25, dtype=torch.float64, device="cuda")
    with fastbb.use_backend("triton"):
        out = fpn_merge(*args)
        grads = torch.autograd.grad(out, args, grad_out.float())
    args64 = [t.detach().double().requires_grad_() for t in args]
    want = fpn_merge_reference(*args64)
    torch.testing.assert_close(out.detach().double(), want.detach(), **_tolerance(torch.float32, want))
    want_grads = torch.autograd.grad(want, args64, grad_out)
    for name, got, expected in zip(("x", "weight", "bias", "top"), grads, want_grads):
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        torch.testing.assert_close(got.double(), expected, **_tolerance(torch.float32, expected), msg=name)
