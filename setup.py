"""Build fastbb and its extension fastbb._C against the torch already installed.

C++ CPU kernels are always compiled. CUDA kernels (csrc/**/*.cu) are compiled when a usable CUDA toolkit
and a CUDA build of torch are present (unless FASTBB_NO_CUDA=1), or when FASTBB_FORCE_CUDA=1. FASTBB_CUDA_ARCHS picks the
targets (default "8.0;9.0"). If the extension cannot be compiled (no compiler, no toolkit) and the build
was not forced, the install still succeeds: every op then runs on its pure-PyTorch reference.
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    # pip builds in a fresh, isolated environment unless told not to, and that environment has no torch;
    # fetching one there could give another torch than the installed one, and a binary that cannot load.
    sys.exit("fastbb: the build cannot see torch. fastbb._C is compiled against the torch already installed, "
             "which pip's isolated build environment hides: install torch first, then run "
             "`pip install --no-build-isolation .` (or `pip install --no-build-isolation -e .`).")

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "fastbb", "_version.py")) as _file:
    VERSION = re.search(r'__version__ = "([^"]+)"', _file.read()).group(1)


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _load_toolkit_finder():
    # fastbb/_cuda_toolkit.py by path: importing the fastbb package here would need the extension built.
    import importlib.util
    spec = importlib.util.spec_from_file_location("_cuda_toolkit", os.path.join(ROOT, "fastbb", "_cuda_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FORCE_CUDA = _env_flag("FASTBB_FORCE_CUDA")
CUDA_HOME, CUDA_FOUND_BY, CUDA_VERSION = _load_toolkit_finder().find_cuda_toolkit(torch.version.cuda)
if _env_flag("FASTBB_NO_CUDA") and not FORCE_CUDA:
    WITH_CUDA, CUDA_SKIPPED = False, "FASTBB_NO_CUDA=1 was set"
elif torch.version.cuda is None and not FORCE_CUDA:
    WITH_CUDA, CUDA_SKIPPED = False, f"torch {torch.__version__} is a CPU-only build"
elif CUDA_HOME is None:
    WITH_CUDA, CUDA_SKIPPED = False, CUDA_FOUND_BY
    if FORCE_CUDA:
        sys.exit(f"fastbb: FASTBB_FORCE_CUDA=1, but {CUDA_FOUND_BY}; install the CUDA {torch.version.cuda} "
                 "toolkit or set CUDA_HOME to it")
else:
    WITH_CUDA, CUDA_SKIPPED = True, None
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: point it at the toolkit found here.
    os.environ["CUDA_HOME"] = CUDA_HOME

from torch.utils import cpp_extension  # noqa: E402  (after CUDA_HOME is settled)


def _default_max_jobs():
    # A torch translation unit needs about 1.5 GiB to compile; cap the jobs by memory and cores.
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gib // 1.5))))


os.environ.setdefault("MAX_JOBS", _default_max_jobs())
os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FASTBB_CUDA_ARCHS", "8.0;9.0")


def _build_report():
    """The one line the build ends with: what was built, and why CUDA was skipped and how to enable it."""
    if WITH_CUDA:
        archs = ", ".join(f"sm_{a.replace('.', '')}" for a in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a)
        return (f"fastbb: built fastbb._C with C++ CPU kernels and CUDA kernels for {archs} (CUDA "
                f"{CUDA_VERSION or '?'} toolkit at {CUDA_HOME}, found through {CUDA_FOUND_BY})")
    return (f"fastbb: built fastbb._C with C++ CPU kernels only; CUDA kernels skipped: {CUDA_SKIPPED}. To build "
            f"them, install a CUDA build of torch and the matching CUDA toolkit, point CUDA_HOME at it and "
            f"reinstall (FASTBB_FORCE_CUDA=1 makes a missing toolkit an error)")


BUILD_REPORT = _build_report()


def _write_build_info(report):
    # Read by fastbb._backend before it imports fastbb._C, so that a binary built for another torch
    # is never loaded (loading it could abort the process instead of raising).
    path = os.path.join(ROOT, "fastbb", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py; describes the fastbb._C binary next to it.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {WITH_CUDA!r}\n")
        f.write(f"CUDA_ARCHS = {os.environ['TORCH_CUDA_ARCH_LIST']!r}\n")
        f.write(f"BUILD_REPORT = {report!r}\n")


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cxx_flags = ["-O3", "-fopenmp", f"-DFASTBB_TORCH_VERSION=\"{torch.__version__}\""]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not WITH_CUDA:
        return cpp_extension.CppExtension(
            "fastbb._C", cpp_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    # Some CUDA library headers torch includes (cusparse.h, ...) ship with the nvidia pip wheels.
    for site in sys.path:
        wheel_include = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(wheel_include):
            include_dirs.append(wheel_include)
            break
    nvcc_flags = ["-O3", "-lineinfo", "-DFASTBB_WITH_CUDA"]
    return cpp_extension.CUDAExtension(
        "fastbb._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DFASTBB_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"])


class BuildExtension(cpp_extension.BuildExtension):
    """Falls back to a pure-PyTorch install when compilation fails, unless the build was forced."""

    def run(self):
        # Until the build succeeds, the report says it did not (a killed build leaves this line behind).
        _write_build_info("fastbb: the last build of fastbb._C did not finish; reinstall fastbb to rebuild it")
        try:
            super().run()
        except Exception as exc:  # compiler or toolkit missing or broken
            if FORCE_CUDA or _env_flag("FASTBB_REQUIRE_EXTENSION"):
                raise
            sys.stderr.write(
                f"\nfastbb: building fastbb._C failed ({exc}); installed without it: every op runs on its "
                "pure-PyTorch reference. Set FASTBB_REQUIRE_EXTENSION=1 to make this an error.\n")
            path = os.path.join(ROOT, "fastbb", "_build_info.py")
            if os.path.exists(path):
                os.remove(path)
            return
        # pip shows a build's output only with -v; `python -m fastbb info` repeats this line.
        _write_build_info(BUILD_REPORT)
        print(BUILD_REPORT, flush=True)



setup(
    name="fastbb",
    version=VERSION,
    description="Fused CUDA, Triton and C++ kernels for ResNet / FPN / RetinaNet detectors, as drop-in modules",
    python_requires=">=3.10",
    packages=find_packages(include=["fastbb", "fastbb.*"]) + ["fastbb.kernels", "fastbb.benchmarks"],
    package_dir={"fastbb.kernels": "kernels", "fastbb.benchmarks": "benchmarks"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.11"],
    extras_require={"test": ["pytest", "pytest-benchmark", "torchvision"], "triton": ["triton"]},
    zip_safe=False,
)
