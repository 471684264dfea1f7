"""OpenMMLab-style config building: fastbb.build(dict(type='FPN', ...)), per package scope."""
import inspect
from typing import Any, Callable

# The OpenMMLab packages whose config type names fastbb builds. One name can mean a different class in each
# (mmdet's ResNet defaults to norm_eval=True, mmseg's and mmpretrain's to False; mmpretrain's deep stem has
# other keys), so every scope has its own table.
SCOPES = ("mmdet", "mmseg", "mmpretrain")
DEFAULT_SCOPE = "mmdet"

_MODULES = {scope: {} for scope in SCOPES}
# (scope, name) of the classes fastbb.mm leaves out of the package's own registry (see register)
_KEEP_ORIGINAL = set()


def register(name: str | None = None, scopes: tuple[str, ...] = SCOPES,
             replaces_original: bool = True) -> Callable[[type], type]:
    """
    Class decorator that makes the class buildable by :func:`build` as ``dict(type=NAME, ...)``.

    Args:
        name (str, optional): the type name in configs. Default: the class's name.
        scopes (Tuple[str]): the packages whose configs mean this class by the name (see :data:`SCOPES`).
            Default: all of them.
        replaces_original (bool): whether ``import fastbb.mm`` puts the class in place of the package's own in
            its registry. False for the classes that exist so that fastbb.build works without the package and
            would bring nothing fused into it. Default: True.

    Returns:
        Callable[[type], type]: the decorator, which registers the class and returns it unchanged. It
        raises a KeyError when another class is registered under the name in one of the scopes already.
    """
    unknown = [scope for scope in scopes if scope not in _MODULES]
    if unknown:
        raise KeyError(f"fastbb.register: unknown scope(s) {unknown}; expected some of {list(SCOPES)}")

    def add(cls):
        key = name or cls.__name__
        for scope in scopes:
            table = _MODULES[scope]
            if key in table and table[key] is not cls:
                raise KeyError(f"fastbb.register: type {key!r} is already registered to {table[key]!r} in scope "
                               f"{scope!r}")
        for scope in scopes:
            _MODULES[scope][key] = cls
            if not replaces_original:
                _KEEP_ORIGINAL.add((scope, key))
        return cls
    return add


def registered(scope: str | None = None) -> list[str]:
    """
    Lists the type names :func:`build` knows.

    Args:
        scope (str, optional): one of :data:`SCOPES`. Default: the names of every scope.

    Returns:
        list[str]: the registered type names, sorted.
    """
    if scope is None:
        return sorted(set().union(*_MODULES.values()))
    return sorted(_scope_table("registered", scope))


def lookup(type_name: str, scope: str = DEFAULT_SCOPE) -> type:
    """
    The class registered under a type name in a scope.

    Args:
        type_name (str): the config's type name.
        scope (str): one of :data:`SCOPES`. Default: ``'mmdet'``.

    Returns:
        type: the class; a KeyError naming the type when there is none.
    """
    table = _scope_table("build", scope)
    if type_name not in table:
        raise KeyError(f"fastbb.build: unknown type {type_name!r} in scope {scope!r}; registered types: "
                       f"{sorted(table)}")
    return table[type_name]


def replaces_original(type_name: str, scope: str) -> bool:
    """Whether fastbb.mm replaces the package's own class of this type name (see register)."""
    return (scope, type_name) not in _KEEP_ORIGINAL


def _scope_table(caller, scope):
    if scope not in _MODULES:
        raise KeyError(f"fastbb.{caller}: unknown scope {scope!r}; expected one of {list(SCOPES)}")
    return _MODULES[scope]


def build(cfg: dict, scope: str = DEFAULT_SCOPE, **default_args: Any) -> Any:
    """
    Builds the object an OpenMMLab-style config names, as mmengine's ``Registry.build`` does.

    Args:
        cfg (dict): ``type`` (a registered name, see :func:`registered`, or a class) and the constructor's
            keyword arguments.
        scope (str): the package whose meaning of the type names to build: ``'mmdet'``, ``'mmseg'`` or
            ``'mmpretrain'`` (as mmengine's default scope). Default: ``'mmdet'``.
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
    cls = lookup(type_name, scope)
    params = inspect.signature(cls).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in args if k not in params]
    if unknown and not takes_kwargs:
        raise TypeError(f"fastbb.build: {type_name} got unexpected key(s) {unknown}; "
                        f"it accepts {[k for k in params if k != 'self']}")
    return cls(**args)
