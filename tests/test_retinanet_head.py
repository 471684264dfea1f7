"""fastbb.models.detection.RetinaNetHead (and its two branch heads) against torchvision's, built from the same
seed (the same weights) and run on the same features."""
import copy
import inspect
from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models.detection import retinanet as tv_retinanet

import fastbb
from conftest import assert_error_within, record_choices
from fastbb.models import detection
from fastbb.nn import conv_layers
from fastbb.ops.conv_bn_relu import TABLE as EVAL_CONV_TABLE
from fastbb.ops.conv_bn_relu import TRAIN_CONV_TABLE

NORMS = {"v1": None, "v2": partial(nn.GroupNorm, 32)}
# P3..P7 of a 64x88 image (odd sizes, a 1x1 level), of a 40x40 one (square, 1x1 twice), one odd level, and
# P3..P7 of a 264x320 image (P3..P5 at 8x8 or more: through the eval conv table in inference)
LEVELS = {"odd": [(8, 11), (4, 6), (2, 3), (1, 2), (1, 1)], "square": [(5, 5), (3, 3), (2, 2), (1, 1), (1, 1)],
          "7x11": [(7, 11)], "large": [(33, 40), (17, 20), (9, 10), (5, 5), (3, 3)]}


def build_pair(version="v1", in_channels=64, num_anchors=3, num_classes=5, seed=0):
    """(fastbb's head, torchvision's) from the same seed: the same weights. The classification bias is drawn
    too (torchvision sets it to the constant prior), so that every class column differs."""
    heads = []
    for cls in (detection.RetinaNetHead, tv_retinanet.RetinaNetHead):
        torch.manual_seed(seed)
        head = cls(in_channels, num_anchors, num_classes, norm_layer=NORMS[version])
        with torch.no_grad():
            for module in head.modules():
                if isinstance(module, nn.GroupNorm):  # non-trivial affine parameters
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
            head.classification_head.cls_logits.bias.normal_()
        heads.append(head)
    return heads


def features(levels, batch=2, channels=64, dtype=torch.float32, channels_last=False):
    out = [torch.randn(batch, channels, h, w, dtype=dtype) for h, w in levels]
    if channels_last:
        out = [f.contiguous(memory_format=torch.channels_last) for f in out]
    return out


def assert_same_outputs(got, want, **tolerance):
    assert set(got) == {"cls_logits", "bbox_regression"}
    for key in got:
        assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype, key
        torch.testing.assert_close(got[key], want[key], **tolerance)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_same_classes_modules_keys_and_init_as_torchvision(version):
    ours, theirs = build_pair(version, in_channels=256, num_anchors=9, num_classes=91)
    torch.manual_seed(3)
    fresh_ours = detection.RetinaNetHead(256, 9, 91, norm_layer=NORMS[version])
    torch.manual_seed(3)
    fresh_theirs = tv_retinanet.RetinaNetHead(256, 9, 91, norm_layer=NORMS[version])
    assert isinstance(ours, tv_retinanet.RetinaNetHead)
    assert isinstance(ours.classification_head, tv_retinanet.RetinaNetClassificationHead)
    assert isinstance(ours.classification_head, detection.RetinaNetClassificationHead)
    assert isinstance(ours.regression_head, tv_retinanet.RetinaNetRegressionHead)
    assert isinstance(ours.regression_head, detection.RetinaNetRegressionHead)
    heads = (tv_retinanet.RetinaNetHead, tv_retinanet.RetinaNetClassificationHead, tv_retinanet.RetinaNetRegressionHead)
    assert [(n, m.__class__ if not isinstance(m, heads) else None) for n, m in ours.named_modules()] == \
        [(n, m.__class__ if not isinstance(m, heads) else None) for n, m in theirs.named_modules()]
    # the same random draws in the same order
    fresh = fresh_ours.state_dict()
    assert list(fresh) == list(fresh_theirs.state_dict())
    for name, value in fresh_theirs.state_dict().items():
        assert torch.equal(fresh[name], value), name
    # keys both ways, with torchvision's version metadata
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(fresh, strict=True)
    assert fresh._metadata["classification_head"]["version"] == 2
    assert ours.regression_head._loss_type == theirs.regression_head._loss_type == "l1"


@pytest.mark.parametrize("name", ["RetinaNetHead", "RetinaNetClassificationHead", "RetinaNetRegressionHead"])
def test_signatures_are_torchvision_s(name):
    def parameters(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    ours, theirs = getattr(detection, name), getattr(tv_retinanet, name)
    assert parameters(ours) == parameters(theirs)
    assert parameters(ours.forward) == parameters(theirs.forward)


def test_v1_keys_are_upgraded_as_torchvision():
    """A state_dict saved before torchvision's v2 key layout (conv.0, conv.2, ... without version metadata)."""
    ours, theirs = build_pair("v1")
    old = {}
    for name, value in theirs.state_dict().items():
        parts = name.split(".")
        if parts[1] == "conv":  # classification_head.conv.1.0.weight -> classification_head.conv.2.weight
            name = ".".join(parts[:2] + [str(2 * int(parts[2]))] + parts[4:])
        old[name] = value.clone()
    assert "classification_head.conv.6.bias" in old
    for model in (ours, theirs):
        torch.nn.init.zeros_(model.regression_head.conv[3][0].weight)
        model.load_state_dict(old, strict=True)
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("levels", list(LEVELS))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad", "no_grad, every level through the table"])
def test_outputs_equal_torchvision(version, levels, batch, mode, monkeypatch):
    if mode.endswith("table"):
        monkeypatch.setattr(conv_layers, "_EVAL_TABLE_MIN_POSITIONS", 1)
        mode = "no_grad"
    ours, theirs = build_pair(version)
    x = features(LEVELS[levels], batch=batch)
    context = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
    with context():
        got, want = ours(x), theirs(x)
    assert got["cls_logits"].shape == (batch, 3 * sum(h * w for h, w in LEVELS[levels]), 5)
    assert_same_outputs(got, want, rtol=1e-5, atol=1e-5)
    assert got["cls_logits"].requires_grad == (mode == "grad")


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("levels", ["odd", "large"])
def test_float64_outputs_equal_torchvision(version, grad, levels):
    ours, theirs = (h.double() for h in build_pair(version))
    x = features(LEVELS[levels], dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        assert_same_outputs(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_float64_gradients_equal_torchvision(version):
    ours, theirs = (h.double().train() for h in build_pair(version))
    x = features(LEVELS["odd"], dtype=torch.float64)
    inputs = {name: [f.clone().requires_grad_() for f in x] for name in ("ours", "theirs")}
    got, want = ours(inputs["ours"]), theirs(inputs["theirs"])
    weights = {key: torch.randn_like(value) for key, value in want.items()}
    sum((got[k] * w).sum() for k, w in weights.items()).backward()
    sum((want[k] * w).sum() for k, w in weights.items()).backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12, msg=name)
    for a, b in zip(inputs["ours"], inputs["theirs"]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12)


def test_float64_gradcheck():
    ours, _ = build_pair("v2", in_channels=32, num_anchors=1, num_classes=2)
    ours = ours.double()
    x = [f.requires_grad_() for f in features([(3, 2), (2, 1)], batch=1, channels=32, dtype=torch.float64)]
    torch.autograd.gradcheck(lambda *f: tuple(ours(list(f)).values()), x, fast_mode=True)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("grad", [False, True])
def test_bf16_autocast_as_torchvision(version, grad):
    """The dtypes torchvision's head returns under CPU bf16 autocast, within 2x its own error against float64."""
    ours, theirs = build_pair(version)
    exact_head = copy.deepcopy(theirs).double()
    x = features(LEVELS["large"])
    with torch.set_grad_enabled(grad):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = ours(x), theirs(x)
        exact = exact_head([f.double() for f in x])
    for key in exact:
        assert got[key].dtype == want[key].dtype, key
        assert_error_within(got[key], want[key], exact[key], name=key)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("grad", [False, True])
def test_channels_last_inputs(version, grad):
    ours, theirs = build_pair(version)
    x = features(LEVELS["large"], channels_last=True)
    with torch.set_grad_enabled(grad):
        got, want = ours(x), theirs(x)
    assert_same_outputs(got, want, rtol=1e-5, atol=1e-5)
    assert all(got[k].is_contiguous() for k in got)


def test_branch_heads_alone_equal_torchvision():
    ours, theirs = build_pair("v2")
    x = features(LEVELS["odd"])
    with torch.no_grad():
        torch.testing.assert_close(ours.classification_head(x), theirs.classification_head(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.regression_head(x), theirs.regression_head(x), rtol=1e-5, atol=1e-5)
    got = ours.classification_head(x)
    assert got.requires_grad
    torch.testing.assert_close(got, theirs.classification_head(x), rtol=1e-5, atol=1e-5)


def test_other_norm_layers_and_replaced_branches_as_torchvision():
    """Another norm layer (BatchNorm, eval), a branch replaced by torchvision's own: torchvision's outputs."""
    torch.manual_seed(0)
    ours = detection.RetinaNetHead(64, 3, 5, norm_layer=nn.BatchNorm2d).eval()
    theirs = tv_retinanet.RetinaNetHead(64, 3, 5, norm_layer=nn.BatchNorm2d).eval()
    theirs.load_state_dict(ours.state_dict())
    x = features(LEVELS["large"])
    with torch.no_grad():
        assert_same_outputs(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours, theirs = build_pair("v1")
    ours.regression_head = copy.deepcopy(theirs.regression_head)
    with torch.no_grad():
        assert_same_outputs(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_compile_fullgraph(version):
    ours, theirs = build_pair(version)
    x = features(LEVELS["odd"])
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_same_outputs(compiled(x), theirs(x), rtol=1e-5, atol=1e-5)
    got = compiled(x)
    got["cls_logits"].sum().backward()
    assert ours.classification_head.conv[0][0].weight.grad is not None


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_export(version):
    ours, theirs = build_pair(version)
    x = features(LEVELS["odd"])
    program = torch.export.export(ours, (x,))
    convs = [n for n in program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 5 * (2 * 4 + 2)
    with torch.no_grad():
        assert_same_outputs(program.module()(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_not_scriptable():
    ours, _ = build_pair("v1")
    with pytest.raises(fastbb.NotScriptableError):
        torch.jit.script(ours)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_models_build_fastbb_s_head(version, monkeypatch):
    """The builders and RetinaNet(head=None) build fastbb's head where torchvision builds its own (the same
    weights from the same seed: tests/test_retinanet.py), and the batched loss still applies to it."""
    builder = detection.retinanet_resnet50_fpn if version == "v1" else detection.retinanet_resnet50_fpn_v2
    model = builder(weights=None, weights_backbone=None, num_classes=3)
    assert type(model.head) is detection.RetinaNetHead
    norms = [type(m) for m in model.head.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == (8 if version == "v2" else 0)
    monkeypatch.setattr(detection.retinanet, "retinanet_loss", lambda *args, **kwargs: None)  # (when built without it)
    assert detection.retinanet._fused_loss_applies(model)
    custom = detection.RetinaNet(model.backbone, 3, head=tv_retinanet.RetinaNetHead(256, 9, 3))
    assert type(custom.head) is tv_retinanet.RetinaNetHead


def test_convert_gives_torchvision_s_head_fastbb_s_forward():
    _, theirs = build_pair("v2")
    converted = copy.deepcopy(theirs)
    report = fastbb.convert(converted)
    assert any(line.startswith("(model): RetinaNetHead") for line in report), report
    assert type(converted) is tv_retinanet.RetinaNetHead
    assert type(converted.classification_head) is tv_retinanet.RetinaNetClassificationHead
    assert converted.classification_head.forward.__func__ is detection.RetinaNetClassificationHead.forward
    assert converted.regression_head.forward.__func__ is detection.RetinaNetRegressionHead.forward
    x = features(LEVELS["large"])
    with torch.no_grad():
        assert_same_outputs(converted(x), theirs(x), rtol=1e-5, atol=1e-5)
    # a head whose branch is not torchvision's class keeps its forward
    other = copy.deepcopy(theirs)
    other.regression_head = detection.RetinaNetRegressionHead(64, 3)
    assert not any("RetinaNetHead" in line for line in fastbb.convert(other))


def test_cpu_float32_convs_run_through_fastbb_s_conv_tables(monkeypatch):
    """In float32 CPU inference the convs of levels of 8x8 or more run through conv_bn_relu's eval table (its
    Winograd conv where it applies; the 4x4 and smaller levels as the modules); under autograd every conv runs
    through the training-conv table; in float64 and under autocast, torchvision's forward (no table)."""
    chosen = record_choices(monkeypatch, EVAL_CONV_TABLE, TRAIN_CONV_TABLE)
    ours, _ = build_pair("v2", in_channels=128)
    x = features([(8, 8), (4, 4), (2, 2)], channels=128)
    with torch.no_grad():
        ours(x)
    # on the 8x8 level only: each branch's 4 stacked convs as Winograd convs, its last conv (15 or 12 channels
    # out: too few for the Winograd conv) as oneDNN's
    branch = ["cpp"] * 4 + ["onednn"]
    assert chosen == {"conv_bn_relu": branch * 2, "conv_bn_relu.train_conv": []}
    chosen["conv_bn_relu"].clear()
    ours(x)
    assert chosen == {"conv_bn_relu": [], "conv_bn_relu.train_conv": ["reference"] * 30}
    chosen["conv_bn_relu.train_conv"].clear()
    with torch.no_grad():
        ours.double()([f.double() for f in x])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours.float()(x)
    assert chosen == {"conv_bn_relu": [], "conv_bn_relu.train_conv": []}


def test_inference_follows_weights_changed_in_place_or_replaced():
    """The Winograd weights kept between inference calls are remade when a weight changes in place (an optimizer
    step, load_state_dict) or is replaced by another parameter."""
    ours, theirs = build_pair("v1", in_channels=128)
    x = features(LEVELS["large"][:2], channels=128)
    with torch.no_grad():
        ours(x)
        for model in (ours, theirs):
            model.classification_head.conv[0][0].weight.mul_(-2)
            model.regression_head.bbox_reg.weight = nn.Parameter(model.regression_head.bbox_reg.weight * 3)
        assert_same_outputs(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        ours.load_state_dict(build_pair("v1", in_channels=128, seed=1)[1].state_dict())
        theirs.load_state_dict(ours.state_dict())
        assert_same_outputs(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_forward_hooks_run_as_in_torchvision():
    """A module with a forward hook runs as itself (its hook fires once per level), the others still fused."""
    ours, theirs = build_pair("v1", in_channels=128)
    calls = []
    ours.classification_head.conv[0][0].register_forward_hook(lambda *_: calls.append("conv"))
    ours.regression_head.conv.register_forward_hook(lambda *_: calls.append("stack"))
    x = features(LEVELS["large"][:2], channels=128)
    with torch.no_grad():
        assert_same_outputs(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert sorted(calls) == ["conv", "conv", "stack", "stack"]


@pytest.mark.parametrize("shapes", [[(8, 8), (4, 4), (2, 2), (1, 1)], [(13, 21), (7, 11), (4, 6), (2, 3), (1, 2)],
                                    [(5, 5), (3, 3), (2, 2), (1, 1), (1, 1)], [(3, 1), (3, 1), (1, 1)], [(2, 2)]])
def test_canvas_corners_keep_a_zero_row_or_column_between_maps(shapes):
    """Every map lies inside the canvas, the canvas is no larger than the maps need, and any two maps are
    at least one row or one column apart (a 3x3 conv on the canvas reads no other map)."""
    corners, (height, width) = conv_layers.canvas_corners(shapes)
    boxes = [(top, left, top + h, left + w) for (top, left), (h, w) in zip(corners, shapes)]
    assert all(top >= 0 and left >= 0 and bottom <= height and right <= width for top, left, bottom, right in boxes)
    assert height == max(box[2] for box in boxes) and width == max(box[3] for box in boxes)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            row_gap = max(a[0] - b[2], b[0] - a[2])
            column_gap = max(a[1] - b[3], b[1] - a[3])
            assert max(row_gap, column_gap) >= 1, (a, b)


def test_canvas_corners_refuse_a_map_larger_than_the_one_before():
    assert conv_layers.canvas_corners([(4, 4), (8, 8)]) is None
    assert conv_layers.canvas_corners([(4, 4), (2, 5)]) is None


LEVELS_512 = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]  # P3..P7 of a 128x128 image


def test_training_runs_the_small_levels_on_one_canvas(monkeypatch):
    """Under autograd the levels with fewer than 512 output positions over the batch (here 8x8 to 1x1 at
    batch 4) share one train-table call per conv, the 16x16 level its own: 2 calls per conv, not 5. Outputs
    and every gradient equal torchvision's to float32 rounding."""
    chosen = record_choices(monkeypatch, TRAIN_CONV_TABLE)
    ours, theirs = build_pair("v1")
    x = features(LEVELS_512, batch=4)
    inputs = {name: [f.clone().requires_grad_() for f in x] for name in ("ours", "theirs")}
    got, want = ours(inputs["ours"]), theirs(inputs["theirs"])
    assert len(chosen["conv_bn_relu.train_conv"]) == 2 * 5 * 2  # branches x convs x (16x16 alone, the canvas)
    assert_same_outputs(got, want, rtol=1e-5, atol=1e-5)
    weights = {key: torch.randn_like(value) for key, value in want.items()}
    sum((got[k] * w).sum() for k, w in weights.items()).backward()
    sum((want[k] * w).sum() for k, w in weights.items()).backward()
    # sums over the levels in another order: float32 rounding, relative to the largest value
    pairs = [(a.grad, b.grad) for a, b in zip(ours.parameters(), theirs.parameters())]
    pairs += [(a.grad, b.grad) for a, b in zip(inputs["ours"], inputs["theirs"])]
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("levels", ["odd", "square", "canvas after a large level"])
def test_float64_canvas_outputs_and_gradients_equal_each_level_alone(levels):
    """levels_forward's canvas in float64 (the head runs it on float32 only): outputs and every gradient
    equal the branch run on each level alone."""
    shapes = LEVELS_512 if levels.startswith("canvas") else LEVELS[levels]
    ours, _ = build_pair("v1")
    branch = ours.double().classification_head
    x = features(shapes, batch=4, dtype=torch.float64)
    inputs = {name: [f.clone().requires_grad_() for f in x] for name in ("canvas", "alone")}
    got = conv_layers.levels_forward(branch.conv, branch.cls_logits, inputs["canvas"])
    want = [branch.cls_logits(branch.conv(f)) for f in inputs["alone"]]
    grads = []
    for outputs in (got, want):
        branch.zero_grad()
        sum((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
            for out in outputs).backward()
        grads.append([p.grad.clone() for p in branch.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(inputs["canvas"], inputs["alone"]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["v2 (GroupNorm)", "forward hook", "no autograd", "one small level"])
def test_canvas_only_where_every_layer_computes_as_on_each_level(case, monkeypatch):
    """A norm layer (its statistics are per level), a hook (it would see the canvas), inference and a single
    small level run level by level."""
    canvases = []
    on_canvas = conv_layers._on_canvas
    monkeypatch.setattr(conv_layers, "_on_canvas", lambda *args: canvases.append(1) or on_canvas(*args))
    ours, theirs = build_pair("v2" if case.startswith("v2") else "v1")
    if case == "forward hook":
        ours.classification_head.conv[1][0].register_forward_hook(lambda module, args, out: None)
    shapes = [(16, 16), (8, 8)] if case == "one small level" else LEVELS_512
    x = features(shapes, batch=4)
    with torch.set_grad_enabled(case != "no autograd"):
        got, want = ours(x), theirs(x)
    assert_same_outputs(got, want, rtol=1e-5, atol=1e-5)
    assert len(canvases) == (1 if case == "forward hook" else 0)  # the regression branch still uses it
