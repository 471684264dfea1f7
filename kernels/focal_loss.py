"""Triton kernel of fastbb.ops sigmoid focal loss: one lane per element of the (N, C) logits.

Same contract and math as csrc/focal_loss/focal_loss_cpu.cpp: one read of logits and targets (or
labels) gives the loss (or one partial sum per block, added afterwards in block order: no atomics, so
repeated runs give the same bits) and the weighted per-element gradient. Computed in float32 (float64 for
float64); low-precision values are converted on load and on store only.
"""
import torch
import triton
import triton.language as tl

from fastbb.kernels._common import check_grid, compute_dtype, on_device, torch_compute_dtype

_BLOCK = 1024


@triton.jit
def _focal_loss_kernel(logits_ptr, targets_ptr, labels_ptr, weight_ptr, loss_ptr, grad_ptr, partial_ptr,
                       total, num_classes, weight_row_stride, weight_col_stride, alpha_pos: tl.float64,
                       alpha_neg: tl.float64, gamma: tl.float64,
                       ignore_index, HAS_LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr,
                       GRAD: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < total
    x = tl.load(logits_ptr + offs, mask=valid, other=0).to(COMPUTE)
    row = offs // num_classes
    col = offs - row * num_classes
    scale = tl.where(valid, 1.0, 0.0).to(COMPUTE)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row, mask=valid, other=-1)
        t = tl.where(label == col, 1.0, 0.0).to(COMPUTE)
        scale = tl.where(label == ignore_index, 0.0, scale).to(COMPUTE)
    else:
        t = tl.load(targets_ptr + offs, mask=valid, other=0).to(COMPUTE)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + row * weight_row_stride + col * weight_col_stride, mask=valid, other=0)
        scale = scale * w.to(COMPUTE)

    e = tl.exp(-tl.abs(x))
    d = 1.0 / (1.0 + e)
    p = tl.where(x >= 0, d, e * d)
    q = tl.where(x >= 0, e * d, d)
    # log(1 + e), e in [0, 1]: 2 atanh(s), s = e / (2 + e) <= 1/3, exact for tiny e where log(1 + e) is not.
    s = e / (2.0 + e)
    s2 = s * s
    series = 1.0 / 19
    series = series * s2 + 1.0 / 17
    series = series * s2 + 1.0 / 15
    series = series * s2 + 1.0 / 13
    series = series * s2 + 1.0 / 11
    series = series * s2 + 1.0 / 9
    series = series * s2 + 1.0 / 7
    series = series * s2 + 1.0 / 5
    series = series * s2 + 1.0 / 3
    series = series * s2 + 1.0
    log1p_e = 2.0 * s * series
    softplus_pos = tl.maximum(x, 0.0) + log1p_e  # -log q
    softplus_neg = tl.maximum(-x, 0.0) + log1p_e  # -log p
    ce = t * softplus_neg + (1.0 - t) * softplus_pos
    m = p * (1.0 - t) + q * t
    g = tl.cast(gamma, COMPUTE)
    m_safe = tl.where(m > 0, m, 1.0)
    m_gamma = tl.where(m > 0, tl.exp(g * tl.log(m_safe)), tl.where(g == 0, 1.0, 0.0))
    # gamma = 0: no gamma term (PyTorch's pow backward is 0 for exponent 0); computing it would give
    # 0 * inf = NaN where m is subnormal (float32 |x| in about (87, 104)) and m^-1 overflows.
    m_gamma_1 = tl.where(m > 0, tl.exp((g - 1.0) * tl.log(m_safe)), tl.where(g == 1, 1.0, 0.0))
    m_gamma_1 = tl.where(g == 0, 0.0, m_gamma_1)
    scale = scale * (tl.cast(alpha_pos, COMPUTE) * t + tl.cast(alpha_neg, COMPUTE) * (1.0 - t))
    loss = scale * ce * m_gamma
    if REDUCE:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(loss, axis=0))
    else:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=valid)
    if GRAD:
        grad = scale * ((p - t) * m_gamma + g * ce * m_gamma_1 * p * q * (1.0 - 2.0 * t))
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def sigmoid_focal_loss(logits, targets, labels, weight, alpha, gamma, ignore_index, reduce, compute_grad):
    """fastbb_C::sigmoid_focal_loss's contract (fastbb/ops/focal_loss.py) on Triton."""
    compute = torch_compute_dtype(logits.dtype)
    total = logits.numel()
    num_blocks = triton.cdiv(total, _BLOCK)
    partial = torch.empty(num_blocks if reduce else 0, dtype=compute, device=logits.device)
    loss = partial if reduce else torch.empty_like(logits)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    if total > 0:
        grid = check_grid("fastbb.sigmoid_focal_loss", (num_blocks,), logits.shape)
        with on_device(logits):
            _focal_loss_kernel[grid](
                logits, targets if targets is not None else logits, labels if labels is not None else logits,
                weight if weight is not None else logits, loss, grad, partial, total, logits.shape[1],
                weight.stride(0) if weight is not None else 0, weight.stride(1) if weight is not None else 0,
                alpha if alpha >= 0 else 1.0, 1.0 - alpha if alpha >= 0 else 1.0, gamma, ignore_index,
                HAS_LABELS=labels is not None, HAS_WEIGHT=weight is not None, REDUCE=reduce, GRAD=compute_grad,
                COMPUTE=compute_dtype(logits.dtype), BLOCK=_BLOCK)
    if reduce:
        return partial.sum(), grad
    return loss, grad
