"""What every op file shares: the private kernel namespace and the input checks."""
import math

import torch

# Schemas of the compiled kernels (namespace fastbb_C) are defined here, in Python, by each op file;
# fastbb._C only registers implementations for them. A missing or stale binary therefore never removes
# an op: the public fastbb:: op falls back to its reference.
kernel_lib = torch.library.Library("fastbb_C", "FRAGMENT")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Errors of the type the original raises, so that code catching the original's errors keeps working, and
# still the ValueError / TypeError that describes the mistake. torchvision's ops and PyTorch's own check
# their inputs in C++ (TORCH_CHECK), which raises RuntimeError; mmdet (and torchvision's BoxCoder) check
# configurations and arguments with assert, which raises AssertionError.
class ValueRuntimeError(ValueError, RuntimeError):
    """A bad input shape or value, where the original raises RuntimeError."""


class TypeRuntimeError(TypeError, RuntimeError):
    """An input of a type or dtype the op does not take, where the original raises RuntimeError."""


class ValueAssertionError(ValueError, AssertionError):
    """A bad configuration or argument value, where the original asserts (AssertionError)."""


class TypeAssertionError(TypeError, AssertionError):
    """A configuration or argument of the wrong type, where the original asserts (AssertionError)."""


def compute_dtype(dtype):
    """The dtype fastbb computes in for inputs of `dtype`: float64 for float64, float32 for every other float
    (16-bit inputs are widened on load and rounded once on store)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(t):
    """channels_last when the 4-D tensor t is laid out so (and not also plain contiguous), else
    contiguous_format: the format of outputs made to follow t, in the real kernels, the Triton launchers
    (as kernels/_common.output_format) and the fake functions alike, so real and fake outputs get the same
    strides."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_tensor(op, name, t, *, ndim=None, last_dim=None, dtypes=None):
    """Raise a TypeRuntimeError / ValueRuntimeError naming `op` and `name` when `t` is not what is expected
    (RuntimeError, as the checks of torchvision's and PyTorch's C++ ops)."""
    if not isinstance(t, torch.Tensor):
        raise TypeRuntimeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        shape = "(N, 4)" if last_dim == 4 and ndim == 2 else f"{ndim}-D"
        raise ValueRuntimeError(f"{op}: {name} must be {shape}, got shape {tuple(t.shape)}")
    if last_dim is not None and (t.dim() == 0 or t.shape[-1] != last_dim):
        raise ValueRuntimeError(f"{op}: {name} must have last dimension {last_dim}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeRuntimeError(f"{op}: {name} must have dtype in ({names}), "
                               f"got {str(t.dtype).replace('torch.', '')}")


def check_same_device(op, **tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueRuntimeError(f"{op}: all tensors must be on one device, got {listed}")


def check_float(op, name, value, lo=None, hi=None):
    """A finite Python number within [lo, hi]."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueRuntimeError(f"{op}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeRuntimeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueRuntimeError(f"{op}: {name} must be finite, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueRuntimeError(f"{op}: {name} must be in [{lo}, {hi}], got {value}")
    return value


def check_top_shape(op, top, lateral_shape, lateral_name="lateral"):
    """The FPN merges' coarser map: top must be 4-D with the batch and channels of lateral_shape
    (N, C, H, W), no larger than it, and not spatially empty where the lateral is not."""
    if top.dim() != 4:
        raise ValueRuntimeError(f"{op}: top must be 4-D (N, C, h, w), got shape {tuple(top.shape)}")
    if tuple(top.shape[:2]) != tuple(lateral_shape[:2]):
        raise ValueRuntimeError(f"{op}: top must have the batch and channels (N, C) of {lateral_name} "
                                f"{tuple(lateral_shape)}, got shape {tuple(top.shape)}")
    (h, w), (height, width) = top.shape[-2:], lateral_shape[-2:]
    if h > height or w > width:
        raise ValueRuntimeError(f"{op}: top ({h}x{w}) must not be larger than {lateral_name} "
                                f"({height}x{width}): the merge upsamples the coarser map")
    if (h == 0 or w == 0) and height * width > 0:
        raise ValueRuntimeError(f"{op}: top has an empty spatial size {h}x{w}; nothing to upsample to "
                                f"{height}x{width}")
