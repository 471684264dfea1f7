"""conv + BN + ReLU and ResNet-50 backbones: fastbb vs eager PyTorch / torchvision and torch.compile.

- conv_bn_relu eval: a 3x3 256->256 conv (dilation 1, 2, 4, padding = dilation) + BN (running statistics)
  + ReLU at 1x256x64x64, float32: nn modules eager, torch.compile of them, fastbb.ops.conv_bn_relu.
- conv_bn_relu training forward + backward (dilation 2): eager modules vs fastbb.
- ResNet-50 eval at 1x3x224x224, NCHW and (on the CPU) channels_last (torchvision, torch.compile of it,
  fastbb.models.resnet50 with the same weights), the C2..C5 features of 2x3x800x1344 (eval; torchvision's
  feature extractor, torch.compile of it, fastbb), and a training step (forward + backward) of the
  backbone at 2x3x224x224.
On a GPU the ResNet-50 eval case runs at batch 32 in bfloat16 channels_last as well.
- ResNet-50 forward + backward under bfloat16 autocast (2x3x128x128 on the CPU, 32x3x224x224 on CUDA):
  torchvision under the same autocast vs fastbb.
"""
import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastbb
from fastbb.ops.conv_bn_relu import conv_bn_relu

# A cold torch.compile of a ResNet-50 forward (seconds): about a minute here, and on a 16-core GPU machine
# an estimate to be replaced by the compile_s the GPU check records.
RESNET_COMPILE_ESTIMATE_S = 90


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _conv_bn_cases(device):
    torch.manual_seed(0)
    x = torch.randn(1, 256, 64, 64, device=device)
    cases = []
    for dilation in (1, 2, 4):
        conv = nn.Conv2d(256, 256, 3, padding=dilation, dilation=dilation, bias=False).to(device)
        bn = _randomize_bn(nn.BatchNorm2d(256)).to(device).eval()
        eager = nn.Sequential(conv, bn, nn.ReLU()).eval()
        compiled = torch.compile(eager, dynamic=False)

        def fused(conv=conv, bn=bn):
            return conv_bn_relu(x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                padding=conv.padding, dilation=conv.dilation, eps=bn.eps)

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    return fn()
            return run

        cases.append({"name": f"conv_bn_relu eval 3x3 d{dilation} 1x256x64x64",
                      "providers": {"eager": no_grad(lambda m=eager: m(x)), "torch.compile": no_grad(lambda c=compiled: c(x)),
                                    "fastbb": no_grad(fused)},
                      "baseline": "eager", "representative": dilation == 2})

    conv = nn.Conv2d(256, 256, 3, padding=2, dilation=2, bias=False).to(device)
    bn_eager = _randomize_bn(nn.BatchNorm2d(256)).to(device).train()
    bn_fused = copy.deepcopy(bn_eager)
    x_grad = x.clone().requires_grad_()
    params = [x_grad, conv.weight, bn_eager.weight, bn_eager.bias]

    def eager_step():
        out = F.relu(bn_eager(conv(x_grad)))
        return torch.autograd.grad(out, params, torch.ones_like(out))

    def fused_step():
        out = conv_bn_relu(x_grad, conv.weight, None, bn_fused.weight, bn_fused.bias, bn_fused.running_mean,
                           bn_fused.running_var, padding=2, dilation=2, training=True)
        return torch.autograd.grad(out, [x_grad, conv.weight, bn_fused.weight, bn_fused.bias], torch.ones_like(out))

    cases.append({"name": "conv_bn_relu train fwd+bwd 3x3 d2 1x256x64x64",
                  "providers": {"eager": eager_step, "fastbb": fused_step}, "baseline": "eager"})
    return cases


def _resnet_cases(device):
    torch.manual_seed(1)
    theirs = _randomize_bn(torchvision.models.resnet50()).to(device).eval()
    ours = fastbb.models.resnet50(weights=theirs.state_dict()).to(device).eval()
    variants = [("", torch.float32, torch.contiguous_format, 1)]
    if device == "cpu":  # channels_last: where fastbb runs oneDNN on packed folded weights
        variants.append((" NHWC", torch.float32, torch.channels_last, 1))
    if device == "cuda":
        variants.append((" bf16 NHWC", torch.bfloat16, torch.channels_last, 32))
    cases = []
    for tag, dtype, layout, batch in variants:
        model_tv, model_fb = (copy.deepcopy(m).to(dtype=dtype, memory_format=layout) for m in (theirs, ours))
        compiled = torch.compile(model_tv, dynamic=False)
        x = torch.randn(batch, 3, 224, 224, device=device).to(dtype).contiguous(memory_format=layout)

        def no_grad(fn, x=x):
            def run():
                with torch.no_grad():
                    return fn(x)
            return run

        cases.append({"name": f"ResNet-50 eval {batch}x3x224x224{tag}",
                      "providers": {"torchvision": no_grad(model_tv), "torch.compile": no_grad(compiled),
                                    "fastbb": no_grad(model_fb)},
                      "baseline": "torchvision", "compile_estimate_s": RESNET_COMPILE_ESTIMATE_S,
                      "representative": tag == ""})

    from torchvision.models.feature_extraction import create_feature_extractor
    extractor = create_feature_extractor(theirs, {f"layer{i}": f"c{i + 1}" for i in range(1, 5)})
    image = torch.randn(2, 3, 800, 1344, device=device)

    def features(fn):
        def run():
            with torch.no_grad():
                return fn(image)
        return run

    compiled_extractor = torch.compile(extractor, dynamic=False)
    cases.append({"name": "ResNet-50 eval C2-C5 features 2x3x800x1344",
                  "providers": {"torchvision": features(extractor), "torch.compile": features(compiled_extractor),
                                "fastbb": features(ours.forward_features)},
                  "baseline": "torchvision", "compile_estimate_s": RESNET_COMPILE_ESTIMATE_S})

    train_theirs = copy.deepcopy(theirs).train()
    train_ours = fastbb.models.resnet50(weights=train_theirs.state_dict()).to(device).train()
    batch = torch.randn(2, 3, 224, 224, device=device)

    def step(model, forward):
        # The backbone ends at layer4: the classifier head takes no part in the step.
        params = [p for name, p in model.named_parameters() if p.requires_grad and not name.startswith("fc.")]

        def run():
            loss = sum(f.float().square().mean() for f in forward(model, batch))
            return torch.autograd.grad(loss, params)
        return run

    torchvision_features = create_feature_extractor(train_theirs, {f"layer{i}": f"c{i + 1}" for i in range(1, 5)})
    cases.append({"name": "ResNet-50 backbone train step 2x3x224x224",
                  "providers": {"torchvision": step(train_theirs, lambda m, b: torchvision_features(b).values()),
                                "fastbb": step(train_ours, fastbb.models.ResNet.forward_features)},
                  "baseline": "torchvision"})
    return cases


def _autocast_cases(device):
    """A training forward + backward of the whole ResNet-50 under bfloat16 autocast (on the CPU, where
    that is the autocast dtype; on CUDA at the GPU check's batch of 32 at 224x224), torchvision under the
    same autocast."""
    torch.manual_seed(2)
    theirs = _randomize_bn(torchvision.models.resnet50()).to(device).train()
    ours = fastbb.models.resnet50(weights=theirs.state_dict()).to(device).train()
    # On a 2-core CPU without native bfloat16, 2x3x224x224 takes 2-6 s a call: 128x128 keeps it near 1 s.
    batch = torch.randn(*((2, 3, 128, 128) if device == "cpu" else (32, 3, 224, 224)), device=device)

    def step(model):
        params = list(model.parameters())

        def run():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(batch).float().square().mean()
            return torch.autograd.grad(loss, params)
        return run

    return [{"name": "ResNet-50 fwd+bwd bf16 autocast " + "x".join(map(str, batch.shape)),
             "providers": {"torchvision": step(theirs), "fastbb": step(ours)}, "baseline": "torchvision"}]


def cases(device):
    return _conv_bn_cases(device) + _resnet_cases(device) + _autocast_cases(device)
