"""Which implementation of an op runs: the compiled extension, Triton, or the pure-PyTorch reference.

Every op declares, per device type, the backends it has in order of preference (fastest first). The
first usable one runs, unless a backend is forced with the FASTBB_BACKEND environment variable or the
`use_backend(name)` context manager (tests and benchmarks use this to compare backends).
"""
import contextlib
import importlib
import importlib.util
import os
import threading
import warnings

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")

_state = threading.local()
_extension = None
_extension_error = None
_triton_error = None


def _load_extension():
    """Import fastbb._C once; record why it is unusable instead of raising."""
    global _extension, _extension_error
    try:
        from fastbb import _build_info
    except ImportError:
        _extension_error = "fastbb._C is not built (install with pip to compile it)"
        return
    if _build_info.TORCH_VERSION != torch.__version__:
        _extension_error = (f"fastbb._C was built for torch {_build_info.TORCH_VERSION} but torch "
                            f"{torch.__version__} is installed; reinstall fastbb to rebuild it")
        return
    try:
        _extension = importlib.import_module("fastbb._C")
    except (ImportError, OSError) as exc:
        _extension_error = f"fastbb._C failed to load: {exc}"


def _check_triton():
    global _triton_error
    if importlib.util.find_spec("triton") is None:
        _triton_error = "triton is not installed"


_load_extension()
_check_triton()
if _extension_error is not None:
    warnings.warn(f"fastbb: {_extension_error}; ops run on their pure-PyTorch reference.", stacklevel=2)
elif not _extension.with_cuda() and torch.version.cuda is not None and torch.cuda.is_available():
    # A GPU, but a CPU-only build: say why once, so a silent fallback to Triton / PyTorch is not mistaken
    # for fastbb's CUDA speed.
    warnings.warn(f"{build_report()}. CUDA ops run on Triton or PyTorch instead.", stacklevel=2)


def extension():
    """The loaded fastbb._C module, or None."""
    return _extension


def build_report():
    """The line the build ended with: what fastbb._C holds, and why CUDA kernels were skipped if they were."""
    try:
        from fastbb import _build_info
    except ImportError:
        return "fastbb._C is not built: every op runs on its pure-PyTorch reference"
    return getattr(_build_info, "BUILD_REPORT", f"fastbb._C built for torch {_build_info.TORCH_VERSION}, CUDA "
                                                f"kernels {'compiled' if _build_info.WITH_CUDA else 'not compiled'}")


def triton_interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_kernel(qualname, dispatch_key):
    """Whether fastbb._C registered a kernel for the private op `qualname` (e.g. 'fastbb_C::nms')."""
    # Asks the dispatcher rather than fastbb._C, so a kernel library loaded another way (a development
    # build through torch.utils.cpp_extension.load) is used too.
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
    except RuntimeError:
        return False


def backend_usable(backend, device_type, kernel=None):
    """Whether `backend` can run on `device_type`; `kernel` names the fastbb_C op it needs, if any."""
    if backend == "reference":
        return True
    if backend == "cpp":
        return device_type == "cpu" and (kernel is None or has_kernel(kernel, "CPU"))
    if backend == "cuda":
        return device_type == "cuda" and (kernel is None or has_kernel(kernel, "CUDA"))
    if backend == "triton":
        if _triton_error is not None:
            return False
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreter_on())
    return False


def forced_backend():
    """The backend forced by use_backend() (innermost wins) or FASTBB_BACKEND, or None."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    name = os.environ.get("FASTBB_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTBB_BACKEND={name!r} is not one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Force every fastbb op called inside the block to run on backend `name`."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: backend must be one of {BACKENDS}, got {name!r}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def choose(op_name, device_type, preference, kernels=None):
    """Pick the backend for one call of `op_name` on `device_type`.

    preference: {device_type: (backend, ...)} fastest first (the reference is the last resort
    everywhere); kernels: {backend: fastbb_C op name}.
    """
    kernels = kernels or {}
    forced = forced_backend()
    if forced is not None:
        if not backend_usable(forced, device_type, kernels.get(forced)):
            raise RuntimeError(
                f"fastbb.{op_name}: backend {forced!r} was forced but is not usable on {device_type} "
                f"tensors here ({_why_unusable(forced, device_type)}); usable: "
                f"{[b for b in BACKENDS if backend_usable(b, device_type, kernels.get(b))]}")
        # An op has a backend when it prefers it on some device: Triton, preferred on CUDA, can be
        # forced on CPU tensors under the interpreter without ever being chosen there by default.
        offered = {b for backends in preference.values() for b in backends} | {"reference"}
        if forced not in offered:
            raise RuntimeError(f"fastbb.{op_name} has no {forced!r} implementation; it has {sorted(offered)}")
        return forced
    for backend in preference.get(device_type, ()):
        if backend_usable(backend, device_type, kernels.get(backend)):
            return backend
    return "reference"


def _why_unusable(backend, device_type):
    if backend in ("cpp", "cuda") and _extension_error is not None:
        return _extension_error
    if backend == "triton" and _triton_error is not None:
        return _triton_error
    if backend == "triton" and device_type == "cpu":
        return "Triton runs CPU tensors only under the interpreter (TRITON_INTERPRET=1 before import)"
    if backend == "cpp" and device_type != "cpu":
        return "the C++ backend runs CPU tensors"
    if backend == "cuda" and device_type != "cuda":
        return "the CUDA backend runs CUDA tensors"
    return "the kernel was not compiled into fastbb._C"


def backends():
    """What is built and usable here: {backend: {'built': bool, 'usable_on': [device types], 'why': str}}."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {}
    for backend in BACKENDS:
        if backend in ("cpp", "cuda"):
            built = _extension is not None and (backend == "cpp" or _extension.with_cuda())
        elif backend == "triton":
            built = _triton_error is None
        else:
            built = True
        usable = [d for d in devices if built and backend_usable(backend, d)]
        why = "" if usable else (_why_unusable(backend, devices[-1]) if built or backend != "cuda"
                                 else (_extension_error or "fastbb._C was built without CUDA"))
        report[backend] = {"built": built, "usable_on": usable, "why": why}
    return report
