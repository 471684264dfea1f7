"""The eval conv_bn_relu's choice on CUDA among cuDNN's fused ops, the Triton epilogue conv and the plain
conv with its in-place add and ReLU (the reference): per shape by timing, or the forced backend's.

The chooser and the table's CUDA choices are exercised on the CPU with fake implementations and fake
timings; the real implementations are checked against PyTorch on a GPU (marked cuda).
"""
import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastbb
from fastbb import _backend
from fastbb.ops.conv_bn_relu import TABLE, cuda_conv, eval_conv_reference
from fastbb.ops.conv_bn_relu.bn_relu_train import FORWARD_TABLE
from fastbb.ops.conv_bn_relu.fold import fold

from conftest import TOLERANCES, assert_error_within


@pytest.fixture
def timings(monkeypatch):
    """Fake timings {name: ms} for the chooser; records which candidates were timed."""
    fake = {}
    timed = []

    def time_candidate(fn):
        name = fn.func.name if hasattr(fn, "func") else fn.name  # the table's runs come bound to their arguments
        timed.append(name)
        return fake[name]

    monkeypatch.setattr(cuda_conv, "_time_candidate", time_candidate)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return fake, timed


class _Fake:
    """A candidate returning `out` (or raising `error`), counting its calls."""

    def __init__(self, name, out, error=None):
        self.name, self.out, self.error, self.calls = name, out, error, 0

    def __call__(self, *args):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.out


def _fakes(*names, out=None, **errors):
    out = torch.zeros(2, 3, 4, 5) if out is None else out
    return {name: _Fake(name, out, errors.get(name)) for name in names}


def test_picks_the_fastest_and_remembers_it_per_key(timings):
    fake, timed = timings
    fake.update(reference=3.0, cudnn=1.0, triton=2.0)
    cache = cuda_conv._ConvAlgorithmCache()
    candidates = _fakes("reference", "cudnn", "triton")
    assert cache.choose("a", candidates) == "cudnn"
    assert sorted(timed) == ["cudnn", "reference", "triton"]
    fake.update(reference=0.5)  # would change the winner if it were timed again
    assert cache.choose("a", candidates) == "cudnn"
    assert len(timed) == 3
    assert cache.choose("b", candidates) == "reference"  # a new key is timed on its own
    assert len(timed) == 6


def test_the_reference_wins_ties_and_a_lone_reference_is_not_timed(timings):
    fake, timed = timings
    fake.update(reference=1.0, triton=1.0)
    cache = cuda_conv._ConvAlgorithmCache()
    assert cache.choose("a", _fakes("reference", "triton")) == "reference"
    assert cache.choose("b", _fakes("reference")) == "reference"
    assert timed == ["reference", "triton"]


def test_a_raising_candidate_is_dropped(timings):
    fake, timed = timings
    fake.update(reference=3.0, cudnn=1.0, triton=2.0)
    cache = cuda_conv._ConvAlgorithmCache()
    candidates = _fakes("reference", "cudnn", "triton", cudnn=RuntimeError("no engine for this shape"))
    assert cache.choose("a", candidates) == "triton"
    assert "cudnn" not in timed
    assert cache.choose("a", candidates) == "triton"
    assert candidates["cudnn"].calls == 1  # tried once, never again for this key


def test_a_candidate_with_another_layout_is_dropped(timings):
    fake, timed = timings
    fake.update(reference=3.0, triton=1.0)
    candidates = _fakes("reference", "triton")
    candidates["triton"].out = torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert cuda_conv._ConvAlgorithmCache().choose("a", candidates) == "reference"
    assert timed == ["reference"]


def test_an_error_of_the_reference_itself_is_raised(timings):
    candidates = _fakes("reference", "triton", reference=ValueError("bad input"))
    with pytest.raises(ValueError, match="bad input"):
        cuda_conv._ConvAlgorithmCache().choose("a", candidates)


@pytest.mark.parametrize("hook", ["compiling", "capturing"])
def test_no_timing_while_compiling_or_capturing(timings, monkeypatch, hook):
    fake, timed = timings
    fake.update(reference=3.0, cudnn=1.0)
    if hook == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cache = cuda_conv._ConvAlgorithmCache()
    candidates = _fakes("reference", "cudnn")
    assert cache.choose("a", candidates) == "reference"
    assert timed == [] and all(c.calls == 0 for c in candidates.values())
    cache._winners["a"] = "cudnn"  # a winner timed before the capture is used in it
    assert cache.choose("a", candidates) == "cudnn"
    assert timed == []


def _args(dtype=torch.float32, channels_last=False, residual=True, relu=True, groups=1, dilation=1):
    """The eval table's arguments: (x, weight, shift, residual, stride, padding, dilation, groups, relu,
    packed_weights)."""
    x = torch.randn(2, 4, 7, 6, dtype=dtype)
    weight = torch.randn(6, 4 // groups, 3, 3, dtype=dtype)
    if channels_last:
        x, weight = x.to(memory_format=torch.channels_last), weight.to(memory_format=torch.channels_last)
    shift = torch.randn(6, dtype=dtype)
    res = torch.randn(2, 6, 7, 6, dtype=dtype) if residual else None
    return x, weight, shift, res, (1, 1), (dilation, dilation), (dilation, dilation), groups, relu, None


@pytest.fixture
def cuda_here(monkeypatch):
    """The table's CUDA choices made for CPU tensors: cuDNN, its fused ops and Triton count as usable on
    "cuda", and the timing's device guard is a no-op."""
    usable = _backend.backend_usable
    monkeypatch.setattr(_backend, "backend_usable", lambda backend, device_type, kernel=None: (
        device_type == "cuda" and backend in ("cudnn", "triton")) or usable(backend, device_type, kernel))
    monkeypatch.setattr(cuda_conv, "_HAS_CUDNN_FUSED", True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


def _fake_table(monkeypatch):
    """The eval table with each backend's run replaced by a _Fake of its name; returns {backend: fake}."""
    fakes = {i.backend: _Fake(i.backend, torch.zeros(1)) for i in TABLE.implementations}
    implementations = tuple(dataclasses.replace(i, run=fakes[i.backend]) for i in TABLE.implementations)
    monkeypatch.setattr(TABLE, "implementations", implementations)
    monkeypatch.setattr(TABLE, "reference", implementations[-1])
    return fakes


@pytest.mark.parametrize("forced, expected", [("reference", "reference"), ("cudnn", "cudnn"), ("triton", "triton")])
def test_forced_backend_runs_its_implementation_on_cuda(cuda_here, monkeypatch, forced, expected):
    fakes = _fake_table(monkeypatch)
    monkeypatch.setattr(cuda_conv, "_time_candidate", lambda fn: pytest.fail("timed with a backend forced"))
    with fastbb.use_backend(forced):
        assert TABLE("cuda", *_args()) is fakes[expected].out
    assert [f.calls for f in fakes.values()] == [int(name == expected) for name in fakes]


@pytest.mark.parametrize("forced", ["cpp", "mkl", "onednn"])
def test_forcing_a_cpu_backend_on_cuda_raises(cuda_here, forced):
    """cpp means fastbb's C++ CPU kernels, on every op: forced on CUDA tensors it raises (it once meant
    cuDNN's fused conv here), as do the third-party CPU paths."""
    with fastbb.use_backend(forced), pytest.raises(RuntimeError, match=f"backend '{forced}' was forced but is not "
                                                                       "usable on cuda"):
        TABLE.choose("cuda", *_args())
    if forced == "cpp":  # the training BN too
        with fastbb.use_backend(forced), pytest.raises(RuntimeError, match="not usable on cuda"):
            FORWARD_TABLE.choose("cuda", *_args()[:4], 1e-5, True)


def test_forcing_cuda_raises_the_op_has_no_cuda_kernels(cuda_here):
    with fastbb.use_backend("cuda"), pytest.raises(RuntimeError, match=r"fastbb\.conv_bn_relu has no 'cuda'"):
        TABLE.choose("cuda", *_args())


@pytest.mark.parametrize("forced", ["cudnn", "triton"])
def test_forced_backend_not_applicable_runs_the_reference(cuda_here, forced):
    args = _args(relu=False) if forced == "cudnn" else _args(groups=2)  # no fused cuDNN op; Triton: groups=1
    with fastbb.use_backend(forced):
        assert TABLE.choose("cuda", *args) is TABLE.reference


def test_unforced_picks_the_fastest_by_timing(cuda_here, timings, monkeypatch):
    """Unforced, the applicable CUDA implementations and the reference are timed at a shape's first call
    (the table's pick): the fastest runs, and is remembered for the shape."""
    fake, timed = timings
    fake.update(reference=3.0, cudnn=2.0, triton=1.0)
    _fake_table(monkeypatch)
    monkeypatch.setattr(cuda_conv, "_conv_algorithms", cuda_conv._ConvAlgorithmCache())
    assert TABLE.choose("cuda", *_args()).backend == "triton"
    assert sorted(timed) == ["cudnn", "reference", "triton"]
    assert TABLE.choose("cuda", *_args()).backend == "triton"
    assert len(timed) == 3  # remembered
    fake.update(reference=0.5)
    assert TABLE.choose("cuda", *_args(relu=False)).backend == "reference"  # another shape: no cuDNN op, timed
    assert sorted(timed[3:]) == ["reference", "triton"]
    assert TABLE.choose("cuda", *_args(dtype=torch.float64)) is TABLE.reference  # nothing else applies: not timed
    assert len(timed) == 5


def test_compiling_runs_the_reference_even_when_forced(cuda_here, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for forced in ("cudnn", "triton"):
        with fastbb.use_backend(forced):
            assert TABLE.choose("cuda", *_args()) is TABLE.reference
    assert TABLE.choose("cuda", *_args()) is TABLE.reference


def _cuda_fast_paths(args):
    """The backends of the implementations besides the reference that apply to this call on CUDA."""
    return [i.backend for i in TABLE.implementations
            if "cuda" in i.devices and i is not TABLE.reference and i.applies_to(args)]


@pytest.mark.parametrize("change, offered", [
    ({}, ["cudnn", "triton"]),
    ({"relu": False}, ["triton"]),
    ({"groups": 2}, ["cudnn"]),
    ({"dtype": torch.float64}, []),
])
def test_implementations_offered_on_cuda(cuda_here, change, offered):
    assert _cuda_fast_paths(_args(**change)) == offered


def test_cudnn_is_not_offered_when_determinism_is_asked(cuda_here, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    assert not cuda_conv.cudnn_eval_applies(*_args())


def test_no_fast_path_when_autograd_is_needed(cuda_here):
    x, weight, *rest = _args()
    args = (x, weight.requires_grad_(), *rest)
    assert TABLE.choose("cuda", *args) is TABLE.reference
    with fastbb.use_backend("cudnn"):
        assert TABLE.choose("cuda", *args) is TABLE.reference


def _cpu_eval_before(x, weight, shift, residual, stride, padding, dilation, groups, relu):
    """The CPU eval path as it has always been: oneDNN with the ReLU post-op, else conv, add_, relu_."""
    if residual is None and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.ops.mkldnn._convolution_pointwise(x, weight, shift, list(padding), list(stride), list(dilation),
                                                       groups, "relu" if relu else "none", [], "")
    out = F.conv2d(x, weight, shift, stride, padding, dilation, groups)
    if residual is not None:
        out.add_(residual)
    return out.relu_() if relu else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("residual, relu", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_never_takes_the_cuda_branch(monkeypatch, dtype, residual, relu, channels_last):
    """CPU tensors never reach the CUDA implementations or their timing, and give what the CPU path always
    gave (oneDNN's conv with the ReLU post-op for float32 without residual, else the conv, add_ and relu_)."""
    for name in ("cudnn_eval", "triton_eval", "fastest"):
        monkeypatch.setattr(cuda_conv, name, lambda *args, name=name: pytest.fail(f"{name} ran for CPU tensors"))
    monkeypatch.setattr(cuda_conv, "_time_candidate", lambda fn: pytest.fail("timed on the CPU"))
    x, weight, _, res, stride, padding, dilation, groups, relu, _ = _args(dtype, channels_last, residual, relu)
    bn = [torch.rand(6, dtype=dtype) + 0.5, torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype),
          torch.rand(6, dtype=dtype) + 0.5]
    with torch.no_grad():
        got = fastbb.ops.conv_bn_relu(x, weight, None, *bn, padding=padding, relu=relu, residual=res)
        folded, shift = fold(weight, None, *bn, 1e-5, torch.float64)  # as the inference cache folds
        want = _cpu_eval_before(x, folded, shift, res, stride, padding, dilation, groups, relu)
    if dtype == torch.float32 and res is None:
        # oneDNN with the packed folded weight may pick another kernel, which rounds differently.
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])
    else:
        assert torch.equal(got, want)
    assert got.stride() == want.stride()


@pytest.mark.skipif(not _backend.backend_usable("triton", "cpu"), reason="needs Triton's interpreter on the CPU")
@pytest.mark.parametrize("residual, relu, channels_last, dilation", [
    (True, True, False, 1), (False, True, True, 2), (True, False, True, 1), (False, False, False, 2)])
def test_triton_eval_matches_the_reference_on_the_interpreter(residual, relu, channels_last, dilation):
    args = _args(torch.float32, channels_last, residual, relu, dilation=dilation)
    got = cuda_conv.triton_eval(*args)
    want = eval_conv_reference(*args)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    assert cuda_conv._same_layout(got, want)


# ---------------------------------------------------------------------------------------------------------
# On a GPU

# Relative error (of the norm) each kernel may add to eager's own: float32 convs in cuDNN run in TF32 by
# default, and not necessarily in the same kernels for the plain and the fused ops.
_GPU_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 2e-2}


def _relative_error(got, exact):
    return float((got.double() - exact).norm() / exact.norm().clamp_min(1e-30))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_cuda_implementations_match_pytorch(dtype, channels_last, dilation, residual, relu):
    x = torch.randn(2, 32, 19, 23, device="cuda", dtype=torch.float64)
    weight = torch.randn(48, 32, 3, 3, device="cuda", dtype=torch.float64) / 17
    shift = torch.randn(48, device="cuda", dtype=torch.float64)
    res = torch.randn(2, 48, 19, 23, device="cuda", dtype=torch.float64) if residual else None
    geometry = ((1, 1), (dilation, dilation), (dilation, dilation), 1, relu)
    exact = F.conv2d(x, weight, shift, 1, dilation, dilation)
    exact = exact + res if residual else exact
    exact = exact.relu() if relu else exact
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    args = (x.to(dtype, memory_format=fmt), weight.to(dtype, memory_format=fmt), shift.to(dtype),
            None if res is None else res.to(dtype, memory_format=fmt), *geometry, None)
    assert _cuda_fast_paths(args) == (["cudnn", "triton"] if relu else ["triton"])
    implementations = [i for i in TABLE.implementations if i.backend in _cuda_fast_paths(args)]
    eager = TABLE.reference.run(*args)
    for implementation in implementations:
        got = implementation.run(*args)
        assert got.dtype == dtype and cuda_conv._same_layout(got, eager), implementation.backend
        assert_error_within(got, eager, exact, 2.0, slack=_GPU_TOLERANCE[dtype], name=implementation.backend)


@pytest.mark.cuda
@pytest.mark.parametrize("forced", [None, "reference", "cudnn", "triton"])
def test_cuda_dispatch_matches_pytorch(monkeypatch, forced):
    monkeypatch.setattr(cuda_conv, "_conv_algorithms", cuda_conv._ConvAlgorithmCache())
    x = torch.randn(2, 16, 12, 12, device="cuda").to(memory_format=torch.channels_last)
    weight = torch.randn(32, 16, 3, 3, device="cuda").to(memory_format=torch.channels_last)
    bn = [torch.rand(32, device="cuda") + 0.5, torch.randn(32, device="cuda"), torch.randn(32, device="cuda"),
          torch.rand(32, device="cuda") + 0.5]
    res = torch.randn(2, 32, 12, 12, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = F.relu(F.batch_norm(F.conv2d(x.double(), weight.double(), padding=1), *(t.double() for t in bn[2:]),
                                    *(t.double() for t in bn[:2]), eps=1e-5) + res.double())
        if forced is None:
            got = fastbb.ops.conv_bn_relu(x, weight, None, *bn, padding=1, residual=res)
            assert len(cuda_conv._conv_algorithms._winners) == 1
            monkeypatch.setattr(cuda_conv, "_time_candidate", lambda fn: pytest.fail("timed twice"))
            again = fastbb.ops.conv_bn_relu(x, weight, None, *bn, padding=1, residual=res)
            torch.testing.assert_close(again, got)
        else:
            with fastbb.use_backend(forced):
                got = fastbb.ops.conv_bn_relu(x, weight, None, *bn, padding=1, residual=res)
    assert _relative_error(got, exact) <= _GPU_TOLERANCE[torch.float32]
    assert got.is_contiguous(memory_format=torch.channels_last)
