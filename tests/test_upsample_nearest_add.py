"""fastbb.ops.upsample_nearest_add against `lateral + F.interpolate(top, size=..., mode="nearest")`."""
import pytest
import torch
import torch.nn.functional as F

import fastbb
from fastbb.ops.upsample_nearest_add import upsample_nearest_add, upsample_nearest_add_reference

from conftest import TOLERANCES, check_forced_backends, usable_backends

BACKENDS = usable_backends("cpu", "upsample_nearest_add")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (top h, w) -> (lateral H, W): equal, exact 2x, odd (ResNet's ceil(L/2)), non-2x ratios, 1x1 tops.
SIZES = [((5, 7), (5, 7)), ((4, 6), (8, 12)), ((4, 6), (7, 11)), ((26, 3), (44, 5)), ((7, 13), (13, 25)),
         ((1, 1), (5, 3)), ((3, 1), (9, 2)), ((2, 5), (6, 5))]


def _pair(top_size, lateral_size, dtype, n=2, c=3, channels_last=False):
    top = torch.randn(n, c, *top_size, dtype=torch.float64).to(dtype)
    lateral = torch.randn(n, c, *lateral_size, dtype=torch.float64).to(dtype)
    if channels_last:
        top, lateral = top.to(memory_format=torch.channels_last), lateral.to(memory_format=torch.channels_last)
    return top, lateral


def _assert_matches(got, want):
    """Bit for bit: every backend adds in float32 (the dtype for float64) and rounds once, as eager does."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


def test_reference_reads_pytorch_legacy_nearest_rows():
    """The documented index rule, float32 scale then floor, against PyTorch itself: 26 -> 44 at row 22 reads
    row 12 (the exact rational would give 13)."""
    top = torch.arange(26, dtype=torch.float32).reshape(1, 1, 26, 1)
    out = upsample_nearest_add_reference(top, torch.zeros(1, 1, 44, 1))
    scale = torch.tensor(26, dtype=torch.float32) / 44
    rule = torch.clamp(torch.floor(torch.arange(44, dtype=torch.float32) * scale), max=25)
    assert torch.equal(out.flatten(), rule) and out.flatten()[22] == 12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_forward_matches_eager(backend, dtype, sizes):
    top, lateral = _pair(*sizes, dtype)
    want = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
    with fastbb.use_backend(backend):
        got = upsample_nearest_add(top, lateral)
    _assert_matches(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "mixed", "strided"])
def test_layouts(backend, dtype, layout):
    top, lateral = _pair((7, 13), (13, 25), dtype, c=5, channels_last=layout == "channels_last")
    if layout == "mixed":
        lateral = lateral.to(memory_format=torch.channels_last)
    if layout == "strided":  # views that are neither layout
        top = torch.randn(2, 10, 7, 26, dtype=dtype)[:, ::2, :, ::2]
        lateral = torch.randn(2, 5, 13, 25, dtype=dtype).transpose(2, 3).contiguous().transpose(2, 3)
    want = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
    with fastbb.use_backend(backend):
        got = upsample_nearest_add(top, lateral)
    _assert_matches(got, want)
    if layout in ("channels_last", "mixed"):
        assert got.is_contiguous(memory_format=torch.channels_last)  # the lateral's layout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_empty(backend, shape):
    top = torch.randn(*shape, 2, 3)
    lateral = torch.randn(*shape, 4, 5, requires_grad=True)
    with fastbb.use_backend(backend):
        out = upsample_nearest_add(top.requires_grad_(), lateral)
        out.sum().backward()
    assert out.shape == lateral.shape and top.grad.shape == top.shape and not top.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", SIZES[1:6], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_backward(backend, dtype, sizes, channels_last):
    """The lateral's gradient is the output gradient; the top's the window sum, against aten's backward
    of the upsample computed in float64."""
    top, lateral = _pair(*sizes, dtype, channels_last=channels_last)
    top.requires_grad_()
    lateral.requires_grad_()
    grad_out = torch.randn(lateral.shape, dtype=torch.float64).to(dtype)
    with fastbb.use_backend(backend):
        grad_top, grad_lateral = torch.autograd.grad(upsample_nearest_add(top, lateral), (top, lateral), grad_out)
    top64 = top.detach().double().requires_grad_()
    want = torch.autograd.grad(F.interpolate(top64, size=lateral.shape[-2:], mode="nearest"), top64,
                               grad_out.double())[0]
    assert torch.equal(grad_lateral, grad_out)
    assert grad_top.dtype == dtype and grad_top.shape == top.shape
    # 16-bit: summed in float32 and rounded once, so within one rounding of the float64 sum.
    torch.testing.assert_close(grad_top.double(), want, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    top, lateral = _pair((7, 13), (13, 25), torch.float32, c=4)
    top.requires_grad_()
    grad_out = torch.randn(lateral.shape)
    with fastbb.use_backend(backend):
        first = torch.autograd.grad(upsample_nearest_add(top, lateral), top, grad_out)[0]
        second = torch.autograd.grad(upsample_nearest_add(top, lateral), top, grad_out)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    top, lateral = _pair((3, 4), (7, 9), torch.float64, n=1, c=2)
    args = (top.requires_grad_(), lateral.requires_grad_())
    with fastbb.use_backend(backend):
        torch.autograd.gradcheck(upsample_nearest_add, args)
        torch.autograd.gradgradcheck(upsample_nearest_add, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    top, lateral = _pair((3, 5), (7, 9), torch.float32)
    with fastbb.use_backend(backend):
        torch.library.opcheck(torch.ops.fastbb.upsample_nearest_add, (top.requires_grad_(), lateral.requires_grad_()))
        torch.library.opcheck(torch.ops.fastbb.upsample_nearest_backward, (torch.randn(2, 3, 7, 9), 3, 5))
    if backend == "cpp":
        out = torch.empty_like(lateral)
        torch.library.opcheck(torch.ops.fastbb_C.upsample_nearest_add_out, (top.detach(), lateral.detach(), out))
        torch.library.opcheck(torch.ops.fastbb_C.upsample_nearest_backward, (torch.randn(2, 3, 7, 9), 3, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    top, lateral = _pair((4, 6), (7, 11), torch.float32)
    top.requires_grad_()
    with fastbb.use_backend(backend):
        compiled = torch.compile(lambda t, l: upsample_nearest_add(t, l) * 2, fullgraph=True, backend="aot_eager")
        out = compiled(top, lateral)
        out.sum().backward()
    assert torch.equal(out, 2 * (lateral + F.interpolate(top, size=(7, 11), mode="nearest")))
    assert top.grad.shape == top.shape


def test_forced_backend_runs_its_implementation(monkeypatch):
    top, lateral = _pair((4, 6), (7, 11), torch.float32)
    check_forced_backends(monkeypatch, "upsample_nearest_add", lambda: upsample_nearest_add(top, lateral))
    grad_out = torch.randn(lateral.shape)
    check_forced_backends(monkeypatch, "upsample_nearest_add.backward",
                          lambda: torch.ops.fastbb.upsample_nearest_backward(grad_out, 4, 6))


def test_inputs_unmodified():
    top, lateral = _pair((4, 6), (7, 11), torch.float32)
    before = (top.clone(), lateral.clone())
    for backend in BACKENDS:
        with fastbb.use_backend(backend):
            upsample_nearest_add(top, lateral)
    assert torch.equal(before[0], top) and torch.equal(before[1], lateral)


@pytest.mark.parametrize("make, message", [
    (lambda: (torch.randn(3, 4, 5), torch.randn(1, 3, 8, 10)), "top must be 4-D"),
    (lambda: (torch.randn(1, 3, 4, 5), torch.randn(3, 8, 10)), "lateral must be 4-D"),
    (lambda: (torch.randn(1, 2, 4, 5), torch.randn(1, 3, 8, 10)), "batch and channels"),
    (lambda: (torch.randn(2, 3, 4, 5), torch.randn(1, 3, 8, 10)), "batch and channels"),
    (lambda: (torch.randn(1, 3, 9, 5), torch.randn(1, 3, 8, 10)), "must not be larger"),
    (lambda: (torch.randn(1, 3, 4, 11), torch.randn(1, 3, 8, 10)), "must not be larger"),
    (lambda: (torch.randn(1, 3, 0, 5), torch.randn(1, 3, 8, 10)), "empty spatial size"),
    (lambda: (torch.randint(0, 3, (1, 3, 4, 5)), torch.randn(1, 3, 8, 10)), "top must have dtype"),
    (lambda: (torch.randn(1, 3, 4, 5), torch.randn(1, 3, 8, 10, device="meta")), "one device"),
    (lambda: ([[1.0]], torch.randn(1, 3, 8, 10)), "top must be a torch.Tensor"),
])
def test_bad_input(make, message):
    top, lateral = make()
    with pytest.raises((TypeError, ValueError), match=rf"^fastbb\.upsample_nearest_add: .*{message}"):
        upsample_nearest_add(top, lateral)


# ---- CUDA: the Triton kernels on the GPU. One shape, so each dtype and layout costs one compile per kernel.

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_triton_forward_and_backward(dtype, channels_last):
    """Forward bit for bit against eager PyTorch on the GPU; the top's gradient within one rounding of
    aten's backward in float64; the lateral's gradient is the output gradient itself."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    top, lateral = (t.cuda() for t in _pair((7, 13), (13, 25), dtype, c=21, channels_last=channels_last))
    top.requires_grad_()
    lateral.requires_grad_()
    grad_out = torch.randn(lateral.shape, dtype=torch.float64).to(dtype).cuda().contiguous(memory_format=fmt)
    with fastbb.use_backend("triton"):
        out = upsample_nearest_add(top, lateral)
        grad_top, grad_lateral = torch.autograd.grad(out, (top, lateral), grad_out)
    want = lateral.detach() + F.interpolate(top.detach(), size=lateral.shape[-2:], mode="nearest")
    _assert_matches(out.detach(), want)
    assert out.is_contiguous(memory_format=fmt)
    top64 = top.detach().double().requires_grad_()
    want_grad = torch.autograd.grad(F.interpolate(top64, size=lateral.shape[-2:], mode="nearest"), top64,
                                    grad_out.double())[0]
    assert torch.equal(grad_lateral, grad_out)
    assert grad_top.dtype == dtype and grad_top.shape == top.shape
    torch.testing.assert_close(grad_top.double(), want_grad, **TOLERANCES[dtype])
