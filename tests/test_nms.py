"""nms, batched_nms and nms_sorted_padded: every usable backend against the reference, the reference
against torchvision.ops (torchvision's CPU kernel computes the same float32/float64 IoU, so results are
compared exactly)."""
import importlib
import math

import pytest
import torch
import torchvision

import fastbb
from conftest import LaunchSpy, check_forced_backends, usable_backends

nms_mod = importlib.import_module("fastbb.ops.nms")
nms, nms_reference = nms_mod.nms, nms_mod.nms_reference
batched_nms, batched_nms_reference = nms_mod.batched_nms, nms_mod.batched_nms_reference
nms_sorted_padded, nms_sorted_padded_reference = nms_mod.nms_sorted_padded, nms_mod.nms_sorted_padded_reference

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TRITON_MAX_N = 300  # the Triton interpreter is slow: keep its inputs small
TRITON_ON_CPU = fastbb._backend.backend_usable("triton", "cpu")
needs_triton_on_cpu = pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton on CPU tensors needs its interpreter")
if TRITON_ON_CPU or torch.cuda.is_available():
    import triton
    import triton.language as tl

    from fastbb.kernels import nms as nms_kernels

# The Triton interpreter computes with numpy, which warns on the NaN that degenerate boxes produce.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# Box layouts: (origin, extent, min size, max size) of x1y1 and wh draws.
LAYOUTS = {
    "spread": (0.0, 1000.0, 1.0, 200.0),
    "crowded": (0.0, 100.0, 20.0, 200.0),  # most boxes overlap most others
    "negative": (-600.0, 500.0, 1.0, 150.0),
}


def rand_boxes(n, dtype=torch.float32, layout="spread", device="cpu"):
    origin, extent, wmin, wmax = LAYOUTS[layout]
    xy = torch.rand(n, 2, dtype=torch.float64) * extent + origin
    wh = torch.rand(n, 2, dtype=torch.float64) * (wmax - wmin) + wmin
    return torch.cat([xy, xy + wh], 1).to(dtype=dtype, device=device)


def backends_for(device, op, n):
    found = usable_backends(device, op)
    if device == "cpu" and n > TRITON_MAX_N:
        found = [b for b in found if b != "triton"]
    return found


def run(backend, fn, *args):
    with fastbb.use_backend(backend):
        return fn(*args)


def torchvision_nms(boxes, scores, threshold):
    """torchvision on CPU has no 16-bit kernel: give it the same values in float32."""
    if boxes.dtype in (torch.float16, torch.bfloat16):
        boxes, scores = boxes.float(), scores.float()
    return torchvision.ops.nms(boxes.cpu(), scores.cpu(), threshold)


def torchvision_batched_nms(boxes, scores, idxs, threshold):
    """torchvision's exact per-class path (its offset trick rounds differently)."""
    if boxes.dtype in (torch.float16, torch.bfloat16):
        boxes, scores = boxes.float(), scores.float()
    return torchvision.ops.boxes._batched_nms_vanilla(boxes.cpu(), scores.cpu(), idxs.cpu(), threshold)


# ------------------------------------------------------------------------------------------------- nms

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("n", [0, 1, 2, 7, 301, 1000])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_torchvision(layout, n, threshold, dtype):
    boxes, scores = rand_boxes(n, dtype, layout), torch.rand(n, dtype=dtype)
    expected = torchvision.ops.nms(boxes, scores, threshold)
    got = nms_reference(boxes, scores, threshold)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", usable_backends("cpu", "nms"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 2, 7, 301, 1000])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.7])
def test_backends_match_reference_and_torchvision(backend, dtype, n, threshold):
    if backend == "triton" and n > TRITON_MAX_N:
        n = 97
    layout = "crowded" if n % 2 else "negative"
    boxes, scores = rand_boxes(n, dtype, layout), torch.rand(n, dtype=dtype)
    got = run(backend, nms, boxes, scores, threshold)
    assert got.dtype == torch.int64 and got.device == boxes.device
    assert torch.equal(got, nms_reference(boxes, scores, threshold))
    assert torch.equal(got, torchvision_nms(boxes, scores, threshold))


@pytest.mark.parametrize("backend", usable_backends("cpu", "nms"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_iou_exactly_at_threshold_is_kept(backend, dtype):
    # Pairs (higher score first) whose IoU is exactly 0.5, exactly 0 (touching) and just above 0.5,
    # shifted to random integer offsets (exact in every dtype), in random order.
    pairs = torch.tensor([[[0, 0, 2, 1], [0, 0, 1, 1]],
                          [[0, 0, 1, 1], [1, 0, 2, 1]],
                          [[0, 0, 4, 4], [0, 0, 4, 3]]], dtype=torch.float64)
    offsets = torch.randint(-30, 30, (3, 1, 2)).double().repeat(1, 1, 2) * 8  # |x| < 256: exact in bfloat16
    boxes = (pairs + offsets).reshape(6, 4)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=torch.float64)
    perm = torch.randperm(6)
    boxes, scores = boxes[perm].to(dtype), scores[perm].to(dtype)
    position = {int(p): i for i, p in enumerate(perm)}
    for threshold, suppressed in ((0.5, {5}), (0.0, {1, 5}), (0.75, set())):
        got = run(backend, nms, boxes, scores, threshold)
        expected = [position[i] for i in range(6) if i not in suppressed]
        assert got.tolist() == expected, threshold
        assert torch.equal(got, torchvision_nms(boxes, scores, threshold))


@pytest.mark.parametrize("backend", usable_backends("cpu", "nms"))
def test_tied_scores_keep_stable_order(backend):
    n = 250
    boxes = rand_boxes(n, layout="crowded")
    scores = torch.randint(0, 4, (n,)).float() / 4  # many exact ties: the lower index ranks first
    got = run(backend, nms, boxes, scores, 0.5)
    assert torch.equal(got, nms_reference(boxes, scores, 0.5))
    assert torch.equal(got, torchvision.ops.nms(boxes, scores, 0.5))
    ranks = torch.sort(scores, descending=True, stable=True).indices
    position = torch.empty_like(ranks)
    position[ranks] = torch.arange(n)
    assert bool((position[got].diff() > 0).all())


@pytest.mark.parametrize("backend", usable_backends("cpu", "nms"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_scores_and_degenerate_boxes(backend, dtype):
    n = 200
    boxes = rand_boxes(n, dtype, "crowded")
    scores = torch.rand(n, dtype=dtype)
    scores[torch.randperm(n)[:15]] = math.nan
    pick = torch.randperm(n)[:60].view(6, 10)
    boxes[pick[0], 2] = boxes[pick[0], 0]  # zero width
    boxes[pick[1]] = boxes[pick[1]][:, [2, 3, 0, 1]]  # inverted
    boxes[pick[2], 1] = math.nan
    boxes[pick[3], 0] = -math.inf
    boxes[pick[4], 2:] = math.inf
    boxes[pick[5]] = boxes[pick[5, :1]]  # duplicates of one box
    got = run(backend, nms, boxes, scores, 0.5)
    assert torch.equal(got, nms_reference(boxes, scores, 0.5))
    assert torch.equal(got, torchvision.ops.nms(boxes, scores, 0.5))
    kept = set(got.tolist())
    for row in pick[:3].flatten().tolist():  # no positive area: never suppressed
        assert row in kept


@pytest.mark.parametrize("backend", usable_backends("cpu", "nms"))
def test_non_contiguous_inputs_and_inputs_unmodified(backend):
    n = 151
    wide = rand_boxes(2 * n, layout="crowded").view(n, 8)
    boxes = wide[:, ::2]  # (n, 4), stride 2
    scores = torch.rand(2 * n)[::2]
    assert not boxes.is_contiguous() and not scores.is_contiguous()
    boxes_before, scores_before = boxes.clone(), scores.clone()
    idxs = torch.randint(0, 3, (2 * n,))[::2]
    got = run(backend, nms, boxes, scores, 0.5)
    got_batched = run(backend, batched_nms, boxes, scores, idxs, 0.5)
    assert torch.equal(got, nms_reference(boxes.contiguous(), scores.contiguous(), 0.5))
    assert torch.equal(got_batched, batched_nms_reference(boxes.contiguous(), scores.contiguous(), idxs.contiguous(), 0.5))
    assert torch.equal(boxes, boxes_before) and torch.equal(scores, scores_before)


@pytest.mark.slow
@pytest.mark.skipif(not fastbb._backend.has_kernel("fastbb_C::nms", "CPU"), reason="the C++ kernel is not built")
def test_large_cpp_matches_torchvision():
    n = 100_000
    # Large boxes: many suppressions, so torchvision's O(N * kept) loop stays around a second.
    xy = torch.rand(n, 2) * 2000
    boxes = torch.cat([xy, xy + torch.rand(n, 2) * 250 + 50], 1)
    scores = torch.rand(n)
    got = run("cpp", nms, boxes, scores, 0.5)
    assert torch.equal(got, torchvision.ops.nms(boxes, scores, 0.5))


# ----------------------------------------------------------------------------------------- batched_nms

@pytest.mark.parametrize("classes", [1, 3, 80, 1000])
@pytest.mark.parametrize("n", [0, 1, 7, 301, 2000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_batched_matches_reference_and_torchvision(classes, n, dtype):
    boxes = rand_boxes(n, dtype, "crowded" if classes >= 80 else "negative")
    scores = torch.rand(n, dtype=torch.float64).to(dtype)
    idxs = torch.randint(-classes // 2, classes - classes // 2, (n,), dtype=torch.int32)
    expected = batched_nms_reference(boxes, scores, idxs, 0.5)
    for backend in backends_for("cpu", "batched_nms", n):
        assert torch.equal(run(backend, batched_nms, boxes, scores, idxs, 0.5), expected), backend
    # torchvision's per-class path orders tied scores arbitrarily: compare as sets, and the order
    # exactly where no scores tie.
    tv = torchvision_batched_nms(boxes, scores, idxs, 0.5)
    assert sorted(tv.tolist()) == sorted(expected.tolist())
    if torch.unique(scores).numel() == n:
        assert torch.equal(tv, expected)


@pytest.mark.parametrize("backend", usable_backends("cpu", "batched_nms"))
def test_batched_one_class_equals_nms_and_classes_are_independent(backend):
    n = 180
    boxes, scores = rand_boxes(n, layout="crowded"), torch.rand(n)
    same = torch.full((n,), 7)
    assert torch.equal(run(backend, batched_nms, boxes, scores, same, 0.5), nms_reference(boxes, scores, 0.5))
    # Every box its own class: nothing is suppressed; the result is the stable ranking.
    distinct = torch.arange(n) - 90
    ranking = torch.sort(scores, descending=True, stable=True).indices
    assert torch.equal(run(backend, batched_nms, boxes, scores, distinct, 0.0), ranking)


def test_batched_ties_are_stable():
    n = 400
    boxes = rand_boxes(n, layout="crowded")
    scores = torch.randint(0, 3, (n,)).float()
    idxs = torch.randint(0, 4, (n,))
    expected = batched_nms_reference(boxes, scores, idxs, 0.5)
    for backend in backends_for("cpu", "batched_nms", n):
        assert torch.equal(run(backend, batched_nms, boxes, scores, idxs, 0.5), expected), backend
    assert sorted(torchvision_batched_nms(boxes, scores, idxs, 0.5).tolist()) == sorted(expected.tolist())
    position = torch.empty(n, dtype=torch.long)
    position[torch.sort(scores, descending=True, stable=True).indices] = torch.arange(n)
    assert bool((position[expected].diff() > 0).all())


# ------------------------------------------------------------------------------------ nms_sorted_padded

def padded_inputs(batch, rows, dtype=torch.float32, labels_range=3, device="cpu"):
    boxes = rand_boxes(batch * rows, dtype, "crowded").view(batch, rows, 4)
    labels = torch.randint(0, labels_range, (batch, rows))
    counts = torch.randint(0, rows + 1, (batch,))
    if batch > 1:
        counts[0], counts[-1] = rows, 0
    for image in range(batch):  # padding rows hold junk: they must be ignored
        boxes[image, counts[image]:] = torch.where(torch.rand(rows - counts[image], 4) < 0.5, math.nan, 5.0).to(dtype)
    return boxes.to(device), labels.to(device), counts.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,rows", [(1, 1), (2, 70), (3, 130), (1, 0)])
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_sorted_padded_matches_reference(dtype, batch, rows, threshold):
    boxes, labels, counts = padded_inputs(batch, rows, dtype)
    expected = nms_sorted_padded_reference(boxes, labels, counts, threshold)
    assert expected.shape == (batch, rows) and expected.dtype == torch.bool
    for backend in usable_backends("cpu", "nms_sorted_padded"):
        assert torch.equal(run(backend, nms_sorted_padded, boxes, labels, counts, threshold), expected), backend
    # Independent check: rows ranked by position are batched_nms with decreasing scores.
    for image in range(batch):
        n = int(counts[image])
        kept = batched_nms_reference(boxes[image, :n], torch.arange(n, 0, -1, dtype=torch.float32),
                                     labels[image, :n], threshold)
        assert torch.equal(expected[image].nonzero().squeeze(1), kept)


def upper(mask):
    """The words of a suppression bitmask on or above the diagonal, the only ones specified."""
    return mask[:, nms_mod._upper_words(mask.shape[1], mask.shape[2], mask.device)]


def with_junk_below_diagonal(mask):
    """mask with every bit set in the words below the diagonal (which no reduction may read)."""
    junk = mask.clone()
    junk[:, ~nms_mod._upper_words(mask.shape[1], mask.shape[2], mask.device)] = -1
    return junk


def random_mask(batch, rows, density, device="cpu"):
    """A suppression bitmask of random bits (j > i only, as a real one), zero below the diagonal: far
    denser cross-word suppression than boxes produce."""
    words = (rows + 63) // 64
    bits = (torch.rand(batch, rows, words * 64) < density) & torch.ones(rows, words * 64, dtype=torch.bool).triu(1)
    bits[:, :, rows:] = False
    shifts = torch.arange(64, dtype=torch.int64)
    return (bits.view(batch, rows, words, 64).long() << shifts).sum(-1).to(device)


def reduce_implementations(device="cpu"):
    """The greedy scans of a bitmask usable here: name -> function(mask, counts)."""
    found = {"reference": nms_mod._reduce_mask_reference}
    if fastbb._backend.has_kernel("fastbb_C::nms_reduce_mask", "CUDA" if device == "cuda" else "CPU"):
        found["compiled"] = torch.ops.fastbb_C.nms_reduce_mask
    if device == "cuda" or TRITON_ON_CPU:
        found["triton"] = nms_kernels.reduce_mask
        found["triton, one word per step"] = lambda mask, counts: nms_kernels.reduce_mask(mask, counts, block_words=1)
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mask_stages_match_reference(dtype):
    boxes, labels, counts = padded_inputs(2, 133, dtype)
    threshold = 0.3
    expected_mask = nms_mod._iou_mask_reference(boxes, labels, counts, threshold)
    if TRITON_ON_CPU:
        assert torch.equal(upper(nms_kernels.iou_mask(boxes, labels, counts, threshold)), upper(expected_mask))
    if fastbb._backend.has_kernel("fastbb_C::nms_iou_mask", "CPU"):
        assert torch.equal(upper(torch.ops.fastbb_C.nms_iou_mask(boxes, labels, counts, threshold)),
                           upper(expected_mask))
    keep = nms_mod._reduce_mask_reference(expected_mask, counts)
    assert torch.equal(keep, nms_sorted_padded_reference(boxes, labels, counts, threshold))
    for name, reduce in reduce_implementations().items():
        assert torch.equal(reduce(expected_mask, counts), keep), name


@pytest.mark.parametrize("batch,rows", [(3, 200), (2, 64), (1, 65), (4, 1)])
def test_reductions_ignore_words_below_the_diagonal(batch, rows):
    """Words below the diagonal are unspecified: every reduction gives the same result when they hold junk."""
    boxes, labels, counts = padded_inputs(batch, rows, labels_range=2)
    mask = nms_mod._iou_mask_reference(boxes, labels, counts, 0.4)
    expected = nms_sorted_padded_reference(boxes, labels, counts, 0.4)
    junk = with_junk_below_diagonal(mask)
    for name, reduce in reduce_implementations().items():
        assert torch.equal(reduce(junk, counts), expected), name


@needs_triton_on_cpu
@pytest.mark.parametrize("batch,rows,labels_range,threshold", [
    (4, 200, 80, 0.5),  # many classes
    (3, 333, 3, 0.3),  # M not a multiple of 64, more words than one reduce step takes
    (2, 128, 1, 0.0),  # M a multiple of 64; threshold 0: every overlap suppresses
    (5, 63, 7, 0.5),
    (3, 1, 1, 0.5),
])
def test_triton_reduce_matches_reference(batch, rows, labels_range, threshold):
    """The Triton greedy scan against the plain Python one, on masks of boxes (padded images, empty ones
    among them) and on dense random masks."""
    boxes, labels, counts = padded_inputs(batch, rows, labels_range=labels_range)
    if batch > 2:
        counts[1] = 0  # an empty image between non-empty ones
    box_mask = nms_kernels.iou_mask(boxes, labels, counts, threshold)
    dense_mask = random_mask(batch, rows, 0.02)
    all_rows = torch.full((batch,), rows)
    for mask, valid in ((box_mask, counts), (dense_mask, counts), (dense_mask, all_rows)):
        expected = nms_mod._reduce_mask_reference(mask, valid)
        for block_words in (None, 1, 2):
            got = nms_kernels.reduce_mask(mask, valid, block_words=block_words)
            assert got.dtype == torch.bool and got.shape == (batch, rows)
            assert torch.equal(got, expected), block_words
    assert torch.equal(nms_kernels.reduce_mask(box_mask, counts),
                       nms_sorted_padded_reference(boxes, labels, counts, threshold))


@needs_triton_on_cpu
@pytest.mark.parametrize("batch,rows", [(2, 200), (3, 64), (1, 1)])
def test_triton_mask_launches_only_tiles_on_or_above_the_diagonal(monkeypatch, batch, rows):
    """One program per tile on or above the diagonal; the words below it are never written."""
    sentinel = 0x5A5A5A5A5A5A5A5A

    def fill(grid, args):
        args[3].fill_(sentinel)  # the mask, before the kernel writes it

    spy = LaunchSpy(nms_kernels._iou_mask_kernel, fill)
    monkeypatch.setattr(nms_kernels, "_iou_mask_kernel", spy)
    boxes, labels, counts = padded_inputs(batch, rows, labels_range=2)
    mask = nms_kernels.iou_mask(boxes, labels, counts, 0.5)
    words = (rows + 63) // 64
    assert spy.grids == [(batch * words * (words + 1) // 2,)]
    below = ~nms_mod._upper_words(rows, words)
    assert bool((mask[:, below] == sentinel).all())
    assert torch.equal(upper(mask), upper(nms_mod._iou_mask_reference(boxes, labels, counts, 0.5)))


if TRITON_ON_CPU:
    @triton.jit
    def _upper_tile_probe(tile_ptr, row_ptr, col_ptr, n, words, tiles, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        valid = offsets < n
        tile = tl.load(tile_ptr + offsets, mask=valid, other=0)
        row_tile, col_tile = nms_kernels._upper_tile(tile, words, tiles)
        tl.store(row_ptr + offsets, row_tile, mask=valid)
        tl.store(col_ptr + offsets, col_tile, mask=valid)


def upper_tiles_exact(words, tiles):
    """(row, col) of each tile index, row by row over the tiles on or above the diagonal, in integers."""
    rows, cols = [], []
    for tile in tiles:
        back = words * (words + 1) // 2 - 1 - tile
        r = (math.isqrt(8 * back + 1) - 1) // 2
        rows.append(words - 1 - r)
        cols.append(words - 1 - (back - r * (r + 1) // 2))
    return rows, cols


@needs_triton_on_cpu
@pytest.mark.parametrize("words", [1, 2, 3, 7, 64, 1000, 65535, 2**20])
def test_upper_tile_index(words):
    """The tile of each program against integer arithmetic: every tile on or above the diagonal once, row by
    row, for tile counts up to and past CUDA's grid limit."""
    total = words * (words + 1) // 2
    if total <= 4096:
        tiles = list(range(total))
    else:  # both ends, the starts and ends of tile rows, and random tiles
        starts = [r * words - r * (r - 1) // 2 for r in torch.randint(0, words, (300,)).tolist()]
        tiles = sorted(set(range(64)) | set(range(total - 64, total)) | set(starts) | {s - 1 for s in starts if s}
                       | set(torch.randint(0, total, (500,)).tolist()))
    tile_index = torch.tensor(tiles, dtype=torch.int64)
    rows, cols = torch.empty_like(tile_index), torch.empty_like(tile_index)
    block = triton.next_power_of_2(len(tiles))
    _upper_tile_probe[(1,)](tile_index, rows, cols, len(tiles), words, total, BLOCK=block)
    want_rows, want_cols = upper_tiles_exact(words, tiles)
    assert rows.tolist() == want_rows and cols.tolist() == want_cols
    assert all(r <= c < words for r, c in zip(want_rows, want_cols))
    if total <= 4096:  # exactly the tiles on or above the diagonal, row by row
        assert list(zip(want_rows, want_cols)) == [(r, c) for r in range(words) for c in range(r, words)]


@needs_triton_on_cpu
def test_triton_launch_grids_within_cuda_limits():
    """Inputs whose grids would pass CUDA's limits raise a ValueError naming the op and the shape before
    any launch (meta tensors: nothing is allocated)."""
    many_words = torch.empty((1, 64 * 2**17, 4), device="meta")  # 2**17 words: 2**33 tiles
    many_images = torch.empty((2**31, 1, 4), device="meta")
    for boxes in (many_words, many_images):
        counts = torch.empty(boxes.shape[0], dtype=torch.int64, device="meta")
        with pytest.raises(ValueError, match=rf"nms_iou_mask: input of shape \({boxes.shape[0]}, {boxes.shape[1]}, 4\)"):
            nms_kernels.iou_mask(boxes, None, counts, 0.5)
    mask = torch.empty((2**31, 1, 1), dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"nms_reduce_mask: input of shape \(2147483648, 1, 1\)"):
        nms_kernels.reduce_mask(mask, torch.empty(2**31, dtype=torch.int64, device="meta"))
    # The largest single image whose tiles fit: 65535 words, 2147450880 tiles.
    assert nms_kernels.upper_tiles(65535) <= 2**31 - 1 < nms_kernels.upper_tiles(65536)


# --------------------------------------------------------------------------- custom ops and compilation

@pytest.mark.parametrize("backend", usable_backends("cpu", "nms"))
def test_opcheck(backend):
    boxes, scores = rand_boxes(40, layout="crowded"), torch.rand(40)
    idxs = torch.randint(0, 3, (40,))
    p_boxes, p_labels, p_counts = padded_inputs(2, 40)
    with fastbb.use_backend(backend):
        torch.library.opcheck(torch.ops.fastbb.nms.default, (boxes, scores, 0.5))
        torch.library.opcheck(torch.ops.fastbb.batched_nms.default, (boxes, scores, idxs, 0.5))
        torch.library.opcheck(torch.ops.fastbb.nms_sorted_padded.default, (p_boxes, p_labels, p_counts, 0.5))


@pytest.mark.parametrize("op", ["nms", "batched_nms", "nms_sorted_padded"])
def test_forced_backend_runs_its_implementation(monkeypatch, op):
    boxes, scores, idxs = rand_boxes(30, layout="crowded"), torch.rand(30), torch.randint(0, 3, (30,))
    p_boxes, p_labels, p_counts = padded_inputs(2, 30)
    calls = {"nms": lambda: nms(boxes, scores, 0.5), "batched_nms": lambda: batched_nms(boxes, scores, idxs, 0.5),
             "nms_sorted_padded": lambda: nms_sorted_padded(p_boxes, p_labels, p_counts, 0.5)}
    check_forced_backends(monkeypatch, op, calls[op])


def test_torch_compile_fullgraph():
    def detect(boxes, scores, idxs):
        keep = nms(boxes, scores, 0.5)
        keep_per_class = batched_nms(boxes, scores, idxs, 0.4)
        return boxes[keep].sum() + keep_per_class.numel(), keep, keep_per_class

    compiled = torch.compile(detect, fullgraph=True, backend="aot_eager")
    boxes, scores = rand_boxes(120, layout="crowded"), torch.rand(120)
    idxs = torch.randint(0, 5, (120,))
    expected = detect(boxes, scores, idxs)
    got = compiled(boxes, scores, idxs)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------- input errors

@pytest.mark.parametrize("iou_threshold", [-math.inf, -0.1, 0.0, 1.0, 1.5, math.inf, math.nan])
def test_any_threshold_as_torchvision(iou_threshold):
    """torchvision takes any float threshold: above 1 (or NaN) nothing is suppressed, below 0 every overlap
    is, even of disjoint boxes; degenerate (empty) boxes, whose IoU is NaN, are never suppressed. batched_nms
    is compared with torchvision's per-category path (its coordinate-offset path, taken for fewer boxes,
    makes boxes of other categories disjoint, which a negative threshold then suppresses across categories)."""
    boxes = rand_boxes(300)
    boxes[:5, 2:] = boxes[:5, :2]  # zero-area boxes
    scores = torch.rand(300)
    idxs = torch.randint(0, 3, (300,))
    assert torch.equal(nms(boxes, scores, iou_threshold), torchvision.ops.nms(boxes, scores, iou_threshold))
    want = torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
    assert torch.equal(batched_nms(boxes, scores, idxs, iou_threshold), want)
    assert torch.equal(batched_nms_reference(boxes, scores, idxs, iou_threshold), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_batched_nms_takes_floating_and_bool_idxs_as_torchvision(dtype):
    """Each idxs value is one category, whatever idxs' dtype (torchvision offsets the boxes by idxs)."""
    boxes, scores = rand_boxes(400), torch.rand(400)
    idxs = (torch.randint(0, 4, (400,)) * 1.5).to(dtype) if dtype != torch.bool else torch.rand(400) > 0.5
    want = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5), want)
    assert torch.equal(batched_nms_reference(boxes, scores, idxs, 0.5), want)


def test_bad_inputs_raise_clear_errors():
    boxes, scores = rand_boxes(5), torch.rand(5)
    for fn in (nms, nms_reference):  # the message names the function called
        with pytest.raises(ValueError, match=rf"^fastbb\.{fn.__name__}: boxes must be \(N, 4\)"):
            fn(boxes[None], scores, 0.5)
    with pytest.raises(ValueError, match=r"^fastbb\.batched_nms: idxs"):
        batched_nms(boxes, scores, torch.zeros(4, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="boxes"):
        nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(ValueError, match="boxes"):
        nms(boxes[None], scores, 0.5)
    with pytest.raises(TypeError, match="boxes"):
        nms(boxes.long(), scores, 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(boxes, scores[:4], 0.5)
    with pytest.raises(ValueError, match="scores"):
        nms(boxes, scores[:, None], 0.5)
    with pytest.raises(TypeError, match="scores"):
        nms(boxes, scores.long(), 0.5)
    with pytest.raises(TypeError, match="iou_threshold"):
        nms(boxes, scores, "0.5")
    with pytest.raises(ValueError, match="device"):
        nms(boxes, scores.to("meta"), 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_nms(boxes, scores, torch.zeros(4, dtype=torch.long), 0.5)
    with pytest.raises(TypeError, match="idxs"):
        batched_nms(boxes, scores, torch.zeros(5, dtype=torch.complex64), 0.5)
    p_boxes, p_labels, p_counts = padded_inputs(2, 6)
    with pytest.raises(ValueError, match=r"^fastbb\.nms_sorted_padded: labels"):
        nms_sorted_padded(p_boxes, p_labels[:, :5], p_counts, 0.5)
    with pytest.raises(ValueError, match="valid_counts"):
        nms_sorted_padded(p_boxes, p_labels, p_counts[:1], 0.5)
    with pytest.raises(ValueError, match="boxes"):
        nms_sorted_padded(p_boxes[0], p_labels, p_counts, 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        nms_sorted_padded(p_boxes, p_labels, p_counts, math.nan)


# ------------------------------------------------------------------------------------------------ CUDA

# The CUDA paths: the compiled kernels, the Triton path as chosen (its mask, and the compiled reduction when
# built), and the Triton path with its own reduction (what runs where the compiled one is not built).
CUDA_PATHS = ["cuda", "triton", "triton-reduce"]


def use_cuda_path(monkeypatch, path):
    """Set up `path` (CUDA_PATHS) and return the backend to force."""
    if path == "triton-reduce":
        monkeypatch.setattr(nms_mod, "_compiled_reduce_usable", lambda mask: False)
        return "triton"
    return path


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 20000])
def test_cuda_nms_matches_reference_and_torchvision(monkeypatch, path, dtype, n):
    backend = use_cuda_path(monkeypatch, path)
    if backend not in usable_backends("cuda", "nms"):
        pytest.fail(f"backend {backend} is not usable on this GPU machine")
    boxes, scores = rand_boxes(n, dtype, "crowded" if n < 5000 else "spread"), torch.rand(n, dtype=dtype)
    expected = run("cpp" if "cpp" in usable_backends("cpu", "nms") else "reference", nms, boxes, scores, 0.5)
    got = run(backend, nms, boxes.cuda(), scores.cuda(), 0.5)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)
    assert torch.equal(expected, torchvision_nms(boxes, scores, 0.5))
    if dtype in (torch.float32, torch.float64) and n:
        # torchvision's CUDA kernel lets nvcc fuse a multiply-add in its IoU, so an IoU within an ulp of
        # the threshold may round the other way there: allow a rare difference, no more.
        tv_cuda = set(torchvision.ops.nms(boxes.cuda(), scores.cuda(), 0.5).tolist())
        assert len(tv_cuda ^ set(expected.tolist())) <= max(2, n // 2000)


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("classes,n", [(1, 500), (80, 5000), (1000, 3000)])
def test_cuda_batched_nms_matches_reference(monkeypatch, path, classes, n):
    backend = use_cuda_path(monkeypatch, path)
    boxes, scores = rand_boxes(n, layout="crowded"), torch.rand(n)
    idxs = torch.randint(-5, classes - 5, (n,))
    expected = batched_nms_reference(boxes, scores, idxs, 0.5) if n <= 1000 else run(
        "cpp", batched_nms, boxes, scores, idxs, 0.5)
    got = run(backend, batched_nms, boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_sorted_padded_matches_reference_and_graph_capture(monkeypatch, path, dtype):
    """Every CUDA path is free of host synchronisation: captured once in a CUDA graph, replayed on new data."""
    backend = use_cuda_path(monkeypatch, path)
    boxes, labels, counts = padded_inputs(3, 1000, dtype, labels_range=5)
    expected = nms_sorted_padded_reference(boxes, labels, counts, 0.5)
    boxes, labels, counts = boxes.cuda(), labels.cuda(), counts.cuda()
    with fastbb.use_backend(backend):
        assert torch.equal(nms_sorted_padded(boxes, labels, counts, 0.5).cpu(), expected)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            nms_sorted_padded(boxes, labels, counts, 0.5)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = nms_sorted_padded(boxes, labels, counts, 0.5)
    new_boxes, new_labels, new_counts = padded_inputs(3, 1000, dtype, labels_range=5)
    boxes.copy_(new_boxes)
    labels.copy_(new_labels)
    counts.copy_(new_counts)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), nms_sorted_padded_reference(new_boxes, new_labels, new_counts, 0.5))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_mask_triangle_and_reductions(dtype):
    """The CUDA and Triton masks on the GPU match the reference on and above the diagonal, and every GPU
    reduction ignores what lies below it (junk there changes nothing)."""
    boxes, labels, counts = padded_inputs(3, 333, dtype, labels_range=4)
    counts[1] = 0
    expected_mask = nms_mod._iou_mask_reference(boxes, labels, counts, 0.4)
    expected = nms_sorted_padded_reference(boxes, labels, counts, 0.4)
    masks = {"triton": nms_kernels.iou_mask(boxes.cuda(), labels.cuda(), counts.cuda(), 0.4)}
    if fastbb._backend.has_kernel("fastbb_C::nms_iou_mask", "CUDA"):
        masks["cuda"] = torch.ops.fastbb_C.nms_iou_mask(boxes.cuda(), labels.cuda(), counts.cuda(), 0.4)
    for name, mask in masks.items():
        assert torch.equal(upper(mask).cpu(), upper(expected_mask)), name
    junk = with_junk_below_diagonal(expected_mask).cuda()
    dense = random_mask(3, 333, 0.02)
    for name, reduce in reduce_implementations("cuda").items():
        if name == "reference":
            continue
        assert torch.equal(reduce(junk, counts.cuda()).cpu(), expected), name
        assert torch.equal(reduce(dense.cuda(), counts.cuda()).cpu(), nms_mod._reduce_mask_reference(dense, counts)), name


@pytest.mark.cuda
def test_cuda_reduce_of_a_mask_past_48k_of_shared_memory():
    """M = 390,400 rows: 6100 words of removed bits (48,800 bytes) plus the kernel's static shared memory
    pass the 48 KB a block gets without opting in, so the compiled reduction must raise its limit (the
    launch failed before). Only the first 3000 rows are valid: the rest of the 19 GB mask is never read."""
    rows, valid = 6100 * 64, 3000
    boxes = rand_boxes(valid, layout="crowded")[None]
    labels = torch.randint(0, 3, (1, valid))
    count = torch.tensor([valid])
    small = nms_mod._iou_mask_reference(boxes, labels, count, 0.5)
    expected = nms_mod._reduce_mask_reference(small, count)
    mask = torch.empty((1, rows, 6100), dtype=torch.int64, device="cuda")
    mask[:, :valid, :small.shape[2]] = small.cuda()
    try:
        for name, reduce in reduce_implementations("cuda").items():
            if name == "reference":
                continue
            keep = reduce(mask, count.cuda()).cpu()
            assert keep.shape == (1, rows) and not keep[:, valid:].any(), name
            assert torch.equal(keep[:, :valid], expected), name
    finally:
        del mask
        torch.cuda.empty_cache()
