"""Which implementation of an op runs: fastbb's compiled kernels, its Triton kernels, a named third-party
fast path, or the pure-PyTorch reference.

Every op declares one table (`OpTable`): its implementations in order of preference, each with its
backend, the devices it is chosen on by default, the fastbb_C kernel it needs, when it applies to a call,
and what it is. Dispatch, `fastbb.backends()`, the tests, the benchmarks and the README's backend matrix
all read those tables. A backend name means one thing everywhere (BACKENDS). The first usable,
applicable implementation runs, unless a backend is forced with the FASTBB_BACKEND environment variable or
the `use_backend(name)` context manager: then the op runs its implementation of that backend where one
applies to the call, and its reference where none does.
"""
import contextlib
import dataclasses
import importlib
import importlib.util
import os
import threading
import warnings
from typing import Any, Callable, Iterator

import torch

# Every backend name, with the one thing it means for every op.
BACKENDS = {
    "reference": "plain PyTorch, written for clarity: the ground truth every other backend is tested against",
    "cpp": "fastbb's C++ CPU kernels (fastbb._C, OpenMP)",
    "cuda": "fastbb's CUDA kernels (fastbb._C)",
    "triton": "fastbb's Triton kernels (fastbb.kernels); on CPU tensors only under TRITON_INTERPRET=1",
    "onednn": "oneDNN's convolution with fused post-ops (bias, residual add, ReLU), through PyTorch",
    "mkl": "MKL's matrix products, through PyTorch, with fastbb's epilogue",
    "cudnn": "cuDNN's convolution with fused bias, residual add and ReLU, through PyTorch",
}

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


def load_warning(extension_error, extension_module, gpu_present):
    """The one warning `import fastbb` gives about fastbb._C, or None: the binary is missing or stale, or a
    GPU is present but the build has no CUDA kernels (so that a fallback to Triton / PyTorch is not mistaken
    for fastbb's CUDA speed)."""
    if extension_error is not None:
        return f"fastbb: {extension_error}; ops run on their pure-PyTorch reference."
    if gpu_present and not extension_module.with_cuda():
        return f"{build_report()}. CUDA ops run on Triton or PyTorch instead."
    return None


_load_extension()
_check_triton()
_warning = load_warning(_extension_error, _extension, torch.version.cuda is not None and torch.cuda.is_available())
if _warning is not None:
    warnings.warn(_warning, stacklevel=2)


def triton_interpreter_on():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Kernels found registered: a registration stays, so the dispatcher (several microseconds a question, asked
# at every call of an op) is asked again only about kernels not found yet.
_kernels_found = set()


def has_kernel(qualname, dispatch_key):
    """Whether fastbb._C registered a kernel for the private op `qualname` (e.g. 'fastbb_C::nms')."""
    # Asks the dispatcher rather than fastbb._C, so a kernel library loaded another way (a development
    # build through torch.utils.cpp_extension.load) is used too.
    if (qualname, dispatch_key) in _kernels_found:
        return True
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
    except RuntimeError:
        return False
    if found:
        _kernels_found.add((qualname, dispatch_key))
    return found


@torch.compiler.assume_constant_result  # a fact of the process: tables can choose while torch.compile traces
def backend_usable(backend, device_type, kernel=None):
    """Whether `backend` can run on `device_type`; `kernel` names the fastbb_C op it needs, if any."""
    if backend == "reference":
        return True
    if backend == "cpp":
        return device_type == "cpu" and kernel is not None and has_kernel(kernel, "CPU")
    if backend == "cuda":
        return device_type == "cuda" and kernel is not None and has_kernel(kernel, "CUDA")
    if backend == "triton":
        if _triton_error is not None:
            return False
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreter_on())
    if backend == "onednn":
        return device_type == "cpu" and torch.backends.mkldnn.is_available()
    if backend == "mkl":
        return device_type == "cpu" and torch.backends.mkl.is_available()
    if backend == "cudnn":
        return device_type == "cuda" and torch.backends.cudnn.is_available()
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
def use_backend(name: str) -> Iterator[None]:
    """
    Forces every fastbb op called inside the ``with`` block, in this thread, to run on one backend.

    An op runs its implementation of that backend where one applies to the call, and its pure-PyTorch
    reference where none does; it raises a RuntimeError when it has the backend but the backend cannot
    run here (a kernel not built, a CUDA backend for CPU tensors), and when it has no such backend at
    all. Blocks nest (the innermost wins) and take precedence over the FASTBB_BACKEND environment
    variable.

    Args:
        name (str): the backend, one of ``"reference"``, ``"cpp"``, ``"cuda"``, ``"triton"``,
            ``"onednn"``, ``"mkl"``, ``"cudnn"`` (``fastbb.backends()`` says which are usable here).

    Returns:
        ContextManager[None]: the context manager of the block.
    """
    if name not in BACKENDS:
        raise ValueError(f"fastbb.use_backend: backend must be one of {list(BACKENDS)}, got {name!r}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _why_unusable(backend, device_type):
    if backend in ("cpp", "cuda") and _extension_error is not None:
        return _extension_error
    if backend == "triton" and _triton_error is not None:
        return _triton_error
    if backend == "triton" and device_type == "cpu":
        return "Triton runs CPU tensors only under the interpreter (TRITON_INTERPRET=1 before import)"
    if backend in ("cpp", "onednn", "mkl") and device_type != "cpu":
        return f"the {backend} backend runs CPU tensors"
    if backend in ("cuda", "cudnn") and device_type != "cuda":
        return f"the {backend} backend runs CUDA tensors"
    if backend in ("onednn", "mkl", "cudnn"):
        return f"this torch was built without {backend}"
    return "the kernel was not compiled into fastbb._C"


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run an op.

    backend: a key of BACKENDS. run: called with the op's arguments. devices: the device types it is
    chosen on by default (a forced backend may run it elsewhere, e.g. Triton on CPU tensors under the
    interpreter). kernel: the fastbb_C op it needs, or a tuple of them (a composition of fastbb ops that
    is only that backend when each of its inner ops has that backend's kernel). applies: a predicate on
    the op's arguments, for implementations that handle only some calls (a 3x3 stride-1 conv, say).
    what: one line for people.
    """
    backend: str
    run: Callable
    devices: tuple = ("cpu", "cuda")
    kernel: str | tuple | None = None
    applies: Callable | None = None
    what: str = ""

    def usable(self, device_type):
        if isinstance(self.kernel, tuple):
            return all(backend_usable(self.backend, device_type, k) for k in self.kernel)
        return backend_usable(self.backend, device_type, self.kernel)

    def applies_to(self, args):
        return self.applies is None or bool(self.applies(*args))


# Every op's table, by op name, in the order they were declared.
TABLES = {}


class OpTable:
    """An op's implementations in order of preference, read by dispatch, fastbb.backends(), the tests, the
    benchmarks and the README's backend matrix.

    autocast: the op's rule under torch.autocast, as the op it replaces behaves (for people and the
    README). pick: optional function(implementations, args) -> implementation that chooses among the
    applicable, usable implementations of a device when no backend is forced (by default the first).
    stage_of: for an op run in stages that choose their implementations separately (a conv, then a
    training BN), the op's name; the stage's table is named "<op>.<stage>". A forced backend that the op
    has but a stage lacks runs that stage's reference, as where none of its implementations applies.
    """

    def __init__(self, op, implementations, *, autocast, pick=None, stage_of=None):
        implementations = tuple(implementations)
        unknown = sorted({i.backend for i in implementations} - set(BACKENDS))
        if unknown:
            raise ValueError(f"fastbb.{op}: unknown backends {unknown}; the backends are {list(BACKENDS)}")
        references = [i for i in implementations if i.backend == "reference"]
        if len(references) != 1 or references[0].applies is not None:
            raise ValueError(f"fastbb.{op}: a table needs exactly one reference implementation, for every call")
        if stage_of is not None and not op.startswith(f"{stage_of}."):
            raise ValueError(f"fastbb.{op}: the table of a stage of {stage_of} is named '{stage_of}.<stage>'")
        self.op = op
        self.stage_of = stage_of
        self.implementations = implementations
        self.reference = references[0]
        self.autocast = autocast
        self.pick = pick
        TABLES[op] = self

    def offered(self):
        """The backends the op has, in order of preference."""
        return list(dict.fromkeys(i.backend for i in self.implementations))

    def kernel(self, backend):
        """The fastbb_C op (or tuple of them) the first implementation of `backend` needs (None if none
        needs one)."""
        return next((i.kernel for i in self.implementations if i.backend == backend and i.kernel), None)

    def usable_backends(self, device_type):
        """The op's backends that can run on `device_type` here (forced, where that is how they run there)."""
        return [b for b in self.offered()
                if any(i.usable(device_type) for i in self.implementations if i.backend == b)]

    def choose(self, device_type, *args):
        """The implementation one call runs (see the module docstring for the rules)."""
        forced = forced_backend()
        if forced is None:
            candidates = [i for i in self.implementations if device_type in i.devices and i.backend != "reference"
                          and i.usable(device_type) and i.applies_to(args)]
            if not candidates:
                return self.reference
            return self.pick(candidates, args) if self.pick is not None else candidates[0]
        if forced not in self.offered():
            # A backend of another stage of the op: checked as that stage would check it, then this stage
            # runs its reference.
            having = [t for t in self._op_tables() if forced in t.offered()]
            if not having:
                op = self.stage_of or self.op
                offered = list(dict.fromkeys(b for t in self._op_tables() for b in t.offered()))
                raise RuntimeError(f"fastbb.{op} has no {forced!r} implementation; it has {offered}")
            having[0]._forced_usable(forced, device_type)
            return self.reference
        usable = self._forced_usable(forced, device_type)
        return next((i for i in usable if i.applies_to(args)), self.reference)

    def _op_tables(self):
        """The tables of the op this table belongs to: the op's own and those of its stages."""
        op = self.stage_of or self.op
        return [t for t in TABLES.values() if op in (t.op, t.stage_of)] or [self]

    def _forced_usable(self, forced, device_type):
        """The implementations of the forced backend usable on device_type; raises when there are none."""
        usable = [i for i in self.implementations if i.backend == forced and i.usable(device_type)]
        if not usable:
            raise RuntimeError(
                f"fastbb.{self.op}: backend {forced!r} was forced but is not usable on {device_type} tensors here "
                f"({_why_unusable(forced, device_type)}); usable: {self.usable_backends(device_type)}")
        return usable

    def __call__(self, device_type, *args):
        return self.choose(device_type, *args).run(*args)


def backends() -> dict[str, dict[str, Any]]:
    """
    Reports what is built and usable in this process, per backend.

    Returns:
        dict[str, dict[str, Any]]: for each backend name, ``{"built": bool, "usable_on": list[str]`` (the
        device types it can run on here), ``"why": str`` (why it is usable nowhere, else ``""``),
        ``"what": str`` (what the backend is), ``"ops": list[str]`` (the ops that have it) ``}``.
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {}
    for backend, what in BACKENDS.items():
        if backend in ("cpp", "cuda"):
            built = _extension is not None and (backend == "cpp" or _extension.with_cuda())
        elif backend == "triton":
            built = _triton_error is None
        else:
            built = True
        ops = [table.op for table in TABLES.values() if backend in table.offered()]
        usable = [d for d in devices if backend == "reference"
                  or any(backend in table.usable_backends(d) for table in TABLES.values())]
        if not ops:
            why = "no op has this backend"
        elif usable:
            why = ""
        elif backend == "cuda" and _extension is not None and not _extension.with_cuda():
            why = "fastbb._C was built without CUDA"
        else:
            why = _why_unusable(backend, devices[-1])
        report[backend] = {"built": built, "usable_on": usable, "why": why, "what": what, "ops": ops}
    return report
