"""What every op file shares: the private kernel namespace, the input checks and the autocast rules' helpers."""
import functools
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


def autocast_dtype(x):
    """The dtype torch.autocast, enabled now for x's device type, casts a conv's floating inputs to (what
    torch.get_autocast_dtype says); None outside autocast or when x is not a tensor. Under torch.compile
    these questions are folded to constants (dynamo guards on the autocast state)."""
    if not isinstance(x, torch.Tensor) or not torch._C._is_any_autocast_enabled():
        return None
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


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


def check_float(op, name, value, lo=None, hi=None, allow_nonfinite=False):
    """A Python number within [lo, hi], finite unless allow_nonfinite."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueRuntimeError(f"{op}: {name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeRuntimeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not allow_nonfinite and not math.isfinite(value):
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


# ---------------------------------------------------------------------------------------------------------
# Autocast. Each op declares its rule under torch.autocast next to its table (the table's `autocast=` text)
# and registers it here: a kernel at the AutocastCPU / AutocastCUDA dispatch keys that casts the op's
# arguments as the composite of aten ops it replaces would be cast, then runs the op with autocast off for
# that device, as aten's own autocast kernels do. torch.library.register_autocast casts every floating input
# to one fixed dtype, which fits neither "the autocast dtype, whichever it is" nor ops that cast only some
# of their inputs.

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_autocast_lib = torch.library.Library("fastbb", "FRAGMENT")


def autocast_eligible(t, device_type):
    """Whether aten's autocast casts t as an op's input: a floating tensor of that device type, not float64."""
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
            and t.dtype != torch.float64)


def autocast_cast(t, device_type, dtype):
    """t cast to dtype where aten's autocast would cast it, else t itself (None, integer tensors, float64)."""
    return t.to(dtype) if autocast_eligible(t, device_type) else t


@functools.cache
def autocast_runs_in_float32(aten_op, device_type):
    """Whether torch's autocast runs `aten_op` (e.g. "aten::upsample_nearest2d", "aten::exp") in float32 on
    device_type in this torch. aten registers an autocast kernel only for the ops of its cast lists, and these
    ops are on no list but the float32 one; the lists differ by device and by torch version (CUDA runs the
    nearest upsample and exp in float32, the CPU in the input's dtype), so they are read, not assumed."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(aten_op, _AUTOCAST_KEYS[device_type])
    except RuntimeError:
        return False


def register_autocast_rule(op_name, cast_args):
    """Registers the rule of op fastbb::<op_name> under torch.autocast on CPU and CUDA: cast_args(device_type,
    args) returns the op's positional arguments cast as the rule says, and the op runs on them with autocast
    off for that device. An op whose rule casts nothing registers `keep_arguments`, so that its kernels
    never run under autocast (the aten ops inside a kernel would otherwise cast on their own)."""
    op = getattr(torch.ops.fastbb, op_name).default
    for device_type, key in _AUTOCAST_KEYS.items():
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(keyset, *args, device_type=device_type, excluded=excluded):
            cast = cast_args(device_type, args)
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return op(*cast)
        _autocast_lib.impl(op_name, kernel, key, with_keyset=True)


def keep_arguments(device_type, args):
    """The rule of an op that autocast does not cast (dtype-preserving ops such as indexing and add)."""
    return args
