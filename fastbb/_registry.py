"""OpenMMLab-style config building: fastbb.build(dict(type='FPN', ...))."""
import inspect
from typing import Any, Callable

_MODULES = {}


def register(name: str | None = None) -> Callable[[type], type]:
    """
    Class decorator that makes the class buildable by :func:`build` as ``dict(type=NAME, ...)``.

    Args:
        name (str, optional): the type name in configs. Default: the class's name.

    Returns:
        Callable[[type], type]: the decorator, which registers the class and returns it unchanged. It
        raises a KeyError when another class is registered under the name already.
    """
    def add(cls):
        key = name or cls.__name__
        if key in _MODULES and _MODULES[key] is not cls:
            raise KeyError(f"fastbb.register: type {key!r} is already registered to {_MODULES[key]!r}")
        _MODULES[key] = cls
        return cls
    return add


def registered() -> list[str]:
    """
    Lists the type names :func:`build` knows.

    Returns:
        list[str]: the registered type names, sorted.
    """
    return sorted(_MODULES)


def build(cfg: dict, **default_args: Any) -> Any:
    """
    Builds the object an OpenMMLab-style config names, as mmengine's ``Registry.build`` does.

    Args:
        cfg (dict): ``type`` (a registered name, see :func:`registered`, or a class) and the constructor's
            keyword arguments.
        **default_args: constructor arguments for the keys ``cfg`` does not set.

    Returns:
        Any: the object built, e.g. ``fastbb.build(dict(type="FPN", in_channels=[256, 512], out_channels=256,
        num_outs=5))`` an :class:`fastbb.nn.FPN`.
    """
    if not isinstance(cfg, dict):
        raise TypeError(f"fastbb.build: cfg must be a dict, got {type(cfg).__name__}")
    if "type" not in cfg:
        raise KeyError(f"fastbb.build: cfg must have a 'type' key, got keys {sorted(cfg)}")
    args = dict(default_args)
    args.update(cfg)
    type_name = args.pop("type")
    if not isinstance(type_name, str):
        return type_name(**args)  # a class passed directly, as mmengine allows
    if type_name not in _MODULES:
        raise KeyError(f"fastbb.build: unknown type {type_name!r}; registered types: {registered()}")
    cls = _MODULES[type_name]
    params = inspect.signature(cls).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in args if k not in params]
    if unknown and not takes_kwargs:
        raise TypeError(f"fastbb.build: {type_name} got unexpected key(s) {unknown}; "
                        f"it accepts {[k for k in params if k != 'self']}")
    return cls(**args)
