"""ONNX export (torch.onnx.export(..., dynamo=True)) of fused models: standard ONNX operators only (the custom
ops decompose to their references), run by onnxruntime with the original torchvision module's outputs."""
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.ops import feature_pyramid_network as tv_fpn

import fastbb

from conftest import assert_error_within, randomize_bn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
onnxruntime = pytest.importorskip("onnxruntime")


def _onnx_run(module, inputs):
    """The module exported to ONNX and run by onnxruntime on inputs: (outputs as tensors, the ONNX model)."""
    program = torch.onnx.export(module, inputs, dynamo=True, verbose=False)
    model = program.model_proto
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {arg.name: value.numpy() for arg, value in zip(session.get_inputs(), inputs, strict=True)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)], model


def _operators(model):
    return {(node.domain or "ai.onnx", node.op_type) for node in model.graph.node}


def _assert_standard_operators(model):
    domains = {domain for domain, _ in _operators(model)}
    assert domains == {"ai.onnx"}, f"non-standard operator domains {domains}"


def test_resnet18_onnx_matches_torchvision():
    model = randomize_bn(fastbb.models.resnet18(num_classes=10)).eval()
    original = torchvision.models.resnet18(num_classes=10).eval()
    original.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    (got,), onnx_model = _onnx_run(model, (x,))
    _assert_standard_operators(onnx_model)
    with torch.no_grad():
        expected = original(x)
        exact = original.double()(x.double())
    assert got.shape == expected.shape
    # onnxruntime's convs sum in another order than PyTorch's: over 200 seeds the ratio reached 2.17.
    assert_error_within(got, expected, exact, factor=2.5, name="resnet18 logits")


class _FPN(nn.Module):
    """The FPN with tensor inputs and outputs, as a detector's backbone feeds it."""

    def __init__(self, fpn):
        super().__init__()
        self.fpn = fpn

    def forward(self, c2, c3, c4):
        return tuple(self.fpn(OrderedDict([("c2", c2), ("c3", c3), ("c4", c4)])).values())


def test_feature_pyramid_network_onnx_matches_torchvision():
    fpn = fastbb.nn.FeaturePyramidNetwork([8, 16, 32], 12, extra_blocks=fastbb.nn.LastLevelMaxPool())
    original = tv_fpn.FeaturePyramidNetwork([8, 16, 32], 12, extra_blocks=tv_fpn.LastLevelMaxPool())
    original.load_state_dict(fpn.state_dict())
    # Odd sizes and a non-2x ratio (9 -> 17, 5 -> 9): PyTorch's nearest index rule must survive the export.
    inputs = (torch.randn(2, 8, 17, 15), torch.randn(2, 16, 9, 8), torch.randn(2, 32, 5, 4))
    got, onnx_model = _onnx_run(_FPN(fpn).eval(), inputs)
    _assert_standard_operators(onnx_model)
    assert ("ai.onnx", "Resize") in _operators(onnx_model)
    with torch.no_grad():
        expected = _FPN(original)(*inputs)
        exact = _FPN(original.double())(*(t.double() for t in inputs))
    assert len(got) == len(expected) == 4
    for level, (a, b, c) in enumerate(zip(got, expected, exact)):
        assert a.shape == b.shape
        assert_error_within(a, b, c, factor=2.0, name=f"level {level}")


def test_exported_program_converts_to_onnx():
    """A program exported first (torch.export, which keeps the custom ops) converts too: the decompositions
    are registered with torch, not tied to torch.onnx.export's own capture."""
    fpn = _FPN(fastbb.nn.FeaturePyramidNetwork([8, 16, 32], 12)).eval()
    inputs = (torch.randn(1, 8, 17, 15), torch.randn(1, 16, 9, 8), torch.randn(1, 32, 5, 4))
    exported = torch.export.export(fpn, inputs)
    assert any(node.target == torch.ops.fastbb.fpn_merge.default for node in exported.graph.nodes)
    got, onnx_model = _onnx_run(exported, inputs)
    _assert_standard_operators(onnx_model)
    with torch.no_grad():
        expected = fpn(*inputs)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mmdet_fpn_with_norm_onnx_matches_eager():
    """mmdet's FPN with BN on the laterals merges with upsample_nearest_add; exported, it computes what the
    eager module computes."""
    fpn = randomize_bn(fastbb.nn.FPN([8, 16, 32], 12, num_outs=4, norm_cfg=dict(type="BN"))).eval()

    class Neck(nn.Module):
        def __init__(self):
            super().__init__()
            self.fpn = fpn

        def forward(self, c2, c3, c4):
            return self.fpn((c2, c3, c4))

    inputs = (torch.randn(1, 8, 15, 13), torch.randn(1, 16, 8, 7), torch.randn(1, 32, 4, 4))
    got, onnx_model = _onnx_run(Neck().eval(), inputs)
    _assert_standard_operators(onnx_model)
    with torch.no_grad():
        expected = fpn(inputs)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_box_decode_onnx_matches_torchvision():
    class Decode(nn.Module):
        def __init__(self):
            super().__init__()
            self.coder = fastbb.nn.BoxCoder((10.0, 10.0, 5.0, 5.0))

        def forward(self, deltas, boxes):
            return self.coder.decode_single(deltas, boxes)

    xy = torch.rand(20, 2) * 50
    boxes = torch.cat([xy, xy + torch.rand(20, 2) * 30 + 1], dim=1)
    deltas = torch.randn(20, 8)
    (got,), onnx_model = _onnx_run(Decode().eval(), (deltas, boxes))
    _assert_standard_operators(onnx_model)
    expected = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(deltas, boxes)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
