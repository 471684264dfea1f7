"""fastbb.models.MMResNet / ResNetV1c / ResNetV1d (mmdet) and MMSegResNet (mmseg): the ResNet backbones.

Checked against torchvision where the two coincide (mmdet's ResNet-50 is torchvision's without fc; mmseg's
contract_dilation ResNet-50 is torchvision's replace_stride_with_dilation=[False, True, True]), and every
variant against an unfused run of its own modules written as mmdet's forward. The comparisons with the real
OpenMMLab classes are in test_mm_real_resnet.py.
"""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import fastbb
from fastbb.models import MMResNet, MMSegResNet, MMSegResNetV1c, ResNetV1c, ResNetV1d, resnet50

from conftest import assert_error_within, randomize_bn


def _block_reference(block, x):
    """mmdet's BasicBlock / Bottleneck forward, module by module."""
    out = block.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    identity = x if block.downsample is None else block.downsample(x)
    return block.relu(out + identity)


def _reference_forward(model, x):
    """mmdet's ResNet.forward, module by module (no fusion)."""
    if model.deep_stem:
        x = model.stem(x)
    else:
        x = model.relu(model.bn1(model.conv1(x)))
    x = model.maxpool(x)
    outs = []
    for i, name in enumerate(model.res_layers):
        for block in getattr(model, name):
            x = _block_reference(block, x)
        if i in model.out_indices:
            outs.append(x)
    return tuple(outs)


def _tv_features(model):
    return create_feature_extractor(model, {f"layer{i}": f"c{i + 1}" for i in range(1, 5)})


def test_default_resnet50_is_torchvision_without_fc():
    theirs = randomize_bn(torchvision.models.resnet50()).eval()
    ours = MMResNet(depth=50).eval()
    assert list(ours.state_dict()) == [k for k in theirs.state_dict() if not k.startswith("fc.")]
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(state)
    x = torch.randn(1, 3, 64, 80)
    exact = _tv_features(copy.deepcopy(theirs).double())(x.double())
    with torch.no_grad():
        want = _tv_features(theirs)(x)
        got = ours(x)
    assert len(got) == 4
    for name, g, w, e in zip(exact, got, want.values(), exact.values()):
        assert_error_within(g, w, e, 2.0, name=name)
        assert g.stride() == w.stride()  # NCHW out for NCHW in, whatever layout runs inside


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_mmseg_contract_dilation_equals_torchvision_dilated_resnet50(mode):
    """CONTRACT: mmseg ResNet(dilations=(1,1,2,4), strides=(1,2,1,1), contract_dilation=True) with a
    torchvision state_dict is torchvision's resnet50(replace_stride_with_dilation=[False, True, True])."""
    theirs = randomize_bn(torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]))
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    ours = MMSegResNet(depth=50, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True)
    ours.load_state_dict(state)
    dilated = resnet50(weights=theirs.state_dict(), replace_stride_with_dilation=[False, True, True])
    conv_dilations = [(n, m.dilation, m.stride) for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)]
    assert conv_dilations == [(n, m.dilation, m.stride) for n, m in theirs.named_modules() if isinstance(m, nn.Conv2d)]
    exact_model = copy.deepcopy(theirs).double()
    for model in (theirs, ours, dilated, exact_model):
        getattr(model, mode)()
    x = torch.randn(2, 3, 48, 56)
    with torch.no_grad():
        exact = _tv_features(exact_model)(x.double())
        want = _tv_features(theirs)(x)
        got = ours(x)
        same_path = dilated.forward_features(x)
    for name, g, w, e, s in zip(exact, got, want.values(), exact.values(), same_path):
        assert_error_within(g, w, e, 2.0, name=name)
        assert torch.equal(g, s)  # the very same fused computation as fastbb's torchvision-style ResNet


# (multi_grid and contract_dilation are mmseg's: MMSegResNet)
VARIANTS = [
    dict(depth=18),
    dict(depth=18, dilations=(1, 1, 2, 2), strides=(1, 2, 1, 1)),
    dict(depth=50, style="caffe", out_indices=(1, 3)),
    dict(depth=50, deep_stem=True, stem_channels=32, base_channels=16),
    dict(depth=50, deep_stem=True, avg_down=True, base_channels=16),
    dict(depth=50, base_channels=16, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), multi_grid=(1, 2, 4)),
    dict(depth=50, base_channels=16, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True),
    dict(depth=34, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(2,), base_channels=16),
]


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_variants_match_their_unfused_modules(kwargs, mode):
    cls = MMSegResNet if "multi_grid" in kwargs or "contract_dilation" in kwargs else MMResNet
    model = randomize_bn(cls(norm_eval=False, **kwargs)).double()
    reference = copy.deepcopy(model)
    model.train(mode == "train")
    reference.train(mode == "train")
    x = torch.randn(2, 3, 45, 51, dtype=torch.float64)
    got = model(x)
    want = _reference_forward(reference, x)
    assert len(got) == len(model.out_indices)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    grads = [torch.autograd.grad(sum(o.square().mean() for o in outs), list(m.parameters()))
             for outs, m in ((got, model), (want, reference))]
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)  # running statistics moved alike


@pytest.mark.parametrize("training, grad", [(True, True), (True, False), (False, True), (False, False)])
def test_training_runs_channels_last_inside(training, grad):
    """A training forward with autograd of NCHW float32 images on the CPU runs channels_last inside
    (fastbb.models.resnet.runs_channels_last), and every output comes back contiguous as x; the other modes
    keep x's layout throughout. The values are tested against the real classes (test_mm_real_resnet.py)."""
    model = MMResNet(18).train(training)
    layouts = []
    model.layer1.register_forward_hook(lambda module, inputs, output: layouts.append(
        output.is_contiguous(memory_format=torch.channels_last) and not output.is_contiguous()))
    with torch.set_grad_enabled(grad):
        outs = model(torch.randn(2, 3, 32, 32))
    assert layouts == [training and grad]
    assert len(outs) == 4 and all(out.is_contiguous() for out in outs)


def test_structure_follows_mmdet():
    caffe = MMResNet(depth=50, style="caffe")
    assert caffe.layer2[0].conv1.stride == (2, 2) and caffe.layer2[0].conv2.stride == (1, 1)
    v1c = ResNetV1c(depth=50)
    keys = list(v1c.state_dict())
    assert not any(k.startswith(("conv1.", "bn1.")) for k in keys)
    assert [k for k in keys if k.startswith("stem.") and k.endswith("weight")] == \
        ["stem.0.weight", "stem.1.weight", "stem.3.weight", "stem.4.weight", "stem.6.weight", "stem.7.weight"]
    assert v1c.stem[0].stride == (2, 2) and v1c.stem[0].out_channels == 32 and v1c.stem[6].out_channels == 64
    v1d = ResNetV1d(depth=50)
    for i in range(1, 5):
        pool, conv = getattr(v1d, f"layer{i}")[0].downsample[:2]
        assert isinstance(pool, nn.AvgPool2d) and pool.ceil_mode and not pool.count_include_pad
        assert pool.stride == (1 if i == 1 else 2) and conv.stride == (1, 1)
    assert "layer1.0.downsample.1.weight" in v1d.state_dict() and "layer1.0.downsample.2.running_var" in v1d.state_dict()
    grid = MMSegResNet(depth=50, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True,
                       multi_grid=(1, 2, 4))
    assert [b.conv2.dilation[0] for b in grid.layer4] == [1, 2, 4]
    assert [b.conv2.dilation[0] for b in grid.layer3] == [1] + [2] * 5  # contracted first block
    basic = MMResNet(depth=18, dilations=(1, 1, 1, 2), strides=(1, 2, 2, 1))
    assert basic.layer4[1].conv1.dilation == (2, 2) and basic.layer4[1].conv2.dilation == (1, 1)
    # As mmdet, init_weights (which mmengine's runner calls) initialises: zero_init_residual zeroes the last BNs.
    for zero_init_residual in (True, False):
        model = MMResNet(depth=50, zero_init_residual=zero_init_residual)
        assert model.layer1[0].bn3.weight.abs().sum() > 0
        model.init_weights()
        assert (model.layer1[0].bn3.weight.abs().sum() == 0) == zero_init_residual
    assert MMResNet(depth=101).feat_dim == 2048 and len(MMResNet(depth=152).layer3) == 36


def test_frozen_stages_and_norm_eval():
    model = MMResNet(depth=18, frozen_stages=1, norm_eval=False).train()
    frozen = [model.conv1, model.bn1, model.layer1]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not model.bn1.training and not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    deep = ResNetV1c(depth=18, frozen_stages=0).train()
    assert not deep.stem.training and all(not p.requires_grad for p in deep.stem.parameters())
    eval_norms = MMResNet(depth=18).train()  # mmdet's default norm_eval=True
    assert all(not m.training for m in eval_norms.modules() if isinstance(m, nn.BatchNorm2d))
    before = copy.deepcopy(eval_norms.state_dict())
    eval_norms(torch.randn(2, 3, 32, 32))
    for name, value in eval_norms.state_dict().items():
        assert torch.equal(value, before[name]), name  # no running statistic moved


def test_with_cp_gives_the_same_gradients():
    plain = randomize_bn(MMResNet(depth=18, base_channels=8)).double().train()
    checkpointed = MMResNet(depth=18, base_channels=8, with_cp=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(sum(o.sum() for o in m(x)), [x] + list(m.parameters())) for m in (plain, checkpointed)]
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w)


def test_build_from_configs():
    backbone = fastbb.build(dict(type="ResNet", depth=50, num_stages=4, out_indices=(3,), style="pytorch"))
    assert isinstance(backbone, MMResNet)
    with torch.no_grad():
        (c5,) = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert c5.shape == (1, 2048, 2, 2)
    v1c = fastbb.build(dict(type="ResNetV1c", depth=18, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
                            norm_cfg=dict(type="SyncBN", requires_grad=True), norm_eval=False, contract_dilation=True),
                       scope="mmseg")
    assert isinstance(v1c, MMSegResNetV1c) and isinstance(v1c.stem[1], nn.SyncBatchNorm)
    assert isinstance(fastbb.build(dict(type="ResNetV1c", depth=18)), ResNetV1c)
    assert isinstance(fastbb.build(dict(type="ResNetV1d", depth=18)), ResNetV1d)
    frozen_bn = fastbb.build(dict(type="ResNet", depth=18, norm_cfg=dict(type="BN", requires_grad=False, eps=1e-3)))
    assert frozen_bn.bn1.eps == 1e-3 and not frozen_bn.bn1.weight.requires_grad


@pytest.mark.filterwarnings("ignore:.*pretrained is deprecated")
def test_pretrained_local_checkpoint(tmp_path):
    """A checkpoint named by pretrained or init_cfg loads in init_weights (a classifier's keys ignored)."""
    source = randomize_bn(MMResNet(depth=18))
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {**source.state_dict(), "fc.weight": torch.zeros(2, 512)}}, path)
    for model in (MMResNet(depth=18, pretrained=str(path)),
                  MMResNet(depth=18, init_cfg=dict(type="Pretrained", checkpoint=str(path)))):
        assert not torch.equal(model.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
        model.init_weights()
        for name, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name


# (the options fastbb does not fuse, GN, dcn, plugins, other convs, build the original class: see
# test_mm_real_resnet.py)
@pytest.mark.parametrize("cls, kwargs, error, match", [
    (MMResNet, dict(depth=42), KeyError, "invalid depth 42"),
    (MMResNet, dict(depth=50, num_stages=5, strides=(1,) * 5, dilations=(1,) * 5), ValueError, "num_stages"),
    (MMResNet, dict(depth=50, strides=(1, 2, 2)), ValueError, "strides and dilations"),
    (MMResNet, dict(depth=50, out_indices=(4,)), ValueError, "out_indices"),
    (MMResNet, dict(depth=50, style="tf"), ValueError, "style"),
    (MMResNet, dict(depth=50, norm_cfg="BN"), TypeError, "norm_cfg must be a dict"),
    (MMResNet, dict(depth=50, norm_cfg=dict(type="BN", foo=1)), TypeError, "norm_cfg .*'foo'"),
    (MMResNet, dict(depth=50, conv_cfg="Conv2d"), TypeError, "conv_cfg must be a dict"),
    (MMResNet, dict(depth=50, pretrained=3), TypeError, "pretrained must be a str or None"),
    (MMSegResNet, dict(depth=50, multi_grid=(1, 2)), ValueError, "multi_grid"),
])
def test_bad_configs_name_the_option(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_state_dict_mismatch_is_the_usual_error():
    state = MMResNet(depth=18).state_dict()
    del state["layer1.0.conv1.weight"]
    state["fc.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*layer1.0.conv1.weight.*Unexpected key\(s\).*fc.weight"):
        MMResNet(depth=18).load_state_dict(state)
