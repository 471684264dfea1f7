"""fastbb.ops.retinanet_postprocess against torchvision RetinaNet.postprocess_detections and the reference."""
import importlib
import types

import pytest
import torch
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import BoxCoder

import fastbb
from fastbb.ops.retinanet_postprocess import (
    _check_inputs, _postprocess_batched, retinanet_postprocess, retinanet_postprocess_reference)

from conftest import TOLERANCES, check_forced_backends, usable_backends

# "batched" is the fixed-shape GPU path (PyTorch + fastbb ops), run here on CPU tensors with its inner ops
# on their default CPU backends.
CPU_PATHS = [b for b in usable_backends("cpu", "retinanet_postprocess") if b in ("reference", "cpp")] + ["batched"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _problem(batch, levels, num_classes, dtype=torch.float32, mean=-3.0, device="cpu"):
    """Head outputs, per-image anchors (distinct per image) and per-image sizes; anchors spill over the
    image borders so that clipping matters."""
    num_anchors = sum(levels)
    cls_logits = (torch.randn(batch, num_anchors, num_classes) * 1.5 + mean).to(dtype)
    bbox_regression = (torch.randn(batch, num_anchors, 4) * 0.5).to(dtype)
    anchors = []
    for _ in range(batch):
        centre = torch.rand(num_anchors, 2) * torch.tensor([520.0, 420.0])
        size = torch.rand(num_anchors, 2) * 180 + 16
        anchors.append(torch.cat((centre - size / 2, centre + size / 2), -1).to(dtype).to(device))
    image_sizes = [(int(torch.randint(200, 400, ())), int(torch.randint(200, 500, ()))) for _ in range(batch)]
    return cls_logits.to(device), bbox_regression.to(device), anchors, list(levels), image_sizes


def _torchvision(cls_logits, bbox_regression, anchors, levels, image_sizes, score_thresh=0.05, nms_thresh=0.5,
                 detections_per_img=300, topk_candidates=1000, box_coder_weights=(1.0, 1.0, 1.0, 1.0)):
    """The real RetinaNet.postprocess_detections, called on an object carrying the attributes it reads."""
    model = types.SimpleNamespace(score_thresh=score_thresh, nms_thresh=nms_thresh,
                                  detections_per_img=detections_per_img, topk_candidates=topk_candidates,
                                  box_coder=BoxCoder(weights=box_coder_weights))
    head_outputs = {"cls_logits": list(cls_logits.split(levels, 1)),
                    "bbox_regression": list(bbox_regression.split(levels, 1))}
    return RetinaNet.postprocess_detections(model, head_outputs, [list(a.split(levels)) for a in anchors],
                                            image_sizes)


def _run(path, *args, **kwargs):
    """retinanet_postprocess on one CPU path, as torchvision's list of dicts."""
    if path == "batched":
        boxes, scores, labels, counts = _postprocess_batched(*_check_inputs(*args, **_kwargs(**kwargs)))
        return [{"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
                for i, n in enumerate(counts.tolist())]
    with fastbb.use_backend(path):
        return retinanet_postprocess(*args, **kwargs)


def _kwargs(score_thresh=0.05, nms_thresh=0.5, detections_per_img=300, topk_candidates=1000,
            box_coder_weights=(1.0, 1.0, 1.0, 1.0)):
    return dict(score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                topk_candidates=topk_candidates, box_coder_weights=box_coder_weights)


def assert_same_detections(actual, expected, dtype):
    """Equal up to the order of equal scores: the same score sequence, and each detection of `actual`
    matched to a distinct one of `expected` with a close score, the same label and a close box."""
    tol = TOLERANCES[dtype]
    box_tol = dict(rtol=tol["rtol"], atol=tol["atol"] * 100)  # coordinates are in pixels, up to ~500
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got["boxes"].dtype == want["boxes"].dtype and got["scores"].dtype == want["scores"].dtype
        assert got["labels"].dtype == torch.int64 and want["labels"].dtype == torch.int64
        assert got["boxes"].shape == want["boxes"].shape and got["boxes"].shape[1:] == (4,)
        torch.testing.assert_close(got["scores"], want["scores"], **tol)
        a_s, e_s = got["scores"].double(), want["scores"].double()
        a_b, e_b = got["boxes"].double(), want["boxes"].double()
        score_close = (a_s[:, None] - e_s[None, :]).abs() <= tol["atol"] + tol["rtol"] * e_s.abs()[None, :]
        box_close = ((a_b[:, None] - e_b[None, :]).abs()
                     <= box_tol["atol"] + box_tol["rtol"] * e_b.abs()[None, :]).all(-1)
        candidates = score_close & box_close & (got["labels"][:, None] == want["labels"][None, :])
        used = torch.zeros(e_s.shape[0], dtype=torch.bool)
        for i in range(a_s.shape[0]):
            free = torch.nonzero(candidates[i] & ~used).flatten()
            assert free.numel() > 0, (f"detection {i} (score {a_s[i].item()}, label {got['labels'][i].item()}, "
                                      f"box {a_b[i].tolist()}) has no match")
            used[free[0]] = True


# ---------------------------------------------------------------------------------------------------
# The reference is torchvision
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, levels, num_classes", [(1, (300, 80, 20), 5), (3, (240, 60), 91),
                                                        (2, (150, 40, 12), 20)])
def test_reference_matches_torchvision(dtype, batch, levels, num_classes):
    problem = _problem(batch, levels, num_classes, dtype)
    assert_same_detections(retinanet_postprocess_reference(*problem), _torchvision(*problem), dtype)


@pytest.mark.parametrize("options", [
    dict(topk_candidates=40),                                  # the top-k cut on every level
    dict(detections_per_img=15),                               # truncation after NMS
    dict(score_thresh=0.3, nms_thresh=0.3),
    dict(score_thresh=0.0, nms_thresh=1.0),                    # nothing filtered, nothing suppressed
    dict(box_coder_weights=(10.0, 10.0, 5.0, 5.0)),
])
def test_reference_matches_torchvision_options(options):
    problem = _problem(2, (200, 50, 12), 7, torch.float64)
    assert_same_detections(retinanet_postprocess_reference(*problem, **options),
                           _torchvision(*problem, **options), torch.float64)


def test_reference_matches_torchvision_large():
    # More candidates than topk on the first level, and far more boxes than detections_per_img.
    problem = _problem(2, (1500, 375, 100), 91, torch.float32, mean=-4.0)
    assert_same_detections(retinanet_postprocess_reference(*problem), _torchvision(*problem), torch.float32)


# ---------------------------------------------------------------------------------------------------
# Every path against the reference
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, levels, num_classes", [(1, (300, 80, 20), 5), (3, (250, 60), 91)])
def test_paths_match_reference(path, dtype, batch, levels, num_classes):
    problem = _problem(batch, levels, num_classes, dtype)
    assert_same_detections(_run(path, *problem), retinanet_postprocess_reference(*problem), dtype)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("options", [
    dict(topk_candidates=25), dict(detections_per_img=7), dict(score_thresh=0.5, nms_thresh=0.2),
    dict(score_thresh=0.0), dict(nms_thresh=0.0), dict(box_coder_weights=(10.0, 10.0, 5.0, 5.0)),
])
def test_paths_options(path, options):
    problem = _problem(3, (200, 50, 12), 9, torch.float32)
    assert_same_detections(_run(path, *problem, **options), retinanet_postprocess_reference(*problem, **options),
                           torch.float32)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_large_level_topk(path):
    # ~6% of 2,400 x 91 logits pass: the top-k selection works on thousands of candidates per level.
    problem = _problem(2, (2400, 600, 150, 40, 12), 91, torch.float32, mean=-5.0)
    assert_same_detections(_run(path, *problem), retinanet_postprocess_reference(*problem), torch.float32)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_ties_follow_the_defined_order(path):
    # Few distinct scores (logits on a coarse grid): the top-k cut and NMS meet many equal scores, and
    # every path resolves them the same way (score descending, lower (level, index) first).
    cls_logits, bbox_regression, anchors, levels, sizes = _problem(2, (120, 40), 6)
    cls_logits = (cls_logits * 2).round() / 2
    args = (cls_logits, bbox_regression, anchors, levels, sizes)
    got = _run(path, *args, topk_candidates=30, detections_per_img=40)
    want = retinanet_postprocess_reference(*args, topk_candidates=30, detections_per_img=40)
    for g, w in zip(got, want):
        torch.testing.assert_close(g["scores"], w["scores"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g["boxes"], w["boxes"], rtol=1e-5, atol=1e-3)
        assert torch.equal(g["labels"], w["labels"])


@pytest.mark.parametrize("path", CPU_PATHS)
def test_no_detections(path):
    cls_logits, bbox_regression, anchors, levels, sizes = _problem(3, (50, 20), 4)
    cls_logits[1] = -20.0  # image 1: nothing above the threshold
    out = _run(path, cls_logits, bbox_regression, anchors, levels, sizes)
    assert out[1]["boxes"].shape == (0, 4) and out[1]["scores"].shape == (0,) and out[1]["labels"].shape == (0,)
    assert out[0]["scores"].numel() > 0 and out[2]["scores"].numel() > 0
    assert_same_detections(out, retinanet_postprocess_reference(cls_logits, bbox_regression, anchors, levels, sizes),
                           torch.float32)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_score_thresh_extremes(path):
    cls_logits, bbox_regression, anchors, levels, sizes = _problem(2, (30, 10), 3)
    cls_logits[0, :5] = -200.0  # sigmoid is exactly 0: not above a threshold of 0
    cls_logits[1, :3] = float("nan")  # never a detection
    cls_logits[1, 3:5] = float("inf")  # sigmoid 1: above any threshold < 1
    args = (cls_logits, bbox_regression, anchors, levels, sizes)
    for thresh in (0.0, 0.999, 1.0):
        got = _run(path, *args, score_thresh=thresh, nms_thresh=1.0)
        want = retinanet_postprocess_reference(*args, score_thresh=thresh, nms_thresh=1.0)
        assert_same_detections(got, want, torch.float32)
        assert all(torch.isfinite(d["scores"]).all() for d in got)
    assert all(d["scores"].numel() == 0 for d in _run(path, *args, score_thresh=1.0))
    zero = _run(path, *args, score_thresh=0.0, nms_thresh=1.0, topk_candidates=10**6)
    assert zero[0]["scores"].numel() == 40 * 3 - 5 * 3


@pytest.mark.parametrize("path", CPU_PATHS)
def test_empty_levels_one_class_one_image(path):
    problem = _problem(1, (0, 37, 0, 5), 1)
    assert_same_detections(_run(path, *problem), retinanet_postprocess_reference(*problem), torch.float32)
    empty = _problem(2, (0, 0), 3)
    assert all(d["scores"].numel() == 0 for d in _run(path, *empty))


@pytest.mark.parametrize("path", CPU_PATHS)
def test_non_contiguous_and_tensor_arguments(path):
    cls_logits, bbox_regression, anchors, levels, sizes = _problem(2, (100, 30), 8)
    want = retinanet_postprocess_reference(cls_logits, bbox_regression, anchors, levels, sizes)
    cls_t = cls_logits.transpose(0, 2).contiguous().transpose(0, 2)
    reg_t = bbox_regression.transpose(1, 2).contiguous().transpose(1, 2)
    assert not cls_t.is_contiguous() and not reg_t.is_contiguous()
    stacked = torch.stack(anchors)
    got = _run(path, cls_t, reg_t, stacked, torch.tensor(levels), torch.tensor(sizes))
    assert_same_detections(got, want, torch.float32)


@pytest.mark.parametrize("path", [p for p in CPU_PATHS if p != "batched"])
def test_padded_form(path):
    problem = _problem(3, (150, 40), 10)
    with fastbb.use_backend(path):
        boxes, scores, labels, counts = retinanet_postprocess(*problem, detections_per_img=50, padded=True)
        listed = retinanet_postprocess(*problem, detections_per_img=50)
    assert boxes.shape == (3, 50, 4) and scores.shape == (3, 50) and labels.shape == (3, 50)
    assert counts.dtype == torch.int64 and labels.dtype == torch.int64 and counts.shape == (3,)
    for i, d in enumerate(listed):
        n = int(counts[i])
        assert n == d["scores"].shape[0] <= 50
        assert torch.equal(boxes[i, :n], d["boxes"]) and torch.equal(scores[i, :n], d["scores"])
        assert torch.equal(labels[i, :n], d["labels"])
        assert not boxes[i, n:].any() and not scores[i, n:].any() and not labels[i, n:].any()
    ref = retinanet_postprocess_reference(*problem, detections_per_img=50, padded=True)
    assert torch.equal(ref[3], counts)


def test_batched_path_padding():
    problem = _problem(3, (150, 40), 10)
    problem[0][1] = -30.0  # an image with no detections
    boxes, scores, labels, counts = _postprocess_batched(*_check_inputs(*problem, **_kwargs(detections_per_img=20)))
    assert boxes.shape == (3, 20, 4) and counts.tolist()[1] == 0
    for i, n in enumerate(counts.tolist()):
        assert not boxes[i, n:].any() and not scores[i, n:].any() and not labels[i, n:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_chunk, topk_candidates", [(7, 5), (64, 20), (64, 300), (1000, 40)])
def test_batched_path_segmented_topk(monkeypatch, dtype, max_chunk, topk_candidates):
    """The batched path's two-stage top-k (levels cut into chunks, then each level's chunk winners) with
    chunks small enough that levels span many of them, some shorter than topk_candidates."""
    module = importlib.import_module("fastbb.ops.retinanet_postprocess")  # the package exports the function
    monkeypatch.setattr(module, "_MAX_CHUNK", max_chunk)
    # Levels of unequal size, one empty; logits near the threshold so that many pass it.
    problem = _problem(3, (90, 0, 33, 5), 7, dtype=dtype, mean=-2.5)
    kwargs = _kwargs(topk_candidates=topk_candidates, detections_per_img=60)
    got = _run("batched", *problem, **kwargs)
    want = retinanet_postprocess_reference(*problem, **kwargs)
    assert_same_detections(got, want, dtype)


def test_inputs_unmodified():
    problem = _problem(2, (120, 30), 6)
    before = [t.clone() for t in problem[:2]] + [a.clone() for a in problem[2]]
    for path in CPU_PATHS:
        _run(path, *problem)
    after = list(problem[:2]) + list(problem[2])
    assert all(torch.equal(b, a) for b, a in zip(before, after))


# ---------------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------------

def test_opcheck():
    cls_logits, bbox_regression, anchors, levels, sizes = _problem(2, (60, 20), 5)
    args = _check_inputs(cls_logits, bbox_regression, anchors, levels, sizes, **_kwargs(detections_per_img=30))
    torch.library.opcheck(torch.ops.fastbb.retinanet_postprocess_padded, args)
    if "cpp" in CPU_PATHS:
        torch.library.opcheck(torch.ops.fastbb_C.retinanet_postprocess, args)


def test_forced_backend_runs_its_implementation(monkeypatch):
    problem = _problem(2, (12, 4), 3)
    check_forced_backends(monkeypatch, "retinanet_postprocess",
                          lambda: retinanet_postprocess(*problem, detections_per_img=10))


def test_cuda_implementation_needs_every_inner_cuda_kernel(monkeypatch):
    """The GPU path is a composition of fastbb ops: it is "cuda" only where all their CUDA kernels are built."""
    cuda = next(i for i in fastbb._backend.TABLES["retinanet_postprocess"].implementations if i.backend == "cuda")
    needed = {"fastbb_C::decode_boxes", "fastbb_C::nms_sorted_padded"}
    assert set(cuda.kernel) == needed
    for built in ({"fastbb_C::decode_boxes"}, {"fastbb_C::nms_sorted_padded"}, needed):
        monkeypatch.setattr(fastbb._backend, "has_kernel", lambda name, key: key == "CUDA" and name in built)
        assert cuda.usable("cuda") == (built == needed)
        assert not cuda.usable("cpu")


def test_torch_compile_padded():
    problem = _problem(2, (80, 20), 5)

    def detect(cls_logits, bbox_regression, anchors):
        return retinanet_postprocess(cls_logits, bbox_regression, anchors, problem[3], problem[4],
                                     detections_per_img=40, padded=True)

    compiled = torch.compile(detect, fullgraph=True, backend="aot_eager")
    got = compiled(problem[0], problem[1], torch.stack(problem[2]))
    want = detect(problem[0], problem[1], torch.stack(problem[2]))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def _bad(**changes):
    cls_logits, bbox_regression, anchors, levels, sizes = _problem(2, (20, 5), 3)
    args = dict(cls_logits=cls_logits, bbox_regression=bbox_regression, anchors=anchors,
                num_anchors_per_level=levels, image_sizes=sizes)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, match", [
    (dict(cls_logits=torch.randn(2, 25)), ValueError, "cls_logits must be 3-D"),
    (dict(cls_logits=torch.randint(0, 3, (2, 25, 3))), TypeError, "cls_logits must have dtype"),
    (dict(bbox_regression=torch.randn(2, 25, 5)), ValueError, r"bbox_regression must be \(N, A, 4\)"),
    (dict(bbox_regression=torch.randn(2, 24, 4)), ValueError, r"bbox_regression must be \(N, A, 4\)"),
    (dict(bbox_regression=torch.randn(2, 25, 4, dtype=torch.float64)), TypeError, "bbox_regression must have"),
    (dict(anchors=[torch.rand(25, 4)]), ValueError, "anchors must be a list of N = 2"),
    (dict(anchors=[torch.rand(25, 4), torch.rand(24, 4)]), ValueError, r"anchors\[1\] must be \(A, 4\)"),
    (dict(anchors=[torch.rand(25, 4), torch.randint(0, 9, (25, 4))]), TypeError, r"anchors\[1\] must have dtype"),
    (dict(num_anchors_per_level=[20, 4]), ValueError, "num_anchors_per_level must sum to A = 25"),
    (dict(num_anchors_per_level=[]), ValueError, "num_anchors_per_level must be a non-empty"),
    (dict(num_anchors_per_level=[30, -5]), ValueError, "num_anchors_per_level must be a non-empty"),
    (dict(image_sizes=[(100, 100)]), ValueError, "image_sizes must be a list of N = 2"),
    (dict(image_sizes=[(100, 100), (100,)]), ValueError, r"image_sizes must hold \(h, w\) pairs"),
    (dict(image_sizes=torch.ones(3, 2)), ValueError, "image_sizes must be N = 2"),
    (dict(score_thresh=float("nan")), ValueError, "score_thresh must be finite"),
    (dict(score_thresh=1.5), ValueError, r"score_thresh must be in \[0.0, 1.0\]"),
    (dict(score_thresh=-0.1), ValueError, r"score_thresh must be in \[0.0, 1.0\]"),
    (dict(nms_thresh=float("nan")), ValueError, "nms_thresh must be finite"),
    (dict(nms_thresh=1.01), ValueError, r"nms_thresh must be in \[0.0, 1.0\]"),
    (dict(detections_per_img=0), ValueError, "detections_per_img must be an integer >= 1"),
    (dict(topk_candidates=0), ValueError, "topk_candidates must be an integer >= 1"),
    (dict(topk_candidates=2.5), ValueError, "topk_candidates must be an integer >= 1"),
    (dict(box_coder_weights=(1.0, 0.0, 1.0, 1.0)), ValueError, "box_coder_weights must be 4 finite nonzero"),
])
def test_bad_inputs(changes, error, match):
    for fn in (retinanet_postprocess, retinanet_postprocess_reference):
        with pytest.raises(error, match=rf"^fastbb\.retinanet_postprocess: .*{match}"):
            fn(**_bad(**changes))


def test_device_mismatch():
    args = _bad(anchors=[torch.rand(25, 4), torch.rand(25, 4, device="meta")])
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        retinanet_postprocess(**args)


# ---------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------

def _to_cuda(problem):
    cls_logits, bbox_regression, anchors, levels, sizes = problem
    return cls_logits.cuda(), bbox_regression.cuda(), [a.cuda() for a in anchors], levels, sizes


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(backend, dtype):
    # More candidates than topk on the first level; 3 images of different sizes.
    problem = _problem(3, (1500, 375, 100), 91, dtype, mean=-4.0)
    want = retinanet_postprocess_reference(*problem)
    with fastbb.use_backend(backend):
        got = retinanet_postprocess(*_to_cuda(problem))
    assert all(d["boxes"].is_cuda and d["labels"].is_cuda for d in got)
    assert_same_detections([{k: v.cpu() for k, v in d.items()} for d in got], want, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    # Fewer candidates than topk: CUDA's sigmoid may round a half score differently from the CPU's, which
    # must not decide a top-k cut here.
    problem = _problem(2, (200, 50, 12), 20, dtype)
    want = retinanet_postprocess_reference(*problem)
    got = retinanet_postprocess(*_to_cuda(problem))
    assert_same_detections([{k: v.cpu() for k, v in d.items()} for d in got], want, dtype)


@pytest.mark.cuda
def test_cuda_padded_matches_list():
    problem = _to_cuda(_problem(2, (300, 80), 10))
    problem[0][1] = -30.0  # an image without detections
    boxes, scores, labels, counts = retinanet_postprocess(*problem, detections_per_img=25, padded=True)
    listed = retinanet_postprocess(*problem, detections_per_img=25)
    assert counts[1] == 0 and boxes.shape == (2, 25, 4)
    for i, d in enumerate(listed):
        n = int(counts[i])
        assert torch.equal(boxes[i, :n], d["boxes"]) and torch.equal(scores[i, :n], d["scores"])
        assert torch.equal(labels[i, :n], d["labels"]) and not scores[i, n:].any()


@pytest.mark.cuda
def test_cuda_graph_capture_padded():
    problem = _problem(2, (600, 150, 40), 91, torch.float32, mean=-4.0, device="cuda")
    sizes = torch.tensor(problem[4], device="cuda")
    args = (problem[0], problem[1], torch.stack(problem[2]), problem[3], sizes)
    eager = retinanet_postprocess(*args, padded=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        retinanet_postprocess(*args, padded=True)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = retinanet_postprocess(*args, padded=True)
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(captured, eager):
        assert torch.equal(g, w)
