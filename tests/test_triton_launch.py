"""What every Triton launcher in fastbb.kernels must do, checked for all of them at once: launch under the
device guard of its tensors (so a tensor on cuda:1 runs on cuda:1, not on the current device) and refuse,
with a ValueError naming the op and the input shape, a grid past CUDA's limits.

Multi-GPU placement itself needs two GPUs, which no test machine has: here the guard is replaced by a
recorder, and each launch is checked to happen inside it, for one of the launch's own tensors.
"""
import contextlib
import functools
import importlib
import math
import re

import pytest
import torch

import fastbb
from conftest import LaunchSpy

pytestmark = [
    pytest.mark.skipif(not fastbb._backend.backend_usable("triton", "cpu"),
                       reason="Triton on CPU tensors needs its interpreter"),
    # The interpreter computes with numpy, which warns on the NaN of degenerate boxes.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

KERNEL_MODULES = ("nms", "focal_loss", "box_decode", "upsample_nearest_add", "fpn_merge", "bn_relu", "conv2d_epilogue",
                  "match_anchors")


def kernel_modules():
    return {name: importlib.import_module(f"fastbb.kernels.{name}") for name in KERNEL_MODULES}


def launched_kernels(module):
    """The module's @triton.jit kernels that launchers launch (device helpers are not named *_kernel)."""
    from triton.runtime.jit import KernelInterface
    return {name: obj for name, obj in vars(module).items()
            if name.endswith("_kernel") and isinstance(obj, KernelInterface)}


def test_every_kernel_module_is_covered():
    """A new kernel file must be added to KERNEL_MODULES (and its launchers to the test below)."""
    import fastbb.kernels as package
    import pkgutil
    found = {m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}
    assert found == set(KERNEL_MODULES)


def run_every_launcher():
    """Each launcher once, on small CPU tensors (through the public ops where they reach it)."""
    from fastbb.kernels import conv2d_epilogue
    from fastbb.ops.box_decode import decode_boxes
    from fastbb.ops.conv_bn_relu import conv_bn_relu
    from fastbb.ops.focal_loss import sigmoid_focal_loss
    from fastbb.ops.fpn_merge import fpn_merge
    from fastbb.ops.nms import nms_sorted_padded
    from fastbb.ops.retinanet_loss import match_anchors
    from fastbb.ops.upsample_nearest_add import upsample_nearest_add

    with fastbb.use_backend("triton"):
        xy = torch.rand(2, 70, 2) * 50
        boxes = torch.cat([xy, xy + torch.rand(2, 70, 2) * 40 + 1], -1)
        nms_sorted_padded(boxes, torch.randint(0, 3, (2, 70)), torch.tensor([70, 40]), 0.5)

        logits = torch.randn(4, 3, requires_grad=True)
        sigmoid_focal_loss(logits, (torch.rand(4, 3) < 0.3).float(), reduction="sum").backward()

        decode_boxes(torch.rand(6, 4) * 10 + torch.tensor([0.0, 0.0, 20.0, 20.0]), torch.randn(2, 6, 4))

        match_anchors(boxes[0], boxes[:, :5], torch.tensor([5, 2]))  # the low-quality rule: both kernels

        top = torch.randn(2, 3, 4, 5, requires_grad=True)
        upsample_nearest_add(top, torch.randn(2, 3, 7, 9)).sum().backward()

        x = torch.randn(2, 5, 7, 9, requires_grad=True)
        fpn_merge(x, torch.randn(4, 5, 1, 1), torch.randn(4), torch.randn(2, 4, 4, 5)).sum().backward()

        y = torch.randn(2, 3, 6, 5, requires_grad=True)
        conv_bn_relu(y, torch.randn(4, 3, 3, 3), None, torch.rand(4) + 0.5, torch.randn(4), padding=1,
                     training=True).sum().backward()

    conv2d_epilogue.conv2d_epilogue(torch.randn(1, 3, 6, 5), torch.randn(4, 3, 3, 3), torch.rand(4), torch.randn(4),
                                 None, True, padding=1)


def test_every_triton_launch_runs_under_the_device_guard_of_its_tensors(monkeypatch):
    guards = []  # the tensor of each guard entered, in order
    open_guards = []  # indices into guards of the guards entered and not yet left, innermost last
    launches = []  # (kernel, index of the innermost open guard or None, tensor arguments of the launch)

    @contextlib.contextmanager
    def recording_guard(tensor):
        guards.append(tensor)
        open_guards.append(len(guards) - 1)
        try:
            yield
        finally:
            open_guards.pop()

    def record(kernel_name, grid, args):
        launches.append((kernel_name, open_guards[-1] if open_guards else None,
                         [a for a in args if isinstance(a, torch.Tensor)]))

    all_kernels = set()
    for module_name, module in kernel_modules().items():
        if hasattr(module, "on_device"):
            monkeypatch.setattr(module, "on_device", recording_guard)
        for name, kernel in launched_kernels(module).items():
            qualname = f"{module_name}.{name}"
            all_kernels.add(qualname)
            monkeypatch.setattr(module, name, LaunchSpy(kernel, functools.partial(record, qualname)))
    # A launcher guarding through _common or torch.cuda.device directly is recorded the same way.
    monkeypatch.setattr(importlib.import_module("fastbb.kernels._common"), "on_device", recording_guard)
    monkeypatch.setattr(torch.cuda, "device", recording_guard)

    run_every_launcher()

    assert {name for name, _, _ in launches} == all_kernels, "a kernel was not launched: extend run_every_launcher"
    for name, guard, _ in launches:
        assert guard is not None, f"{name} launched outside a device guard"
    # The right tensor: one that the launches under that guard operate on (one launcher may run several
    # kernels under one guard, the later ones on buffers it made on the same device).
    for guard, tensor in enumerate(guards):
        operands = [t for _, g, tensors in launches if g == guard for t in tensors]
        assert any(tensor is t or (tensor.device == t.device and tensor.data_ptr() == t.data_ptr())
                   for t in operands), f"guard {guard} was entered for a tensor none of its launches ({[n for n, g, _ in launches if g == guard]}) is given"


# ---------------------------------------------------------------------------------------------------- grids

def test_check_grid():
    from fastbb.kernels._common import check_grid
    assert check_grid("op", (2**31 - 1, 65535, 65535), (3, 4)) == (2**31 - 1, 65535, 65535)
    for grid in ((2**31,), (1, 65536), (1, 1, 65536), (1, 1, 1, 1)):
        with pytest.raises(ValueError, match=r"some_op: input of shape \(3, 4\) needs a launch grid"):
            check_grid("some_op", grid, (3, 4))


def meta(*shape, dtype=torch.float32, **kwargs):
    return torch.empty(shape, dtype=dtype, device="meta", **kwargs)


# Launcher calls whose grids pass CUDA's limits, on meta tensors (nothing is allocated; a launch would
# fail otherwise): case -> (shape of the input the error names, call). Each must raise a ValueError naming
# the op and that shape before launching.
WIDE = 2**23 + 2**10  # 65544 blocks of 128 along grid y
OVERSIZED = {
    "fastbb.nms_iou_mask, words": ((1, 64 * 2**17, 4), lambda k: k["nms"].iou_mask(
        meta(1, 64 * 2**17, 4), None, meta(1, dtype=torch.int64), 0.5)),
    "fastbb.nms_iou_mask, images": ((2**31, 1, 4), lambda k: k["nms"].iou_mask(
        meta(2**31, 1, 4), None, meta(2**31, dtype=torch.int64), 0.5)),
    "fastbb.nms_reduce_mask": ((2**31, 1, 1), lambda k: k["nms"].reduce_mask(
        meta(2**31, 1, 1, dtype=torch.int64), meta(2**31, dtype=torch.int64))),
    "fastbb.sigmoid_focal_loss": ((2**31, 1024), lambda k: k["focal_loss"].sigmoid_focal_loss(
        meta(2**31, 1024), meta(2**31, 1024), None, None, 0.25, 2.0, -100, False, True)),
    "fastbb.decode_boxes": ((256, 2**31, 4), lambda k: k["box_decode"].decode_boxes(
        meta(2**31, 4), meta(256, 2**31, 4), None, 0, [1.0] * 4, [0.0] * 4, [1.0] * 4, -math.inf,
        math.log(1000.0 / 16), math.inf, [])),
    "fastbb.upsample_nearest_add": ((1, 1, 1, WIDE), lambda k: k["upsample_nearest_add"].upsample_nearest_add(
        meta(1, 1, 1, WIDE), meta(1, 1, 1, WIDE), meta(1, 1, 1, WIDE))),
    "fastbb.upsample_nearest_add_backward": ((1, 1, 1, WIDE), lambda k: k["upsample_nearest_add"].upsample_nearest_backward(
        meta(1, 1, 1, WIDE), 1, WIDE)),
    "fastbb.fpn_merge": ((1, 1, 2**16, 2**15 + 1), lambda k: k["fpn_merge"].fpn_merge(
        meta(1, 1, 2**16, 2**15 + 1), meta(1, 1, 1, 1), None, meta(1, 1, 1, 1))),
    "fastbb.bn_relu_forward": ((2**31, 1, 1, 2), lambda k: k["bn_relu"].bn_relu_forward(
        meta(2**31, 1, 1, 2), None, None, None, 1e-5, True)),
    "fastbb.bn_relu_backward": ((2**31, 1, 1, 2), lambda k: k["bn_relu"].bn_relu_backward(
        meta(2**31, 1, 1, 2), meta(2**31, 1, 1, 2), meta(2**31, 1, 1, 2), meta(1), meta(1), None, True, False)),
    "fastbb.conv2d_epilogue": ((2**16, 1, 2**8, 2**8), lambda k: k["conv2d_epilogue"].conv2d_epilogue(
        meta(2**16, 1, 2**8, 2**8), meta(1, 1, 1, 1), meta(1), meta(1), None, True)),
}


@pytest.mark.parametrize("case", sorted(OVERSIZED))
def test_oversized_grids_raise_naming_the_op_and_shape(case):
    op = case.split(",")[0]
    shape, call = OVERSIZED[case]
    with pytest.raises(ValueError, match=rf"^{re.escape(op)}: ") as error:
        call(kernel_modules())
    assert str(shape) in str(error.value)
