"""The original OpenMMLab module where a drop-in cannot fuse a valid option.

For a valid option fastbb does not implement fused (a GroupNorm norm_cfg, a deformable conv, HorizontalBoxes
outputs, ...), constructing the drop-in builds, when the package of the class it replaces is installed, that
class with the same arguments (unfused, correct), with a one-line warning; when it is not installed, it
raises NotFusedError naming the option and the missing package (build_original). A drop-in finds the
option in one of two ways:
- FallsBackToOriginal (metaclass): its constructor raises NotFusedError while checking its arguments (FPN,
  FocalLoss, the box coder);
- FallsBackBeforeInit (base class): a classmethod reads the option from the bound arguments before anything
  is built (mmdet's / mmseg's / mmpretrain's ResNets and blocks), so no random numbers are drawn first and
  the same seed gives the original's weights.
"""
import importlib
import importlib.util
import inspect
import warnings

__all__ = ["FallsBackBeforeInit", "FallsBackToOriginal", "NotFusedError", "build_original", "original_class"]


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


def build_original(what: str, path: str, args: tuple, kwargs: dict, extra: dict | None = None):
    """
    The original class built with a drop-in's arguments, with a warning; NotFusedError where its package is
    not installed.

    Args:
        what (str): the drop-in's name and the option it does not fuse, as a message starts.
        path (str): the original class, ``"package.module.ClassName"``.
        args (tuple), kwargs (dict): the drop-in's arguments.
        extra (dict, optional): arguments added for the original, where it is a more general class (mmdet's
            ResNet for a ResNetV1c).

    Returns:
        nn.Module or object: the original.
    """
    original = original_class(path)
    if original is None:
        package, class_name = path.split(".")[0], path.rsplit(".", 1)[1]
        raise NotFusedError(f"{what}, and {package}, whose {class_name} would run it unfused, is not installed")
    warnings.warn(f"{what}; built {path} instead (unfused)", stacklevel=3)
    return original(*args, **kwargs, **(extra or {}))


class FallsBackToOriginal(type):
    """
    Metaclass of a drop-in whose constructor raises NotFusedError for an option it does not fuse:
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
            return build_original(str(error), path, args, kwargs)


class FallsBackBeforeInit:
    """
    Base class of a drop-in that reads the option it does not fuse from its arguments before it is built:
    ``__new__`` then returns the original (build_original), so the drop-in's ``__init__`` does not run, and
    fastbb.build and mmengine's Registry.build both get the original. A subclass sets ``_original``
    (``"package.module.ClassName"``), optionally ``_original_args`` (arguments added for the original, where it
    is a more general class) and ``_variant`` (the arguments a variant such as ResNetV1c fixes), and defines
    ``_unfused(arguments)``: the option ("norm_cfg type 'GN'"), or None. Its messages name it as
    ``_public_module`` + its class name.
    """

    _original: str
    _original_args: dict = {}
    _variant: dict = {}
    _signature: inspect.Signature | None = None
    _public_module = "fastbb.models"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = vars(cls).get("__init__")
        if init is not None:
            parameters = inspect.signature(init).parameters.values()
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
                cls._signature = inspect.signature(init)  # the full signature a variant's subclass binds to

    def __new__(cls, *args, **kwargs):
        # copy.deepcopy and pickle call __new__ without arguments, to fill the object in themselves.
        if args or kwargs:
            option = cls._option_of(args, kwargs)
            if option is not None:
                return build_original(f"{cls._public_name()}: {option} is not fused by fastbb", cls._original, args,
                                      kwargs, cls._original_args)
        return super().__new__(cls)

    @classmethod
    def _unfused(cls, arguments: dict) -> str | None:
        return None

    @classmethod
    def _option_of(cls, args, kwargs):
        try:
            bound = cls._signature.bind(None, *args, **kwargs, **cls._variant)
        except TypeError:
            return None  # the constructor raises the TypeError itself
        bound.apply_defaults()
        return cls._unfused(bound.arguments)

    @classmethod
    def _public_name(cls):
        return f"{cls._public_module}.{cls.__name__}"
