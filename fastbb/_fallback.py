"""The original OpenMMLab module where a drop-in cannot fuse a valid option.

A drop-in's constructor raises NotFusedError for a valid option fastbb does not implement fused (a GroupNorm
norm_cfg, a deformable conv, HorizontalBoxes outputs, ...). Classes made with the FallsBackToOriginal
metaclass catch it: when the package of the class they replace is installed, the call returns that class
built with the same arguments (unfused, correct), with a one-line warning saying so once per class and
option; when it is not installed, the error reaches the caller, naming the option.
"""
import importlib
import importlib.util
import inspect
import warnings

__all__ = ["FallsBackToOriginal", "NotFusedError", "original_class"]

_warned = set()


class NotFusedError(ValueError):
    """A valid option of the replaced OpenMMLab module that fastbb does not implement fused."""


def original_class(path: str) -> type | None:
    """
    The OpenMMLab class a drop-in replaces, imported from its module (not from a registry, which fastbb.mm
    may have patched).

    Args:
        path (str): ``"package.module.ClassName"``.

    Returns:
        type or None: the class; None when its package is not installed.
    """
    module_name, class_name = path.rsplit(".", 1)
    if importlib.util.find_spec(module_name.split(".")[0]) is None:
        return None
    if module_name.startswith(("mmdet.", "mmseg.", "mmpretrain.")):
        # their models import mmcv.ops, which needs an mmcv._ext: fastbb's where mmcv's compiled ops are missing
        from fastbb.mm import _ext
        _ext.install_if_missing()
    return getattr(importlib.import_module(module_name), class_name)


class FallsBackToOriginal(type):
    """
    Metaclass of a drop-in that builds the original class where the drop-in raises NotFusedError:
    ``class FPN(nn.Module, metaclass=FallsBackToOriginal, original="mmdet.models.necks.fpn.FPN")``.
    Only the class that names ``original`` falls back (a subclass of it raises), and the class keeps the
    signature of its ``__init__`` for inspect (fastbb.build checks config keys against it).
    """

    def __new__(mcs, name, bases, namespace, original: str | None = None):
        cls = super().__new__(mcs, name, bases, namespace)
        cls._fallback_original = (cls, original) if original else None
        init = inspect.signature(cls.__init__)
        cls.__signature__ = init.replace(parameters=list(init.parameters.values())[1:])
        return cls

    def __call__(cls, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except NotFusedError as error:
            owner, path = cls._fallback_original or (None, None)
            if owner is not cls:
                raise
            original = original_class(path)
            if original is None:
                raise
            if (path, str(error)) not in _warned:
                _warned.add((path, str(error)))
                warnings.warn(f"{error}; built {path} instead (unfused)", stacklevel=2)
            return original(*args, **kwargs)
