"""The real OpenMMLab packages in tests (mmdet 3.3, mmpretrain 1.2, mmseg 1.2 over mmcv-lite 2.1).

mmcv-lite has no compiled ops, and ``import mmdet.models`` imports ``mmcv.ops``, which loads ``mmcv._ext``.
conftest.py calls install_stand_in_ext() before any test runs: a stand-in ``mmcv._ext`` whose ``nms`` is
torchvision's (with mmcv's ``offset``) and whose other functions raise NotImplementedError. So the unpatched
OpenMMLab models the tests compare with never run on fastbb, and fastbb.mm, finding an ``mmcv._ext``, does
not install its own in the test process (tests/test_mm_ext.py checks that in fresh processes).
"""
import importlib.util
import sys
import types

import pytest
import torch
import torchvision


def _stand_in_nms(boxes, scores, iou_threshold, offset=0):
    # offset=1 (mmcv's legacy pixel convention) counts a box's last row and column: the same IoUs as the
    # boxes grown by one at their far corner with offset 0.
    if offset:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + offset], dim=1)
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def _missing(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"mmcv._ext.{name} is not in the tests' stand-in mmcv._ext")
    return missing


def install_stand_in_ext() -> None:
    """Puts the stand-in mmcv._ext into sys.modules where mmcv is installed without its compiled ops."""
    if importlib.util.find_spec("mmcv") is None or "mmcv._ext" in sys.modules:
        return
    if importlib.util.find_spec("mmcv._ext") is not None:  # a full mmcv: its own ops
        return
    ext = types.ModuleType("mmcv._ext", "tests' stand-in for mmcv's compiled ops (tests/mm_support.py)")
    ext.nms = _stand_in_nms
    ext.__getattr__ = _missing
    sys.modules["mmcv._ext"] = ext


def require(package: str):
    """Imports an OpenMMLab package's models (registering its classes), skipping the test where it is not
    installed (CI installs them all: see requirements-mm.txt)."""
    pytest.importorskip(package)
    return importlib.import_module(f"{package}.models")
