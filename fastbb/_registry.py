"""OpenMMLab-style config building: fastbb.build(dict(type='FPN', ...))."""
import inspect

_MODULES = {}


def register(name=None):
    """Class decorator: make the class buildable as dict(type=name or its class name, ...)."""
    def add(cls):
        key = name or cls.__name__
        if key in _MODULES and _MODULES[key] is not cls:
            raise KeyError(f"fastbb.register: type {key!r} is already registered to {_MODULES[key]!r}")
        _MODULES[key] = cls
        return cls
    return add


def registered():
    """The registered type names, sorted."""
    return sorted(_MODULES)


def build(cfg, **default_args):
    """Build the module that `cfg['type']` names, passing the other keys as constructor arguments."""
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
