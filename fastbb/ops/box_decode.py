"""decode_boxes: regression deltas + anchors -> (clamped, clipped) x1y1x2y2 boxes in one fused pass.

Two conventions, chosen with `style`:
- "torchvision": torchvision BoxCoder.decode_single: d = deltas / weights; dw, dh <= dwh_max
  (bbox_xform_clip); centre x1 + 0.5 * w.
- "mmdet": mmdet DeltaXYWHBBoxCoder delta2bbox: d = deltas * stds + means; dw, dh clamped to
  [dwh_min, dwh_max]; the centre shift dx * w clamped to [-dxy_max, dxy_max] (ctr_clamp); centre (x1 + x2) * 0.5.
Both optionally clip x to [0, w] and y to [0, h] of the image (max_shape).

The operation order is the libraries', so float32 results match theirs to the bit (up to an ulp of exp).
float16 / bfloat16 inputs are computed in float32 and stored in their own dtype.

Under torch.autocast (the table's rule) the result has the dtype the libraries' decode has there: their exp
runs in float32 where autocast lists exp as a float32 op (CUDA), which makes their boxes float32, so the op
then casts anchors and deltas to float32; elsewhere (CPU) nothing is cast and the boxes keep deltas' dtype.
"""
import math
from collections.abc import Sequence

import torch

from fastbb._tracing import fx_leaf
from fastbb import _backend
from fastbb.ops._common import (FLOAT_DTYPES, ValueAssertionError, autocast_cast, autocast_runs_in_float32,
                                check_same_device, check_tensor, compute_dtype, kernel_lib, register_autocast_rule)

_OP = "fastbb.decode_boxes"  # how error messages name the op
_STYLES = {"torchvision": 0, "mmdet": 1}
_DEFAULT_DWH_MAX = math.log(1000.0 / 16)

# The compiled kernels take anchors (A, 4), deltas (R, A, 4K) of one dtype and either image_size [h, w]
# or image_sizes (B, 2) in the compute dtype (float32, or float64 for float64 deltas), B dividing R * A:
# flattened row i of deltas belongs to image i // (R * A / B).
_SCHEMA_ARGS = ("(Tensor anchors, Tensor deltas, Tensor? image_sizes, int style, float[] weights, float[] means, "
                "float[] stds, float dwh_min, float dwh_max, float dxy_max, float[] image_size) -> Tensor")
kernel_lib.define("decode_boxes" + _SCHEMA_ARGS)


def _decode_rows(anchors, deltas, image_sizes, style, weights, means, stds, dwh_min, dwh_max, dxy_max,
                 image_size):
    """The decode math in PyTorch on the op's normalised layout: anchors (A, 4), deltas (R, A, 4K)."""
    out_dtype = deltas.dtype
    compute = compute_dtype(out_dtype)
    anchors = anchors.to(compute)
    codes = deltas.to(compute).unflatten(-1, (-1, 4))  # (R, A, K, 4)

    x1, y1, x2, y2 = (anchors[:, i, None] for i in range(4))  # (A, 1): broadcast over K
    widths = x2 - x1
    heights = y2 - y1
    if style == _STYLES["torchvision"]:
        ctr_x = x1 + 0.5 * widths
        ctr_y = y1 + 0.5 * heights
        dx, dy, dw, dh = (codes[..., i] / weights[i] for i in range(4))
    else:
        ctr_x = (x1 + x2) * 0.5
        ctr_y = (y1 + y2) * 0.5
        dx, dy, dw, dh = (codes[..., i] * stds[i] + means[i] for i in range(4))

    shift_x = dx * widths
    shift_y = dy * heights
    if dxy_max != math.inf:
        shift_x = shift_x.clamp(-dxy_max, dxy_max)
        shift_y = shift_y.clamp(-dxy_max, dxy_max)
    if dwh_min != -math.inf or dwh_max != math.inf:
        lo = None if dwh_min == -math.inf else dwh_min
        hi = None if dwh_max == math.inf else dwh_max
        dw = dw.clamp(min=lo, max=hi)
        dh = dh.clamp(min=lo, max=hi)

    pred_ctr_x = shift_x + ctr_x
    pred_ctr_y = shift_y + ctr_y
    half_w = 0.5 * (torch.exp(dw) * widths)
    half_h = 0.5 * (torch.exp(dh) * heights)
    boxes = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), -1)

    if image_sizes is not None:
        rows = codes.shape[0] * codes.shape[1]
        per_image = image_sizes.to(compute).repeat_interleave(rows // image_sizes.shape[0], dim=0)
        limits = per_image.flip(-1).repeat(1, 2).reshape(codes.shape[0], codes.shape[1], 1, 4)  # (w, h, w, h)
        boxes = boxes.clamp(min=0)
        boxes = torch.where(boxes > limits, limits, boxes)  # as torch.clamp: the bound passes no gradient
    elif image_size:
        height, width = image_size
        boxes = torch.stack((boxes[..., 0].clamp(0, width), boxes[..., 1].clamp(0, height),
                             boxes[..., 2].clamp(0, width), boxes[..., 3].clamp(0, height)), -1)
    return boxes.flatten(-2).to(out_dtype)


def _compiled(*args):
    return torch.ops.fastbb_C.decode_boxes(*args)


def _triton(*args):
    from fastbb.kernels import box_decode
    return box_decode.decode_boxes(*args)


# Every implementation takes the op's arguments (anchors (A, 4), deltas (R, A, 4K), image_sizes, style,
# weights, means, stds, dwh_min, dwh_max, dxy_max, image_size) and returns the boxes (R, A, 4K).
TABLE = _backend.OpTable("decode_boxes", [
    _backend.Implementation("cuda", _compiled, devices=("cuda",), kernel="fastbb_C::decode_boxes",
                            what="one CUDA thread per box, vector loads and stores when the buffers are aligned"),
    _backend.Implementation("triton", _triton, devices=("cuda",), what="one Triton lane per box"),
    _backend.Implementation("cpp", _compiled, devices=("cpu",), kernel="fastbb_C::decode_boxes",
                            what="one C++ pass over the boxes (OpenMP)"),
    _backend.Implementation("reference", _decode_rows,
                            what="plain PyTorch, in torchvision's and mmdet's operation order"),
], autocast="computed in float32 (float64 for float64); anchors and deltas cast to float32 where autocast runs exp in "
            "float32 (CUDA), so the boxes have the dtype torchvision's / mmdet's decode has there, else deltas' dtype")


def decode_autocast_args(device_type, anchors, deltas):
    """anchors and deltas as the decode's autocast rule casts them on device_type (for this op and the
    post-processing that decodes)."""
    if autocast_runs_in_float32("aten::exp", device_type):
        return autocast_cast(anchors, device_type, torch.float32), autocast_cast(deltas, device_type, torch.float32)
    return anchors, deltas


@torch.library.custom_op("fastbb::decode_boxes", mutates_args=())
def _decode_boxes_op(anchors: torch.Tensor, deltas: torch.Tensor, image_sizes: torch.Tensor | None, style: int,
                     weights: list[float], means: list[float], stds: list[float], dwh_min: float,
                     dwh_max: float, dxy_max: float, image_size: list[float]) -> torch.Tensor:
    return TABLE(deltas.device.type, anchors, deltas, image_sizes, style, weights, means, stds, dwh_min, dwh_max,
                 dxy_max, image_size)


@_decode_boxes_op.register_fake
def _(anchors, deltas, image_sizes, style, weights, means, stds, dwh_min, dwh_max, dxy_max, image_size):
    return torch.empty_like(deltas, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    anchors, deltas, image_sizes, *params = inputs
    ctx.save_for_backward(anchors, deltas, image_sizes)
    ctx.params = params


def _backward(ctx, grad_boxes):
    """Chain rule through the decode, in PyTorch; a clamped or clipped value passes no gradient."""
    anchors, deltas, image_sizes = ctx.saved_tensors
    style, weights, means, stds, dwh_min, dwh_max, dxy_max, image_size = ctx.params
    compute = compute_dtype(deltas.dtype)
    a = anchors.to(compute)
    codes = deltas.to(compute).unflatten(-1, (-1, 4))
    grad = grad_boxes.to(compute).unflatten(-1, (-1, 4))

    size = a[:, None, 2:] - a[:, None, :2]  # (A, 1, 2): w, h
    if style == _STYLES["torchvision"]:
        denorm = 1.0 / torch.tensor(weights, dtype=compute, device=deltas.device)
        d = codes / torch.tensor(weights, dtype=compute, device=deltas.device)
    else:
        denorm = torch.tensor(stds, dtype=compute, device=deltas.device)
        d = codes * denorm + torch.tensor(means, dtype=compute, device=deltas.device)
    dxy, dwh = d[..., :2], d[..., 2:]
    shift = dxy * size
    shift_passes = (shift >= -dxy_max) & (shift <= dxy_max)
    dwh_passes = (dwh >= dwh_min) & (dwh <= dwh_max)
    scale = torch.exp(dwh.clamp(dwh_min, dwh_max))
    if style == _STYLES["torchvision"]:
        ctr = a[:, None, :2] + 0.5 * size
    else:
        ctr = (a[:, None, :2] + a[:, None, 2:]) * 0.5
    pred_ctr = shift.clamp(-dxy_max, dxy_max) + ctr
    half = 0.5 * (scale * size)
    if image_sizes is not None or image_size:
        rows = codes.shape[0] * codes.shape[1]
        if image_sizes is not None:
            limits = image_sizes.to(compute).flip(-1).repeat_interleave(rows // image_sizes.shape[0], dim=0)
            limits = limits.reshape(codes.shape[0], codes.shape[1], 1, 2)
        else:
            limits = torch.tensor([image_size[1], image_size[0]], dtype=compute, device=deltas.device)
        corners = torch.cat((pred_ctr - half, pred_ctr + half), -1)
        limits4 = torch.cat((limits, limits), -1)
        grad = grad * ((corners >= 0) & (corners <= limits4))

    grad_ctr = grad[..., :2] + grad[..., 2:]  # d/d pred_ctr
    grad_half = grad[..., 2:] - grad[..., :2]  # d/d half
    grad_shift = grad_ctr * shift_passes
    grad_dwh = grad_half * half * dwh_passes
    grad_d = torch.cat((grad_shift * size, grad_dwh), -1)
    grad_deltas = (grad_d * denorm).flatten(-2).to(deltas.dtype)

    # w, h feed the centre (0.5 each way), the shift and the scaled size; the centre gets 0.5 of x1 and x2.
    grad_size = grad_shift * dxy + grad_half * 0.5 * scale
    grad_ctr_sum = grad_ctr.sum(dim=(0, 2))
    grad_size_sum = grad_size.sum(dim=(0, 2))
    grad_anchors = torch.cat((0.5 * grad_ctr_sum - grad_size_sum, 0.5 * grad_ctr_sum + grad_size_sum), -1)
    return (grad_anchors.to(anchors.dtype), grad_deltas) + (None,) * 9


_decode_boxes_op.register_autograd(_backward, setup_context=_setup_context)
register_autocast_rule("decode_boxes", lambda device_type, args: (*decode_autocast_args(device_type, *args[:2]),
                                                                  *args[2:]))


# ---------------------------------------------------------------------------------------------------------
# Public function: checks and normalisation to the op's layout.

def _check_numbers(name, values, *, nonzero):
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, Sequence) or len(values) != 4:
        raise ValueError(f"{_OP}: {name} must be 4 numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (nonzero and v == 0):
            raise ValueError(f"{_OP}: {name} must be 4 finite{' nonzero' if nonzero else ''} numbers, "
                             f"got {values!r}")
        out.append(float(v))
    return out


def _check_clamp(name, value, default, *, nonnegative=False):
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{_OP}: {name} must be a finite number or None, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{_OP}: {name} must be >= 0, got {value}")
    return float(value)


def _image_clip(max_shape, deltas, compute):
    """(image_sizes tensor or None, image_size list) for the op, from the accepted max_shape forms."""
    if max_shape is None:
        return None, []
    if isinstance(max_shape, torch.Tensor):
        if max_shape.is_floating_point() is False and max_shape.dtype not in (torch.int32, torch.int64,
                                                                                torch.int16, torch.uint8):
            raise TypeError(f"{_OP}: max_shape must hold numbers, got dtype {max_shape.dtype}")
        check_same_device(_OP, deltas=deltas, max_shape=max_shape)
        if max_shape.dim() == 1 and max_shape.shape[0] in (2, 3):
            return max_shape[:2].to(compute).reshape(1, 2), []
        if max_shape.dim() == 2 and max_shape.shape[1] in (2, 3):
            return _per_image(max_shape[:, :2].to(compute), deltas)
        raise ValueError(f"{_OP}: max_shape must be (h, w), (h, w, c) or per-image (B, 2|3), "
                         f"got a tensor of shape {tuple(max_shape.shape)}")
    if not isinstance(max_shape, Sequence) or len(max_shape) == 0:
        raise ValueError(f"{_OP}: max_shape must be None, (h, w), (h, w, c) or a per-image list, got {max_shape!r}")
    if all(isinstance(s, (Sequence, torch.Tensor)) for s in max_shape):
        sizes = [_check_hw(s) for s in max_shape]
        return _per_image(torch.tensor(sizes, dtype=compute, device=deltas.device), deltas)
    return None, _check_hw(max_shape)


def _check_hw(shape):
    if isinstance(shape, torch.Tensor):
        shape = shape.tolist()
    if len(shape) not in (2, 3) or not all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
            for v in shape[:2]):
        raise ValueError(f"{_OP}: max_shape must be (h, w) or (h, w, c) with finite h, w >= 0, got {shape!r}")
    return [float(shape[0]), float(shape[1])]


def _per_image(image_sizes, deltas):
    if deltas.dim() < 3 or image_sizes.shape[0] != deltas.shape[0]:
        raise ValueAssertionError(f"{_OP}: a per-image max_shape needs deltas of shape (B, ..., 4K) with B = "
                                  f"{image_sizes.shape[0]} images, got deltas of shape {tuple(deltas.shape)}")
    return image_sizes, []


def _anchor_layout(anchors, lead):
    """anchors (..., 4) broadcast to deltas' leading dims `lead`, as (A, 4) repeated R times: (anchors, R, A)."""
    a_lead = tuple(anchors.shape[:-1])
    try:
        if torch.broadcast_shapes(a_lead, lead) != torch.Size(lead):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{_OP}: the leading dims of anchors {tuple(anchors.shape)} must broadcast to those "
                         f"of deltas {tuple(lead)}") from None
    padded = (1,) * (len(lead) - len(a_lead)) + a_lead
    # The longest suffix of deltas' dims that anchors hold in full, with only 1s before it: then no copy.
    for start in range(len(lead) + 1):
        if all(d == 1 for d in padded[:start]) and tuple(padded[start:]) == tuple(lead[start:]):
            num_anchors = math.prod(lead[start:])
            return anchors.reshape(num_anchors, 4), math.prod(lead[:start]), num_anchors
    num_anchors = math.prod(lead)
    return anchors.expand(*lead, 4).reshape(num_anchors, 4), 1, num_anchors


@fx_leaf("fastbb.ops.decode_boxes")
def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor, *, style: str = "torchvision",
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), means: Sequence[float] = (0.0,) * 4,
                 stds: Sequence[float] = (1.0,) * 4, dwh_min: float | None = None,
                 dwh_max: float | None = _DEFAULT_DWH_MAX, dxy_max: float | None = None,
                 max_shape: Sequence | torch.Tensor | None = None) -> torch.Tensor:
    """
    Decodes regression deltas relative to anchors into ``(x1, y1, x2, y2)`` boxes, in one fused pass:
    torchvision's ``BoxCoder.decode_single`` (style "torchvision") or mmdet's ``DeltaXYWHBBoxCoder.decode``
    (style "mmdet"), with the libraries' operation order (float32 results match theirs to the bit, up to an
    ulp of exp). Differentiable in anchors and deltas.

    Args:
        anchors (Tensor[..., 4]): reference boxes ``(x1, y1, x2, y2)``; their leading dims broadcast to
            those of deltas (e.g. anchors (A, 4) for deltas (B, A, 4K)). Cast to deltas' dtype, as
            torchvision does.
        deltas (Tensor[..., 4K]): encoded boxes, K per anchor; float16, bfloat16, float32 or float64.
        style (str): "torchvision" (deltas / weights, centre x1 + 0.5 * w) or "mmdet" (deltas * stds +
            means, centre (x1 + x2) * 0.5).
        weights (sequence of 4 floats): torchvision's BoxCoder weights (wx, wy, ww, wh), nonzero.
        means (sequence of 4 floats): mmdet's target means.
        stds (sequence of 4 floats): mmdet's target stds, nonzero.
        dwh_min (float, optional): lower clamp of dw, dh (None: unbounded).
        dwh_max (float, optional): upper clamp of dw, dh (None: unbounded); torchvision's
            bbox_xform_clip, log(1000 / 16), by default.
        dxy_max (float, optional): clamp of the centre shift dx * w, dy * h to [-dxy_max, dxy_max]
            (mmdet's ctr_clamp; None: unbounded).
        max_shape (optional): None, (h, w), (h, w, c), or per image a (B, 2|3) tensor or a list of B
            shapes for deltas (B, ..., 4K): clips x to [0, w] and y to [0, h].

    Returns:
        Tensor[..., 4K]: the decoded boxes, of deltas' shape and dtype (under ``torch.autocast`` on CUDA,
        float32, as torchvision's decode gives there).
    """
    check_tensor(_OP, "deltas", deltas, dtypes=FLOAT_DTYPES)
    check_tensor(_OP, "anchors", anchors, last_dim=4)
    if deltas.dim() == 0 or deltas.shape[-1] % 4 != 0 or deltas.shape[-1] == 0:
        raise ValueError(f"{_OP}: deltas must have a last dimension that is a positive multiple of 4, "
                         f"got shape {tuple(deltas.shape)}")
    if anchors.is_complex() or anchors.dtype == torch.bool:
        raise TypeError(f"{_OP}: anchors must be real numbers, got dtype {anchors.dtype}")
    check_same_device(_OP, anchors=anchors, deltas=deltas)
    if style not in _STYLES:
        raise ValueError(f"{_OP}: style must be one of {sorted(_STYLES)}, got {style!r}")
    weights = _check_numbers("weights", weights, nonzero=True)
    means = _check_numbers("means", means, nonzero=False)
    stds = _check_numbers("stds", stds, nonzero=True)
    lo = _check_clamp("dwh_min", dwh_min, -math.inf)
    hi = _check_clamp("dwh_max", dwh_max, math.inf)
    if lo > hi:
        raise ValueError(f"{_OP}: dwh_min must be <= dwh_max, got {dwh_min} > {dwh_max}")
    ctr = _check_clamp("dxy_max", dxy_max, math.inf, nonnegative=True)
    image_sizes, image_size = _image_clip(max_shape, deltas, compute_dtype(deltas.dtype))

    lead = tuple(deltas.shape[:-1])
    anchor_rows, repeats, num_anchors = _anchor_layout(anchors.to(deltas.dtype), lead)
    rows = deltas.reshape(repeats, num_anchors, deltas.shape[-1])
    if image_sizes is not None and image_sizes.shape[0] == 0:
        image_sizes = None  # a batch of no images: nothing to clip
    out = _decode_boxes_op(anchor_rows, rows, image_sizes, _STYLES[style], weights, means, stds, lo, hi, ctr,
                           image_size)
    return out.reshape(deltas.shape)


def decode_boxes_reference(anchors: torch.Tensor, deltas: torch.Tensor, *, style: str = "torchvision",
                           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), means: Sequence[float] = (0.0,) * 4,
                           stds: Sequence[float] = (1.0,) * 4, dwh_min: float | None = None,
                           dwh_max: float | None = _DEFAULT_DWH_MAX, dxy_max: float | None = None,
                           max_shape: Sequence | torch.Tensor | None = None) -> torch.Tensor:
    """:func:`decode_boxes` in plain PyTorch (the ground truth): same arguments, checks and results."""
    with _backend.use_backend("reference"):
        return decode_boxes(anchors, deltas, style=style, weights=weights, means=means, stds=stds,
                            dwh_min=dwh_min, dwh_max=dwh_max, dxy_max=dxy_max, max_shape=max_shape)
