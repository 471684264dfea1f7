"""fpn_merge: one FPN top-down step, `conv1x1(x, weight, bias) + F.interpolate(top, size=x's, mode="nearest")`.

The lateral 1x1 conv and the merge of the upsampled coarser map (upsample_nearest_add's semantics).
Backends (TABLE):
- cuda "triton": one kernel, a GEMM over the input channels whose epilogue adds the bias and the
  upsampled top before the single store (the lateral output never round-trips through memory).
- cpu "cpp": the 1x1 conv (MKL's GEMM per image for NCHW float32, as in conv_bn_relu; else oneDNN) into
  a fresh buffer, then the upsampled top added into it in place by fastbb's C++ merge kernel: one extra
  pass instead of eager's two (upsample written, then re-read).
- "reference": F.conv2d + F.interpolate + add.
Backward: the conv's gradients by aten's convolution_backward, the top's by upsample_nearest_backward.
A GEMM-based conv rounds differently from cuDNN/oneDNN in the last bits; float32 GEMMs run in full
float32 precision (no TF32).
"""
import torch
import torch.nn.functional as F

from fastbb._tracing import fx_leaf
from fastbb import _backend
from fastbb.ops._common import FLOAT_DTYPES, check_same_device, check_tensor, check_top_shape, memory_format
from fastbb.ops._pointwise_gemm import pointwise_conv_gemm, pointwise_gemm_applies

_OP = "fastbb.fpn_merge"  # how error messages name the op


def _merge_triton(x, weight, bias, top):
    from fastbb.kernels import fpn_merge as kernels
    return kernels.fpn_merge(x, weight, bias, top)


def _merge_cpp(x, weight, bias, top):
    if pointwise_gemm_applies(x, weight, None, (1, 1), (0, 0), 1):
        out = pointwise_conv_gemm(x, weight, bias)
    else:
        out = F.conv2d(x, weight, bias)
    if out.numel() > 0:
        torch.ops.fastbb_C.upsample_nearest_add_out(top.contiguous(memory_format=memory_format(out)), out, out)
    return out


def _merge_reference(x, weight, bias, top):
    return F.conv2d(x, weight, bias) + F.interpolate(top, size=x.shape[-2:], mode="nearest")


# Every implementation takes (x, weight, bias, top) and returns the merged map in x's memory format.
TABLE = _backend.OpTable("fpn_merge", [
    _backend.Implementation("triton", _merge_triton, devices=("cuda",),
                            what="one Triton GEMM over the input channels whose epilogue adds the bias and the "
                                 "upsampled top before the single store"),
    _backend.Implementation("cpp", _merge_cpp, devices=("cpu",), kernel="fastbb_C::upsample_nearest_add_out",
                            what="the 1x1 conv (MKL's GEMM per image for NCHW float32, else PyTorch's conv), then "
                                 "fastbb's C++ kernel adds the upsampled top in place"),
    _backend.Implementation("reference", _merge_reference, what="plain PyTorch: F.conv2d + F.interpolate + add"),
], autocast="runs in the autocast dtype, as conv2d does")


@torch.library.custom_op("fastbb::fpn_merge", mutates_args=())
def _fpn_merge_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  top: torch.Tensor) -> torch.Tensor:
    return TABLE(x.device.type, x, weight, bias, top)


@_fpn_merge_op.register_fake
def _(x, weight, bias, top):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    return x.new_empty(shape).contiguous(memory_format=memory_format(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, top = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.top_size = tuple(top.shape[-2:])


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight, needs_bias, needs_top = ctx.needs_input_grad
    grad_x = grad_weight = grad_bias = grad_top = None
    if needs_x or needs_weight or needs_bias:
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [0, 0], [1, 1], False,
            [0, 0], 1, [needs_x, needs_weight, needs_bias and ctx.has_bias])
    if needs_top:
        grad_top = torch.ops.fastbb.upsample_nearest_backward(grad_out, *ctx.top_size)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, grad_top


_fpn_merge_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, lateral_weight, lateral_bias, top):
    check_tensor(_OP, "x", x, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "lateral_weight", lateral_weight)
    check_tensor(_OP, "top", top)
    if x.dim() != 4:
        raise ValueError(f"{_OP}: x must be 4-D (N, C_in, H, W), got shape {tuple(x.shape)}")
    if lateral_weight.dim() != 4 or lateral_weight.shape[2:] != (1, 1) or lateral_weight.shape[1] != x.shape[1]:
        raise ValueError(f"{_OP}: lateral_weight must be a 1x1 conv weight (C_out, C_in = {x.shape[1]}, 1, 1), "
                         f"got shape {tuple(lateral_weight.shape)}")
    if x.shape[1] == 0 or lateral_weight.shape[0] == 0:  # as for F.conv2d, no channels is an error
        raise ValueError(f"{_OP}: x and lateral_weight must have at least one channel, got shapes "
                         f"{tuple(x.shape)} and {tuple(lateral_weight.shape)}")
    out_channels = lateral_weight.shape[0]
    tensors = {"x": x, "lateral_weight": lateral_weight, "top": top}
    if lateral_bias is not None:
        check_tensor(_OP, "lateral_bias", lateral_bias)
        if tuple(lateral_bias.shape) != (out_channels,):
            raise ValueError(f"{_OP}: lateral_bias must be (C_out,) = ({out_channels},), got shape "
                             f"{tuple(lateral_bias.shape)}")
        tensors["lateral_bias"] = lateral_bias
    check_same_device(_OP, **tensors)
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{_OP}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    check_top_shape(_OP, top, (x.shape[0], out_channels, *x.shape[2:]), "the lateral conv's output")


def _fpn_merge_scripted(x: torch.Tensor, lateral_weight: torch.Tensor, lateral_bias: torch.Tensor | None,
                       top: torch.Tensor) -> torch.Tensor:
    """fpn_merge under TorchScript: the custom op, without the Python input checks TorchScript cannot compile."""
    return torch.ops.fastbb.fpn_merge(x, lateral_weight, lateral_bias, top)


@fx_leaf("fastbb.ops.fpn_merge", scripted=_fpn_merge_scripted)
def fpn_merge(x: torch.Tensor, lateral_weight: torch.Tensor, lateral_bias: torch.Tensor | None,
              top: torch.Tensor) -> torch.Tensor:
    """
    One FPN top-down step: ``F.conv2d(x, lateral_weight, lateral_bias) + F.interpolate(top,
    size=x.shape[-2:], mode="nearest")``, the lateral 1x1 conv fused with the merge of the coarser map.
    Differentiable in all four inputs.

    Args:
        x (Tensor[N, C_in, H, W]): the backbone feature map; float16, bfloat16, float32 or float64, NCHW or
            channels_last.
        lateral_weight (Tensor[C_out, C_in, 1, 1]): the lateral conv's weight.
        lateral_bias (Tensor[C_out], optional): the lateral conv's bias.
        top (Tensor[N, C_out, h, w]): the coarser merged map, with h <= H and w <= W.
        All four of one dtype and device.

    Returns:
        Tensor[N, C_out, H, W]: the merged map, in x's dtype and memory format.
    """
    _check(x, lateral_weight, lateral_bias, top)
    return torch.ops.fastbb.fpn_merge(x, lateral_weight, lateral_bias, top)


def fpn_merge_reference(x: torch.Tensor, lateral_weight: torch.Tensor, lateral_bias: torch.Tensor | None,
                        top: torch.Tensor) -> torch.Tensor:
    """:func:`fpn_merge` in plain PyTorch (the ground truth): same arguments and checks."""
    _check(x, lateral_weight, lateral_bias, top)
    return F.conv2d(x, lateral_weight, lateral_bias) + F.interpolate(top, size=x.shape[-2:], mode="nearest")
