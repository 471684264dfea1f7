"""How fastbb's ops and modules look to torch.fx symbolic tracing and to TorchScript.

- torch.fx: a public op function called with traced values (torch.fx.Proxy arguments) is recorded as one
  call_function node of that function (:func:`fx_leaf`), as ``torch.fx.wrap`` records a wrapped function,
  but whichever module the call comes from. Its input checks and its kernels run when the traced module
  runs, so the graph holds the fused op, not its decomposition.
- TorchScript: fastbb's fused modules and public op functions run Python that TorchScript cannot compile
  (input checks, the choice of backend, module introspection). ``torch.jit.script`` of one raises an
  error that says so and what to use instead (:func:`not_scriptable`), rather than failing inside fastbb.
  The custom ops ``torch.ops.fastbb.*`` themselves can be called from scripted code, and so can the public
  functions whose op takes their arguments as they are (nms, batched_nms, fpn_merge, upsample_nearest_add):
  TorchScript compiles a version of each without the Python input checks.
"""
import functools

import torch

_INSTEAD = ("use torch.export.export(module, args) (or torch.compile), which keeps the fused ops; scripted code "
            "can call the custom ops torch.ops.fastbb.* directly")


class NotScriptableError(RuntimeError):
    """torch.jit.script of a fastbb module or public op function, which run Python TorchScript cannot compile."""


def not_scriptable_error(name: str, why: str = "it runs fastbb's fused kernels through Python (input checks, "
                                               "the choice of backend) that TorchScript cannot compile") -> Exception:
    return NotScriptableError(f"{name} is not scriptable (torch.jit.script): {why}; {_INSTEAD}")


def _proxy_in(values):
    """The first torch.fx.Proxy among values (or one level inside a list or tuple of them), else None."""
    for value in values:
        if isinstance(value, torch.fx.Proxy):
            return value
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.fx.Proxy):
                    return item
    return None


def traced(*values) -> bool:
    """Whether one of values is a torch.fx traced value (a Proxy): torch.fx is symbolically tracing, and its
    shape, dtype and contents are unknown until the traced module runs."""
    return _proxy_in(values) is not None


def fx_leaf(name: str, scripted=None):
    """Decorator of a public op function `name` (e.g. "fastbb.ops.nms"): a call with traced (Proxy)
    arguments becomes one call_function node of the function in the traced graph. Under torch.jit.script
    (of the function, or of code calling it) the function is `scripted`, a TorchScript-compatible version
    that calls the custom op without the Python input checks; without one, scripting raises
    NotScriptableError."""
    def decorate(fn):
        @functools.wraps(fn)
        def op(*args, **kwargs):
            # (A scan of the arguments: a microsecond or two. torch.fx's own is-tracing flag differs between
            # torch versions and warns when read in recent ones.)
            proxy = _proxy_in(args)
            if proxy is None and kwargs:
                proxy = _proxy_in(kwargs.values())
            if proxy is not None:
                return proxy.tracer.create_proxy("call_function", op, args, kwargs)
            return fn(*args, **kwargs)

        def prepare_scriptable():
            if scripted is None:
                raise not_scriptable_error(name)
            return scripted
        op.__prepare_scriptable__ = prepare_scriptable  # what torch.jit.script asks first, also when recursing
        return op
    return decorate


def not_scriptable(cls):
    """Class decorator of a fused module (or plain class): torch.jit.script of it, or of a model holding
    it, raises NotScriptableError naming the class."""
    package = ".".join(cls.__module__.split(".")[:2])  # fastbb.nn, fastbb.models

    def __prepare_scriptable__(klass):
        raise not_scriptable_error(f"{package}.{klass.__name__}")
    cls.__prepare_scriptable__ = classmethod(__prepare_scriptable__)
    return cls
