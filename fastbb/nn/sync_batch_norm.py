"""Training-mode synchronized batch norm for the fused conv -> BN path, on any device and process-group backend.

torch's nn.SyncBatchNorm only synchronizes GPU-like tensors (a CPU tensor raises "SyncBatchNorm expected
input tensor to be on GPU ..."), so fastbb all-reduces the batch statistics itself, with collectives every
backend has (gloo on the CPU, NCCL on CUDA).
"""
import torch
import torch.distributed as dist

from fastbb.ops._common import compute_dtype


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum all-reduce: every rank's output is the sum of all inputs, so the gradient of each
    rank's input is the sum of all ranks' output gradients, i.e. an all-reduce again. (The same as
    torch.distributed.nn.functional.all_reduce, which is deprecated in recent torch and warns at every call.)"""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad, ctx.group), None


def _sync_batch_norm_train(y, weight, bias, running_mean, running_var, momentum, eps, process_group=None,
                          residual=None, relu=False):
    """relu(batch_norm(y) [+ residual]) with the batch statistics of y over every rank of process_group
    (None: the default group), as nn.SyncBatchNorm trains, but on any device and backend.

    The statistics are all-reduced with a differentiable all-reduce, so autograd's backward all-reduces
    their gradients: the same sums of dy and dy * (y - mean) over all ranks that SyncBatchNorm's backward
    all-reduces. running_mean / running_var (None: not tracked) are updated in place with `momentum` and
    the unbiased variance of the global count, as nn.SyncBatchNorm does. Statistics are computed in float32
    (float64 for float64 y); the output has y's dtype. Every rank must call this the same number of times.
    """
    compute = compute_dtype(y.dtype)
    values = y.to(compute)
    channels = y.shape[1]
    local_count = y.numel() // channels if channels else 0
    # Two all-reduces: the global mean first, then the sum of squared deviations from it. That is the
    # two-pass variance a single process computes; one all-reduce of the sums of y and y^2 would give
    # var = E[y^2] - mean^2, which cancels catastrophically when |mean| >> std (float32 loses every digit
    # of a channel with mean 1e3 and std 1). Chan's combination of per-rank (count, mean, M2) is as
    # accurate but needs every rank's values (an all-gather, with a harder backward) or brings back
    # the cancellation when summed; the cost here is one more tiny all-reduce per layer each way.
    sums = torch.cat([values.sum((0, 2, 3)), values.new_full((1,), local_count)])
    sums = _AllReduceSum.apply(sums, process_group)
    count = sums[-1].detach()
    if local_count < 2:  # only then can the global count be < 2 (reading it waits for the device)
        global_count = int(count)
        if global_count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got 1 value per channel "
                             f"over the process group (input size {list(y.shape)} on this rank)")
        if global_count == 0:  # every rank's batch is empty: no statistics to track
            running_mean = running_var = None
    mean = sums[:-1] / count
    centered = values - mean[:, None, None]
    var = _AllReduceSum.apply(centered.square().sum((0, 2, 3)), process_group) / count  # biased
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(compute)
    out = centered * scale[:, None, None]
    if bias is not None:
        out = out + bias.to(compute)[:, None, None]
    if residual is not None:
        out = out + residual.to(compute)
    if relu:
        out = torch.relu(out)
    if running_mean is not None and momentum is not None:
        with torch.no_grad():
            unbiased_var = var * (count / (count - 1))
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased_var.to(running_var.dtype), alpha=momentum)
    return out.to(y.dtype)
