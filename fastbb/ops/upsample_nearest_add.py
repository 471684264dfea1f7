"""upsample_nearest_add: the FPN top-down merge, `lateral + F.interpolate(top, size=lateral's, mode="nearest")`.

PyTorch's legacy nearest index, per axis: scale = float32(in) / float32(out) (a float32 division, not the
exact rational), src = min(floor(float32(dst) * scale), in - 1). Odd sizes and non-2x ratios therefore read
the rows PyTorch reads (26 -> 44 at dst 22 reads row 12). The add rounds once, as eager PyTorch does.

Forward is one pass: read lateral and top, write the sum (eager writes and re-reads the upsampled map).
Backward: the lateral's gradient is the output gradient itself (no copy); the top's is a deterministic
gather, each top pixel summing its window of the output gradient (fixed order, no atomics), by the op
fastbb::upsample_nearest_backward.

Backends (TABLE, and BACKWARD_TABLE for the top's gradient): cpu "cpp" (OpenMP over planes or rows, NCHW
and channels_last); cuda "triton"; "reference".

Dtypes, as `lateral + F.interpolate(top)`: top and lateral may differ, and the sum has add's promoted
dtype (the kernels, which take one dtype, then run on promoted copies; the promotion is exact, so the sum
is eager's bit for bit). Under torch.autocast (AUTOCAST): top is cast to float32 where torch's autocast runs
the nearest upsample in float32 (CUDA), as F.interpolate's input would be, and nothing else is cast.
"""
import torch
import torch.nn.functional as F

from fastbb._tracing import fx_leaf
from fastbb import _backend
from fastbb.ops._common import (FLOAT_DTYPES, autocast_cast, autocast_runs_in_float32, check_same_device, check_tensor,
                                check_top_shape, kernel_lib, memory_format, register_autocast_rule)

_OP = "fastbb.upsample_nearest_add"  # how error messages name the op

# Kernels. upsample_nearest_add_out: out = lateral + upsample(top); top and lateral in one memory format
# (contiguous NCHW or channels_last), out like lateral, and out may be lateral itself (in place).
# upsample_nearest_backward: the top's gradient (N, C, top_height, top_width) in grad_out's dtype and format.
kernel_lib.define("upsample_nearest_add_out(Tensor top, Tensor lateral, Tensor(a!) out) -> ()")
kernel_lib.define("upsample_nearest_backward(Tensor grad_out, int top_height, int top_width) -> Tensor")


@torch.library.register_fake("fastbb_C::upsample_nearest_add_out", lib=kernel_lib)
def _(top, lateral, out):
    return None


@torch.library.register_fake("fastbb_C::upsample_nearest_backward", lib=kernel_lib)
def _(grad_out, top_height, top_width):
    return _empty_top_grad(grad_out, top_height, top_width)


def _empty_top_grad(grad_out, top_height, top_width):
    shape = (grad_out.shape[0], grad_out.shape[1], top_height, top_width)
    return grad_out.new_empty(shape).contiguous(memory_format=memory_format(grad_out))


# Forward implementations: (top, lateral, out) -> out = lateral + upsample(top), top and lateral in out's
# memory format; each leaves an empty out as it is.

def _add_compiled(top, lateral, out):
    torch.ops.fastbb_C.upsample_nearest_add_out(top, lateral, out)


def _add_triton(top, lateral, out):
    from fastbb.kernels import upsample_nearest_add as kernels
    kernels.upsample_nearest_add(top, lateral, out)


def _add_reference(top, lateral, out):
    if out.numel() > 0:
        torch.add(lateral, F.interpolate(top, size=lateral.shape[-2:], mode="nearest"), out=out)


# Add-like, as `lateral + F.interpolate(top)` under autocast (the backward follows the forward).
_AUTOCAST = ("as lateral + F.interpolate(top, mode=\"nearest\"): top in float32 where autocast runs the nearest "
             "upsample in float32 (CUDA), else as it is; the sum in add's promoted dtype")
TABLE = _backend.OpTable("upsample_nearest_add", [
    _backend.Implementation("triton", _add_triton, devices=("cuda",),
                            what="one Triton pass: reads lateral and top, writes the sum (NCHW or channels_last "
                                 "tiles)"),
    _backend.Implementation("cpp", _add_compiled, devices=("cpu",), kernel="fastbb_C::upsample_nearest_add_out",
                            what="one C++ pass, OpenMP over planes (NCHW) or rows (channels_last)"),
    _backend.Implementation("reference", _add_reference, what="plain PyTorch: F.interpolate, then add"),
], autocast=_AUTOCAST)


# Backward implementations: (grad_out, top_height, top_width) -> the top's gradient in grad_out's memory
# format, grad_out dense in its own format.

def _backward_compiled(grad_out, top_height, top_width):
    return torch.ops.fastbb_C.upsample_nearest_backward(grad_out, top_height, top_width)


def _backward_triton(grad_out, top_height, top_width):
    from fastbb.kernels import upsample_nearest_add as kernels
    return kernels.upsample_nearest_backward(grad_out, top_height, top_width)


def _backward_reference(grad_out, top_height, top_width):
    """The top's gradient in plain PyTorch: aten's own backward of the nearest upsample."""
    if grad_out.numel() == 0:
        return _empty_top_grad(grad_out, top_height, top_width).zero_()
    n, c = grad_out.shape[:2]
    grad = torch.ops.aten.upsample_nearest2d_backward(grad_out, list(grad_out.shape[-2:]),
                                                     [n, c, top_height, top_width])
    return grad.contiguous(memory_format=memory_format(grad_out))


BACKWARD_TABLE = _backend.OpTable("upsample_nearest_add.backward", [
    _backend.Implementation("triton", _backward_triton, devices=("cuda",),
                            what="one Triton lane per top pixel sums its window of the output gradient (fixed "
                                 "order, no atomics)"),
    _backend.Implementation("cpp", _backward_compiled, devices=("cpu",), kernel="fastbb_C::upsample_nearest_backward",
                            what="each top pixel sums its window in C++, in ATen's order (OpenMP)"),
    _backend.Implementation("reference", _backward_reference, what="aten's upsample_nearest2d_backward"),
], autocast=_AUTOCAST)


@torch.library.custom_op("fastbb::upsample_nearest_add", mutates_args=())
def _upsample_nearest_add_op(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    layout = memory_format(lateral)
    dtype = torch.promote_types(top.dtype, lateral.dtype)
    lateral = lateral.to(dtype).contiguous(memory_format=layout)
    out = torch.empty_like(lateral)
    TABLE(lateral.device.type, top.to(dtype).contiguous(memory_format=layout), lateral, out)
    return out


@_upsample_nearest_add_op.register_fake
def _(top, lateral):
    dtype = torch.promote_types(top.dtype, lateral.dtype)
    return torch.empty_like(lateral.contiguous(memory_format=memory_format(lateral)), dtype=dtype)


def _autocast_args(device_type, args):
    top, lateral = args
    if autocast_runs_in_float32("aten::upsample_nearest2d", device_type):
        top = autocast_cast(top, device_type, torch.float32)
    return top, lateral


register_autocast_rule("upsample_nearest_add", _autocast_args)


@torch.library.custom_op("fastbb::upsample_nearest_backward", mutates_args=())
def _upsample_nearest_backward_op(grad_out: torch.Tensor, top_height: int, top_width: int) -> torch.Tensor:
    grad_out = grad_out.contiguous(memory_format=memory_format(grad_out))
    return BACKWARD_TABLE(grad_out.device.type, grad_out, top_height, top_width)


@_upsample_nearest_backward_op.register_fake
def _(grad_out, top_height, top_width):
    return _empty_top_grad(grad_out, top_height, top_width)


def _setup_context(ctx, inputs, output):
    top, lateral = inputs
    ctx.top_size = tuple(top.shape[-2:])
    ctx.dtypes = top.dtype, lateral.dtype


def _backward(ctx, grad_out):
    # Each input's gradient in its own dtype (grad_out has the promoted one): no copy when they agree.
    top_dtype, lateral_dtype = ctx.dtypes
    grad_top = None
    if ctx.needs_input_grad[0]:
        grad_top = torch.ops.fastbb.upsample_nearest_backward(grad_out, *ctx.top_size).to(top_dtype)
    return grad_top, grad_out.to(lateral_dtype) if ctx.needs_input_grad[1] else None


_upsample_nearest_add_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    ctx.out_size = tuple(inputs[0].shape[-2:])


def _backward_of_backward(ctx, grad_grad_top):
    # The window sum is linear; its adjoint is the nearest upsample itself.
    return F.interpolate(grad_grad_top, size=ctx.out_size, mode="nearest"), None, None


_upsample_nearest_backward_op.register_autograd(_backward_of_backward, setup_context=_setup_backward_context)


def _check(top, lateral):
    check_tensor(_OP, "top", top, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "lateral", lateral, dtypes=FLOAT_DTYPES)
    if lateral.dim() != 4:
        raise ValueError(f"{_OP}: lateral must be 4-D (N, C, H, W), got shape {tuple(lateral.shape)}")
    check_same_device(_OP, top=top, lateral=lateral)
    check_top_shape(_OP, top, lateral.shape)


def _upsample_nearest_add_scripted(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """upsample_nearest_add under TorchScript: the custom op, without the Python input checks."""
    return torch.ops.fastbb.upsample_nearest_add(top, lateral)


@fx_leaf("fastbb.ops.upsample_nearest_add", scripted=_upsample_nearest_add_scripted)
def upsample_nearest_add(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """
    The FPN top-down merge in one pass: ``lateral + F.interpolate(top, size=lateral.shape[-2:],
    mode="nearest")``, bit for bit (PyTorch's legacy nearest index). Differentiable in both inputs.

    Args:
        top (Tensor[N, C, h, w]): the coarser map, with h <= H and w <= W; lateral's device, any floating
            dtype.
        lateral (Tensor[N, C, H, W]): the finer map; float16, bfloat16, float32 or float64, NCHW or
            channels_last.

    Returns:
        Tensor[N, C, H, W]: the sum, in lateral's memory format and add's promoted dtype of the two (under
        ``torch.autocast``, the dtype eager's sum has there: on CUDA the upsample runs in float32).
    """
    _check(top, lateral)
    return torch.ops.fastbb.upsample_nearest_add(top, lateral)


def upsample_nearest_add_reference(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """:func:`upsample_nearest_add` in plain PyTorch (the ground truth): same arguments and checks."""
    _check(top, lateral)
    return lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
