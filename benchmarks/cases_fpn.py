"""FPN merges and modules on the RetinaNet R50-FPN default shapes (CONTRACT.md: batch 2, 800x1344 input).

- upsample_nearest_add at P3: lateral 2x256x100x168, top 2x256x50x84 (float32): eager
  `lateral + F.interpolate(top, size=..., mode="nearest")`, torch.compile of it, fastbb; forward, and
  forward + backward (gradients of both). "copy lateral" times `torch.add(lateral, 1, out=buffer)`, a pass
  that reads and writes the lateral once: the memory floor the merge cannot beat (it also reads the top).
- fpn_merge at P3 (C3 2x512x100x168 -> 256 channels): eager conv1x1 + interpolate + add, compiled, fastbb.
- the two top-down merges of the FPN alone (eager vs fastbb) and the whole torchvision
  FeaturePyramidNetwork with LastLevelP6P7 (as RetinaNet) vs fastbb.nn.FeaturePyramidNetwork with the same
  weights, forward and forward + backward: the merges' share of the FPN and what fastbb removes of it.
- the same FPNs (float32 weights and inputs) forward + backward under torch.autocast in bfloat16, as mixed
  precision training runs them.
On a GPU the same cases run in bfloat16 channels_last as well.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torchvision.ops import feature_pyramid_network as tv_fpn

from fastbb.benchmarks.runner import backend_providers
from fastbb.nn import FeaturePyramidNetwork, LastLevelP6P7
from fastbb.ops.fpn_merge import fpn_merge
from fastbb.ops.upsample_nearest_add import upsample_nearest_add

BATCH = 2
# C3..C5 of an 800x1344 input, and the FPN's P3..P5.
C_LEVELS = [(512, 100, 168), (1024, 50, 84), (2048, 25, 42)]
OUT_CHANNELS = 256


def _eager_merge(top, lateral):
    return lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")


def _eager_fpn_merge(x, weight, bias, top):
    return F.conv2d(x, weight, bias) + F.interpolate(top, size=x.shape[-2:], mode="nearest")


def _grads(fn, inputs):
    """forward + backward of fn(*inputs) with a fixed output gradient."""
    def run():
        out = fn(*inputs)
        return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], torch.ones_like(out))
    return run


def _layouts(device):
    """(tag, dtype, memory format) of the timed variants: float32 NCHW; on a GPU also bf16 channels_last."""
    variants = [("", torch.float32, torch.contiguous_format)]
    if device == "cuda":
        variants.append((" bf16 NHWC", torch.bfloat16, torch.channels_last))
    return variants


def _merge_cases(device, tag, dtype, layout):
    gen = torch.Generator().manual_seed(0)
    _, height, width = C_LEVELS[0]
    top = torch.randn(BATCH, OUT_CHANNELS, height // 2, width // 2, generator=gen)
    lateral = torch.randn(BATCH, OUT_CHANNELS, height, width, generator=gen)
    top, lateral = (t.to(device, dtype).contiguous(memory_format=layout) for t in (top, lateral))
    buffer = torch.empty_like(lateral)
    compiled = torch.compile(_eager_merge, dynamic=False)
    shape = f"{BATCH}x{OUT_CHANNELS}x{height}x{width}{tag}"

    forward = {
        "eager": lambda: _eager_merge(top, lateral),
        "torch.compile": lambda: compiled(top, lateral),
        "fastbb": lambda: upsample_nearest_add(top, lateral),
        "copy lateral": lambda: torch.add(lateral, 1, out=buffer),
    }
    forward.update(backend_providers("upsample_nearest_add", device, forward["fastbb"]))
    top_g, lateral_g = top.clone().requires_grad_(), lateral.clone().requires_grad_()
    backward = {
        "eager": _grads(_eager_merge, (top_g, lateral_g)),
        "torch.compile": _grads(compiled, (top_g, lateral_g)),
        "fastbb": _grads(upsample_nearest_add, (top_g, lateral_g)),
    }
    backward.update(backend_providers("upsample_nearest_add", device, backward["fastbb"]))
    return [{"name": f"upsample_nearest_add fwd {shape}", "providers": forward, "baseline": "eager",
             "representative": tag == ""},
            {"name": f"upsample_nearest_add fwd+bwd {shape}", "providers": backward, "baseline": "eager"}]


def _fpn_merge_case(device, tag, dtype, layout):
    gen = torch.Generator().manual_seed(1)
    c_in, height, width = C_LEVELS[0]
    x = torch.randn(BATCH, c_in, height, width, generator=gen)
    weight = torch.randn(OUT_CHANNELS, c_in, 1, 1, generator=gen) / c_in ** 0.5
    bias = torch.randn(OUT_CHANNELS, generator=gen)
    top = torch.randn(BATCH, OUT_CHANNELS, height // 2, width // 2, generator=gen)
    x, top = (t.to(device, dtype).contiguous(memory_format=layout) for t in (x, top))
    weight, bias = weight.to(device, dtype), bias.to(device, dtype)
    compiled = torch.compile(_eager_fpn_merge, dynamic=False)
    providers = {
        "eager": lambda: _eager_fpn_merge(x, weight, bias, top),
        "torch.compile": lambda: compiled(x, weight, bias, top),
        "fastbb": lambda: fpn_merge(x, weight, bias, top),
    }
    providers.update(backend_providers("fpn_merge", device, providers["fastbb"]))
    name = f"fpn_merge fwd {BATCH}x{c_in}x{height}x{width}->{OUT_CHANNELS}{tag}"
    return [{"name": name, "providers": providers, "baseline": "eager", "representative": tag == ""}]


def _fpn_cases(device, tag, dtype, layout):
    gen = torch.Generator().manual_seed(2)
    features = OrderedDict(
        (f"c{i + 3}", torch.randn(BATCH, c, h, w, generator=gen).to(device, dtype).contiguous(memory_format=layout))
        for i, (c, h, w) in enumerate(C_LEVELS))
    in_channels = [c for c, _, _ in C_LEVELS]
    theirs = tv_fpn.FeaturePyramidNetwork(in_channels, OUT_CHANNELS, tv_fpn.LastLevelP6P7(OUT_CHANNELS, OUT_CHANNELS))
    ours = FeaturePyramidNetwork(in_channels, OUT_CHANNELS, LastLevelP6P7(OUT_CHANNELS, OUT_CHANNELS))
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = (m.to(device, dtype).to(memory_format=layout) for m in (theirs, ours))

    def forward(model):
        def run():
            with torch.no_grad():
                return model(features)
        return run

    def forward_backward(model, autocast_dtype=None, inputs=features):
        params = list(model.parameters())

        def run():
            with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                outputs = list(model(inputs).values())
            return torch.autograd.grad(outputs, params, [torch.ones_like(o) for o in outputs])
        return run

    # The two top-down merges alone, on the FPN's own shapes (P5 -> P4, P4 -> P3).
    tops = [torch.randn(BATCH, OUT_CHANNELS, h, w, generator=gen).to(device, dtype).contiguous(memory_format=layout)
            for _, h, w in C_LEVELS]

    def merges(merge):
        return lambda: [merge(tops[i + 1], tops[i]) for i in (1, 0)]

    shape = f"C3-C5 {BATCH}x800x1344{tag}"
    # Under autocast on the CPU one image (a call of the batch takes about 3 s on 2 cores).
    autocast_batch = 1 if device == "cpu" else BATCH
    autocast_features = OrderedDict((name, f[:autocast_batch]) for name, f in features.items())
    return [
        {"name": f"FPN top-down merges {shape}", "providers": {"eager": merges(_eager_merge),
                                                              "fastbb": merges(upsample_nearest_add)},
         "baseline": "eager"},
        {"name": f"FeaturePyramidNetwork fwd {shape}",
         "providers": {"torchvision": forward(theirs), "fastbb": forward(ours)}, "baseline": "torchvision",
         "representative": tag == ""},
        {"name": f"FeaturePyramidNetwork fwd+bwd {shape}",
         "providers": {"torchvision": forward_backward(theirs), "fastbb": forward_backward(ours)},
         "baseline": "torchvision"},
    ] + ([] if tag else [  # autocast takes the float32 models and inputs
        {"name": f"FeaturePyramidNetwork fwd+bwd bf16 autocast C3-C5 {autocast_batch}x800x1344",
         "providers": {"torchvision": forward_backward(theirs, torch.bfloat16, autocast_features),
                       "fastbb": forward_backward(ours, torch.bfloat16, autocast_features)},
         "baseline": "torchvision"},
    ])


def cases(device):
    result = []
    for tag, dtype, layout in _layouts(device):
        result += _merge_cases(device, tag, dtype, layout)
        result += _fpn_merge_case(device, tag, dtype, layout)
        result += _fpn_cases(device, tag, dtype, layout)
    return result
