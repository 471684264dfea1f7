"""setup.py's search for the CUDA toolkit (fastbb/_cuda_toolkit.py), on fake toolkit folders."""
import json
import os

from fastbb._cuda_toolkit import find_cuda_toolkit


def _toolkit(root, version):
    """A folder that looks like a CUDA toolkit of `version` to the search."""
    os.makedirs(root / "include")
    os.makedirs(root / "bin")
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "version.json").write_text(json.dumps({"cuda": {"version": f"{version}.1"}}))
    return str(root)


def _path_with_nvcc(tmp_path, monkeypatch, text):
    bin_dir = tmp_path / "path-bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(text)
    nvcc.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)


def test_finds_the_toolkit_behind_an_nvcc_wrapper_script(tmp_path, monkeypatch):
    """The machine's case: /usr/local/bin/nvcc is `exec /usr/local/cuda-13.0/bin/nvcc "$@"`, so the folder
    above the nvcc on PATH has no include/cuda_runtime.h."""
    home = _toolkit(tmp_path / "cuda-13.0", "13.0")
    _path_with_nvcc(tmp_path, monkeypatch, f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    found, how, version = find_cuda_toolkit("13.0", standard_folders=())
    assert found == os.path.realpath(home) and version == "13.0" and "nvcc on PATH" in how


def test_finds_the_toolkit_behind_an_nvcc_symlink(tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "cuda-12.8", "12.8")
    _path_with_nvcc(tmp_path, monkeypatch, "")
    os.remove(tmp_path / "path-bin" / "nvcc")
    os.symlink(os.path.join(home, "bin", "nvcc"), tmp_path / "path-bin" / "nvcc")
    assert find_cuda_toolkit("12.8", standard_folders=())[0] == os.path.realpath(home)


def test_an_unusable_cuda_home_does_not_hide_a_standard_install(tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "cuda-13.0", "13.0")
    _path_with_nvcc(tmp_path, monkeypatch, "#!/bin/sh\n")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nothing-here"))
    found, how, _ = find_cuda_toolkit("13.0", standard_folders=(str(tmp_path / "cuda-*"),))
    assert found == os.path.realpath(home) and how == "the standard install folders"


def test_cuda_home_wins_and_the_matching_major_version_is_preferred(tmp_path, monkeypatch):
    old = _toolkit(tmp_path / "cuda-12.4", "12.4")
    new = _toolkit(tmp_path / "cuda-13.0", "13.0")
    _path_with_nvcc(tmp_path, monkeypatch, "#!/bin/sh\n")
    monkeypatch.setenv("CUDA_HOME", old)
    pattern = (str(tmp_path / "cuda-*"),)
    assert find_cuda_toolkit("12.4", standard_folders=pattern)[1] == "$CUDA_HOME"
    # torch built for CUDA 13: a CUDA 12 toolkit named by CUDA_HOME cannot build for it; the 13.0 one can
    assert find_cuda_toolkit("13.0", standard_folders=pattern)[0] == os.path.realpath(new)


def test_no_toolkit_says_where_it_looked(tmp_path, monkeypatch):
    _path_with_nvcc(tmp_path, monkeypatch, "#!/bin/sh\n")
    os.remove(tmp_path / "path-bin" / "nvcc")
    found, why, version = find_cuda_toolkit("13.0", standard_folders=(str(tmp_path / "cuda*"),))
    assert found is None and version is None and why.startswith("no CUDA toolkit found")
