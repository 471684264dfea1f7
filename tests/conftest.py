"""Test set-up shared by every test file.

Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter, which must be switched on
before triton is first imported; fastbb imports triton lazily, so setting it here is early enough.
"""
import dataclasses
import json
import os
import random
import re
import urllib.parse
import zlib

import pytest
import torch
import torch.utils._python_dispatch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastbb  # noqa: E402
from mm_support import install_torchvision_ext  # noqa: E402

install_torchvision_ext()

# Tolerances by dtype, for comparing a kernel against its reference computed in the same dtype.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def usable_backends(device, op):
    """The backends of `op` (its table's name, e.g. "nms") that can run on `device` here, as the op's table
    says (Triton on CPU tensors under the interpreter included)."""
    return fastbb._backend.TABLES[op].usable_backends(device)


def check_forced_backends(monkeypatch, op, call, device="cpu"):
    """With each backend of `op`'s table that is usable on `device` forced, call() runs that backend's
    implementation, the table's own (every implementation of these ops applies to every call); and forcing
    a backend the op does not have raises, naming the op. Implementations are spied on in the table, so
    an op that runs other ops inside records only its own."""
    table = fastbb._backend.TABLES[op]
    declared = {}  # backend -> the table's first implementation of it
    for implementation in table.implementations:
        declared.setdefault(implementation.backend, implementation)
    ran = []

    def spied(implementation):
        def run(*args):
            ran.append(implementation)
            return implementation.run(*args)
        return dataclasses.replace(implementation, run=run)

    monkeypatch.setattr(table, "implementations", tuple(spied(i) for i in table.implementations))
    monkeypatch.setattr(table, "reference", spied(table.reference))
    for backend in table.usable_backends(device):
        ran.clear()
        with fastbb.use_backend(backend):
            call()
        assert ran == [declared[backend]], (op, backend, [i.backend for i in ran])
    lacking = next(b for b in fastbb._backend.BACKENDS if b not in table.offered())
    message = re.escape(f"fastbb.{op} has no '{lacking}'")
    with fastbb.use_backend(lacking), pytest.raises(RuntimeError, match=message):
        call()


def error_norm(value, exact):
    """Norm of value - exact, in float64 (a max over a few elements is too noisy to bound)."""
    if exact.numel() == 0:
        return 0.0
    return float((value.detach().double() - exact.detach().double()).norm())


def assert_error_within(got, original, exact, factor=2.0, *, slack=0.0, name=""):
    """got's error against `exact` (a float64 run) is at most `factor` times the original's own error
    (torchvision's / PyTorch's result in the same dtype), plus slack * |exact|.

    With FASTBB_RECORD_ERROR_RATIOS=PATH set, each check appends a JSON line (test id, name, the ratio of
    got's error to the original's, and the share of the bound used) to PATH: tests/seed_sweep.py runs
    the tests over many seeds with it to set each factor above the worst ratio seen."""
    exact = exact.detach().double()
    original_error = error_norm(original, exact)
    error = error_norm(got, exact)
    bound = factor * original_error + slack * (float(exact.norm()) if exact.numel() else 0.0)
    record = os.environ.get("FASTBB_RECORD_ERROR_RATIOS")
    if record:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        with open(record, "a") as f:
            f.write(json.dumps({"test": test, "name": name, "factor": factor,
                                "ratio": error / original_error if original_error else None,
                                "share_of_bound": error / bound if bound else None}) + "\n")
    assert error <= bound, (f"{name}: error {error:.3g} > bound {bound:.3g} = {factor} x the original's error "
                            f"{original_error:.3g} + slack")


@pytest.fixture
def without_openmmlab(monkeypatch):
    """The OpenMMLab packages look not installed to fastbb's fallbacks (fastbb._fallback): a drop-in given a
    valid option it cannot fuse then raises, naming the option, instead of building the original."""
    import fastbb._fallback
    monkeypatch.setattr(fastbb._fallback, "original_class", lambda path: None)


def cache_torchvision_weights(monkeypatch, tmp_path, weights, model):
    """model's state_dict where torchvision's weights API finds `weights` (torch.hub's cache under a
    temporary $TORCH_HOME, under the URL's file name), so that nothing is downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), checkpoints / os.path.basename(urllib.parse.urlparse(weights.url).path))
    return model.state_dict()


def randomize_bn(model):
    """Non-trivial BN statistics and affine parameters in every BatchNorm of model (in place), so that eval
    mode is not the identity and zero-initialised residual branches take part."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


class LaunchSpy:
    """Stands in for a Triton kernel (`kernel[grid](...)`): calls `before(grid, args)` if given, records
    the grid, then launches the real kernel."""

    def __init__(self, kernel, before=None):
        self.kernel, self.before, self.grids = kernel, before, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.before is not None:
                self.before(grid, args)
            self.grids.append(grid)
            return self.kernel[grid](*args, **kwargs)
        return launch


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that reach the dispatcher (below autograd) while it is active, as 'namespace::name', outermost
    calls only, in `names`."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))

    def has(self, prefix):
        return any(name.startswith(prefix) for name in self.names)


def record_choices(monkeypatch, *tables):
    """{table name: [backend, ...]}: the backend of the implementation each of `tables` (fastbb._backend
    OpTables) runs, call by call, for the rest of the test."""
    chosen = {table.op: [] for table in tables}
    for table in tables:
        def choose(device_type, *args, table=table, choose=table.choose):
            implementation = choose(device_type, *args)
            chosen[table.op].append(implementation.backend)
            return implementation
        monkeypatch.setitem(table.__dict__, "choose", choose)
    return chosen


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: large shapes; deselect with -m 'not slow'")


def _runs_on_cuda(item):
    """Whether a test is parametrized with a CUDA device (devices() offers one when a GPU is present)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(value == "cuda" or (isinstance(value, torch.device) and value.type == "cuda")
               for value in params.values() if isinstance(value, (str, torch.device)))


def pytest_collection_modifyitems(config, items):
    # Tests that run on the GPU through a device parameter carry the cuda mark too, so that `-m cuda` (the
    # GPU check) selects every test that touches the GPU.
    for item in items:
        if _runs_on_cuda(item):
            item.add_marker(pytest.mark.cuda)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fixed_seed(request):
    """A seed per test drawn from its id (reported on failure): every run of a test sees the same inputs,
    so CI is deterministic. FASTBB_TEST_SEED=N adds N to every test's seed, to try other draws."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("FASTBB_TEST_SEED", "0"))) % 2**32
    random.seed(seed)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Print the failing test's seed, so the same inputs can be drawn again."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("random seed", f"torch.manual_seed({value}); random.seed({value})"))
