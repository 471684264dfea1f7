"""The eval conv_bn_relu's per-shape choice among cuDNN's fused ops, the Triton epilogue conv and eager.

The chooser is exercised on the CPU with fake candidates and fake timings; the real candidates are
checked against PyTorch on a GPU (marked cuda).
"""
import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastbb
from fastbb import _backend

from conftest import TOLERANCES

op = importlib.import_module("fastbb.ops.conv_bn_relu")  # the module; fastbb.ops.conv_bn_relu is the op


@pytest.fixture
def timings(monkeypatch):
    """Fake timings {name: ms} for the chooser; records which candidates were timed."""
    fake = {}
    timed = []

    def time_candidate(fn):
        timed.append(fn.name)
        return fake[fn.name]

    monkeypatch.setattr(op, "_time_candidate", time_candidate)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return fake, timed


class _Fake:
    """A candidate returning `out` (or raising `error`), counting its calls."""

    def __init__(self, name, out, error=None):
        self.name, self.out, self.error, self.calls = name, out, error, 0

    def __call__(self):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.out


def _fakes(*names, out=None, **errors):
    out = torch.zeros(2, 3, 4, 5) if out is None else out
    return {name: _Fake(name, out, errors.get(name)) for name in names}


def test_picks_the_fastest_and_remembers_it_per_key(timings):
    fake, timed = timings
    fake.update(eager=3.0, cudnn=1.0, triton=2.0)
    cache = op._ConvAlgorithmCache()
    candidates = _fakes("eager", "cudnn", "triton")
    assert cache.choose("a", candidates) == "cudnn"
    assert sorted(timed) == ["cudnn", "eager", "triton"]
    fake.update(eager=0.5)  # would change the winner if it were timed again
    assert cache.choose("a", candidates) == "cudnn"
    assert len(timed) == 3
    assert cache.choose("b", candidates) == "eager"  # a new key is timed on its own
    assert len(timed) == 6


def test_eager_wins_ties_and_a_lone_eager_is_not_timed(timings):
    fake, timed = timings
    fake.update(eager=1.0, triton=1.0)
    cache = op._ConvAlgorithmCache()
    assert cache.choose("a", _fakes("eager", "triton")) == "eager"
    assert cache.choose("b", _fakes("eager")) == "eager"
    assert timed == ["eager", "triton"]


def test_a_raising_candidate_is_dropped(timings):
    fake, timed = timings
    fake.update(eager=3.0, cudnn=1.0, triton=2.0)
    cache = op._ConvAlgorithmCache()
    candidates = _fakes("eager", "cudnn", "triton", cudnn=RuntimeError("no engine for this shape"))
    assert cache.choose("a", candidates) == "triton"
    assert "cudnn" not in timed
    assert cache.choose("a", candidates) == "triton"
    assert candidates["cudnn"].calls == 1  # tried once, never again for this key


def test_a_candidate_with_another_layout_is_dropped(timings):
    fake, timed = timings
    fake.update(eager=3.0, triton=1.0)
    candidates = _fakes("eager", "triton")
    candidates["triton"].out = torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last)
    assert op._ConvAlgorithmCache().choose("a", candidates) == "eager"
    assert timed == ["eager"]


def test_an_error_of_eager_itself_is_raised(timings):
    candidates = _fakes("eager", "triton", eager=ValueError("bad input"))
    with pytest.raises(ValueError, match="bad input"):
        op._ConvAlgorithmCache().choose("a", candidates)


@pytest.mark.parametrize("hook", ["compiling", "capturing"])
def test_no_timing_while_compiling_or_capturing(timings, monkeypatch, hook):
    fake, timed = timings
    fake.update(eager=3.0, cudnn=1.0)
    if hook == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cache = op._ConvAlgorithmCache()
    candidates = _fakes("eager", "cudnn")
    assert cache.choose("a", candidates) == "eager"
    assert timed == [] and all(c.calls == 0 for c in candidates.values())
    cache._winners["a"] = "cudnn"  # a winner timed before the capture is used in it
    assert cache.choose("a", candidates) == "cudnn"
    assert timed == []


def _args(dtype=torch.float32, channels_last=False, residual=True, relu=True, groups=1, dilation=1):
    x = torch.randn(2, 4, 7, 6, dtype=dtype)
    weight = torch.randn(6, 4 // groups, 3, 3, dtype=dtype)
    if channels_last:
        x, weight = x.to(memory_format=torch.channels_last), weight.to(memory_format=torch.channels_last)
    shift = torch.randn(6, dtype=dtype)
    res = torch.randn(2, 6, 7, 6, dtype=dtype) if residual else None
    return x, weight, shift, res, (1, 1), (dilation, dilation), (dilation, dilation), groups, relu


@pytest.mark.parametrize("forced, expected", [(None, "triton"), ("reference", "eager"), ("cuda", "cudnn"),
                                              ("cpp", "cudnn"), ("triton", "triton")])
def test_forced_backend_picks_the_candidate(timings, monkeypatch, forced, expected):
    fake, timed = timings
    fake.update(eager=3.0, cudnn=2.0, triton=1.0)
    candidates = _fakes("eager", "cudnn", "triton")
    monkeypatch.setattr(op, "_cuda_candidates", lambda *args: candidates)
    monkeypatch.setattr(op, "_conv_algorithms", op._ConvAlgorithmCache())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # CPU tensors here
    if forced is None:
        out = op._cuda_eval_forward(*_args())
    else:
        with fastbb.use_backend(forced):
            out = op._cuda_eval_forward(*_args())
    assert out is candidates[expected].out
    assert (timed != []) == (forced is None)


def test_forced_backend_not_offered_runs_eager(monkeypatch):
    candidates = _fakes("eager", "triton")  # no cudnn: relu=False, say
    monkeypatch.setattr(op, "_cuda_candidates", lambda *args: candidates)
    with fastbb.use_backend("cuda"):
        op._cuda_eval_forward(*_args())
    assert candidates["eager"].calls == 1 and candidates["triton"].calls == 0


def test_compiling_runs_eager_even_when_forced(monkeypatch):
    monkeypatch.setattr(op, "_cuda_candidates", lambda *args: pytest.fail("candidates built while compiling"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    args = _args()
    with fastbb.use_backend("triton"):
        got = op._cuda_eval_forward(*args)
    assert torch.equal(got, op._eager_eval(*args))


@pytest.mark.parametrize("change, offered", [
    ({}, ["eager", "cudnn", "triton"]),
    ({"relu": False}, ["eager", "triton"]),
    ({"groups": 2}, ["eager", "cudnn"]),
    ({"dtype": torch.float64}, ["eager"]),
])
def test_candidates_offered(monkeypatch, change, offered):
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(op, "_HAS_CUDNN_FUSED", True)
    monkeypatch.setattr(_backend, "backend_usable", lambda backend, device_type, kernel=None: True)
    assert list(op._cuda_candidates(*_args(**change))) == offered


def test_cudnn_is_not_offered_when_determinism_is_asked(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(op, "_HAS_CUDNN_FUSED", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    assert "cudnn" not in op._cuda_candidates(*_args())


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
    monkeypatch.setattr(op, "_cuda_eval_forward", lambda *args: pytest.fail("CUDA branch taken for CPU tensors"))
    monkeypatch.setattr(op, "_time_candidate", lambda fn: pytest.fail("timed on the CPU"))
    x, weight, _, res, stride, padding, dilation, groups, relu = _args(dtype, channels_last, residual, relu)
    bn = [torch.rand(6, dtype=dtype) + 0.5, torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype),
          torch.rand(6, dtype=dtype) + 0.5]
    with torch.no_grad():
        got = fastbb.ops.conv_bn_relu(x, weight, None, *bn, padding=padding, relu=relu, residual=res)
        folded, shift = op._fold(weight, None, *bn, 1e-5, torch.float64)  # as the inference cache folds
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
def test_triton_candidate_matches_eager_on_the_interpreter(residual, relu, channels_last, dilation):
    args = _args(torch.float32, channels_last, residual, relu, dilation=dilation)
    got = op._triton_eval(*args)
    want = op._eager_eval(*args)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    assert op._same_layout(got, want)


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
def test_cuda_candidates_match_pytorch(dtype, channels_last, dilation, residual, relu):
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
            None if res is None else res.to(dtype, memory_format=fmt), *geometry)
    candidates = op._cuda_candidates(*args)
    assert list(candidates) == (["eager", "cudnn", "triton"] if relu else ["eager", "triton"])
    eager = candidates["eager"]()
    eager_error = _relative_error(eager, exact)
    for name, fn in candidates.items():
        got = fn()
        assert got.dtype == dtype and op._same_layout(got, eager), name
        assert _relative_error(got, exact) <= 2 * eager_error + _GPU_TOLERANCE[dtype], name


@pytest.mark.cuda
@pytest.mark.parametrize("forced", [None, "reference", "cuda", "triton"])
def test_cuda_dispatch_matches_pytorch(monkeypatch, forced):
    monkeypatch.setattr(op, "_conv_algorithms", op._ConvAlgorithmCache())
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
            assert len(op._conv_algorithms._winners) == 1
            monkeypatch.setattr(op, "_time_candidate", lambda fn: pytest.fail("timed twice"))
            again = fastbb.ops.conv_bn_relu(x, weight, None, *bn, padding=1, residual=res)
            torch.testing.assert_close(again, got)
        else:
            with fastbb.use_backend(forced):
                got = fastbb.ops.conv_bn_relu(x, weight, None, *bn, padding=1, residual=res)
    assert _relative_error(got, exact) <= _GPU_TOLERANCE[torch.float32]
    assert got.is_contiguous(memory_format=torch.channels_last)
