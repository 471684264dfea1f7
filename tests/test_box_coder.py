"""fastbb.nn.BoxCoder against torchvision's; DeltaXYWHBBoxCoder against a port of mmdet's formulas.

mmdet is not installed here, so its delta2bbox / bbox2delta are ported below in plain PyTorch from
mmdet 3.x's documented formulas (delta_xywh_bbox_coder.py).
"""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

import fastbb
from fastbb.nn import BoxCoder, DeltaXYWHBBoxCoder
from conftest import usable_backends

IMAGE_H, IMAGE_W = 800, 1333


def random_boxes(n, dtype=torch.float32):
    ctr = torch.rand(n, 2, dtype=torch.float64) * torch.tensor([IMAGE_W, IMAGE_H])
    size = torch.rand(n, 2, dtype=torch.float64) * 500 + 2
    return torch.cat((ctr - size / 2, ctr + size / 2), -1).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# torchvision BoxCoder

def test_box_coder_is_a_plain_class_like_torchvision():
    assert not issubclass(TorchvisionBoxCoder, torch.nn.Module) and not issubclass(BoxCoder, torch.nn.Module)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    assert coder.weights == (10.0, 10.0, 5.0, 5.0) and coder.bbox_xform_clip == math.log(1000.0 / 16)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_torchvision(weights):
    ours, theirs = BoxCoder(weights, bbox_xform_clip=3.5), TorchvisionBoxCoder(weights, bbox_xform_clip=3.5)
    per_image = [random_boxes(n) for n in (700, 0, 301)]
    targets = [random_boxes(len(b)) for b in per_image]

    encoded, expected_encoded = ours.encode(targets, per_image), theirs.encode(targets, per_image)
    assert type(encoded) is type(expected_encoded) and len(encoded) == 3
    for a, b in zip(encoded, expected_encoded):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ours.encode_single(targets[0], per_image[0]),
                               theirs.encode_single(targets[0], per_image[0]), rtol=0, atol=0)

    codes = torch.randn(1001, 12) * 2.5  # 3 boxes per anchor, some beyond the clamp
    backends = usable_backends("cpu", "decode_boxes")
    for backend in backends:
        with fastbb.use_backend(backend):
            decoded = ours.decode(codes, per_image)
            single = ours.decode_single(codes, torch.cat(per_image))
        expected = theirs.decode(codes, per_image)
        assert decoded.shape == expected.shape == (1001, 3, 4)
        # fp32 on 1333-px images: within 1e-4 px of torchvision, or within the float32 precision of the box
        # (an ulp or two of its largest coordinate) where that is coarser: a compiled kernel's exp may differ from
        # PyTorch's vectorized exp by an ulp.
        for actual, wanted in ((decoded, expected), (single, theirs.decode_single(codes, torch.cat(per_image)))):
            box_scale = wanted.reshape(-1, 4).abs().amax(-1, keepdim=True).expand(-1, 4).reshape(wanted.shape)
            allowed = torch.clamp(box_scale * 2.0 ** -22, min=1e-4)
            assert ((actual - wanted).abs() <= allowed).all(), backend


def test_box_coder_round_trip_and_empty():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    targets = random_boxes(100)
    ctr, size = (targets[:, :2] + targets[:, 2:]) / 2 + 3, (targets[:, 2:] - targets[:, :2]) * 1.3
    anchors = torch.cat((ctr - size / 2, ctr + size / 2), -1)  # within the dw, dh clamp of the targets
    deltas = coder.encode_single(targets, anchors)
    torch.testing.assert_close(coder.decode_single(deltas, anchors), targets, rtol=0, atol=2e-3)
    empty = coder.decode(torch.zeros(0, 4), [torch.zeros(0, 4)])
    assert empty.shape == TorchvisionBoxCoder((1.0,) * 4).decode(torch.zeros(0, 4), [torch.zeros(0, 4)]).shape


def test_box_coder_decode_checks_arguments():
    with pytest.raises(TypeError, match="boxes must be a list or tuple"):
        BoxCoder((1.0,) * 4).decode(torch.zeros(2, 4), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------------------
# mmdet DeltaXYWHBBoxCoder

def mmdet_bbox2delta(proposals, gt, means, stds):
    proposals, gt = proposals.float(), gt.float()
    px, py = (proposals[..., 0] + proposals[..., 2]) * 0.5, (proposals[..., 1] + proposals[..., 3]) * 0.5
    pw, ph = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
    gx, gy = (gt[..., 0] + gt[..., 2]) * 0.5, (gt[..., 1] + gt[..., 3]) * 0.5
    gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return (deltas - deltas.new_tensor(means)) / deltas.new_tensor(stds)


def mmdet_onnx_delta2bbox(rois, deltas, means, stds, max_shape, wh_ratio_clip, clip_border, add_ctr_clamp,
                          ctr_clamp):
    """mmdet's broadcasting decode (used for (B, N, 4K) deltas), ported from its documented formulas."""
    k = deltas.size(-1) // 4
    denorm = deltas * deltas.new_tensor(stds).repeat(k) + deltas.new_tensor(means).repeat(k)
    dx, dy, dw, dh = (denorm[..., i::4] for i in range(4))
    x1, y1, x2, y2 = (rois[..., i] for i in range(4))
    px = ((x1 + x2) * 0.5).unsqueeze(-1).expand_as(dx)
    py = ((y1 + y2) * 0.5).unsqueeze(-1).expand_as(dy)
    pw = (x2 - x1).unsqueeze(-1).expand_as(dw)
    ph = (y2 - y1).unsqueeze(-1).expand_as(dh)
    dx_width, dy_height = pw * dx, ph * dy
    max_ratio = abs(math.log(wh_ratio_clip))
    if add_ctr_clamp:
        dx_width = torch.clamp(dx_width, max=ctr_clamp, min=-ctr_clamp)
        dy_height = torch.clamp(dy_height, max=ctr_clamp, min=-ctr_clamp)
        dw, dh = torch.clamp(dw, max=max_ratio), torch.clamp(dh, max=max_ratio)
    else:
        dw, dh = dw.clamp(min=-max_ratio, max=max_ratio), dh.clamp(min=-max_ratio, max=max_ratio)
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + dx_width, py + dy_height
    bboxes = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=-1).view(deltas.size())
    if clip_border and max_shape is not None:
        if not isinstance(max_shape, torch.Tensor):
            max_shape = x1.new_tensor(max_shape)
        max_shape = max_shape[..., :2].type_as(x1)
        min_xy = x1.new_tensor(0)
        max_xy = torch.cat([max_shape] * (deltas.size(-1) // 2), dim=-1).flip(-1).unsqueeze(-2)
        bboxes = torch.where(bboxes < min_xy, min_xy, bboxes)
        bboxes = torch.where(bboxes > max_xy, max_xy, bboxes)
    return bboxes


CONFIGS = [
    dict(),
    dict(target_stds=(0.1, 0.1, 0.2, 0.2)),
    dict(target_means=(0.05, -0.05, 0.0, 0.1), target_stds=(0.5, 0.5, 1.0, 1.0), clip_border=False),
    dict(add_ctr_clamp=True, ctr_clamp=32),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_delta_xywh_coder_matches_mmdet(cfg, batched, num_classes):
    coder = DeltaXYWHBBoxCoder(**cfg)
    full = dict(target_means=(0.0,) * 4, target_stds=(1.0,) * 4, clip_border=True, add_ctr_clamp=False,
                ctr_clamp=32)
    full.update(cfg)
    n = 500
    rois = torch.stack([random_boxes(n), random_boxes(n)]) if batched else random_boxes(n)
    deltas = torch.randn(*rois.shape[:-1], 4 * num_classes) * 2.0
    max_shape = [(IMAGE_H, IMAGE_W, 3), (600, 900, 3)] if batched else (IMAGE_H, IMAGE_W, 3)
    expected = mmdet_onnx_delta2bbox(rois, deltas, full["target_means"], full["target_stds"], max_shape, 16 / 1000,
                                     full["clip_border"], full["add_ctr_clamp"], full["ctr_clamp"])
    for backend in usable_backends("cpu", "decode_boxes"):
        if backend == "triton" and (batched or num_classes > 1):
            continue  # the interpreter is slow; one shape covers it
        with fastbb.use_backend(backend):
            decoded = coder.decode(rois, deltas, max_shape=max_shape)
            decoded_ratio = coder.decode(rois, deltas, max_shape=max_shape, wh_ratio_clip=0.1)
        assert decoded.shape == deltas.shape
        torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=2e-4)
        expected_ratio = mmdet_onnx_delta2bbox(rois, deltas, full["target_means"], full["target_stds"], max_shape,
                                               0.1, full["clip_border"], full["add_ctr_clamp"], full["ctr_clamp"])
        torch.testing.assert_close(decoded_ratio, expected_ratio, rtol=1e-5, atol=2e-4)

    gt = random_boxes(n) if not batched else torch.stack([random_boxes(n), random_boxes(n)])
    torch.testing.assert_close(coder.encode(rois, gt), mmdet_bbox2delta(rois, gt, full["target_means"],
                                                                         full["target_stds"]), rtol=0, atol=0)


def test_delta_xywh_coder_max_shape_forms():
    coder = DeltaXYWHBBoxCoder()
    rois = torch.stack([random_boxes(50), random_boxes(50)])
    deltas = torch.randn(2, 50, 4) * 2
    as_list = coder.decode(rois, deltas, max_shape=[(300, 400), (500, 200)])
    as_tensor = coder.decode(rois, deltas, max_shape=torch.tensor([[300, 400, 3], [500, 200, 3]]))
    torch.testing.assert_close(as_list, as_tensor)
    assert as_list[0, :, 0::2].max() <= 400 and as_list[1, :, 1::2].max() <= 500
    single = coder.decode(rois[0], deltas[0], max_shape=torch.tensor([300, 400]))
    torch.testing.assert_close(single, as_list[0])


def test_delta_xywh_coder_attributes_and_build():
    coder = fastbb.build(dict(type="DeltaXYWHBBoxCoder", target_stds=(0.1, 0.1, 0.2, 0.2)))
    assert isinstance(coder, DeltaXYWHBBoxCoder) and not isinstance(coder, torch.nn.Module)
    assert coder.stds == (0.1, 0.1, 0.2, 0.2) and coder.means == (0.0,) * 4 and coder.encode_size == 4
    assert coder.clip_border and not coder.add_ctr_clamp and coder.ctr_clamp == 32 and not coder.use_box_type
    assert isinstance(fastbb.build(dict(type="BoxCoder", weights=(1.0, 1.0, 1.0, 1.0))), BoxCoder)


def test_delta_xywh_coder_errors(without_openmmlab):
    with pytest.raises(ValueError, match="HorizontalBoxes"):
        DeltaXYWHBBoxCoder(use_box_type=True)
    coder = DeltaXYWHBBoxCoder()
    with pytest.raises(ValueError, match="do not match"):
        coder.decode(random_boxes(5), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="one shape"):
        coder.encode(random_boxes(5), random_boxes(5).reshape(5, 1, 4))
