"""fastbb.ops RetinaNet training loss: match_anchors against torchvision's Matcher on box_iou, image by image
(bit for bit), retinanet_loss against torchvision's own RetinaNet.compute_loss (values and gradients), and
the loss's promise of no host synchronisation (fake CUDA tensors, counted syncs, torch.compile fullgraph)."""
import math
import types

import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import boxes as box_ops

import fastbb
from fastbb.ops._common import ValueAssertionError
from fastbb.ops.retinanet_loss import BOX_LOSSES, match_anchors_reference, retinanet_loss_reference
from conftest import TOLERANCES, check_forced_backends, usable_backends

IMAGE_SIZE = 128
FEATURE_SIZES = (16, 8, 4, 2, 1)  # P3..P7 of a 128 x 128 image: 3,069 anchors
NUM_CLASSES = 5


def backends(device="cpu"):
    return usable_backends(device, "match_anchors")


# ---- inputs ----------------------------------------------------------------------------------------------

def random_boxes(count, dtype=torch.float64, low=8.0, high=100.0, size=IMAGE_SIZE):
    """Boxes inside the image with sides in [low, high), coordinates on a quarter-pixel grid (exact in every
    dtype, and equal overlaps between different pairs are likely: ties)."""
    wh = torch.empty(count, 2, dtype=torch.float64).uniform_(low, high)
    x1y1 = torch.rand(count, 2, dtype=torch.float64) * (size - wh).clamp(min=1)
    return (torch.cat((x1y1, x1y1 + wh), -1) * 4).round().div(4).to(dtype)


def tv_anchors(num_images, dtype):
    """torchvision's RetinaNet anchors for a batch of 128 x 128 images (one (A, 4) tensor per image)."""
    generator = tv_retinanet._default_anchorgen()
    images = ImageList(torch.zeros(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=dtype),
                       [(IMAGE_SIZE, IMAGE_SIZE)] * num_images)
    features = [torch.zeros(num_images, 1, s, s, dtype=dtype) for s in FEATURE_SIZES]
    return generator(images, features)


def tied_targets(counts, anchors, dtype):
    """Per image: random boxes, one duplicate of an earlier box and one box equal to an anchor (IoU 1, tied
    with its duplicate), so ties on both sides of the matcher occur."""
    targets = []
    for count in counts:
        boxes = random_boxes(count, dtype)
        if count >= 3:
            boxes[count - 1] = boxes[0]
            boxes[1] = anchors[torch.randint(anchors.shape[0], ()).item()].to(dtype)
            boxes[count - 2] = boxes[1]
        targets.append(boxes)
    return targets


def padded(boxes_per_image, num_gt=None, labels_per_image=None):
    """Pads the per-image boxes to (N, G, 4) with garbage rows (random boxes, anchors' neighbours), which a
    correct matcher never reads."""
    num_gt = max([b.shape[0] for b in boxes_per_image] + [num_gt or 0])
    dtype = boxes_per_image[0].dtype
    gt = torch.stack([torch.cat((b, random_boxes(num_gt - b.shape[0], dtype))) for b in boxes_per_image])
    counts = torch.tensor([b.shape[0] for b in boxes_per_image])
    if labels_per_image is None:
        return gt, counts
    labels = torch.stack([torch.cat((lab, torch.randint(-5, 50, (num_gt - lab.shape[0],))))
                          for lab in labels_per_image])
    return gt, labels, counts


def torchvision_matches(anchors, gt, high, low, allow_low_quality):
    """torchvision's per-image matching, as RetinaNet.compute_loss does it."""
    if gt.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64)
    return det_utils.Matcher(high, low, allow_low_quality)(box_ops.box_iou(gt, anchors))


# ---- match_anchors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("allow_low_quality", (True, False))
@pytest.mark.parametrize("per_image_anchors", (False, True))
def test_match_anchors_is_torchvisions_matcher(backend, dtype, allow_low_quality, per_image_anchors):
    anchors = tv_anchors(4, dtype)[0]
    counts = (7, 0, 1, 12)
    boxes = tied_targets(counts, anchors, dtype)
    gt, gt_counts = padded(boxes, num_gt=15)
    if per_image_anchors:
        # Each image its own anchors: shifted copies (a different IoU matrix per image).
        batch_anchors = torch.stack([anchors + 2.5 * i for i in range(len(counts))])
    else:
        batch_anchors = anchors
    with fastbb.use_backend(backend):
        got = fastbb.ops.match_anchors(batch_anchors, gt, gt_counts, 0.5, 0.4, allow_low_quality)
    assert got.dtype == torch.int64 and got.shape == (len(counts), anchors.shape[0])
    for i, count in enumerate(counts):
        image_anchors = batch_anchors[i] if per_image_anchors else anchors
        expected = torchvision_matches(image_anchors, boxes[i], 0.5, 0.4, allow_low_quality)
        assert torch.equal(got[i], expected), i
    # The test is about something: foreground, ignored and background anchors all occur, and ties too.
    assert {-2, -1, 0}.issubset(set(got.unique().tolist()))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_match_anchors_ties_and_thresholds_at_exact_values(backend, dtype):
    """Anchors on an integer grid and gts built from them: exact IoUs of 1, 0.5 and 0.4 (on the thresholds),
    equal IoUs with several gts (the first wins), a gt whose best anchors tie, and a gt with no overlap at
    all (its best IoU is 0: every anchor ties, so low-quality matching restores all of their own matches)."""
    xs = torch.arange(0, 40, 4, dtype=dtype)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    anchors = torch.cat((grid, grid + 8), -1)  # 8 x 8 anchors every 4 pixels
    gts = [
        torch.tensor([[0, 0, 8, 8], [0, 0, 8, 8], [4, 0, 12, 8], [0, 0, 16, 8]], dtype=dtype),  # IoU 1, 1/3, 1/2
        torch.tensor([[0, 0, 8, 10], [2, 2, 10, 10], [100, 100, 120, 120]], dtype=dtype),  # 0.8, 0.39, none
        torch.tensor([[1000, 1000, 1001, 1001]], dtype=dtype),
    ]
    gt, counts = padded(gts, num_gt=6)
    for allow in (True, False):
        for high, low in ((0.5, 0.4), (0.5, 0.5), (1.0, 0.0), (0.4, 0.4)):
            with fastbb.use_backend(backend):
                got = fastbb.ops.match_anchors(anchors, gt, counts, high, low, allow)
            for i in range(len(gts)):
                assert torch.equal(got[i], torchvision_matches(anchors, gts[i], high, low, allow)), (i, high, low)


# Zero-area gts and anchors make 0 / 0 = NaN IoUs: torch.max picks NaN as the maximum (so the anchor keeps that
# gt, NaN being below no threshold), and no anchor equals a NaN best, as in torchvision. A NaN coordinate makes
# every IoU of its box NaN (torch.maximum / minimum propagate it), whichever argument of the comparison it is.
_NAN = math.nan
NAN_CASES = {
    "degenerate boxes": (torch.tensor([[0, 0, 0, 0], [0, 0, 4, 4], [10, 10, 10, 10], [2, 2, 6, 6], [0, 0, 4, 4.]]),
                         [torch.tensor([[1, 1, 3, 3], [0, 0, 0, 0], [10, 10, 10, 10.]]),
                          torch.tensor([[0, 0, 4, 4.]])]),
    "NaN coordinates": (torch.tensor([[0, 0, 4, 4], [_NAN, 0, 4, 4], [0, 0, 4, _NAN], [1, 1, 5, 5], [2, 0, 6, 4.]]),
                        [torch.tensor([[0, 0, 4, 4], [0, _NAN, 3, 3], [1, 1, 5, 5.]]),
                         torch.tensor([[2, 0, _NAN, 4.]])]),
}


@pytest.mark.parametrize("case", list(NAN_CASES))
@pytest.mark.parametrize("backend", backends())
def test_match_anchors_nan_ious_as_torchvision(backend, case):
    anchors, gts = NAN_CASES[case]
    gt, counts = padded(gts, num_gt=4)
    for allow in (True, False):
        with fastbb.use_backend(backend):
            got = fastbb.ops.match_anchors(anchors, gt, counts, 0.5, 0.4, allow)
        for i in range(len(gts)):
            assert torch.equal(got[i], torchvision_matches(anchors, gts[i], 0.5, 0.4, allow)), (i, allow)


@pytest.mark.parametrize("backend", backends())
def test_match_anchors_mixed_and_16_bit_dtypes(backend):
    """Boxes of two dtypes are compared in the promoted one, as box_iou does; two 16-bit sets keep their
    overlaps' 16-bit rounding (with the reference, whatever backend is asked for)."""
    anchors32 = tv_anchors(1, torch.float32)[0]
    boxes = tied_targets((9, 4), anchors32, torch.float32)
    gt, counts = padded(boxes)
    for anchors_dtype, gt_dtype in ((torch.float16, torch.float32), (torch.float32, torch.float64),
                                    (torch.float16, torch.float16), (torch.bfloat16, torch.float16)):
        anchors = anchors32.to(anchors_dtype)
        with fastbb.use_backend(backend):
            got = fastbb.ops.match_anchors(anchors, gt.to(gt_dtype), counts)
        for i in range(len(boxes)):
            expected = torchvision_matches(anchors, boxes[i].to(gt_dtype), 0.5, 0.4, True)
            assert torch.equal(got[i], expected), (anchors_dtype, gt_dtype, i)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("allow_low_quality", (True, False))
def test_cuda_match_anchors_is_torchvisions_matcher(dtype, allow_low_quality):
    """Every CUDA backend (the Triton kernels) on a real device: the matches of torchvision's Matcher, ties and
    IoUs of exactly 0.4 / 0.5 included (no fused multiply-add, correctly rounded division)."""
    anchors = tv_anchors(4, dtype)[0]
    counts = (7, 0, 1, 12)
    boxes = tied_targets(counts, anchors, dtype)
    gt, gt_counts = padded(boxes, num_gt=15)
    for backend in backends("cuda"):
        with fastbb.use_backend(backend):
            got = fastbb.ops.match_anchors(anchors.cuda(), gt.cuda(), gt_counts.cuda(), 0.5, 0.4,
                                           allow_low_quality).cpu()
        for i in range(len(counts)):
            assert torch.equal(got[i], torchvision_matches(anchors, boxes[i], 0.5, 0.4, allow_low_quality)), (backend, i)


def test_match_anchors_empty_shapes():
    anchors = tv_anchors(1, torch.float32)[0]
    assert torch.equal(fastbb.ops.match_anchors(anchors, torch.zeros(3, 0, 4), torch.zeros(3, dtype=torch.int64)),
                       torch.full((3, anchors.shape[0]), -1))
    assert fastbb.ops.match_anchors(anchors[:0], torch.zeros(2, 4, 4), torch.tensor([1, 4])).shape == (2, 0)
    assert fastbb.ops.match_anchors(anchors, torch.zeros(0, 4, 4), torch.zeros(0, dtype=torch.int64)).shape == \
        (0, anchors.shape[0])


def test_match_anchors_forced_backends(monkeypatch):
    anchors = tv_anchors(1, torch.float32)[0]
    gt, counts = padded(tied_targets((5, 2), anchors, torch.float32))
    check_forced_backends(monkeypatch, "match_anchors", lambda: fastbb.ops.match_anchors(anchors, gt, counts))


@pytest.mark.parametrize("backend", backends())
def test_match_anchors_opcheck(backend):
    anchors = tv_anchors(1, torch.float32)[0][None]
    gt, counts = padded(tied_targets((5, 0, 3), anchors[0], torch.float32))
    with fastbb.use_backend(backend):
        torch.library.opcheck(torch.ops.fastbb.match_anchors.default, (anchors, gt, counts, 0.5, 0.4, True))


def test_match_anchors_reference_is_the_reference():
    anchors = tv_anchors(1, torch.float64)[0]
    gt, counts = padded(tied_targets((6, 3), anchors, torch.float64))
    assert torch.equal(match_anchors_reference(anchors, gt, counts), fastbb.ops.match_anchors(anchors, gt, counts))


# ---- retinanet_loss against torchvision's RetinaNet.compute_loss -----------------------------------------

def torchvision_loss(cls_logits, bbox_regression, anchors, targets, box_loss, allow_low_quality=True):
    """torchvision's own RetinaNet.compute_loss (its matcher, its classification and regression heads), run
    on a stand-in holding just what the method reads."""
    head = tv_retinanet.RetinaNetHead(4, 9, cls_logits.shape[-1])
    head.regression_head._loss_type = box_loss
    model = types.SimpleNamespace(proposal_matcher=det_utils.Matcher(0.5, 0.4, allow_low_quality), head=head)
    return tv_retinanet.RetinaNet.compute_loss(model, targets, {"cls_logits": cls_logits,
                                                                "bbox_regression": bbox_regression}, anchors)


def loss_case(counts, dtype, num_classes=NUM_CLASSES, num_gt=None):
    anchors = tv_anchors(len(counts), dtype)
    boxes = tied_targets(counts, anchors[0], dtype)
    labels = [torch.randint(0, num_classes, (c,)) for c in counts]
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    num_anchors = anchors[0].shape[0]
    cls_logits = (torch.randn(len(counts), num_anchors, num_classes, dtype=torch.float64) * 2 - 2).to(dtype)
    bbox_regression = (torch.randn(len(counts), num_anchors, 4, dtype=torch.float64) * 0.3).to(dtype)
    gt, gt_labels, gt_counts = padded(boxes, num_gt, labels)
    return anchors, targets, cls_logits, bbox_regression, gt, gt_labels, gt_counts


def losses_and_grads(fn, cls_logits, bbox_regression, *args, **kwargs):
    x = cls_logits.detach().clone().requires_grad_()
    d = bbox_regression.detach().clone().requires_grad_()
    out = fn(x, d, *args, **kwargs)
    total = out["classification"] * 0.7 + out["bbox_regression"] * 1.3
    grads = torch.autograd.grad(total, (x, d))
    return {k: v.detach() for k, v in out.items()}, grads


COUNTS = {"varied": (3, 11, 1), "one image without boxes": (6, 0, 9), "no boxes at all": (0, 0), "one image": (4,)}


@pytest.mark.parametrize("box_loss", BOX_LOSSES)
@pytest.mark.parametrize("counts", list(COUNTS))
def test_loss_matches_torchvision_float64(box_loss, counts):
    anchors, targets, cls_logits, bbox_regression, gt, gt_labels, gt_counts = loss_case(COUNTS[counts],
                                                                                        torch.float64, num_gt=14)
    theirs, their_grads = losses_and_grads(torchvision_loss, cls_logits, bbox_regression, anchors, targets, box_loss)
    for shared_anchors in (True, False):
        batch_anchors = anchors[0] if shared_anchors else torch.stack(anchors)
        ours, our_grads = losses_and_grads(fastbb.ops.retinanet_loss, cls_logits, bbox_regression, batch_anchors,
                                           gt, gt_labels, gt_counts, box_loss=box_loss)
        for key in ("classification", "bbox_regression"):
            assert ours[key].dtype == torch.float64
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12)
        for got, expected in zip(our_grads, their_grads):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    if sum(COUNTS[counts]) > 0:  # the case is about something: foreground anchors and a box loss
        assert float(theirs["bbox_regression"]) > 0 and float(their_grads[1].abs().sum()) > 0


@pytest.mark.parametrize("box_loss", ("l1", "giou"))
def test_loss_matches_torchvision_float32(box_loss):
    anchors, targets, cls_logits, bbox_regression, gt, gt_labels, gt_counts = loss_case((5, 0, 13, 2), torch.float32)
    theirs, their_grads = losses_and_grads(torchvision_loss, cls_logits, bbox_regression, anchors, targets, box_loss)
    ours, our_grads = losses_and_grads(fastbb.ops.retinanet_loss, cls_logits, bbox_regression, anchors[0], gt,
                                       gt_labels, gt_counts, box_loss=box_loss)
    for key in ("classification", "bbox_regression"):
        assert ours[key].dtype == torch.float32
        torch.testing.assert_close(ours[key], theirs[key], **TOLERANCES[torch.float32])
    for got, expected in zip(our_grads, their_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_loss_thresholds_and_focal_parameters_reach_their_ops():
    """Non-default matcher and focal settings give what torchvision gives with the same settings."""
    anchors, targets, cls_logits, bbox_regression, gt, gt_labels, gt_counts = loss_case((8, 3), torch.float64)
    ours = fastbb.ops.retinanet_loss(cls_logits, bbox_regression, anchors[0], gt, gt_labels, gt_counts,
                                     allow_low_quality_matches=False, focal_alpha=0.5, focal_gamma=1.0,
                                     box_coder_weights=(2.0, 2.0, 1.0, 1.0))
    head = tv_retinanet.RetinaNetHead(4, 9, NUM_CLASSES)
    head.regression_head.box_coder = det_utils.BoxCoder((2.0, 2.0, 1.0, 1.0))
    model = types.SimpleNamespace(proposal_matcher=det_utils.Matcher(0.5, 0.4, False), head=head)
    focal = torchvision.ops.sigmoid_focal_loss
    try:
        tv_retinanet.sigmoid_focal_loss = lambda x, t, reduction: focal(x, t, alpha=0.5, gamma=1.0,
                                                                        reduction=reduction)
        theirs = tv_retinanet.RetinaNet.compute_loss(model, targets, {"cls_logits": cls_logits,
                                                                      "bbox_regression": bbox_regression}, anchors)
    finally:
        tv_retinanet.sigmoid_focal_loss = focal
    for key in ("classification", "bbox_regression"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-10, atol=1e-12)
    default = fastbb.ops.retinanet_loss(cls_logits, bbox_regression, anchors[0], gt, gt_labels, gt_counts)
    assert not torch.allclose(default["classification"], ours["classification"])


# torchvision's two heads' losses (v1 "l1", v2 "giou"); the others' gradients are compared with torchvision's
# in test_loss_matches_torchvision_float64. ("ciou" would fail here: torchvision's CIoU holds its trade-off
# weight constant in the gradient, so its gradient is knowingly not the derivative.)
@pytest.mark.parametrize("box_loss", ("l1", "giou"))
def test_loss_gradcheck(box_loss):
    """Numerical gradients of both losses (float64), on a small batch: 16 anchors, 2 classes (the full
    Jacobian: gradcheck's fast_mode, random projections, missed CIoU's constant weight where this does not)."""
    xy = torch.randint(0, 40, (16, 2)).double()
    anchors = torch.cat((xy, xy + torch.randint(6, 20, (16, 2)).double()), -1)
    gt = torch.stack([torch.cat((anchors[:3] + 1.5, anchors[:1] - 1)), anchors[4:8] + 0.5])
    labels, counts = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 0]]), torch.tensor([4, 3])
    x = torch.randn(2, 16, 2, dtype=torch.float64, requires_grad=True)
    d = (torch.randn(2, 16, 4, dtype=torch.float64) * 0.2).requires_grad_()

    def losses(x, d):
        out = fastbb.ops.retinanet_loss(x, d, anchors, gt, labels, counts, box_loss=box_loss)
        return out["classification"], out["bbox_regression"]
    assert (fastbb.ops.match_anchors(anchors, gt, counts) >= 0).sum() >= 4  # foreground anchors: a box loss
    assert torch.autograd.gradcheck(losses, (x, d))


def test_loss_reference_gives_the_same():
    anchors, _, cls_logits, bbox_regression, gt, gt_labels, gt_counts = loss_case((4, 7), torch.float64)
    ours = fastbb.ops.retinanet_loss(cls_logits, bbox_regression, anchors[0], gt, gt_labels, gt_counts,
                                     box_loss="giou")
    reference = retinanet_loss_reference(cls_logits, bbox_regression, anchors[0], gt, gt_labels, gt_counts,
                                         box_loss="giou")
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-12, atol=1e-14)


def test_loss_under_autocast_is_float32():
    anchors, targets, cls_logits, bbox_regression, gt, gt_labels, gt_counts = loss_case((5, 2), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fastbb.ops.retinanet_loss(cls_logits.bfloat16(), bbox_regression.bfloat16(), anchors[0].bfloat16(),
                                         gt, gt_labels, gt_counts)
    theirs = torchvision_loss(cls_logits.bfloat16().float(), bbox_regression.bfloat16().float(),
                              [a.bfloat16().float() for a in anchors], targets, "l1")
    for key in ("classification", "bbox_regression"):
        assert ours[key].dtype == torch.float32
        torch.testing.assert_close(ours[key], theirs[key], **TOLERANCES[torch.float32])


def test_pad_targets():
    boxes = [random_boxes(3, torch.float32), random_boxes(0, torch.float32), random_boxes(5, torch.float32)]
    labels = [torch.tensor([1, 0, 4]), torch.zeros(0, dtype=torch.int64), torch.tensor([2, 2, 3, 0, 1])]
    gt, gt_labels, counts = fastbb.ops.pad_targets([{"boxes": b, "labels": lab, "image_id": 3}
                                                    for b, lab in zip(boxes, labels)], num_classes=5)
    assert gt.shape == (3, 5, 4) and gt_labels.shape == (3, 5) and counts.tolist() == [3, 0, 5]
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        assert torch.equal(gt[i, :len(b)], b) and torch.equal(gt_labels[i, :len(b)], lab)
        assert (gt[i, len(b):] == 0).all() and (gt_labels[i, len(b):] == -1).all()
    with pytest.raises(ValueError, match=r"^fastbb.pad_targets: targets\[1\]\['labels'\] must be in \[0, 5\)"):
        fastbb.ops.pad_targets([{"boxes": boxes[0], "labels": labels[0]},
                                {"boxes": boxes[2], "labels": labels[2] + 3}], num_classes=5)
    with pytest.raises(ValueError, match=r"^fastbb.pad_targets: targets\[0\]\['boxes'\] must be"):
        fastbb.ops.pad_targets([{"boxes": torch.zeros(3, 5), "labels": labels[0]}])
    with pytest.raises(TypeError, match="^fastbb.pad_targets: targets must be a list"):
        fastbb.ops.pad_targets({"boxes": boxes[0], "labels": labels[0]})


# ---- no host synchronisation -----------------------------------------------------------------------------

def test_loss_runs_on_fake_tensors():
    """With fake tensors (no data), reading a value (.item(), bool of a tensor) or a data-dependent shape
    (boolean indexing, nonzero) raises: the loss runs, so it never waits for the device. The forward runs on
    fake CUDA tensors; forward and backward on fake CPU ones (autograd on CUDA needs a real device)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
    anchors, _, cls_logits, bbox_regression, gt, gt_labels, gt_counts = loss_case((5, 0, 2), torch.float32)
    inputs = (cls_logits, bbox_regression, anchors[0], gt, gt_labels, gt_counts)
    for device in ("cuda", "cpu"):
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            fake = [mode.from_tensor(t).to(device) for t in inputs]
            for box_loss in BOX_LOSSES:
                x, d = fake[0].clone().requires_grad_(device == "cpu"), fake[1].clone().requires_grad_(device == "cpu")
                out = fastbb.ops.retinanet_loss(x, d, *fake[2:], box_loss=box_loss)
                assert out["classification"].device.type == device and out["bbox_regression"].shape == ()
                if device == "cpu":
                    grads = torch.autograd.grad(out["classification"] + out["bbox_regression"], (x, d))
                    assert grads[0].shape == cls_logits.shape and grads[1].shape == bbox_regression.shape
            # The check itself can fail: a data-dependent shape raises here.
            with pytest.raises(DynamicOutputShapeException):
                fake[4][fake[4] > 0].sum()
            with pytest.raises(DataDependentOutputException):
                fake[5].sum().item()


def test_loss_reads_no_values_on_cpu(monkeypatch):
    """On CPU tensors, counts every Python-level read of a tensor's values during the loss (forward and
    backward): there are none."""
    anchors, _, cls_logits, bbox_regression, gt, gt_labels, gt_counts = loss_case((5, 0, 2), torch.float32)
    reads = []
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    for fn in ("nonzero", "argwhere", "masked_select", "unique"):
        original = getattr(torch, fn)

        def counted_fn(*args, _original=original, _name=fn, **kwargs):
            reads.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(torch, fn, counted_fn)
    x = cls_logits.requires_grad_()
    for box_loss in ("l1", "smooth_l1", "giou"):
        out = fastbb.ops.retinanet_loss(x, bbox_regression, anchors[0], gt, gt_labels, gt_counts, box_loss=box_loss)
        out["classification"].backward()
    assert reads == []
    bool(gt_counts[0] > 0)  # the counter counts
    assert reads == ["__bool__"]


def test_loss_compiles_fullgraph():
    anchors, _, cls_logits, bbox_regression, gt, gt_labels, gt_counts = loss_case((3, 0), torch.float32)

    def train_step(x, d, a, g, lab, c):
        out = fastbb.ops.retinanet_loss(x, d, a, g, lab, c, box_loss="giou")
        return out["classification"] + out["bbox_regression"]

    compiled = torch.compile(train_step, fullgraph=True)
    x, d = cls_logits.clone().requires_grad_(), bbox_regression.clone().requires_grad_()
    total = compiled(x, d, anchors[0], gt, gt_labels, gt_counts)
    total.backward()
    y, e = cls_logits.clone().requires_grad_(), bbox_regression.clone().requires_grad_()
    expected = train_step(y, e, anchors[0], gt, gt_labels, gt_counts)
    expected.backward()
    torch.testing.assert_close(total, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(x.grad, y.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(d.grad, e.grad, **TOLERANCES[torch.float32])


# ---- bad inputs ------------------------------------------------------------------------------------------

def _good_args():
    anchors = torch.tensor([[0, 0, 10, 10], [5, 5, 20, 20.]])
    return dict(cls_logits=torch.zeros(2, 2, 3), bbox_regression=torch.zeros(2, 2, 4), anchors=anchors,
                gt_boxes=torch.tensor([[[0, 0, 10, 10.]], [[1, 1, 4, 4.]]]), gt_labels=torch.tensor([[1], [2]]),
                gt_counts=torch.tensor([1, 0]))


BAD_LOSS_CALLS = {
    "cls_logits 2-D": (dict(cls_logits=torch.zeros(2, 3)), RuntimeError, "cls_logits"),
    "cls_logits integer": (dict(cls_logits=torch.zeros(2, 2, 3, dtype=torch.int64)), RuntimeError, "cls_logits"),
    "bbox_regression other anchors": (dict(bbox_regression=torch.zeros(2, 3, 4)), RuntimeError, "bbox_regression"),
    "anchors other count": (dict(anchors=torch.zeros(3, 4)), RuntimeError, "anchors"),
    "anchors (A, 5)": (dict(anchors=torch.zeros(2, 5)), RuntimeError, "anchors"),
    "gt_boxes 2-D": (dict(gt_boxes=torch.zeros(2, 4)), RuntimeError, "gt_boxes"),
    "gt_boxes other batch": (dict(gt_boxes=torch.zeros(3, 1, 4)), RuntimeError, "gt_boxes"),
    "gt_labels float": (dict(gt_labels=torch.zeros(2, 1)), RuntimeError, "gt_labels"),
    "gt_labels other shape": (dict(gt_labels=torch.zeros(2, 2, dtype=torch.int64)), RuntimeError, "gt_labels"),
    "gt_counts float": (dict(gt_counts=torch.zeros(2)), RuntimeError, "gt_counts"),
    "gt_counts other shape": (dict(gt_counts=torch.zeros(3, dtype=torch.int64)), RuntimeError, "gt_counts"),
    "box_loss unknown": (dict(box_loss="iou"), AssertionError, "box_loss"),
    "thresholds reversed": (dict(fg_iou_thresh=0.3), AssertionError, "bg_iou_thresh"),
    "focal_gamma negative": (dict(focal_gamma=-1.0), RuntimeError, "focal_gamma"),
    "box_coder_weights three": (dict(box_coder_weights=(1.0, 1.0, 1.0)), RuntimeError, "box_coder_weights"),
}


@pytest.mark.parametrize("case", list(BAD_LOSS_CALLS))
def test_bad_loss_inputs(case):
    change, error, argument = BAD_LOSS_CALLS[case]
    args = {**_good_args(), **change}
    with pytest.raises(error, match=rf"^fastbb\.retinanet_loss: {argument}\b") as info:
        fastbb.ops.retinanet_loss(**args)
    assert isinstance(info.value, (ValueError, TypeError))


def test_bad_match_inputs():
    anchors, gt, counts = torch.zeros(5, 4), torch.zeros(2, 3, 4), torch.tensor([1, 3])
    fastbb.ops.match_anchors(anchors, gt, counts)  # the good call runs
    with pytest.raises(ValueError, match=r"^fastbb\.match_anchors: anchors must be \(A, 4\) or \(N, A, 4\)"):
        fastbb.ops.match_anchors(torch.zeros(1, 1, 5, 4), gt, counts)
    with pytest.raises(ValueError, match=r"^fastbb\.match_anchors: per-image anchors"):
        fastbb.ops.match_anchors(torch.zeros(3, 5, 4), gt, counts)
    with pytest.raises(TypeError, match=r"^fastbb\.match_anchors: gt_boxes must be floating"):
        fastbb.ops.match_anchors(anchors, gt.long(), counts)
    with pytest.raises(ValueAssertionError, match=r"^fastbb\.match_anchors: bg_iou_thresh"):
        fastbb.ops.match_anchors(anchors, gt, counts, 0.3, 0.4)
    with pytest.raises(TypeError, match=r"^fastbb\.match_anchors: allow_low_quality_matches"):
        fastbb.ops.match_anchors(anchors, gt, counts, 0.5, 0.4, 1)
    with pytest.raises(RuntimeError, match=r"^fastbb\.match_anchors: gt_counts must be \(N,\)"):
        fastbb.ops.match_anchors(anchors, gt, counts[:1])
