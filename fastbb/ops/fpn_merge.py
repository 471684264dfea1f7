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

Dtypes, as the composite it replaces: x, weight and bias must share one dtype (conv2d raises otherwise);
top may differ, and the result then has add's promoted dtype (computed as conv, then upsample-add). Under
torch.autocast (AUTOCAST): x, weight and bias are cast to the autocast dtype, as conv2d's are; top is cast
to float32 where torch's autocast runs the nearest upsample in float32 (CUDA), as F.interpolate's would be;
the sum then has add's promoted dtype.
"""
import torch
import torch.nn.functional as F

from fastbb._tracing import fx_leaf
from fastbb import _backend
from fastbb.ops._common import (FLOAT_DTYPES, autocast_cast, autocast_eligible, autocast_runs_in_float32,
                                check_same_device, check_tensor, check_top_shape, memory_format,
                                register_autocast_rule)
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
    if top.dtype != out.dtype:  # add's promotion of the conv's output and the top (the kernel takes one dtype)
        out = out.to(torch.promote_types(out.dtype, top.dtype))
        top = top.to(out.dtype)
    if out.numel() > 0:
        torch.ops.fastbb_C.upsample_nearest_add_out(top.contiguous(memory_format=memory_format(out)), out, out)
    return out


def _merge_reference(x, weight, bias, top):
    return F.conv2d(x, weight, bias) + F.interpolate(top, size=x.shape[-2:], mode="nearest")


def _triton_applies(x, weight, bias, top):
    # The kernel accumulates in x's compute dtype: a float64 top with a 16/32-bit x (or the reverse) would
    # lose the float64 precision of the sum.
    return top.dtype == x.dtype or torch.float64 not in (x.dtype, top.dtype)


# Every implementation takes (x, weight, bias, top) and returns the merged map in x's memory format and in the
# dtype of add's promotion of x's and top's.
TABLE = _backend.OpTable("fpn_merge", [
    _backend.Implementation("triton", _merge_triton, devices=("cuda",), applies=_triton_applies,
                            what="one Triton GEMM over the input channels whose epilogue adds the bias and the "
                                 "upsampled top before the single store"),
    _backend.Implementation("cpp", _merge_cpp, devices=("cpu",), kernel="fastbb_C::upsample_nearest_add_out",
                            what="the 1x1 conv (MKL's GEMM per image for NCHW float32, else PyTorch's conv), then "
                                 "fastbb's C++ kernel adds the upsampled top in place"),
    _backend.Implementation("reference", _merge_reference, what="plain PyTorch: F.conv2d + F.interpolate + add"),
], autocast="x, weight and bias in the autocast dtype, as conv2d's; top in float32 where autocast runs the nearest "
            "upsample in float32 (CUDA), else as it is; the sum in add's promoted dtype")


class DtypeMismatchError(RuntimeError, TypeError):
    """x, weight and bias of different dtypes: a RuntimeError as conv2d raises (and a TypeError, as fastbb
    raised before)."""


def _autocast_args(device_type, args):
    x, weight, bias, top = args
    dtype = torch.get_autocast_dtype(device_type)
    if autocast_runs_in_float32("aten::upsample_nearest2d", device_type):
        top = autocast_cast(top, device_type, torch.float32)
    return autocast_cast(x, device_type, dtype), autocast_cast(weight, device_type, dtype), \
        autocast_cast(bias, device_type, dtype), top


@torch.library.custom_op("fastbb::fpn_merge", mutates_args=())
def _fpn_merge_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  top: torch.Tensor) -> torch.Tensor:
    return TABLE(x.device.type, x, weight, bias, top)


@_fpn_merge_op.register_fake
def _(x, weight, bias, top):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    dtype = torch.promote_types(x.dtype, top.dtype)
    return x.new_empty(shape, dtype=dtype).contiguous(memory_format=memory_format(x))


register_autocast_rule("fpn_merge", _autocast_args)


def _setup_context(ctx, inputs, output):
    x, weight, bias, top = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.top_size = tuple(top.shape[-2:])
    ctx.top_dtype = top.dtype


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight, needs_bias, needs_top = ctx.needs_input_grad
    grad_x = grad_weight = grad_bias = grad_top = None
    if needs_x or needs_weight or needs_bias:
        # With a top of another dtype the output has the promoted dtype; the conv's gradient is in its own.
        grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out.to(x.dtype), x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [0, 0], [1, 1],
            False, [0, 0], 1, [needs_x, needs_weight, needs_bias and ctx.has_bias])
    if needs_top:
        grad_top = torch.ops.fastbb.upsample_nearest_backward(grad_out, *ctx.top_size).to(ctx.top_dtype)
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
    check_tensor(_OP, "top", top, dtypes=FLOAT_DTYPES)
    # The conv's inputs share a dtype once autocast has cast them (top follows add's promotion instead).
    device_type = x.device.type
    autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    conv_dtypes = {name: autocast_dtype if autocast_dtype and autocast_eligible(t, device_type) else t.dtype
                   for name, t in tensors.items() if name != "top"}
    for name, dtype in conv_dtypes.items():
        if dtype != conv_dtypes["x"]:
            raise DtypeMismatchError(f"{_OP}: {name} must have x's dtype {conv_dtypes['x']}, got {dtype}")
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
        top (Tensor[N, C_out, h, w]): the coarser merged map, with h <= H and w <= W; floating point.
        All four on one device; x, lateral_weight and lateral_bias of one dtype (as conv2d requires, else
        an error that is both a RuntimeError and a TypeError), top of any floating dtype.

    Returns:
        Tensor[N, C_out, H, W]: the merged map, in x's memory format and the dtype ``conv + upsample``
        has: x's, or add's promotion of it with top's. Under ``torch.autocast`` the conv runs in the
        autocast dtype, and the top is upsampled as F.interpolate is there (in float32 on CUDA), so the
        result has the dtype torchvision's FPN merge has under the same autocast.
    """
    _check(x, lateral_weight, lateral_bias, top)
    return torch.ops.fastbb.fpn_merge(x, lateral_weight, lateral_bias, top)


def fpn_merge_reference(x: torch.Tensor, lateral_weight: torch.Tensor, lateral_bias: torch.Tensor | None,
                        top: torch.Tensor) -> torch.Tensor:
    """:func:`fpn_merge` in plain PyTorch (the ground truth): same arguments and checks."""
    _check(x, lateral_weight, lateral_bias, top)
    return F.conv2d(x, lateral_weight, lateral_bias) + F.interpolate(top, size=x.shape[-2:], mode="nearest")
