"""upsample_nearest_add: the FPN top-down merge, `lateral + F.interpolate(top, size=lateral's, mode="nearest")`.

PyTorch's legacy nearest index, per axis: scale = float32(in) / float32(out) (a float32 division, not the
exact rational), src = min(floor(float32(dst) * scale), in - 1). Odd sizes and non-2x ratios therefore read
the rows PyTorch reads (26 -> 44 at dst 22 reads row 12). The add rounds once, as eager PyTorch does.

Forward is one pass: read lateral and top, write the sum (eager writes and re-reads the upsampled map).
Backward: the lateral's gradient is the output gradient itself (no copy); the top's is a deterministic
gather, each top pixel summing its window of the output gradient (fixed order, no atomics), by the op
fastbb::upsample_nearest_backward.

Backends: cpu "cpp" (OpenMP over planes or rows, NCHW and channels_last); cuda "triton"; "reference".
"""
import torch
import torch.nn.functional as F

from fastbb import _backend
from fastbb.ops._common import FLOAT_DTYPES, check_same_device, check_tensor, kernel_lib

_OP = "upsample_nearest_add"
_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton",)}
_FORWARD_KERNELS = {"cpp": "fastbb_C::upsample_nearest_add_out"}
_BACKWARD_KERNELS = {"cpp": "fastbb_C::upsample_nearest_backward"}

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


def memory_format(t):
    """channels_last when t is laid out so (and not also plain contiguous), else contiguous_format."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _empty_top_grad(grad_out, top_height, top_width):
    shape = (grad_out.shape[0], grad_out.shape[1], top_height, top_width)
    return grad_out.new_empty(shape).contiguous(memory_format=memory_format(grad_out))


def _upsample_nearest_add_into(top, lateral, out, backend):
    """out = lateral + upsample(top) on `backend`; top already in lateral's memory format."""
    if backend == "cpp":
        torch.ops.fastbb_C.upsample_nearest_add_out(top, lateral, out)
    elif backend == "triton":
        from fastbb.kernels import fpn
        fpn.upsample_nearest_add(top, lateral, out)
    else:
        torch.add(lateral, F.interpolate(top, size=lateral.shape[-2:], mode="nearest"), out=out)


def add_upsampled_(out, top):
    """out += upsample(top), in place, on the best backend for out's device (fpn_merge's CPU epilogue)."""
    backend = _backend.choose(_OP, out.device.type, _PREFERENCE, _FORWARD_KERNELS)
    _upsample_nearest_add_into(top.contiguous(memory_format=memory_format(out)), out, out, backend)
    return out


@torch.library.custom_op("fastbb::upsample_nearest_add", mutates_args=())
def _upsample_nearest_add_op(top: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    backend = _backend.choose(_OP, lateral.device.type, _PREFERENCE, _FORWARD_KERNELS)
    layout = memory_format(lateral)
    lateral = lateral.contiguous(memory_format=layout)
    out = torch.empty_like(lateral)
    if out.numel() > 0:
        _upsample_nearest_add_into(top.contiguous(memory_format=layout), lateral, out, backend)
    return out


@_upsample_nearest_add_op.register_fake
def _(top, lateral):
    return torch.empty_like(lateral.contiguous(memory_format=memory_format(lateral)))


@torch.library.custom_op("fastbb::upsample_nearest_backward", mutates_args=())
def _upsample_nearest_backward_op(grad_out: torch.Tensor, top_height: int, top_width: int) -> torch.Tensor:
    backend = _backend.choose(_OP, grad_out.device.type, _PREFERENCE, _BACKWARD_KERNELS)
    grad_out = grad_out.contiguous(memory_format=memory_format(grad_out))
    if grad_out.numel() == 0:
        return _empty_top_grad(grad_out, top_height, top_width).zero_()
    if backend == "cpp":
        return torch.ops.fastbb_C.upsample_nearest_backward(grad_out, top_height, top_width)
    if backend == "triton":
        from fastbb.kernels import fpn
        return fpn.upsample_nearest_backward(grad_out, top_height, top_width)
    return upsample_nearest_backward_reference(grad_out, top_height, top_width)


@_upsample_nearest_backward_op.register_fake
def _(grad_out, top_height, top_width):
    return _empty_top_grad(grad_out, top_height, top_width)


def upsample_nearest_backward_reference(grad_out, top_height, top_width):
    """The top's gradient in plain PyTorch: aten's own backward of the nearest upsample."""
    n, c = grad_out.shape[:2]
    grad = torch.ops.aten.upsample_nearest2d_backward(grad_out, list(grad_out.shape[-2:]),
                                                     [n, c, top_height, top_width])
    return grad.contiguous(memory_format=memory_format(grad_out))


def _setup_context(ctx, inputs, output):
    top, _ = inputs
    ctx.top_size = tuple(top.shape[-2:])


def _backward(ctx, grad_out):
    grad_top = None
    if ctx.needs_input_grad[0]:
        grad_top = torch.ops.fastbb.upsample_nearest_backward(grad_out, *ctx.top_size)
    return grad_top, grad_out if ctx.needs_input_grad[1] else None


_upsample_nearest_add_op.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    ctx.out_size = tuple(inputs[0].shape[-2:])


def _backward_of_backward(ctx, grad_grad_top):
    # The window sum is linear; its adjoint is the nearest upsample itself.
    return F.interpolate(grad_grad_top, size=ctx.out_size, mode="nearest"), None, None


_upsample_nearest_backward_op.register_autograd(_backward_of_backward, setup_context=_setup_backward_context)


def check_top_shape(op, top, lateral_shape, lateral_name="lateral"):
    """top must be 4-D with the batch and channels of lateral_shape (N, C, H, W), no larger than it, and
    not spatially empty where the lateral is not."""
    if top.dim() != 4:
        raise ValueError(f"{op}: top must be 4-D (N, C, h, w), got shape {tuple(top.shape)}")
    if tuple(top.shape[:2]) != tuple(lateral_shape[:2]):
        raise ValueError(f"{op}: top must have the batch and channels (N, C) of {lateral_name} "
                         f"{tuple(lateral_shape)}, got shape {tuple(top.shape)}")
    (h, w), (height, width) = top.shape[-2:], lateral_shape[-2:]
    if h > height or w > width:
        raise ValueError(f"{op}: top ({h}x{w}) must not be larger than {lateral_name} ({height}x{width}): "
                         f"the merge upsamples the coarser map")
    if (h == 0 or w == 0) and height * width > 0:
        raise ValueError(f"{op}: top has an empty spatial size {h}x{w}; nothing to upsample to {height}x{width}")


def _check(top, lateral):
    check_tensor(_OP, "top", top, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "lateral", lateral, dtypes=FLOAT_DTYPES)
    if lateral.dim() != 4:
        raise ValueError(f"{_OP}: lateral must be 4-D (N, C, H, W), got shape {tuple(lateral.shape)}")
    check_same_device(_OP, top=top, lateral=lateral)
    if top.dtype != lateral.dtype:
        raise TypeError(f"{_OP}: top and lateral must have one dtype, got {top.dtype} and {lateral.dtype}")
    check_top_shape(_OP, top, lateral.shape)


def upsample_nearest_add(top, lateral):
    """lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest"), in one pass.

    top (N, C, h, w) and lateral (N, C, H, W) with h <= H, w <= W, one floating dtype and device; NCHW or
    channels_last (the result takes lateral's layout). Differentiable in both.
    """
    _check(top, lateral)
    return torch.ops.fastbb.upsample_nearest_add(top, lateral)


def upsample_nearest_add_reference(top, lateral):
    """upsample_nearest_add in plain PyTorch (the ground truth): same arguments and checks."""
    _check(top, lateral)
    return lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
