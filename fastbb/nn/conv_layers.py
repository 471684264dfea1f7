"""Plain conv layers (a Conv2d, or torchvision's Conv2dNormActivation: conv [-> norm] [-> ReLU]) with their
convs through fastbb.ops.conv_bn_relu's tables, for the modules whose convs are plain nn.Conv2d (the RetinaNet
head, the FPN's output convs) in eager float32 CPU computation:
- without autograd: the eval table, on the conv's weight as it is (no BN to fold), a ReLU right after the conv
  in the same call; the packed forms it makes of a weight (the Winograd transform, oneDNN's layout) are kept
  until the weight changes in place or is replaced. Maps under 8x8 run the conv module itself (oneDNN's direct
  conv is 4x the Winograd conv's speed at 4x4 on a 2-core AVX-512 CPU).
- under autograd: the training-conv table, then the layer's other modules. Where the same layers run over
  several small maps (a RetinaNet head's levels), those maps share one call per conv, laid out on one zero-
  separated canvas (levels_forward): oneDNN's weight gradient costs about 1.7 ms per call at 256 channels
  however small the map, 5x the work of a 4x4 level at batch 4.
"""
import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from fastbb._tracing import traced
from fastbb.ops.conv_bn_relu import TABLE as EVAL_CONV_TABLE
from fastbb.ops.conv_bn_relu import TRAIN_CONV_TABLE

__all__ = ["layer_forward", "layers_forward", "levels_forward", "runs_fused_convs"]

# Maps with fewer output positions per image run the conv module itself in inference (see above).
_EVAL_TABLE_MIN_POSITIONS = 64

# Under autograd, maps with fewer output positions over the batch (N * H * W) share one canvas per conv in
# levels_forward; larger ones run alone. Measured at 256 channels, batch 4, forward and backward on a 2-core
# AVX-512 CPU: levels 8x8 to 1x1 one by one 16.2 ms, on one 8x13 canvas 7.3 ms; with the 16x16 level on a
# 16x25 canvas 26.8 ms against 18.0 + 7.3 ms (a large map pays its share of the canvas's gaps and gains nothing).
_CANVAS_MAX_POSITIONS = 512

# weight -> (its version, the packed forms the eval table keeps of it: the Winograd transform, oneDNN's layout)
_packed = WeakIdKeyDictionary()


def runs_fused_convs(features: list[Tensor]) -> bool:
    """Whether layers run their convs through fastbb's tables: eager float32 CPU computation (no autocast, no
    torch.compile, no tracing)."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not traced(*features)
            and not torch.is_autocast_enabled("cpu")
            and all(f.device.type == "cpu" and f.dtype == torch.float32 and f.dim() == 4 for f in features))


def _packed_weights(weight: Tensor) -> dict:
    """The eval table's store of packed forms of weight, emptied when weight changes in place."""
    version, packed = _packed.get(weight, (None, None))
    if version != weight._version:
        packed = {}
        _packed[weight] = (weight._version, packed)
    return packed


def _conv(conv: nn.Conv2d, x: Tensor, relu: bool) -> Tensor:
    """conv(x), then ReLU if relu, through fastbb's conv tables where they take the call; else the module."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or x.dtype != conv.weight.dtype:
        out = conv(x)
        return torch.relu(out) if relu else out
    args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad
                                              or (conv.bias is not None and conv.bias.requires_grad))
    if needs_grad:
        out = TRAIN_CONV_TABLE("cpu", x, conv.weight, conv.bias, *args)
        return torch.relu(out) if relu else out
    if x.shape[-2] * x.shape[-1] < _EVAL_TABLE_MIN_POSITIONS:
        out = conv(x)
        return out.relu_() if relu else out
    # the table's shift is a tensor (the folded BN's, in conv_bn_relu)
    shift = conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
    # x as it is: each implementation keeps its layout, as F.conv2d does (the Winograd conv takes NCHW only)
    return EVAL_CONV_TABLE("cpu", x, conv.weight, shift, None, *args, relu, _packed_weights(conv.weight))


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling module runs forward hooks (its own or global ones): such a module runs as itself."""
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def layer_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """
    layer(x) for one layer (torchvision's Conv2dNormActivation: conv [-> norm] [-> ReLU], or a Conv2d), its
    plain convs through _conv, a conv directly followed by a ReLU as one call; any other module, and a module
    with forward hooks, as itself.

    Args:
        layer (nn.Module): the layer.
        x (Tensor[N, C, H, W]): its input.

    Returns:
        Tensor[N, C_out, H_out, W_out]: layer(x).
    """
    if _has_hooks(layer):
        return layer(x)
    modules = list(layer) if type(layer).forward is nn.Sequential.forward else [layer]
    i = 0
    while i < len(modules):
        module = modules[i]
        if type(module) is nn.Conv2d and not _has_hooks(module):
            relu = i + 1 < len(modules) and type(modules[i + 1]) is nn.ReLU and not _has_hooks(modules[i + 1])
            x = _conv(module, x, relu)
            i += 2 if relu else 1
        else:
            x = module(x)
            i += 1
    return x


def layers_forward(layers: nn.Module, x: Tensor) -> Tensor:
    """layers(x) for a plain nn.Sequential of layers (a RetinaNet head's stacked convs), each through
    layer_forward; any other module, and one with forward hooks, as itself."""
    if type(layers).forward is not nn.Sequential.forward or _has_hooks(layers):
        return layers(x)
    for layer in layers:
        x = layer_forward(layer, x)
    return x


def _canvas_layer(layer: nn.Module) -> bool:
    """Whether layer computes on a canvas of maps as on each map alone: a plain Conv2d whose outputs read at
    most one position away (3x3 stride 1 padding 1, or 1x1 stride 1 padding 0), a plain ReLU, or an
    nn.Sequential (torchvision's Conv2dNormActivation included) of those; no hooks."""
    if _has_hooks(layer):
        return False
    if type(layer).forward is nn.Sequential.forward:
        return all(_canvas_layer(module) for module in layer)
    if type(layer) is nn.ReLU:
        return True
    if type(layer) is not nn.Conv2d or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return False
    return (layer.stride == (1, 1) and layer.dilation == (1, 1)
            and ((layer.kernel_size == (3, 3) and layer.padding == (1, 1))
                 or (layer.kernel_size == (1, 1) and layer.padding == (0, 0))))


def canvas_corners(shapes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]] | None:
    """
    Where maps of non-increasing sizes go on one canvas, one zero row or column between any two: each map
    right of the one before, then below it, alternately (an L-shaped spiral), so that halving sizes fill a
    canvas about as high as the first map and 1.5 times as wide.

    Args:
        shapes (List[Tuple[int, int]]): the maps' (height, width), each no larger than the one before.

    Returns:
        (List[Tuple[int, int]], Tuple[int, int]): each map's (top, left) and the canvas's (height, width);
        None when a map is larger than the one before.
    """
    corners = []
    top = left = 0
    for i, (height, width) in enumerate(shapes):
        if i > 0:
            above_height, above_width = shapes[i - 1]
            if height > above_height or width > above_width:
                return None
            if i % 2 == 1:
                left += above_width + 1
            else:
                top += above_height + 1
        corners.append((top, left))
    size = (max(t + h for (t, _), (h, _) in zip(corners, shapes)),
            max(l + w for (_, l), (_, w) in zip(corners, shapes)))
    return corners, size


def _on_canvas(stack: nn.Module, last: nn.Module, features: list[Tensor], layout) -> list[Tensor]:
    """last(stack(x)) for every x in features (same batch and channels, non-increasing sizes), each conv
    once over one canvas holding them all, laid out as canvas_corners' layout says: after every layer the
    gaps are zeroed again, so that every conv reads zeros around each map, as its padding; the outputs are
    cut back out."""
    corners, (height, width) = layout
    first = features[0]
    canvas = first.new_zeros(first.shape[0], first.shape[1], height, width)
    on_maps = first.new_zeros(height, width)
    for x, (top, left) in zip(features, corners):
        canvas[:, :, top:top + x.shape[2], left:left + x.shape[3]] = x
        on_maps[top:top + x.shape[2], left:left + x.shape[3]].fill_(1)
    for layer in stack:
        canvas = layer_forward(layer, canvas) * on_maps
    out = layer_forward(last, canvas)
    return [out[:, :, top:top + x.shape[2], left:left + x.shape[3]] for x, (top, left) in zip(features, corners)]


def levels_forward(stack: nn.Module, last: nn.Module, features: list[Tensor]) -> list[Tensor]:
    """
    last(stack(x)) for each level's features x (a RetinaNet branch: its stacked layers, then its output
    conv), through layers_forward and layer_forward. Under autograd the levels with fewer than
    _CANVAS_MAX_POSITIONS output positions over the batch run together on one canvas (_on_canvas) where
    every layer computes there as on each level alone (3x3 / 1x1 convs and ReLUs, no norm, no hooks).

    Args:
        stack (nn.Module): the stacked layers.
        last (nn.Module): the output conv.
        features (List[Tensor[N, C, H, W]]): the features of each level.

    Returns:
        List[Tensor[N, C_out, H, W]]: last(stack(x)) of each level, in the levels' order.
    """
    small, layout = [], None
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*features, *stack.parameters(), *last.parameters()))
    if needs_grad and _canvas_layer(stack) and _canvas_layer(last) and isinstance(stack, nn.Sequential):
        small = [i for i, x in enumerate(features)
                 if 0 < x.shape[0] * x.shape[2] * x.shape[3] < _CANVAS_MAX_POSITIONS and x.shape[1] > 0]
        first = features[small[0]] if small else None
        if len(small) >= 2 and all(features[i].shape[:2] == first.shape[:2] and features[i].dtype == first.dtype
                                   for i in small):
            layout = canvas_corners([tuple(features[i].shape[-2:]) for i in small])
        if layout is None:
            small = []
    outputs = [None if i in small else layer_forward(last, layers_forward(stack, x)) for i, x in enumerate(features)]
    if small:
        for i, out in zip(small, _on_canvas(stack, last, [features[i] for i in small], layout)):
            outputs[i] = out
    return outputs
