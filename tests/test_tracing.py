"""fastbb's modules and ops under torch.fx symbolic tracing (torchvision's feature extraction included),
torch.jit.script (the custom ops script; the fused modules raise an error saying to use torch.export) and
torch.export: same outputs as eager, the fused ops kept as single calls."""
import copy
import io
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

import fastbb
from fastbb._tracing import NotScriptableError
from fastbb.nn import (FPN, BoxCoder, ConvBNReLU2d, DeltaXYWHBBoxCoder, FeaturePyramidNetwork, FocalLoss,
                       FrozenBatchNorm2d, LastLevelMaxPool, LastLevelP6P7, SigmoidFocalLoss)

from conftest import assert_error_within, error_norm, randomize_bn


# ---------------------------------------------------------------------------------------------------------
# The modules, each with inputs and the fastbb calls its traced graph must hold. Modules that take
# containers (the FPNs, the extra blocks) or are plain classes (the coders) run inside a small model that
# builds them, as they run inside a detector.

class _TorchvisionFPN(nn.Module):
    def __init__(self, fpn):
        super().__init__()
        self.fpn = fpn

    def forward(self, c2, c3, c4):
        return self.fpn(OrderedDict([("c2", c2), ("c3", c3), ("c4", c4)]))


class _MMDetFPN(nn.Module):
    def __init__(self, fpn):
        super().__init__()
        self.fpn = fpn

    def forward(self, c2, c3, c4):
        return self.fpn((c2, c3, c4))


class _ExtraBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, p4, p5, c5):
        return self.block([p4, p5], [c5], ["p4", "p5"])[0]


class _TorchvisionDecode(nn.Module):
    def __init__(self):
        super().__init__()
        self.coder = BoxCoder((10.0, 10.0, 5.0, 5.0))

    def forward(self, deltas, anchors):
        return self.coder.decode_single(deltas, anchors)


class _MMDetDecode(nn.Module):
    def __init__(self):
        super().__init__()
        self.coder = DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2))

    def forward(self, anchors, deltas):
        return self.coder.decode(anchors, deltas, max_shape=(60, 50))


class _MMDetLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.loss = FocalLoss()

    def forward(self, pred, labels):
        return self.loss(pred, labels, avg_factor=3.0)


def _features():
    # Odd sizes: the nearest upsample's index rule matters (9 -> 17, 5 -> 9).
    return torch.randn(2, 8, 17, 15), torch.randn(2, 16, 9, 8), torch.randn(2, 32, 5, 4)


def _boxes(n):
    xy = torch.rand(n, 2) * 40
    return torch.cat([xy, xy + torch.rand(n, 2) * 20 + 1], dim=1)


def _bn_model(model):
    return randomize_bn(model)


def _mm_resnet(kind):
    return _bn_model(fastbb.build(dict(type=kind, depth=18, norm_eval=False)))


CASES = {
    # name: (module factory, inputs factory, fastbb functions the traced graph calls)
    "ConvBNReLU2d": (lambda: _bn_model(ConvBNReLU2d(4, 6, 3, padding=1)), lambda: (torch.randn(2, 4, 7, 9),),
                     {"conv_bn_relu"}),
    "FrozenBatchNorm2d": (lambda: FrozenBatchNorm2d(4), lambda: (torch.randn(2, 4, 5, 5),), set()),
    "LastLevelMaxPool": (lambda: _ExtraBlock(LastLevelMaxPool()),
                         lambda: (torch.randn(1, 8, 9, 9), torch.randn(1, 8, 5, 5), torch.randn(1, 8, 5, 5)), set()),
    "LastLevelP6P7": (lambda: _ExtraBlock(LastLevelP6P7(16, 8)),
                      lambda: (torch.randn(1, 8, 9, 9), torch.randn(1, 8, 5, 5), torch.randn(1, 16, 5, 5)), set()),
    "FeaturePyramidNetwork": (lambda: _TorchvisionFPN(FeaturePyramidNetwork([8, 16, 32], 12,
                                                                            extra_blocks=LastLevelMaxPool())),
                              _features, {"fpn_merge"}),
    "FPN": (lambda: _MMDetFPN(FPN([8, 16, 32], 12, num_outs=5, add_extra_convs="on_input")), _features,
            {"fpn_merge"}),
    "FPN-norm": (lambda: _bn_model(_MMDetFPN(FPN([8, 16, 32], 12, num_outs=3, norm_cfg=dict(type="BN")))), _features,
                 {"upsample_nearest_add"}),
    "SigmoidFocalLoss": (lambda: SigmoidFocalLoss(reduction="mean"),
                         lambda: (torch.randn(6, 5), (torch.rand(6, 5) > 0.7).float()), {"sigmoid_focal_loss"}),
    "FocalLoss": (_MMDetLoss, lambda: (torch.randn(6, 5), torch.randint(0, 6, (6,))), {"_focal_loss"}),
    "BoxCoder": (_TorchvisionDecode, lambda: (torch.randn(7, 8), _boxes(7)), {"decode_boxes"}),
    "DeltaXYWHBBoxCoder": (_MMDetDecode, lambda: (_boxes(7), torch.randn(7, 4)), {"_promote_deltas", "decode_boxes"}),
    "resnet18": (lambda: _bn_model(fastbb.models.resnet18(num_classes=10)), lambda: (torch.randn(1, 3, 64, 64),),
                 {"conv_bn_relu"}),
    "ResNet": (lambda: _mm_resnet("ResNet"), lambda: (torch.randn(1, 3, 64, 64),), {"conv_bn_relu"}),
    "ResNetV1c": (lambda: _mm_resnet("ResNetV1c"), lambda: (torch.randn(1, 3, 64, 64),), {"conv_bn_relu"}),
    "ResNetV1d": (lambda: _mm_resnet("ResNetV1d"), lambda: (torch.randn(1, 3, 64, 64),), {"conv_bn_relu"}),
}
# Modules with BatchNorms, whose training mode differs (batch statistics, running statistics updated).
TRAINABLE = ["ConvBNReLU2d", "FPN-norm", "resnet18", "ResNet", "ResNetV1c", "ResNetV1d"]


def _converted_resnet18():
    model = _bn_model(torchvision.models.resnet18(num_classes=10))
    fastbb.convert(model)
    return model


def _fastbb_calls(graph):
    """The names of the fastbb functions the graph calls."""
    return {node.target.__name__ for node in graph.nodes
            if node.op == "call_function" and getattr(node.target, "__module__", "").startswith("fastbb.")}


# Functions a fused op decomposes into; a graph holding the fused op calls none of them.
DECOMPOSED = (torch.nn.functional.conv2d, torch.conv2d, torch.nn.functional.interpolate, torch.sigmoid,
              torch.nn.functional.batch_norm, torch.nn.functional.binary_cross_entropy_with_logits, torch.exp)


def _unfused_calls(module, graph, fused):
    """What the graph calls that the fused ops replace: the decomposing functions (F.interpolate for the FPN
    merges, ...), and for conv_bn_relu the convs and BNs called as modules."""
    found = [str(node.target) for node in graph.nodes if node.op == "call_function" and node.target in DECOMPOSED]
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        called = module.get_submodule(node.target)
        if "conv_bn_relu" in fused and isinstance(called, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            found.append(node.target)
    return found


def _assert_same(got, expected, rtol=1e-5):
    """The same computation up to float32 rounding: the eager call may run a fused kernel where the traced
    or exported one runs the op's plain-PyTorch path (its error is bounded against the original in the
    op's own tests)."""
    # An OrderedDict output comes back from torch.fx's generated code as a dict (as torchvision's FPN's does).
    got, expected = (dict(t) if isinstance(t, dict) else t for t in (got, expected))
    got_leaves, got_structure = torch.utils._pytree.tree_flatten(got)
    expected_leaves, expected_structure = torch.utils._pytree.tree_flatten(expected)
    assert got_structure == expected_structure
    for a, b in zip(got_leaves, expected_leaves):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert error_norm(a, b) <= rtol * float(b.double().norm()), error_norm(a, b)


# A ResNet's eager training forward runs channels_last inside (fastbb.models.resnet.runs_channels_last), its
# traced or exported graph the caller's NCHW: oneDNN's convs round differently in the two layouts (the
# mmdet-style ResNets here: 1.2e-5 to 1.6e-5 of the output's norm); the running statistics follow them.
TRAIN_RTOL = 1e-4


def _assert_same_state(module, expected, rtol=None):
    """The same buffers: each within rtol=1e-5, atol=1e-6 of the expected, or, given rtol (the training
    comparisons of a ResNet, see TRAIN_RTOL), each floating tensor within rtol of its norm (a running mean
    near 0 has no meaningful per-element relative error)."""
    state = module.state_dict()
    for name, want in expected.state_dict().items():
        if rtol is None or not want.is_floating_point():
            torch.testing.assert_close(state[name], want, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert error_norm(state[name], want) <= rtol * float(want.double().norm()), name


# ---------------------------------------------------------------------------------------------------------
# torch.fx

@pytest.mark.parametrize("name", sorted(CASES))
def test_fx_trace_keeps_fused_ops_and_outputs(name):
    make_module, make_inputs, fused = CASES[name]
    module = make_module().eval()
    inputs = make_inputs()
    traced = torch.fx.symbolic_trace(module)
    assert _fastbb_calls(traced.graph) == fused
    assert _unfused_calls(traced, traced.graph, fused) == []
    with torch.no_grad():
        _assert_same(traced(*inputs), module(*inputs))


def test_fx_trace_of_a_converted_model():
    """The converted blocks trace fused. torch.fx traces the root module's class forward, not the fused
    forward convert() gave the instance, so the root ResNet's own stem (conv1, bn1) traces unfused."""
    model = _converted_resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    traced = torch.fx.symbolic_trace(model)
    assert _fastbb_calls(traced.graph) == {"conv_bn_relu"}
    assert _unfused_calls(traced, traced.graph, {"conv_bn_relu"}) == ["conv1", "bn1"]
    _assert_same(traced(x), model(x))


@pytest.mark.parametrize("name", TRAINABLE)
def test_fx_trace_in_training_mode(name):
    """The traced training graph normalizes with the batch statistics and updates the running statistics
    and num_batches_tracked at every call, as the eager module does."""
    make_module, make_inputs, fused = CASES[name]
    module = make_module().train()
    eager = copy.deepcopy(module)
    traced = torch.fx.symbolic_trace(module)
    assert fused <= _fastbb_calls(traced.graph)
    for _ in range(2):
        inputs = make_inputs()
        _assert_same(traced(*inputs), eager(*inputs), TRAIN_RTOL)
    _assert_same_state(module, eager, TRAIN_RTOL)
    assert all(bn.num_batches_tracked.item() == 2 for bn in module.modules() if isinstance(bn, nn.BatchNorm2d))


def test_fx_trace_with_cumulative_momentum():
    """momentum=None (the cumulative average, 1 / num_batches_tracked) is read at each call of the graph."""
    module = _bn_model(ConvBNReLU2d(4, 6, 3, padding=1)).train()
    module.bn.momentum = None
    eager = copy.deepcopy(module)
    traced = torch.fx.symbolic_trace(module)
    for _ in range(3):
        x = torch.randn(2, 4, 7, 9)
        _assert_same(traced(x), eager(x))
    _assert_same_state(module, eager)
    assert module.bn.num_batches_tracked.item() == 3


def test_fx_traced_op_checks_its_inputs_when_run():
    """The op's input checks run when the traced module runs, with the op's own error."""
    class Merge(nn.Module):
        def forward(self, top, lateral):
            return fastbb.ops.upsample_nearest_add(top, lateral)

    traced = torch.fx.symbolic_trace(Merge())
    assert _fastbb_calls(traced.graph) == {"upsample_nearest_add"}
    top, lateral = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 7, 8)
    torch.testing.assert_close(traced(top, lateral), fastbb.ops.upsample_nearest_add(top, lateral))
    with pytest.raises(ValueError, match="fastbb.upsample_nearest_add: top"):
        traced(lateral, top)


def test_create_feature_extractor_resnet50_matches_torchvision():
    """torchvision's feature extraction (which traces a train and an eval graph) on fastbb's ResNet-50: the
    eager model's features in both modes, within the factors a 200-seed sweep measured (2x eval, 3.2x train)
    of torchvision's own float32 error of a float64 run of torchvision's extractor, and the running
    statistics updated as torchvision's are (2.5x)."""
    model = randomize_bn(fastbb.models.resnet50())
    original = torchvision.models.resnet50()
    original.load_state_dict(model.state_dict())
    exact = copy.deepcopy(original).double()
    eager = copy.deepcopy(model)
    nodes = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
    ours, theirs, exact = (create_feature_extractor(m, return_nodes=nodes) for m in (model, original, exact))
    assert {"conv_bn_relu"} <= _fastbb_calls(ours.train_graph) and {"conv_bn_relu"} <= _fastbb_calls(ours.eval_graph)
    x = torch.randn(1, 3, 64, 64)
    for mode in ("eval", "train"):
        for m in (ours, theirs, exact, eager):
            m.train(mode == "train")
        got, expected, exact_features = ours(x), theirs(x), exact(x.double())
        assert list(got) == ["c2", "c3", "c4", "c5"]
        for key, eager_features in zip(got, eager.forward_features(x), strict=True):
            _assert_same(got[key], eager_features)
            # (layer4 trains its BNs over 2x2 values: a 200-seed sweep saw c5's ratio reach 2.81, the rest <= 1.18)
            assert_error_within(got[key], expected[key], exact_features[key], 3.2 if mode == "train" else 2.0,
                                name=f"{mode} {key}")
    _assert_same_state(model, eager)
    ours_state, theirs_state = model.state_dict(), original.state_dict()
    for name, value in exact.state_dict().items():  # the training call updated them as torchvision's
        assert_error_within(ours_state[name], theirs_state[name], value, 2.5, name=name)  # sweep's worst: 2.24


# ---------------------------------------------------------------------------------------------------------
# TorchScript

def _script_fpn_merge(x: Tensor, weight: Tensor, bias: Tensor | None, top: Tensor) -> Tensor:
    return torch.ops.fastbb.fpn_merge(x, weight, bias, top)


def _script_upsample_nearest_add(top: Tensor, lateral: Tensor) -> Tensor:
    return torch.ops.fastbb.upsample_nearest_add(top, lateral)


def _script_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    return torch.ops.fastbb.batched_nms(boxes, scores, idxs, iou_threshold)


class _ScriptedNMS(nn.Module):
    def forward(self, boxes: Tensor, scores: Tensor) -> Tensor:
        return torch.ops.fastbb.nms(boxes, scores, 0.5)


def test_script_calls_custom_ops():
    x, top = torch.randn(2, 5, 9, 7), torch.randn(2, 4, 5, 4)
    weight, bias = torch.randn(4, 5, 1, 1), torch.randn(4)
    merge = torch.jit.script(_script_fpn_merge)
    torch.testing.assert_close(merge(x, weight, bias, top), fastbb.ops.fpn_merge(x, weight, bias, top))
    torch.testing.assert_close(merge(x, weight, None, top), fastbb.ops.fpn_merge(x, weight, None, top))
    lateral = torch.randn(2, 4, 9, 7)
    torch.testing.assert_close(torch.jit.script(_script_upsample_nearest_add)(top, lateral),
                               fastbb.ops.upsample_nearest_add(top, lateral))
    boxes, scores, idxs = _boxes(30), torch.rand(30), torch.randint(0, 3, (30,))
    torch.testing.assert_close(torch.jit.script(_script_batched_nms)(boxes, scores, idxs, 0.5),
                               torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))


def test_scripted_module_with_custom_op_saves_and_loads():
    boxes, scores = _boxes(40), torch.rand(40)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(_ScriptedNMS()), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    torch.testing.assert_close(loaded(boxes, scores), torchvision.ops.nms(boxes, scores, 0.5))


@pytest.mark.parametrize("module", [lambda: FrozenBatchNorm2d(4), LastLevelMaxPool, lambda: LastLevelP6P7(8, 8)],
                         ids=["FrozenBatchNorm2d", "LastLevelMaxPool", "LastLevelP6P7"])
def test_script_pure_pytorch_modules(module):
    """The modules without fused ops script, as torchvision's do, and compute what they compute eagerly."""
    module = module().eval()
    scripted = torch.jit.script(module)
    if isinstance(module, FrozenBatchNorm2d):
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(scripted(x), module(x))
    else:
        p, c = [torch.randn(1, 8, 9, 9)], [torch.randn(1, 8, 9, 9)]
        got, names = scripted(list(p), list(c), ["p5"])
        want, want_names = module(list(p), list(c), ["p5"])
        assert names == want_names
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


# Every module case but the plain-PyTorch ones and the coders (plain classes held by a module: TorchScript
# compiles their type without asking them first; scripting the class itself is tested below).
@pytest.mark.parametrize("name", sorted(set(CASES) - {"FrozenBatchNorm2d", "LastLevelMaxPool", "LastLevelP6P7",
                                                      "BoxCoder", "DeltaXYWHBBoxCoder"}))
def test_script_of_fused_module_says_to_use_export(name):
    module = CASES[name][0]()
    assert fastbb.NotScriptableError is NotScriptableError  # what users catch
    with pytest.raises(fastbb.NotScriptableError, match=r"fastbb\.(nn|models)\.\w+ is not scriptable .*torch\.export"):
        torch.jit.script(module)


@pytest.mark.parametrize("cls", [BoxCoder, DeltaXYWHBBoxCoder])
def test_script_of_coder_class_says_to_use_export(cls):
    with pytest.raises(NotScriptableError, match=rf"fastbb\.nn\.{cls.__name__} is not scriptable"):
        torch.jit.script(cls)


def _detects(boxes: Tensor, scores: Tensor, labels: Tensor) -> Tensor:
    keep = fastbb.ops.nms(boxes, scores, 0.5)
    return fastbb.ops.batched_nms(boxes[keep], scores[keep], labels[keep], 0.3)


def _merges(x: Tensor, weight: Tensor, top: Tensor, lateral: Tensor) -> Tensor:
    return fastbb.ops.fpn_merge(x, weight, None, top) + fastbb.ops.upsample_nearest_add(top, lateral)


def test_script_public_op_functions():
    """The public functions whose custom op takes their arguments as they are script (as torchvision's ops
    do): directly, and called from scripted code."""
    boxes, scores, labels = _boxes(40), torch.rand(40), torch.randint(0, 3, (40,), dtype=torch.int32)
    keep = torchvision.ops.nms(boxes, scores, 0.5)
    torch.testing.assert_close(torch.jit.script(fastbb.ops.nms)(boxes, scores, 0.5), keep)
    torch.testing.assert_close(torch.jit.script(_detects)(boxes, scores, labels),
                               torchvision.ops.batched_nms(boxes[keep], scores[keep], labels[keep], 0.3))
    x, weight, top, lateral = torch.randn(1, 5, 9, 7), torch.randn(4, 5, 1, 1), torch.randn(1, 4, 5, 4), \
        torch.randn(1, 4, 9, 7)
    torch.testing.assert_close(torch.jit.script(_merges)(x, weight, top, lateral), _merges(x, weight, top, lateral))


@pytest.mark.parametrize("name", ["conv_bn_relu", "decode_boxes", "sigmoid_focal_loss", "retinanet_postprocess"])
def test_script_of_other_op_functions_says_to_use_export(name):
    with pytest.raises(NotScriptableError, match=rf"fastbb\.ops\.{name} is not scriptable .*torch\.export"):
        torch.jit.script(getattr(fastbb.ops, name))


def test_script_of_code_calling_an_op_function_says_to_use_export():
    def calls_decode(anchors: Tensor, deltas: Tensor) -> Tensor:
        return fastbb.ops.decode_boxes(anchors, deltas)

    with pytest.raises(NotScriptableError, match=r"fastbb\.ops\.decode_boxes is not scriptable"):
        torch.jit.script(calls_decode)


def test_script_of_converted_model_says_to_use_export():
    model = torchvision.models.resnet18(num_classes=10)
    torch.jit.script(model)  # the original scripts
    fastbb.convert(model)
    with pytest.raises(NotScriptableError, match=r"fastbb\.convert: ResNet .*not scriptable.*torch\.export"):
        torch.jit.script(model)
    # A converted block inside an unconverted parent says the same.
    with pytest.raises(NotScriptableError, match=r"fastbb\.convert: BasicBlock layer1\.0 .*not scriptable"):
        torch.jit.script(model.layer1)
    # Chains swapped for ConvBNReLU2d.
    chain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    wrapper = nn.Sequential(chain, nn.Flatten())
    fastbb.convert(wrapper)
    with pytest.raises(NotScriptableError, match=r"fastbb\.nn\.ConvBNReLU2d is not scriptable"):
        torch.jit.script(wrapper)


# ---------------------------------------------------------------------------------------------------------
# torch.export

# The custom ops each module's exported graph holds (conv_bn_relu runs its plain-PyTorch path under export,
# a conv with the BN folded in, or the fused training BN op in training mode).
EXPORTED_OPS = {"FeaturePyramidNetwork": {"fpn_merge"}, "FPN": {"fpn_merge"}, "FPN-norm": {"upsample_nearest_add"},
                "SigmoidFocalLoss": {"sigmoid_focal_loss"}, "FocalLoss": {"sigmoid_focal_loss"},
                "BoxCoder": {"decode_boxes"}, "DeltaXYWHBBoxCoder": {"decode_boxes"}}


def _custom_ops(exported):
    return {node.target.name().split("::")[1].split(".")[0] for node in exported.graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == "fastbb"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_eval(name):
    make_module, make_inputs, _ = CASES[name]
    module = make_module().eval()
    inputs = make_inputs()
    exported = torch.export.export(module, inputs)
    assert _custom_ops(exported) == EXPORTED_OPS.get(name, set())
    with torch.no_grad():
        _assert_same(exported.module()(*inputs), module(*inputs))


def test_export_converted_model():
    model = _converted_resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    _assert_same(exported.module()(x), model(x))


@pytest.mark.parametrize("name", TRAINABLE)
def test_export_train(name):
    """Training mode: the exported program normalizes with the batch statistics and updates the running
    statistics, as the eager module does."""
    make_module, make_inputs, _ = CASES[name]
    module = make_module().train()
    eager = copy.deepcopy(module)
    inputs = make_inputs()
    exported = torch.export.export(module, inputs)
    assert "bn_relu_train" in _custom_ops(exported) or name == "FPN-norm"
    program = exported.module()
    _assert_same(program(*inputs), eager(*inputs), TRAIN_RTOL)
    _assert_same_state(program, eager, TRAIN_RTOL)
