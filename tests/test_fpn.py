"""fastbb.nn.FeaturePyramidNetwork against torchvision's, and fastbb.nn.FPN against mmdet's FPN forward."""
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import feature_pyramid_network as tv_fpn

import fastbb
from fastbb.nn import FPN, FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from conftest import assert_error_within, usable_backends

# The modules run both FPN ops: the backends both can run here.
BACKENDS = [b for b in usable_backends("cpu", "fpn_merge") if b in usable_backends("cpu", "upsample_nearest_add")]
# Small C3..C5-like maps with ResNet's odd sizes (ceil(L / 2)): 13x21 -> 7x11 -> 4x6.
IN_CHANNELS = [6, 10, 14]
SIZES = [(13, 21), (7, 11), (4, 6)]


def _features(batch=2, channels=IN_CHANNELS, sizes=SIZES, dtype=torch.float32):
    return OrderedDict((f"c{i + 3}", torch.randn(batch, c, *s, dtype=dtype))
                       for i, (c, s) in enumerate(zip(channels, sizes)))


def _flat(outputs):
    """The outputs of every level as one vector, so one error norm covers the whole pyramid."""
    return torch.cat([o.reshape(-1) for o in outputs])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", ["none", "pool", "p6p7_from_p5", "p6p7_from_c5"])
@pytest.mark.parametrize("norm", [False, True])
def test_feature_pyramid_network_matches_torchvision(backend, extra, norm):
    kwargs = dict(in_channels_list=IN_CHANNELS, out_channels=8, norm_layer=nn.BatchNorm2d if norm else None)
    ours_extra, theirs_extra = {
        "none": (None, None),
        "pool": (LastLevelMaxPool(), tv_fpn.LastLevelMaxPool()),
        "p6p7_from_p5": (LastLevelP6P7(8, 8), tv_fpn.LastLevelP6P7(8, 8)),
        "p6p7_from_c5": (LastLevelP6P7(14, 8), tv_fpn.LastLevelP6P7(14, 8)),
    }[extra]
    theirs = tv_fpn.FeaturePyramidNetwork(extra_blocks=theirs_extra, **kwargs)
    ours = FeaturePyramidNetwork(extra_blocks=ours_extra, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    if norm:  # BN in eval with non-trivial statistics
        for module in theirs.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.data.uniform_(0.5, 2)
        ours.load_state_dict(theirs.state_dict())
        ours.eval(), theirs.eval()
    features = _features()
    with torch.no_grad():
        want = theirs(features)
        want64 = theirs.double()(OrderedDict((k, v.double()) for k, v in features.items()))
        with fastbb.use_backend(backend):
            got = ours(features)
    assert list(got) == list(want)
    assert all(g.shape == w.shape for g, w in zip(got.values(), want.values()))
    # Twice torchvision's own float32 error, plus 1e-5 of the outputs' norm: a GEMM-based conv legitimately
    # rounds differently from oneDNN.
    assert_error_within(_flat(got.values()), _flat(want.values()), _flat(want64.values()), 2.0, slack=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_pyramid_network_gradients(backend):
    kwargs = dict(in_channels_list=IN_CHANNELS, out_channels=8)
    theirs = tv_fpn.FeaturePyramidNetwork(extra_blocks=tv_fpn.LastLevelP6P7(8, 8), **kwargs).double()
    ours = FeaturePyramidNetwork(extra_blocks=LastLevelP6P7(8, 8), **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    features = OrderedDict((k, v.double().requires_grad_()) for k, v in _features().items())
    grads = []
    for model in (theirs, ours):
        with fastbb.use_backend(backend):
            loss = sum((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
                       for out in model(features).values())
        grads.append(torch.autograd.grad(loss, list(features.values()) + list(model.parameters())))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_feature_pyramid_network_loads_legacy_keys():
    """Checkpoints from before torchvision's Conv2dNormActivation (keys `inner_blocks.0.weight`) load."""
    theirs = tv_fpn.FeaturePyramidNetwork(IN_CHANNELS, 8)
    state = theirs.state_dict()
    legacy = OrderedDict((k.replace(".0.weight", ".weight").replace(".0.bias", ".bias"), v) for k, v in state.items())
    legacy._metadata = OrderedDict({"": {"version": 1}})
    ours = FeaturePyramidNetwork(IN_CHANNELS, 8)
    ours.load_state_dict(legacy)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), state.values()))


def test_feature_pyramid_network_channels_last():
    ours = FeaturePyramidNetwork(IN_CHANNELS, 8, extra_blocks=LastLevelMaxPool())
    features = _features()
    with torch.no_grad():
        want = ours(features)
        got = ours.to(memory_format=torch.channels_last)(
            OrderedDict((k, v.to(memory_format=torch.channels_last)) for k, v in features.items()))
    for g, w in zip(got.values(), want.values()):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_feature_pyramid_network_bad_input():
    with pytest.raises(ValueError, match="in_channels=0"):
        FeaturePyramidNetwork([4, 0], 8)
    with pytest.raises(TypeError, match="extra_blocks"):
        FeaturePyramidNetwork([4, 8], 8, extra_blocks="pool")
    with pytest.raises(ValueError, match="expected 3 feature maps"):
        FeaturePyramidNetwork(IN_CHANNELS, 8)(OrderedDict(list(_features().items())[:2]))
    with pytest.raises(ValueError, match="must not be larger"):  # levels in the wrong order
        FeaturePyramidNetwork(IN_CHANNELS, 8)(_features(sizes=SIZES[::-1]))


# ---------------------------------------------------------------------------------------------------------
# mmdet FPN

def _mmdet_forward(fpn, inputs):
    """mmdet.models.necks.FPN.forward (mmdet 3.x), unfused, written from its source, on fpn's modules."""
    laterals = [conv(inputs[i + fpn.start_level]) for i, conv in enumerate(fpn.lateral_convs)]
    used = len(laterals)
    for i in range(used - 1, 0, -1):
        if "scale_factor" in fpn.upsample_cfg:
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], **fpn.upsample_cfg)
        else:
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              **fpn.upsample_cfg)
    outs = [fpn.fpn_convs[i](laterals[i]) for i in range(used)]
    if fpn.num_outs > len(outs):
        if not fpn.add_extra_convs:
            for _ in range(fpn.num_outs - used):
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        else:
            source = {"on_input": inputs[fpn.backbone_end_level - 1], "on_lateral": laterals[-1],
                      "on_output": outs[-1]}[fpn.add_extra_convs]
            outs.append(fpn.fpn_convs[used](source))
            for i in range(used + 1, fpn.num_outs):
                outs.append(fpn.fpn_convs[i](F.relu(outs[-1]) if fpn.relu_before_extra_convs else outs[-1]))
    return tuple(outs)


MMDET_CONFIGS = {
    "faster_rcnn": dict(num_outs=5),
    "retinanet": dict(start_level=1, add_extra_convs="on_input", num_outs=5),
    "extra_true": dict(add_extra_convs=True, num_outs=5),
    "on_lateral": dict(add_extra_convs="on_lateral", num_outs=4),
    "on_output_relu": dict(add_extra_convs="on_output", relu_before_extra_convs=True, num_outs=6),
    "end_level": dict(start_level=0, end_level=1, num_outs=2),
    "gn_relu": dict(num_outs=4, norm_cfg=dict(type="GN", num_groups=4), act_cfg=dict(type="ReLU")),
    "bn_no_norm_on_lateral": dict(num_outs=3, norm_cfg=dict(type="BN"), no_norm_on_lateral=True),
    "scale_factor": dict(num_outs=3, upsample_cfg=dict(scale_factor=2, mode="nearest")),
    "bilinear": dict(num_outs=3, upsample_cfg=dict(mode="bilinear", align_corners=False)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(MMDET_CONFIGS))
def test_mmdet_fpn_matches_mmdet_forward(backend, config):
    sizes = [(16, 24), (8, 12), (4, 6)] if config == "scale_factor" else SIZES  # scale_factor needs exact halves
    fpn = FPN(IN_CHANNELS, 8, **MMDET_CONFIGS[config]).double().eval()
    inputs = tuple(t.double() for t in _features(sizes=sizes).values())
    with torch.no_grad():
        want = _mmdet_forward(fpn, inputs)
        with fastbb.use_backend(backend):
            got = fpn(inputs)
    assert isinstance(got, tuple) and len(got) == fpn.num_outs == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_mmdet_fpn_state_dict_keys():
    fpn = FPN([256, 512, 1024, 2048], 256, start_level=1, add_extra_convs="on_input", num_outs=5)
    keys = set(fpn.state_dict())
    assert {f"lateral_convs.{i}.conv.{p}" for i in range(3) for p in ("weight", "bias")} <= keys
    assert {f"fpn_convs.{i}.conv.{p}" for i in range(5) for p in ("weight", "bias")} <= keys
    assert len(keys) == 16 and fpn.fpn_convs[3].conv.in_channels == 2048
    normed = FPN([4, 8], 8, num_outs=2, norm_cfg=dict(type="GN", num_groups=2))
    assert "lateral_convs.0.gn.weight" in normed.state_dict() and "lateral_convs.0.conv.bias" not in normed.state_dict()


def test_mmdet_retinanet_fpn_equals_torchvision_p6p7():
    """torchvision's LastLevelP6P7(2048, 256) FPN is mmdet's start_level=1, add_extra_convs='on_input',
    relu_before_extra_convs=True FPN (CONTRACT.md): same weights, same outputs."""
    channels = [4, 6, 10, 14]
    theirs = tv_fpn.FeaturePyramidNetwork(channels[1:], 8, extra_blocks=tv_fpn.LastLevelP6P7(14, 8)).double()
    ours = FPN(channels, 8, num_outs=5, start_level=1, add_extra_convs="on_input",
               relu_before_extra_convs=True).double()
    mapping = {}
    for i in range(3):
        for p in ("weight", "bias"):
            mapping[f"lateral_convs.{i}.conv.{p}"] = f"inner_blocks.{i}.0.{p}"
            mapping[f"fpn_convs.{i}.conv.{p}"] = f"layer_blocks.{i}.0.{p}"
            mapping[f"fpn_convs.3.conv.{p}"] = f"extra_blocks.p6.{p}"
            mapping[f"fpn_convs.4.conv.{p}"] = f"extra_blocks.p7.{p}"
    state = theirs.state_dict()
    ours.load_state_dict({k: state[v] for k, v in mapping.items()})
    features = _features(channels=channels, sizes=[(26, 42)] + SIZES, dtype=torch.float64)
    with torch.no_grad():
        want = list(theirs(OrderedDict(list(features.items())[1:])).values())
        got = ours(tuple(features.values()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_mmdet_fpn_build_and_bad_config(without_openmmlab):
    fpn = fastbb.build(dict(type="FPN", in_channels=[4, 8, 16], out_channels=8, num_outs=5))
    assert isinstance(fpn, FPN) and len(fpn(tuple(_features(channels=[4, 8, 16]).values()))) == 5
    with pytest.raises(ValueError, match="add_extra_convs"):
        FPN([4, 8], 8, num_outs=3, add_extra_convs="on_top")
    with pytest.raises(ValueError, match="norm_cfg type 'LN'"):
        FPN([4, 8], 8, num_outs=2, norm_cfg=dict(type="LN"))
    with pytest.raises(ValueError, match="act_cfg type 'PReLU'"):
        FPN([4, 8], 8, num_outs=2, act_cfg=dict(type="PReLU"))
    with pytest.raises(ValueError, match="conv_cfg"):
        FPN([4, 8], 8, num_outs=2, conv_cfg=dict(type="DCNv2"))
    with pytest.raises(ValueError, match="num_outs"):
        FPN([4, 8, 16], 8, num_outs=2)
    with pytest.raises(ValueError, match="end_level"):
        FPN([4, 8, 16], 8, num_outs=3, end_level=1)
    with pytest.raises(ValueError, match="expected 3 inputs"):
        FPN([4, 8, 16], 8, num_outs=3)(tuple(_features(channels=[4, 8, 16]).values())[:2])
    with pytest.raises(TypeError, match="unexpected key.*upsample_mode"):
        fastbb.build(dict(type="FPN", in_channels=[4, 8], out_channels=8, num_outs=2, upsample_mode="nearest"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_feature_pyramid_network_outputs_keep_torchvision_s_layout(channels_last):
    """The 3x3 output convs run through fastbb's conv tables in CPU inference (the Winograd conv for NCHW maps of
    128+ channels); the outputs are laid out as torchvision's (channels_last inputs give channels_last maps) and equal to them."""
    kwargs = dict(in_channels_list=[64, 128], out_channels=128, extra_blocks=None)
    theirs = tv_fpn.FeaturePyramidNetwork(**kwargs)
    ours = FeaturePyramidNetwork(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    features = _features(batch=1, channels=[64, 128], sizes=[(16, 20), (8, 10)])
    if channels_last:
        features = OrderedDict((k, v.contiguous(memory_format=torch.channels_last)) for k, v in features.items())
    with torch.no_grad():
        got, want = ours(features), theirs(features)
        exact = theirs.double()(OrderedDict((k, v.double()) for k, v in features.items()))
    for name in want:
        for layout in (torch.contiguous_format, torch.channels_last):
            assert got[name].is_contiguous(memory_format=layout) == want[name].is_contiguous(memory_format=layout)
    assert_error_within(_flat(got.values()), _flat(want.values()), _flat(exact.values()), 2.0, slack=1e-5)
