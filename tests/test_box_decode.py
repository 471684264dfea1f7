"""fastbb.ops.decode_boxes: every usable backend against the reference, the reference against torchvision."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import clip_boxes_to_image

import fastbb
from fastbb.ops.box_decode import decode_boxes, decode_boxes_reference
from conftest import TOLERANCES, check_forced_backends, usable_backends

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
IMAGE_H, IMAGE_W = 800, 1333

# Parameter sets: torchvision (RetinaNet, Faster R-CNN weights), mmdet (default, R-CNN stds, YOLOF ctr clamp).
STYLES = {
    "torchvision": dict(style="torchvision"),
    "torchvision_weights": dict(style="torchvision", weights=(10.0, 10.0, 5.0, 5.0)),
    "torchvision_noclamp": dict(style="torchvision", dwh_max=None),
    "mmdet": dict(style="mmdet", dwh_min=-abs(math.log(16 / 1000)), dwh_max=abs(math.log(16 / 1000))),
    "mmdet_stds": dict(style="mmdet", means=(0.0, 0.05, 0.0, -0.02), stds=(0.1, 0.1, 0.2, 0.2),
                       dwh_min=-2.0, dwh_max=2.0),
    "mmdet_ctr_clamp": dict(style="mmdet", dwh_max=2.0, dxy_max=32.0),
}


def random_anchors(n, dtype=torch.float32, device="cpu", image=(IMAGE_H, IMAGE_W)):
    """Anchors scattered over (and a little beyond) an image, sizes 1..600 px."""
    h, w = image
    ctr = torch.rand(n, 2, device=device, dtype=torch.float64) * torch.tensor([w, h], device=device) * 1.1 - 30
    size = torch.rand(n, 2, device=device, dtype=torch.float64) * 600 + 1
    return torch.cat((ctr - size / 2, ctr + size / 2), -1).to(dtype)


def random_deltas(shape, dtype=torch.float32, device="cpu", scale=1.5):
    return (torch.randn(shape, device=device, dtype=torch.float64) * scale).to(dtype)


def run(backend, *args, **kwargs):
    with fastbb.use_backend(backend):
        return decode_boxes(*args, **kwargs)


def assert_close(actual, expected, dtype, backend=None):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    # Boxes are in pixels: the tolerances scale with the image size (1333 px).
    tol = TOLERANCES[dtype]
    if backend == "triton" and dtype == torch.float64 and fastbb._backend.triton_interpreter_on():
        # The interpreter ignores the kernel's float64 annotations and rounds the scalar arguments (stds,
        # clamps) to float32; compiled Triton receives them as float64 (test_cuda_float64_scalars_are_exact).
        tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * 2000)


def backends(device="cpu"):
    return usable_backends(device, "decode_boxes")


# ---------------------------------------------------------------------------------------------------------
# Reference against torchvision and a plain port of mmdet.

@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (0.7, 1.3, 2.0, 3.0)])
@pytest.mark.parametrize("num_per_anchor", [1, 3])
@pytest.mark.parametrize("clip", [False, True])
def test_reference_matches_torchvision(weights, num_per_anchor, clip):
    anchors = random_anchors(2000)
    deltas = random_deltas((2000, 4 * num_per_anchor), scale=3.0)  # some dw, dh beyond the clamp
    coder = TorchvisionBoxCoder(weights)
    expected = coder.decode_single(deltas, anchors)
    if clip:
        expected = clip_boxes_to_image(expected.reshape(2000, -1, 4), (IMAGE_H, IMAGE_W)).reshape(2000, -1)
    actual = decode_boxes_reference(anchors, deltas, weights=weights,
                                    max_shape=(IMAGE_H, IMAGE_W) if clip else None)
    assert torch.equal(actual, expected)  # same operations in the same order: bit-identical


def mmdet_delta2bbox(rois, deltas, means, stds, max_shape, wh_ratio_clip, add_ctr_clamp, ctr_clamp):
    """mmdet 3.x delta2bbox for (N, 4K) deltas, written from its documented formulas."""
    k = deltas.shape[1] // 4
    d = deltas.reshape(-1, 4) * deltas.new_tensor(stds) + deltas.new_tensor(means)
    rois = rois.repeat(1, k).reshape(-1, 4)
    pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
    pwh = rois[:, 2:] - rois[:, :2]
    dxy_wh = pwh * d[:, :2]
    max_ratio = abs(math.log(wh_ratio_clip))
    if add_ctr_clamp:
        dxy_wh = torch.clamp(dxy_wh, max=ctr_clamp, min=-ctr_clamp)
        dwh = torch.clamp(d[:, 2:], max=max_ratio)
    else:
        dwh = d[:, 2:].clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        boxes[..., 0::2].clamp_(min=0, max=max_shape[1])
        boxes[..., 1::2].clamp_(min=0, max=max_shape[0])
    return boxes.reshape(deltas.shape[0], -1)


@pytest.mark.parametrize("add_ctr_clamp", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_reference_matches_mmdet_formulas(add_ctr_clamp, clip):
    anchors = random_anchors(1500)
    deltas = random_deltas((1500, 8), scale=3.0)
    means, stds, ratio = (0.1, -0.1, 0.05, 0.0), (0.1, 0.1, 0.2, 0.2), 16 / 1000
    max_ratio = abs(math.log(ratio))
    expected = mmdet_delta2bbox(anchors, deltas, means, stds, (IMAGE_H, IMAGE_W, 3) if clip else None, ratio,
                                add_ctr_clamp, 32)
    actual = decode_boxes_reference(
        anchors, deltas, style="mmdet", means=means, stds=stds, dwh_min=None if add_ctr_clamp else -max_ratio,
        dwh_max=max_ratio, dxy_max=32 if add_ctr_clamp else None,
        max_shape=(IMAGE_H, IMAGE_W, 3) if clip else None)
    assert torch.equal(actual, expected)


# ---------------------------------------------------------------------------------------------------------
# Backends against the reference.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", sorted(STYLES))
@pytest.mark.parametrize("max_shape", [None, "one", "per_image"])
def test_backends_match_reference(dtype, params, max_shape):
    batch, n, k = 2, 37, 2
    anchors = random_anchors(n, dtype)
    deltas = random_deltas((batch, n, 4 * k), dtype, scale=2.5)
    shape = {None: None, "one": (IMAGE_H, IMAGE_W),
             "per_image": torch.tensor([[IMAGE_H, IMAGE_W], [512, 640]])}[max_shape]
    expected = decode_boxes_reference(anchors, deltas, max_shape=shape, **STYLES[params])
    for backend in backends():
        assert_close(run(backend, anchors, deltas, max_shape=shape, **STYLES[params]), expected, dtype, backend)


@pytest.mark.parametrize("n, k", [(1, 1), (5, 1), (1000, 1), (333, 4)])
def test_shapes(n, k):
    anchors = random_anchors(n)
    deltas = random_deltas((n, 4 * k))
    expected = decode_boxes_reference(anchors, deltas, max_shape=(IMAGE_H, IMAGE_W))
    assert expected.shape == deltas.shape
    for backend in backends():
        if backend == "triton" and n > 400:
            continue  # the interpreter is slow; smaller shapes cover the Triton kernel
        assert_close(run(backend, anchors, deltas, max_shape=(IMAGE_H, IMAGE_W)), expected, torch.float32)


@pytest.mark.parametrize("anchor_shape, delta_shape", [
    ((6, 4), (3, 6, 8)),          # anchors shared by a batch
    ((1, 6, 4), (3, 6, 4)),
    ((3, 1, 4), (3, 6, 4)),       # one anchor per image: expanded
    ((3, 6, 4), (3, 6, 12)),
    ((2, 3, 4), (5, 2, 3, 4)),
])
def test_broadcasting(anchor_shape, delta_shape):
    anchors = random_anchors(math.prod(anchor_shape[:-1])).reshape(anchor_shape)
    deltas = random_deltas(delta_shape)
    k = delta_shape[-1] // 4
    full = anchors.expand(*delta_shape[:-1], 4).reshape(-1, 4)
    expected = decode_boxes_reference(full, deltas.reshape(-1, 4 * k)).reshape(delta_shape)
    for backend in backends():
        assert_close(run(backend, anchors, deltas), expected, torch.float32)


@pytest.mark.parametrize("delta_shape", [(0, 4), (0, 8), (2, 0, 4), (0, 5, 4)])
def test_empty(delta_shape):
    anchors = random_anchors(delta_shape[-2])
    deltas = random_deltas(delta_shape)
    shape = torch.zeros(delta_shape[0], 2) if len(delta_shape) == 3 else (10, 10)
    for backend in backends():
        out = run(backend, anchors, deltas, max_shape=shape)
        assert out.shape == deltas.shape and out.dtype == deltas.dtype


def test_non_contiguous():
    anchors = random_anchors(200).t().contiguous().t()  # column-major
    deltas = random_deltas((200, 16))[:, ::2]
    batched = random_deltas((3, 200, 8)).transpose(0, 1).contiguous().transpose(0, 1)
    assert not deltas.is_contiguous() and not batched.is_contiguous() and not anchors.is_contiguous()
    expected = decode_boxes_reference(anchors.contiguous(), deltas.contiguous(), max_shape=(500, 600))
    expected_batched = decode_boxes_reference(anchors.contiguous(), batched.contiguous())
    for backend in backends():
        assert_close(run(backend, anchors, deltas, max_shape=(500, 600)), expected, torch.float32)
        assert_close(run(backend, anchors, batched), expected_batched, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_deltas_are_clamped(dtype):
    anchors = random_anchors(64, dtype)
    deltas = random_deltas((64, 4), dtype, scale=1.0)
    deltas[:, 2:] = torch.tensor([60000.0, -60000.0], dtype=dtype)  # exp would overflow without the clamp
    for backend in backends():
        for params in STYLES.values():
            if params.get("dwh_max", 1.0) is None:
                continue
            out = run(backend, anchors, deltas, **params)
            assert torch.isfinite(out).all(), (backend, params)
        # With the clamp, the width is exactly the anchor width times exp(dwh_max) (to rounding).
        out = run(backend, anchors, deltas).double()
        expected = (anchors[:, 2] - anchors[:, 0]).double() * (1000.0 / 16)
        torch.testing.assert_close(out[:, 2] - out[:, 0], expected, rtol=2e-2 if dtype.itemsize == 2 else 1e-5,
                                   atol=1e-2)


def test_nan_propagates_like_torch():
    anchors = random_anchors(8)
    deltas = random_deltas((8, 4))
    deltas[3, 2] = float("nan")
    expected = decode_boxes_reference(anchors, deltas, max_shape=(100, 100))
    for backend in backends():
        out = run(backend, anchors, deltas, max_shape=(100, 100))
        assert torch.equal(out.isnan(), expected.isnan()), backend


def test_anchor_dtype_is_cast_like_torchvision():
    anchors = random_anchors(50, torch.float64)
    deltas = random_deltas((50, 4), torch.float32)
    expected = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(deltas, anchors)
    out = decode_boxes(anchors, deltas)
    assert out.dtype == torch.float32
    assert_close(out, expected, torch.float32)
    int_anchors = anchors.round().to(torch.int64)
    assert_close(decode_boxes(int_anchors, deltas), decode_boxes(int_anchors.float(), deltas), torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Autograd, opcheck, torch.compile.

@pytest.mark.parametrize("params", sorted(STYLES))
@pytest.mark.parametrize("max_shape", [None, "one", "per_image"])
def test_gradcheck(params, max_shape):
    anchors = random_anchors(6, torch.float64, image=(60, 60)).requires_grad_()
    deltas = random_deltas((2, 6, 8), torch.float64, scale=1.0).requires_grad_()
    shape = {None: None, "one": (50, 55), "per_image": [(50, 55), (40, 70, 3)]}[max_shape]
    for backend in backends():
        with fastbb.use_backend(backend):
            assert torch.autograd.gradcheck(
                lambda a, d: decode_boxes(a, d, max_shape=shape, **STYLES[params]), (anchors, deltas))


def test_gradient_is_zero_through_a_clamp():
    anchors = torch.tensor([[10.0, 10.0, 20.0, 30.0]], dtype=torch.float64, requires_grad=True)
    deltas = torch.tensor([[0.1, 0.2, 9.0, -0.3]], dtype=torch.float64, requires_grad=True)  # dw clamped
    decode_boxes(anchors, deltas)[:, 2].sum().backward()
    ref_anchors = anchors.detach().clone().requires_grad_()
    ref_deltas = deltas.detach().clone().requires_grad_()
    TorchvisionBoxCoder((1.0,) * 4).decode_single(ref_deltas, ref_anchors)[:, 2].sum().backward()
    assert deltas.grad[0, 2] == 0
    torch.testing.assert_close(deltas.grad, ref_deltas.grad)
    torch.testing.assert_close(anchors.grad, ref_anchors.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_match_autograd_of_reference_layout(dtype):
    anchors = random_anchors(40, dtype).requires_grad_()
    deltas = random_deltas((3, 40, 8), dtype, scale=3.0).requires_grad_()
    grad = torch.randn(3, 40, 8, dtype=dtype)
    ratio = 16 / 1000
    kwargs = dict(style="mmdet", dwh_max=abs(math.log(ratio)), dxy_max=32.0, max_shape=(IMAGE_H, IMAGE_W))
    decode_boxes(anchors, deltas, **kwargs).backward(grad)
    # Same math through torch ops directly (mmdet port), for the gradient of every input.
    a32 = anchors.detach().float().requires_grad_()
    d32 = deltas.detach().float().requires_grad_()
    out = mmdet_delta2bbox(a32.repeat(3, 1), d32.reshape(120, 8), (0.0,) * 4, (1.0,) * 4, (IMAGE_H, IMAGE_W),
                           ratio, True, 32.0)
    out.backward(grad.float().reshape(120, 8))
    torch.testing.assert_close(deltas.grad.float(), d32.grad, **TOLERANCES[dtype])
    torch.testing.assert_close(anchors.grad.float(), a32.grad, rtol=TOLERANCES[dtype]["rtol"],
                               atol=TOLERANCES[dtype]["atol"] * 100)


def test_opcheck():
    anchors = random_anchors(20)
    deltas = random_deltas((2, 20, 8))
    sizes = torch.tensor([[100.0, 120.0], [90.0, 80.0]])
    for backend in backends():
        with fastbb.use_backend(backend):
            torch.library.opcheck(torch.ops.fastbb.decode_boxes.default,
                                  (anchors, deltas, None, 0, [1.0] * 4, [0.0] * 4, [1.0] * 4, -math.inf,
                                   math.log(1000 / 16), math.inf, [800.0, 1333.0]))
            torch.library.opcheck(torch.ops.fastbb.decode_boxes.default,
                                  (anchors.double().requires_grad_(), deltas.double().requires_grad_(), sizes.double(),
                                   1, [1.0] * 4, [0.1] * 4, [0.2] * 4, -4.0, 4.0, 32.0, []))


def test_forced_backend_runs_its_implementation(monkeypatch):
    anchors, deltas = random_anchors(20), random_deltas((2, 20, 4))
    check_forced_backends(monkeypatch, "decode_boxes",
                          lambda: decode_boxes(anchors, deltas, max_shape=(IMAGE_H, IMAGE_W)))


def test_torch_compile_fullgraph():
    anchors = random_anchors(100)
    deltas = random_deltas((2, 100, 4))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def decode(a, d):
        return decode_boxes(a, d, style="mmdet", dwh_min=-4.0, dwh_max=4.0, max_shape=(IMAGE_H, IMAGE_W)) * 2

    expected = decode_boxes(anchors, deltas, style="mmdet", dwh_min=-4.0, dwh_max=4.0,
                            max_shape=(IMAGE_H, IMAGE_W)) * 2
    torch.testing.assert_close(decode(anchors, deltas), expected)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs.

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(anchors=torch.zeros(5, 3)), ValueError, "anchors must have last dimension 4"),
    (dict(deltas=torch.zeros(5, 6)), ValueError, "deltas must have a last dimension that is a positive multiple"),
    (dict(deltas=torch.zeros(5, 0)), ValueError, "deltas must have a last dimension"),
    (dict(deltas=torch.zeros(5, 4, dtype=torch.int64)), TypeError, "deltas must have dtype"),
    (dict(anchors=torch.zeros(5, 4, dtype=torch.bool)), TypeError, "anchors must be real numbers"),
    (dict(anchors=torch.zeros(6, 4)), ValueError, "leading dims of anchors .* must broadcast"),
    (dict(anchors=torch.zeros(2, 5, 4)), ValueError, "leading dims of anchors"),
    (dict(anchors=[[0, 0, 1, 1]]), TypeError, "anchors must be a torch.Tensor"),
    (dict(style="detectron"), ValueError, "style must be one of"),
    (dict(weights=(1.0, 1.0, 1.0)), ValueError, "weights must be 4 numbers"),
    (dict(weights=(1.0, 0.0, 1.0, 1.0)), ValueError, "weights must be 4 finite nonzero"),
    (dict(stds=(1.0, 1.0, 0.0, 1.0)), ValueError, "stds must be 4 finite nonzero"),
    (dict(means=(0.0, math.nan, 0.0, 0.0)), ValueError, "means must be 4 finite"),
    (dict(dwh_max=math.inf), ValueError, "dwh_max must be a finite number"),
    (dict(dwh_min=math.nan), ValueError, "dwh_min must be a finite number"),
    (dict(dwh_min=2.0, dwh_max=1.0), ValueError, "dwh_min must be <= dwh_max"),
    (dict(dxy_max=-1.0), ValueError, "dxy_max must be >= 0"),
    (dict(max_shape=(10,)), ValueError, "max_shape must be"),
    (dict(max_shape=(10, -5)), ValueError, "max_shape must be"),
    (dict(max_shape=(10, math.inf)), ValueError, "max_shape must be"),
    (dict(max_shape=torch.zeros(5)), ValueError, "max_shape must be"),
    (dict(max_shape=[(10, 10), (20, 20)]), ValueError, "per-image max_shape needs deltas"),
    (dict(max_shape="800x1333"), ValueError, "max_shape must be"),
])
def test_bad_inputs(kwargs, error, match):
    args = dict(anchors=torch.zeros(5, 4), deltas=torch.zeros(5, 4))
    args.update(kwargs)
    with pytest.raises(error, match=rf"^fastbb\.decode_boxes: .*{match}"):
        decode_boxes(args.pop("anchors"), args.pop("deltas"), **args)


def test_bad_per_image_count():
    with pytest.raises(ValueError, match="B = 3 images"):
        decode_boxes(torch.zeros(5, 4), torch.zeros(2, 5, 4), max_shape=torch.ones(3, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_device_mismatch():
    with pytest.raises(ValueError, match="one device"):
        decode_boxes(torch.zeros(5, 4, device="cuda"), torch.zeros(5, 4))


def test_meta_device_mismatch():
    with pytest.raises(ValueError, match="one device"):
        decode_boxes(torch.zeros(5, 4, device="meta"), torch.zeros(5, 4))


# ---------------------------------------------------------------------------------------------------------
# GPU.

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", sorted(STYLES))
def test_cuda_backends_match_reference(dtype, params):
    anchors = random_anchors(20000, dtype, "cuda")
    deltas = random_deltas((2, 20000, 4), dtype, "cuda", scale=2.5)
    sizes = torch.tensor([[IMAGE_H, IMAGE_W], [600, 1000]], device="cuda")
    kwargs = dict(STYLES[params], max_shape=sizes)
    expected = decode_boxes_reference(anchors.cpu(), deltas.cpu(), **dict(kwargs, max_shape=sizes.cpu()))
    for backend in usable_backends("cuda", "decode_boxes"):
        assert_close(run(backend, anchors, deltas, **kwargs).cpu(), expected, dtype)
        # Unaligned buffers take the scalar path of the CUDA kernel.
        odd = torch.empty(deltas.numel() + 1, dtype=dtype, device="cuda")[1:].view_as(deltas).copy_(deltas)
        assert_close(run(backend, anchors, odd, **kwargs).cpu(), expected, dtype)


@pytest.mark.cuda
def test_cuda_float64_scalars_are_exact():
    anchors = random_anchors(1000, torch.float64, "cuda")
    deltas = random_deltas((1000, 4), torch.float64, "cuda")
    kwargs = dict(style="mmdet", means=(0.1, 0.2, 0.3, 0.01), stds=(0.1, 0.1, 0.2, 0.2))
    expected = decode_boxes_reference(anchors.cpu(), deltas.cpu(), **kwargs)
    for backend in usable_backends("cuda", "decode_boxes"):
        assert_close(run(backend, anchors, deltas, **kwargs).cpu(), expected, torch.float64, backend)
        gradients = torch.autograd.gradcheck(
            lambda a, d: run(backend, a, d, **kwargs), (anchors[:5].clone().requires_grad_(),
                                                        deltas[:5].clone().requires_grad_()))
        assert gradients
