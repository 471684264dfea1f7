"""Backend choice, the extension loader's fallback, and the command-line entry points."""
import os
import subprocess
import sys

import pytest
import torch

import fastbb
from fastbb import _backend


def _random_boxes(n):
    xy = torch.rand(n, 2) * 100
    return torch.cat([xy, xy + torch.rand(n, 2) * 30 + 1], dim=1), torch.rand(n)


def test_backends_report_lists_every_backend():
    report = fastbb.backends()
    assert set(report) == set(_backend.BACKENDS)
    assert report["reference"]["built"] and "cpu" in report["reference"]["usable_on"]
    for state in report.values():
        assert isinstance(state["usable_on"], list)
        if not state["usable_on"]:
            assert state["why"], "an unusable backend must say why"


def test_use_backend_forces_and_nests():
    assert _backend.forced_backend() is None or os.environ.get("FASTBB_BACKEND")
    with fastbb.use_backend("reference"):
        assert _backend.forced_backend() == "reference"
        with fastbb.use_backend("cpp"):
            assert _backend.forced_backend() == "cpp"
        assert _backend.forced_backend() == "reference"


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastbb.use_backend("fastest"):
            pass


def test_forcing_an_unusable_backend_names_the_op():
    boxes, scores = _random_boxes(10)
    with fastbb.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"fastbb\.nms: backend 'cuda' was forced"):
            fastbb.ops.nms(boxes, scores, 0.5)


def test_forced_backends_agree():
    boxes, scores = _random_boxes(300)
    with fastbb.use_backend("reference"):
        expected = fastbb.ops.nms(boxes, scores, 0.5)
    backends = _backend.TABLES["nms"].usable_backends("cpu")
    assert "cpp" in backends  # the extension is built in every test environment
    for backend in backends:
        with fastbb.use_backend(backend):
            torch.testing.assert_close(fastbb.ops.nms(boxes, scores, 0.5), expected)


def _table(name, *implementations):
    return _backend.OpTable(f"test_{name}", implementations, autocast="none")


def _implementation(backend, tag, **kwargs):
    return _backend.Implementation(backend, lambda x: (tag, x), **kwargs)


def test_table_runs_the_first_usable_applicable_implementation(monkeypatch):
    monkeypatch.setattr(_backend, "TABLES", {})
    table = _table("order",
                   _implementation("cuda", "cuda", devices=("cuda",), kernel="fastbb_C::nms"),
                   _implementation("onednn", "small", devices=("cpu",), applies=lambda x: x < 10),
                   _implementation("mkl", "any", devices=("cpu",)),
                   _implementation("reference", "ref"))
    assert table("cpu", 3) == ("small", 3)  # cuda is for CUDA tensors; onednn applies to small x
    assert table("cpu", 30) == ("any", 30)  # onednn does not apply: the next one
    assert table.offered() == ["cuda", "onednn", "mkl", "reference"]
    assert table.usable_backends("cpu") == ["onednn", "mkl", "reference"]
    assert table.kernel("cuda") == "fastbb_C::nms" and table.kernel("mkl") is None
    with fastbb.use_backend("onednn"):
        assert table("cpu", 3) == ("small", 3)
        assert table("cpu", 30) == ("ref", 30)  # forced, but no onednn implementation applies: the reference
    with fastbb.use_backend("reference"):
        assert table("cpu", 3) == ("ref", 3)
    with fastbb.use_backend("triton"), pytest.raises(RuntimeError, match=r"fastbb\.test_order has no 'triton'"):
        table("cpu", 3)
    with fastbb.use_backend("cuda"), pytest.raises(RuntimeError, match="was forced but is not usable on cpu"):
        table("cpu", 3)
    assert set(_backend.TABLES) == {"test_order"}


def test_table_pick_chooses_among_applicable_implementations(monkeypatch):
    monkeypatch.setattr(_backend, "TABLES", {})
    seen = []

    def pick(candidates, args):
        seen.append([c.backend for c in candidates])
        return candidates[-1]

    table = _backend.OpTable("test_pick", [_implementation("onednn", "a", devices=("cpu",)),
                                           _implementation("mkl", "b", devices=("cpu",)),
                                           _implementation("reference", "ref")], autocast="none", pick=pick)
    assert table("cpu", 1) == ("b", 1) and seen == [["onednn", "mkl"]]


def test_stage_tables_run_their_reference_for_the_op_s_other_backends(monkeypatch):
    """An op run in stages (a conv, then a BN): a backend forced that the op has but a stage lacks runs that
    stage's reference; one the op lacks altogether, or that cannot run on the device, raises naming the op."""
    monkeypatch.setattr(_backend, "TABLES", {})
    conv = _table("staged", _implementation("onednn", "onednn conv", devices=("cpu",)),
                  _implementation("reference", "reference conv"))
    bn = _backend.OpTable("test_staged.bn", [_implementation("cpp", "cpp bn", devices=("cpu",), kernel="fastbb_C::nms"),
                                             _implementation("reference", "reference bn")],
                          autocast="none", stage_of="test_staged")
    assert conv.offered() == ["onednn", "reference"] and bn.offered() == ["cpp", "reference"]
    with fastbb.use_backend("onednn"):
        assert (conv("cpu", 1), bn("cpu", 1)) == (("onednn conv", 1), ("reference bn", 1))
    with fastbb.use_backend("cpp"):
        assert (conv("cpu", 1), bn("cpu", 1)) == (("reference conv", 1), ("cpp bn", 1))
    for table in (conv, bn):
        with fastbb.use_backend("triton"), pytest.raises(RuntimeError, match=r"fastbb\.test_staged has no 'triton'"):
            table("cpu", 1)
        with fastbb.use_backend("cpp"), pytest.raises(RuntimeError, match="'cpp' was forced but is not usable on cuda"):
            table("cuda", 1)
    with pytest.raises(ValueError, match="named 'test_staged.<stage>'"):
        _backend.OpTable("other.bn", [_implementation("reference", "ref")], autocast="none", stage_of="test_staged")


def test_table_declarations_are_checked(monkeypatch):
    monkeypatch.setattr(_backend, "TABLES", {})
    with pytest.raises(ValueError, match="unknown backends"):
        _table("bad_name", _implementation("fastest", "x"), _implementation("reference", "ref"))
    with pytest.raises(ValueError, match="exactly one reference"):
        _table("no_reference", _implementation("mkl", "x"))
    with pytest.raises(ValueError, match="exactly one reference"):
        _table("partial_reference", _implementation("reference", "ref", applies=lambda x: x > 0))


def test_every_op_has_a_table_with_what_each_implementation_is():
    for op in ("nms", "batched_nms", "nms_sorted_padded", "decode_boxes", "retinanet_postprocess",
               "sigmoid_focal_loss", "upsample_nearest_add", "fpn_merge", "conv_bn_relu"):
        table = _backend.TABLES[op]
        assert table.autocast and all(i.what for i in table.implementations), op
    report = fastbb.backends()
    assert "sigmoid_focal_loss" in report["cpp"]["ops"] and report["cpp"]["what"]


def _run_python(code, **env):
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_env_var_rejects_unknown_backend():
    result = _run_python("import torch, fastbb; b = torch.tensor([[0., 0, 1, 1]]); "
                         "fastbb.ops.nms(b, torch.ones(1), 0.5)", FASTBB_BACKEND="fast")
    assert result.returncode != 0
    assert "FASTBB_BACKEND='fast' is not one of" in result.stderr


def test_stale_extension_warns_once_and_ops_fall_back():
    code = (
        "import sys, types, warnings\n"
        "sys.modules['fastbb._build_info'] = types.SimpleNamespace(TORCH_VERSION='1.0.0', WITH_CUDA=False)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastbb, fastbb.ops\n"
        "    import fastbb.nn\n"
        "msgs = [str(w.message) for w in caught if 'fastbb' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'built for torch 1.0.0' in msgs[0], msgs[0]\n"
        "import torch\n"
        "assert 'fastbb._C' not in sys.modules\n"
        "b = torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])\n"
        "keep = fastbb.ops.nms(b, torch.tensor([0.9, 0.8, 0.7]), 0.5)\n"
        "assert keep.tolist() == [0, 2], keep\n"
        "print('ok')\n")
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_info_command_reports_versions_and_backends():
    result = subprocess.run([sys.executable, "-m", "fastbb", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"torch   {torch.__version__}" in result.stdout
    for backend in _backend.BACKENDS:
        assert f"  {backend}" in result.stdout


def test_main_job_runs_a_case_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "fastbb", "--only", "nms 5000", "--min-time", "0.05",
                             "--json", str(path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    import json
    report = json.loads(path.read_text())
    assert report["results"], "no case ran"
    for row in report["results"]:
        for provider, m in row["providers"].items():
            assert "error" not in m, (row["name"], provider, m)
            assert m["median_s"] > 0


def test_load_warning_says_why_cuda_kernels_are_missing_on_a_gpu_machine():
    cpu_only = type("Extension", (), {"with_cuda": staticmethod(lambda: False)})
    with_cuda = type("Extension", (), {"with_cuda": staticmethod(lambda: True)})
    assert _backend.load_warning(None, with_cuda, gpu_present=True) is None
    assert _backend.load_warning(None, cpu_only, gpu_present=False) is None
    message = _backend.load_warning(None, cpu_only, gpu_present=True)
    assert message.startswith("fastbb") and "CUDA ops run on Triton or PyTorch instead" in message
    assert "pure-PyTorch reference" in _backend.load_warning("fastbb._C is not built", None, gpu_present=True)


def test_readme_backend_matrix_is_generated_from_the_tables():
    """The README's matrix is `python -m fastbb backends`, so it cannot go stale (regenerate it with that)."""
    from fastbb.__main__ import backend_matrix

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    start, end = "<!-- backend-matrix:start -->\n", "<!-- backend-matrix:end -->"
    assert readme[readme.index(start) + len(start):readme.index(end)].strip() == backend_matrix().strip()
