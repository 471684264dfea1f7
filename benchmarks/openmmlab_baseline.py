"""The unpatched OpenMMLab baselines on mmcv-lite, for benchmarks and tests.

mmcv-lite has no compiled ops, and ``import mmdet.models`` imports ``mmcv.ops``, which loads ``mmcv._ext``.
install_torchvision_ext() puts a stand-in ``mmcv._ext`` into sys.modules first: its ``nms`` is torchvision's
(with mmcv's ``offset``), its other functions raise NotImplementedError. So the unpatched OpenMMLab models that
benchmarks and tests compare fastbb with run torchvision's NMS, never fastbb's; and fastbb.mm, finding an
``mmcv._ext``, does not install its own.
"""
import importlib.util
import sys
import types

import torch
import torchvision


def _torchvision_nms(boxes, scores, iou_threshold, offset=0):
    # offset=1 (mmcv's legacy pixel convention) counts a box's last row and column: the same IoUs as the
    # boxes grown by one at their far corner with offset 0.
    if offset:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + offset], dim=1)
    return torchvision.ops.nms(boxes, scores, float(iou_threshold))


def _missing(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"mmcv._ext.{name} is not in the torchvision-backed stand-in mmcv._ext")
    return missing


def install_torchvision_ext() -> None:
    """Puts the stand-in mmcv._ext into sys.modules where mmcv is installed without its compiled ops (and no
    other mmcv._ext is loaded yet)."""
    if importlib.util.find_spec("mmcv") is None or "mmcv._ext" in sys.modules:
        return
    if importlib.util.find_spec("mmcv._ext") is not None:  # a full mmcv: its own ops
        return
    ext = types.ModuleType("mmcv._ext", __doc__)
    ext.nms = _torchvision_nms
    ext.__getattr__ = _missing
    sys.modules["mmcv._ext"] = ext
