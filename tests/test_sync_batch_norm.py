"""SyncBatchNorm training in fastbb's fused conv -> BN path (fastbb.nn.sync_batch_norm) across two gloo processes
on the CPU, against one process running nn.Conv2d + nn.BatchNorm2d (+ residual + ReLU) on the whole batch.

The two ranks run once for the whole file (a module fixture: starting processes costs seconds) and save their
results; each test compares one scenario. The single-process loss is the sum of the ranks' losses.
"""
import datetime
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastbb
from fastbb.nn import ConvBNReLU2d

from conftest import TOLERANCES

WORLD_SIZE = 2
C_IN, C_OUT = 3, 5

# Conv -> SyncBatchNorm -> residual -> ReLU scenarios; splits: the batch rows of rank 0 and rank 1.
CASES = {
    "float64": dict(dtype=torch.float64, momentum=0.1, steps=1, splits=(2, 2)),
    "float32": dict(dtype=torch.float32, momentum=0.1, steps=1, splits=(2, 2)),
    "momentum_none": dict(dtype=torch.float64, momentum=None, steps=2, splits=(2, 2)),
    "uneven": dict(dtype=torch.float64, momentum=0.1, steps=1, splits=(3, 1)),
    "one_rank_empty": dict(dtype=torch.float64, momentum=0.1, steps=1, splits=(4, 0)),
    "untracked": dict(dtype=torch.float64, momentum=0.1, steps=1, splits=(2, 2), track_running_stats=False),
}


def _rows(splits, rank):
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def _conv_bn(case, sync):
    torch.manual_seed(0)
    conv = nn.Conv2d(C_IN, C_OUT, 3, padding=1, bias=False)
    track_running_stats = case.get("track_running_stats", True)
    bn = (nn.SyncBatchNorm if sync else nn.BatchNorm2d)(C_OUT, momentum=case["momentum"],
                                                         track_running_stats=track_running_stats)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        if track_running_stats:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return conv.to(case["dtype"]), bn.to(case["dtype"])


def _batch(step, dtype):
    """x (offset so that the conv's output has |mean| > std), residual and the loss weights of step."""
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4, C_IN, 6, 6, generator=generator, dtype=torch.float64) + 3
    residual = torch.randn(4, C_OUT, 6, 6, generator=generator, dtype=torch.float64)
    loss_weights = torch.randn(4, C_OUT, 6, 6, generator=generator, dtype=torch.float64)
    return x.to(dtype), residual.to(dtype), loss_weights.to(dtype)


def _train_conv_bn(conv, bn, forward, case, rows):
    """case's training steps of forward(x, residual) on the batch rows, loss (out * loss_weights).sum();
    the last step's output and gradients, and bn's buffers (running statistics, num_batches_tracked) after
    all steps."""
    for step in range(case["steps"]):
        for p in (conv.weight, bn.weight, bn.bias):
            p.grad = None
        x, residual, loss_weights = (t[rows].clone() for t in _batch(step, case["dtype"]))
        x.requires_grad_()
        residual.requires_grad_()
        out = forward(x, residual)
        (out * loss_weights).sum().backward()
    return {"out": out.detach(), "x.grad": x.grad, "residual.grad": residual.grad, "conv.weight.grad": conv.weight.grad,
            "bn.weight.grad": bn.weight.grad, "bn.bias.grad": bn.bias.grad,
            "buffers": {name: b.clone() for name, b in bn.named_buffers()}}


def _fused_conv_bn_relu(conv, bn):
    return ConvBNReLU2d.from_modules(conv, bn, nn.ReLU()).train()


def _eager_conv_bn_relu(conv, bn):
    return lambda x, residual: F.relu(bn(conv(x)) + residual)


def _resnet18_state():
    torch.manual_seed(0)
    model = fastbb.models.resnet18()
    with torch.no_grad():  # non-trivial BN parameters and running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _resnet_batch():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2 * WORLD_SIZE, 3, 32, 32, generator=generator, dtype=torch.float64)
    return x, torch.randn(2 * WORLD_SIZE, 1000, generator=generator, dtype=torch.float64)


def _train_resnet(model, rows):
    x, loss_weights = (t[rows] for t in _resnet_batch())
    out = model.train()(x)
    (out * loss_weights).sum().backward()
    return {"out": out.detach(), "grads": {name: p.grad for name, p in model.named_parameters()},
            "buffers": {name: b.clone() for name, b in model.named_buffers()}}


def _worker(rank, directory):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        # Rank 0 holds the one value per channel, rank 1 none: both must raise, and leave no collective
        # pending (the scenarios after it would hang or mismatch).
        conv, bn = _conv_bn(CASES["float64"], sync=True)
        try:
            _fused_conv_bn_relu(conv, bn)(torch.randn(1 - rank, C_IN, 1, 1, dtype=torch.float64))
            results["one_value_error"] = None
        except ValueError as error:
            results["one_value_error"] = str(error)
        for name, case in CASES.items():
            conv, bn = _conv_bn(case, sync=True)
            results[name] = _train_conv_bn(conv, bn, _fused_conv_bn_relu(conv, bn), case,
                                           _rows(case["splits"], rank))
        model = fastbb.models.resnet18().double()
        model.load_state_dict(torch.load(f"{directory}/resnet18.pt"))
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        results["resnet18"] = _train_resnet(model, slice(2 * rank, 2 * rank + 2))
        torch.save(results, f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sync_batch_norm")
    resnet_state = _resnet18_state()
    torch.save(resnet_state, directory / "resnet18.pt")
    mp.spawn(_worker, args=(str(directory),), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    return types.SimpleNamespace(ranks=ranks, resnet_state=resnet_state)


def _assert_close(got, want, dtype, name, scaled=False):
    """Within the dtype's tolerance; scaled: its atol relative to the largest |want| (a deep network's
    gradients carry rounding of the order of their largest elements, at every element)."""
    tolerance = dict(TOLERANCES[dtype])
    if scaled:
        tolerance["atol"] *= float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, **tolerance, msg=lambda message: f"{name}: {message}")


def _assert_sum_of_rank_grads(rank_grads, want, dtype, name, scaled=False):
    # DDP averages the ranks' parameter gradients, i.e. divides their all-reduced sum by the world size; that
    # sum is the gradient of the sum of the ranks' losses, which is the single-process loss here.
    _assert_close(sum(rank_grads), want, dtype, name, scaled)


@pytest.mark.parametrize("name", list(CASES))
def test_conv_bn_relu_matches_batch_norm_on_the_whole_batch(run, name):
    case = CASES[name]
    conv, bn = _conv_bn(case, sync=False)
    want = _train_conv_bn(conv, bn, _eager_conv_bn_relu(conv, bn), case, slice(None))
    results = [ranks[name] for ranks in run.ranks]
    for rank, got in enumerate(results):
        rows = _rows(case["splits"], rank)
        for key in ("out", "x.grad", "residual.grad"):
            _assert_close(got[key], want[key][rows], case["dtype"], f"rank {rank} {key}")
        assert list(got["buffers"]) == list(want["buffers"])
        for key, buffer in want["buffers"].items():
            _assert_close(got["buffers"][key], buffer, case["dtype"], f"rank {rank} {key}")
        if case.get("track_running_stats", True):
            assert int(got["buffers"]["num_batches_tracked"]) == case["steps"]
        else:
            assert not got["buffers"]
    for key in ("conv.weight.grad", "bn.weight.grad", "bn.bias.grad"):
        _assert_sum_of_rank_grads([got[key] for got in results], want[key], case["dtype"], key)


def test_one_value_per_channel_over_the_group_raises_on_every_rank(run):
    for ranks in run.ranks:
        assert ranks["one_value_error"] is not None
        assert ranks["one_value_error"].startswith("Expected more than 1 value per channel when training")


def test_resnet18_matches_torchvision_on_the_whole_batch(run):
    import torchvision

    model = torchvision.models.resnet18().double()
    model.load_state_dict(run.resnet_state)
    want = _train_resnet(model, slice(None))
    results = [ranks["resnet18"] for ranks in run.ranks]
    for rank, got in enumerate(results):
        _assert_close(got["out"], want["out"][2 * rank:2 * rank + 2], torch.float64, f"rank {rank} out")
        assert list(got["buffers"]) == list(want["buffers"])
        for name, buffer in want["buffers"].items():
            _assert_close(got["buffers"][name], buffer, torch.float64, f"rank {rank} {name}")
    assert list(results[0]["grads"]) == list(want["grads"])
    for name, grad in want["grads"].items():
        _assert_sum_of_rank_grads([got["grads"][name] for got in results], grad, torch.float64, name, scaled=True)


def test_sync_batch_norm_without_distributed_trains_as_batch_norm():
    assert not (dist.is_available() and dist.is_initialized())
    case = CASES["momentum_none"]
    conv, bn = _conv_bn(case, sync=True)
    got = _train_conv_bn(conv, bn, _fused_conv_bn_relu(conv, bn), case, slice(None))
    conv, bn = _conv_bn(case, sync=False)
    want = _train_conv_bn(conv, bn, _eager_conv_bn_relu(conv, bn), case, slice(None))
    for key, value in want.items():
        _assert_close(got[key], value, case["dtype"], key)
