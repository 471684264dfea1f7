"""Why the focal loss saves its gradient: save-in-forward vs recompute-in-backward, timed side by side.

The shipped op computes the loss and the weighted per-element gradient in one pass and saves the gradient,
so backward is one scaling. The alternative computes only the loss in forward and runs the kernel again in
backward (no saved buffer). Both are timed here through autograd, forward + backward with reduction 'sum',
on the benchmark's 50,000 x 80 inputs (C++ kernel):

    .venv/bin/python -m benchmarks.study_focal_loss_backward

On the 2-core CPU (2026-11-29) saving was about 1.5x faster (fp32 9.9 vs 15.3 ms, bf16 10.4 vs 16.8 ms):
the kernel is compute-bound there, and recomputing doubles the exp/log work. On a GPU both move the same
bytes (save: read x, t, write g, read g, write dx; recompute: read x, t twice, write dx).
"""
import torch

from benchmarks.cases_focal_loss import _forward_backward, _inputs
from benchmarks.runner import time_median
from fastbb.ops.focal_loss import sigmoid_focal_loss, sigmoid_focal_loss_labels


class _Recompute(torch.autograd.Function):
    """Focal loss (alpha 0.25, gamma 2, sum) whose backward runs the one-pass kernel again."""

    @staticmethod
    def forward(ctx, logits, targets, labels):
        loss, _ = torch.ops.fastbb_C.sigmoid_focal_loss(logits, targets, labels, None, 0.25, 2.0, -100, True, False)
        ctx.save_for_backward(logits, targets, labels)
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, labels = ctx.saved_tensors
        _, grad = torch.ops.fastbb_C.sigmoid_focal_loss(logits, targets, labels, None, 0.25, 2.0, -100, True, True)
        return grad * grad_loss.float(), None, None


def main():
    logits, labels, one_hot = _inputs("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.detach().to(dtype).requires_grad_()
        targets = one_hot.to(dtype)
        rows = {
            "dense, save (shipped)": _forward_backward(sigmoid_focal_loss, x, targets, reduction="sum"),
            "dense, recompute": _forward_backward(lambda a, t: _Recompute.apply(a, t, None), x, targets),
            "labels, save (shipped)": _forward_backward(sigmoid_focal_loss_labels, x, labels, reduction="sum"),
            "labels, recompute": _forward_backward(lambda a, lab: _Recompute.apply(a, None, lab), x, labels),
        }
        for name, fn in rows.items():
            seconds, _ = time_median(fn, "cpu")
            print(f"{str(dtype):15} {name:24} {seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
