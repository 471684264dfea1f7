"""What every Triton launcher in fastbb.kernels shares: the interpreter switch, the autotuning switch and
the autotuned-kernel wrapper, the launch configuration of the tiled GEMM kernels, the device guard, CUDA's
grid limits, the compute dtype, the output memory format rule (and the tile orientation built on it), and
the store-side bfloat16 rounding the interpreter needs."""
import contextlib
import os

import torch
import triton
import triton.language as tl

from fastbb.ops._common import compute_dtype as torch_compute_dtype
from fastbb.ops._common import memory_format as output_format

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INT32_MAX = 2**31 - 1
# CUDA's limits on a launch: gridDim.x up to 2**31 - 1, gridDim.y and gridDim.z up to 65535.
GRID_X_MAX = INT32_MAX
GRID_YZ_MAX = 65535
AUTOTUNE_VARIABLE = "FASTBB_TRITON_AUTOTUNE"


def autotune_enabled():
    """Whether autotuned kernels search their config lists (the default) or launch their pinned config
    alone (FASTBB_TRITON_AUTOTUNE=0: one compile per kernel and dtype and no benchmarking, which is what a
    short GPU test run can afford). Read at each launch, so tests and scripts switch it without a reimport."""
    value = os.environ.get(AUTOTUNE_VARIABLE, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{AUTOTUNE_VARIABLE} must be 0 (pinned configs) or 1 (autotune), got {value!r}")
    return value == "1"


class TunedKernel:
    """A @triton.jit kernel with the configs it is autotuned over and the one config it is pinned to when
    autotuning is off (one of those configs, so whatever checks the list covers it too)."""

    def __init__(self, kernel, configs, pinned, key):
        if pinned not in configs:
            raise ValueError(f"{kernel.__name__}: the pinned config {pinned} is not one of its configs")
        self.kernel = kernel
        self.configs = tuple(configs)
        self.pinned = pinned
        self.key = list(key)
        self._launchers = {}

    def launcher(self):
        """triton.autotune over every config, or over the pinned one alone when autotuning is off (a
        single config is launched without benchmarking). One launcher per switch state, each with its own
        tuning cache, made on first use so that importing a kernel module builds no autotuner."""
        tune = autotune_enabled()
        if tune not in self._launchers:
            configs = list(self.configs) if tune else [self.pinned]
            self._launchers[tune] = triton.autotune(configs=configs, key=self.key)(self.kernel)
        return self._launchers[tune]


def gemm_launch(op, kernel, dtype, tuned, tuned_float64, interpreter_blocks, block_m=None, block_n=None,
                block_k=None):
    """(kernel, block keywords) for a launch of a tiled GEMM kernel with inputs of `dtype`: `kernel` with the
    blocks given (all three, each a power of two >= 16, as tl.dot needs), else under the interpreter with
    its small `interpreter_blocks`, else the autotuner of the kernel's configs for the dtype
    (`tuned_float64` for float64, whose accumulator and tiles need smaller ones), which picks the blocks
    itself. `kernel` is the launcher's module-level name for the @triton.jit kernel, looked up at each call,
    so that a test's wrapper of it is what launches."""
    fixed = (block_m, block_n, block_k)
    if any(b is not None for b in fixed):
        if any(b is None or b < 16 or b & (b - 1) for b in fixed):
            raise ValueError(f"{op}: block_m, block_n, block_k must all be powers of two >= 16")
        return kernel, dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    if INTERPRET:
        return kernel, dict(interpreter_blocks)
    return (tuned_float64 if dtype == torch.float64 else tuned).launcher(), {}


def on_device(t):
    """Launch on t's GPU, not on whichever is current (a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_grid(op, grid, shape):
    """Raise a ValueError naming op and the input shape when grid exceeds CUDA's launch limits."""
    limits = (GRID_X_MAX, GRID_YZ_MAX, GRID_YZ_MAX)
    if len(grid) > 3 or any(size > limit for size, limit in zip(grid, limits)):
        raise ValueError(f"{op}: input of shape {tuple(shape)} needs a launch grid {tuple(grid)}, over CUDA's "
                         f"limits {limits[:len(grid)]}; split the input")
    return grid


def compute_dtype(dtype):
    """Triton dtype of the arithmetic: fastbb.ops._common.compute_dtype's rule, as a tl dtype."""
    return tl.float64 if torch_compute_dtype(dtype) == torch.float64 else tl.float32


def round_bf16(dtype):
    """Whether stores of `dtype` need output_value's rounding (bfloat16 under the interpreter)."""
    return INTERPRET and dtype == torch.bfloat16


def span(t, first_dim=0):
    """Largest element offset reachable from index 0 along dims first_dim.. of t."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[first_dim:], t.stride()[first_dim:]))


def tiles_channels_last(t):
    """Whether elementwise tiles over the 4-D t run along channels (its memory order is NHWC): output_format's
    rule for a dense t, the order of its strides for any other view. This only orients tiles for coalescing."""
    if output_format(t) == torch.channels_last:
        return True
    if t.is_contiguous():
        return False
    return t.stride(1) < min(t.stride(2), t.stride(3))


@triton.jit
def output_value(value, ROUND_BF16: tl.constexpr):
    """value ready for the store. The interpreter truncates float32 -> bfloat16 where PyTorch and the GPU
    round to nearest even, so there the rounding is done first on the float32 bits, which leaves the
    interpreter's conversion exact."""
    if ROUND_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
    return value
