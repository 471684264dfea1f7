"""Where the CUDA toolkit is: used by setup.py before fastbb is built (loaded by path, so it imports nothing
of fastbb), and tested on its own.

torch.utils.cpp_extension guesses CUDA_HOME from the nvcc on PATH, which on some machines is a wrapper
script outside the toolkit; its guess then has no include/cuda_runtime.h and a CUDA build is silently
skipped. This looks further.
"""
import glob
import json
import os
import re
import shutil
import subprocess


def toolkit_version(home):
    """'major.minor' of the CUDA toolkit at home (from version.json, else nvcc --version), or None."""
    try:
        with open(os.path.join(home, "version.json")) as f:
            return ".".join(json.load(f)["cuda"]["version"].split(".")[:2])
    except (OSError, ValueError, KeyError):
        pass
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def nvcc_homes():
    """Toolkit folders behind the nvcc on PATH: its real path, and the nvcc a wrapper script runs."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    homes = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        if os.path.getsize(nvcc) < 65536:
            with open(nvcc, errors="replace") as f:
                wrapped = re.findall(r"(/[^\s\"']+/bin/nvcc)\b", f.read())
            homes += [os.path.dirname(os.path.dirname(path)) for path in wrapped]
    except OSError:
        pass
    return [(home, f"the nvcc on PATH ({nvcc})") for home in homes]


STANDARD_FOLDERS = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")


def find_cuda_toolkit(torch_cuda_version, standard_folders=STANDARD_FOLDERS):
    """(folder, how it was found, version) of a usable CUDA toolkit, or (None, why none was, None).

    Looks at $CUDA_HOME / $CUDA_PATH, the real toolkit behind the nvcc on PATH (which may be a symlink or a
    wrapper script outside the toolkit), then the standard folders (/usr/local/cuda, /usr/local/cuda-X.Y,
    /opt/cuda); a toolkit whose major version matches torch_cuda_version (torch.version.cuda) wins over one
    that does not.
    """
    candidates = [(os.environ[var], f"${var}") for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    candidates += nvcc_homes()
    for pattern in standard_folders:  # newest version first where a pattern matches several
        candidates += [(home, "the standard install folders") for home in sorted(glob.glob(pattern), reverse=True)]
    usable, looked = [], []
    for home, how in candidates:
        home = os.path.realpath(home)
        looked.append(home)
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and \
                os.path.isfile(os.path.join(home, "bin", "nvcc")):
            usable.append((home, how, toolkit_version(home)))
    if not usable:
        places = ["$CUDA_HOME / $CUDA_PATH", "the nvcc on PATH", *standard_folders]
        checked = f"; checked {', '.join(dict.fromkeys(looked))}" if looked else ""
        return None, f"no CUDA toolkit found (looked at {', '.join(places)}{checked})", None
    wanted = (torch_cuda_version or "").split(".")[0]
    for home, how, version in usable:
        if version and version.split(".")[0] == wanted:
            return home, how, version
    return usable[0]
