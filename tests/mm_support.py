"""The real OpenMMLab packages in tests (mmdet 3.3, mmpretrain 1.2, mmseg 1.2 over mmcv-lite 2.1).

conftest.py calls install_torchvision_ext() (fastbb.benchmarks.openmmlab_baseline) before any test runs: a
torchvision-backed stand-in ``mmcv._ext``, so that the unpatched OpenMMLab models the tests compare with never
run on fastbb, and fastbb.mm, finding an ``mmcv._ext``, does not install its own in the test process
(tests/test_mm_ext.py checks that in a fresh process).
"""
import importlib

import pytest

from fastbb.benchmarks.openmmlab_baseline import install_torchvision_ext

__all__ = ["install_torchvision_ext", "require"]


def require(package: str):
    """Imports an OpenMMLab package's models (registering its classes), skipping the test where it is not
    installed (CI installs them all: see requirements-mm.txt)."""
    pytest.importorskip(package)
    return importlib.import_module(f"{package}.models")
