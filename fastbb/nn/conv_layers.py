"""Plain conv layers (a Conv2d, or torchvision's Conv2dNormActivation: conv [-> norm] [-> ReLU]) with their
convs through fastbb.ops.conv_bn_relu's tables, for the modules whose convs are plain nn.Conv2d (the RetinaNet
head, the FPN's output convs) in eager float32 CPU computation:
- without autograd: the eval table, on the conv's weight as it is (no BN to fold), a ReLU right after the conv
  in the same call; the packed forms it makes of a weight (the Winograd transform, oneDNN's layout) are kept
  until the weight changes in place or is replaced. Maps under 8x8 run the conv module itself (oneDNN's direct
  conv is 4x the Winograd conv's speed at 4x4 on a 2-core AVX-512 CPU).
- under autograd: the training-conv table, then the layer's other modules.
"""
import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from fastbb._tracing import traced
from fastbb.ops.conv_bn_relu import TABLE as EVAL_CONV_TABLE
from fastbb.ops.conv_bn_relu import TRAIN_CONV_TABLE

__all__ = ["layer_forward", "layers_forward", "runs_fused_convs"]

# Maps with fewer output positions per image run the conv module itself in inference (see above).
_EVAL_TABLE_MIN_POSITIONS = 64

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
